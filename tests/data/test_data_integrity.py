"""Dataset integrity (issue #21): an interrupted generation is marked partial, refused by readers
and flagged by `data info`; damaged or truncated files raise InvalidFileError."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

import boltzflow.data
from boltzflow.cli import main
from boltzflow.data import load_positions, read_dataset, write_dataset
from boltzflow.data.store import content_checksum
from boltzflow.errors import InvalidFileError, PartialFileError

PROV = {
    "generator": "boltzflow.data.md:run_md",
    "settings": {"stride": 500},
    "seed": 0,
    "system_parameters": {},
    "temperature": 300.0,
}


def _frames(n, dim=66, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)), rng.normal(size=n)


def _interrupted_prov(n_requested=2000):
    return {**PROV, "n_requested": n_requested, "statistics": {"interrupted": True}}


def test_interrupted_generation_is_partial_and_refused(tmp_path):
    x, u = _frames(231)
    path = write_dataset(
        tmp_path / "md.h5", x, system="aldp", provenance=_interrupted_prov(), energies=u
    )
    with pytest.raises(PartialFileError, match=r"231 of 2000 planned samples"):
        read_dataset(path)
    with pytest.raises(PartialFileError):  # workflows load through load_positions / read_dataset
        load_positions(path)
    ds = read_dataset(path, allow_partial=True)
    assert not ds.complete and ds.n_planned == 2000 and len(ds) == 231
    np.testing.assert_array_equal(ds.positions, x)


def test_complete_flag_is_covered_by_the_checksum(tmp_path):
    x, u = _frames(20)
    path = write_dataset(
        tmp_path / "md.h5", x, system="aldp", provenance=_interrupted_prov(), energies=u
    )
    with h5py.File(path, "r+") as fh:
        fh.attrs["complete"] = 1  # pretend it finished
    with pytest.raises(InvalidFileError, match="checksum mismatch"):
        read_dataset(path)


def test_format_1_interrupted_file_is_flagged(tmp_path):
    """A file written before the flag existed: its provenance says it was interrupted."""
    x, u = _frames(231)
    path = tmp_path / "old.h5"
    prov = _interrupted_prov()
    with h5py.File(path, "w") as fh:
        fh["positions"], fh["energies"] = x, u
        fh.attrs.update(
            {
                "format": "boltzflow-dataset",
                "format_version": 1,
                "system": "aldp",
                "system_parameters": "{}",
                "temperature": 300.0,
                "generator": PROV["generator"],
                "generator_settings": "{}",
                "seed": 0,
                "boltzflow_version": "0",
                "created": "2026-01-01T00:00:00+00:00",
                "provenance": json.dumps(prov),
                "checksum_sha256": content_checksum({"positions": x, "energies": u}),
            }
        )
    with pytest.raises(PartialFileError, match="231 of an unknown number of planned"):
        read_dataset(path)
    assert read_dataset(path, allow_partial=True).n_planned is None
    prov["statistics"]["interrupted"] = False  # a complete format 1 file reads as before
    with h5py.File(path, "r+") as fh:
        fh.attrs["provenance"] = json.dumps(prov)
    assert read_dataset(path).complete


def test_data_generate_interrupted_then_info_says_partial(tmp_path, monkeypatch, capsys):
    x, u = _frames(231, dim=8)

    def fake_generate(system, n, **kwargs):
        assert n == 2000
        return x, u, {**_interrupted_prov(n), "method": "md"}

    monkeypatch.setattr(boltzflow.data, "generate", fake_generate)
    out = tmp_path / "d.h5"
    assert main(["data", "generate", "dw4", "-n", "2000", "-o", str(out)]) == 130
    assert "kept 231 of 2000" in capsys.readouterr().out
    assert main(["data", "info", str(out)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "PARTIAL: 231 of 2000 planned samples" in first


def test_data_info_complete_first_line(tmp_path, capsys):
    x, u = _frames(10, dim=8)
    path = write_dataset(tmp_path / "d.h5", x, system="dw4", provenance=PROV, energies=u)
    assert main(["data", "info", str(path)]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("; complete")


@pytest.mark.parametrize("keep", [0, 100, 2000, -200])
def test_truncated_dataset_is_invalid(tmp_path, keep):
    x, u = _frames(100, dim=8)
    path = write_dataset(tmp_path / "d.h5", x, system="dw4", provenance=PROV, energies=u)
    raw = path.read_bytes()
    cut = tmp_path / "cut.h5"
    cut.write_bytes(raw[:keep])
    with pytest.raises(InvalidFileError, match=r"cut\.h5"):
        read_dataset(cut)
    with pytest.raises(InvalidFileError, match=r"cut\.h5"):
        load_positions(cut)
