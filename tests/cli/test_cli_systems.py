"""The `systems`, `energy` and `demo` commands, end to end through the CLI entry point."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from boltzflow.cli import main
from boltzflow.systems import available, load_system


def test_systems_table_lists_every_system(capsys):
    assert main(["systems"]) == 0
    out = capsys.readouterr().out
    for name in available():
        assert name in out
    many_well = next(line for line in out.splitlines() if line.startswith("many_well_32"))
    assert "yes" in many_well  # exact log Z
    aldp = next(line for line in out.splitlines() if line.startswith("aldp "))
    assert "300 K" in aldp


def test_energy_command_matches_library(tmp_path, capsys):
    system = load_system("dw4")
    x = torch.randn(16, system.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x[3] = float("nan")
    np.save(tmp_path / "x.npy", x.numpy())
    argv = ["energy", "dw4", str(tmp_path / "x.npy"), "-o", str(tmp_path / "u.npy")]
    # NaN coordinates are refused by default (one line, exit 2, no output) ...
    assert main(argv) == 2
    assert "1 of 16 rows contain NaN or inf" in capsys.readouterr().err
    assert not (tmp_path / "u.npy").exists()
    # ... and kept row-aligned with u = +inf when asked
    assert main([*argv, "--nan", "keep"]) == 0
    assert "non-finite: 1" in capsys.readouterr().out
    u = np.load(tmp_path / "u.npy")
    expected = system.energy(x).numpy()
    assert u.shape == (16,)
    assert np.isposinf(u[3])
    np.testing.assert_allclose(np.delete(u, 3), np.delete(expected, 3), rtol=1e-12)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["energy", "no_such_system", "{x}", "-o", "{out}"], "known systems"),
        (["energy", "lj13", "{x}", "-o", "{out}"], "has dim 39"),
        (["energy", "dw4", "{missing}", "-o", "{out}"], "missing.npy"),
        (["energy", "dw4", "{empty}", "-o", "{out}"], "no configurations (0 rows)"),
    ],
)
def test_energy_command_bad_input_is_one_line(tmp_path, capsys, args, message):
    np.save(tmp_path / "x.npy", np.zeros((4, 8)))
    np.save(tmp_path / "empty.npy", np.zeros((0, 8)))
    paths = {
        "x": tmp_path / "x.npy",
        "empty": tmp_path / "empty.npy",
        "out": tmp_path / "u.npy",
        "missing": tmp_path / "missing.npy",
    }
    assert main([a.format(**paths) for a in args]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert not (tmp_path / "u.npy").exists()
