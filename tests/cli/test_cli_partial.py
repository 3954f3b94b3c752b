"""`reweight` / `estimate` on truncated and partial sample files (issue #21): a clear error
(exit 2) instead of estimates from zeros; `--allow-partial` uses and reports the complete rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from boltzflow.cli import main
from boltzflow.io.samples import SampleWriter


def _write(path, n_rows, n_planned, interrupt=False):
    rng = np.random.default_rng(0)
    x = rng.normal(scale=2.0, size=(n_rows, 8))
    log_q = -0.5 * (x**2 / 4).sum(1) - 4 * np.log(2 * np.pi * 4)
    try:
        with SampleWriter(path, dim=8, provenance={}, n_planned=n_planned) as w:
            for i in range(0, n_rows, 250):
                w.append(x[i : i + 250], log_q=log_q[i : i + 250])
            if interrupt:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass


def _reweight(path, out, *extra):
    return main(
        ["reweight", str(path), "--system", "dw4", "-o", str(out), "--n-bootstrap", "10", *extra]
    )


def test_truncated_file_is_refused(tmp_path, capsys):
    path, cut = tmp_path / "samples.h5", tmp_path / "cut.h5"
    _write(path, 2000, 2000)
    cut.write_bytes(path.read_bytes()[:20000])
    assert _reweight(cut, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "cut.h5" in err and "truncated" in err
    assert not (tmp_path / "out" / "report.json").exists()


def test_partial_file_needs_allow_partial(tmp_path, capsys):
    path = tmp_path / "samples.h5"
    _write(path, 1750, 5000, interrupt=True)
    assert _reweight(path, tmp_path / "out") == 2
    assert "partial file" in capsys.readouterr().err
    assert _reweight(path, tmp_path / "out", "--allow-partial") == 0
    assert "partial file: using 1750 of 5000 planned rows" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["results"]["weights"]["N"] == 1750

    spec = tmp_path / "spec.toml"
    spec.write_text('samples = "samples.h5"\nsystem = "dw4"\nmethod = "delta"\n')
    assert main(["estimate", str(spec)]) == 2
    assert "partial file" in capsys.readouterr().err
    assert main(["estimate", str(spec), "--allow-partial"]) == 0
    out = capsys.readouterr()
    assert "1750 of 5000" in out.err
    assert json.loads(out.out)["weights"]["N"] == 1750


@pytest.mark.parametrize("atomic", [True, False])
def test_write_draws_failing_on_settings_leaves_no_file(tmp_path, atomic):
    """`boltzflow sample` with bad settings used to leave a 0-row store."""
    from boltzflow.sampling.draw import write_draws

    def bad_draws():
        raise ValueError("steps must be positive")
        yield  # pragma: no cover

    path = tmp_path / "s.h5"
    with pytest.raises(ValueError, match="steps must be positive"):
        write_draws(path, bad_draws(), dim=8, provenance={}, atomic=atomic, n_planned=10)
    assert list(tmp_path.iterdir()) == []
