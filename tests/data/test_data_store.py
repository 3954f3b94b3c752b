"""HDF5 dataset store: roundtrip, provenance, checksum, corrupt files, atomic writes, loading."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

import boltzflow
from boltzflow.data import Dataset, load_positions, read_dataset, write_dataset
from boltzflow.data.store import FORMAT_VERSION, content_checksum

PROVENANCE = {
    "generator": "test",
    "settings": {"stride": 3, "kernel": "mala"},
    "seed": 7,
    "system_parameters": {"a": 0.0, "b": -4.0},
    "temperature": 300.0,
    "statistics": {"acceptance": [0.57]},
}


def _data(n: int = 50, dim: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, dim)), rng.standard_normal(n)


def test_roundtrip_positions_energies_extra_and_attrs(tmp_path: Path) -> None:
    x, u = _data()
    chain = np.arange(50) % 5
    path = write_dataset(
        tmp_path / "sub" / "d.h5",
        x,
        system="dw4",
        provenance=PROVENANCE,
        energies=u,
        extra={"chain": chain},
    )
    ds = read_dataset(path)
    assert isinstance(ds, Dataset) and ds.path == path and len(ds) == 50 and ds.dim == 8
    np.testing.assert_array_equal(ds.positions, x)
    np.testing.assert_array_equal(ds.energies, u)
    np.testing.assert_array_equal(ds.extra["chain"], chain)
    a = ds.attrs
    assert a["system"] == "dw4"
    assert a["system_parameters"] == {"a": 0.0, "b": -4.0}
    assert a["temperature"] == 300.0
    assert a["generator"] == "test"
    assert a["generator_settings"] == {"stride": 3, "kernel": "mala"}
    assert a["seed"] == 7
    assert a["boltzflow_version"] == boltzflow.__version__
    assert a["format_version"] == FORMAT_VERSION
    assert a["created"].endswith("+00:00")
    assert a["provenance"]["statistics"] == {"acceptance": [0.57]}
    assert a["complete"] == 1 and a["n_planned"] == 50 and ds.complete and ds.n_planned == 50
    # format 2: the checksum covers the arrays and the completeness attributes
    done = np.array([1, 50], dtype=np.int64)
    arrays = {"positions": x, "energies": u, "chain": chain, "__completeness__": done}
    assert a["checksum_sha256"] == content_checksum(arrays)
    assert len(a["checksum_sha256"]) == 64


def test_float32_kept_and_none_temperature_and_seed(tmp_path: Path) -> None:
    x, _ = _data()
    prov = {**PROVENANCE, "temperature": None, "seed": None}
    path = write_dataset(tmp_path / "d.h5", x.astype(np.float32), system="toy", provenance=prov)
    ds = read_dataset(path)
    assert ds.positions.dtype == np.float32 and ds.energies is None
    assert ds.attrs["temperature"] is None and ds.attrs["seed"] is None


def test_checksum_detects_one_changed_value(tmp_path: Path) -> None:
    x, u = _data()
    path = write_dataset(tmp_path / "d.h5", x, system="dw4", provenance=PROVENANCE, energies=u)
    with h5py.File(path, "r+") as fh:
        fh["positions"][3, 2] = fh["positions"][3, 2] + 1e-9
    with pytest.raises(ValueError, match=r"checksum mismatch.*modified or corrupt"):
        read_dataset(path)
    assert read_dataset(path, verify=False).positions.shape == (50, 8)
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_positions(path)  # boltzflow datasets are verified on load too


def test_checksum_detects_changed_energy(tmp_path: Path) -> None:
    x, u = _data()
    path = write_dataset(tmp_path / "d.h5", x, system="dw4", provenance=PROVENANCE, energies=u)
    with h5py.File(path, "r+") as fh:
        fh["energies"][0] = 0.0
    with pytest.raises(ValueError, match="checksum mismatch"):
        read_dataset(path)


def test_truncated_and_random_files_give_clear_errors(tmp_path: Path) -> None:
    x, u = _data(2000)
    good = write_dataset(tmp_path / "d.h5", x, system="dw4", provenance=PROVENANCE, energies=u)
    raw = good.read_bytes()
    half = tmp_path / "half.h5"
    half.write_bytes(raw[: len(raw) // 2])
    noise = tmp_path / "noise.h5"
    noise.write_bytes(np.random.default_rng(1).bytes(4096))
    for bad in (half, noise):
        with pytest.raises(ValueError, match="not an HDF5 file / corrupt"):
            read_dataset(bad)
        with pytest.raises(ValueError, match="not an HDF5 file / corrupt"):
            load_positions(bad)


def test_missing_file_and_missing_attributes(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.h5"):
        read_dataset(tmp_path / "nope.h5")
    with pytest.raises(FileNotFoundError, match=r"nope\.npy"):
        load_positions(tmp_path / "nope.npy")
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as fh:
        fh["positions"] = np.zeros((3, 2))
    with pytest.raises(ValueError, match=r"not a boltzflow dataset: missing .*format"):
        read_dataset(plain)


def test_write_rejects_bad_input(tmp_path: Path) -> None:
    x, u = _data()
    with pytest.raises(ValueError, match="missing keys"):
        write_dataset(tmp_path / "d.h5", x, system="dw4", provenance={"generator": "g"})
    with pytest.raises(ValueError, match="2-D"):
        write_dataset(tmp_path / "d.h5", x[0], system="dw4", provenance=PROVENANCE)
    with pytest.raises(ValueError, match="rows"):
        write_dataset(tmp_path / "d.h5", x, system="dw4", provenance=PROVENANCE, energies=u[:3])
    bad = x.copy()
    bad[4, 0] = np.nan
    with pytest.raises(ValueError, match="1 of 50 rows are not finite"):
        write_dataset(tmp_path / "d.h5", bad, system="dw4", provenance=PROVENANCE)
    with pytest.raises(ValueError, match="reserved"):
        write_dataset(
            tmp_path / "d.h5", x, system="dw4", provenance=PROVENANCE, extra={"energies": u}
        )
    with pytest.raises(TypeError, match="JSON"):
        write_dataset(
            tmp_path / "d.h5",
            x,
            system="dw4",
            provenance={**PROVENANCE, "settings": {"f": object()}},
        )
    assert list(tmp_path.iterdir()) == []


def test_write_is_atomic(tmp_path: Path) -> None:
    x, u = _data()
    target = write_dataset(tmp_path / "d.h5", x, system="dw4", provenance=PROVENANCE, energies=u)
    before = target.read_bytes()
    # An object array passes validation but fails inside h5py, after the temporary file exists.
    with pytest.raises(TypeError):
        write_dataset(
            target,
            x + 1,
            system="dw4",
            provenance=PROVENANCE,
            extra={"bad": np.array([object(), object()], dtype=object)},
        )
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.h5"]  # no stray temporary file
    np.testing.assert_array_equal(read_dataset(target).positions, x)


def test_load_positions_npy_and_hdf5(tmp_path: Path) -> None:
    x, u = _data()
    np.save(tmp_path / "x.npy", x)
    np.testing.assert_array_equal(load_positions(tmp_path / "x.npy"), x)
    ours = write_dataset(tmp_path / "d.h5", x, system="dw4", provenance=PROVENANCE, energies=u)
    np.testing.assert_array_equal(load_positions(ours), x)
    plain = tmp_path / "plain.hdf5"
    with h5py.File(plain, "w") as fh:
        fh["positions"] = x
        fh["grp/other"] = x[:5].astype(np.float32)
    np.testing.assert_array_equal(load_positions(plain), x)
    assert load_positions(plain, "grp/other").dtype == np.float32
    with pytest.raises(ValueError, match=r"no dataset 'missing'.*grp/other"):
        load_positions(plain, "missing")
    with pytest.raises(ValueError, match="only meaningful for HDF5"):
        load_positions(tmp_path / "x.npy", "positions")
    np.save(tmp_path / "i.npy", np.arange(12).reshape(3, 4))
    assert load_positions(tmp_path / "i.npy").dtype == np.float64


def test_load_positions_errors_and_nan_rows(tmp_path: Path) -> None:
    x, _ = _data()
    (tmp_path / "x.txt").write_text("1 2 3\n")
    with pytest.raises(ValueError, match=r"unknown file type '\.txt'"):
        load_positions(tmp_path / "x.txt")
    np.save(tmp_path / "three.npy", x.reshape(50, 4, 2))
    with pytest.raises(ValueError, match=r"2-D array \(N, dim\), got shape \(50, 4, 2\)"):
        load_positions(tmp_path / "three.npy")
    bad = x.copy()
    bad[[1, 7, 9], 3] = np.nan
    bad[11, 0] = np.inf
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(ValueError, match="4 of 50 rows contain NaN or inf"):
        load_positions(tmp_path / "nan.npy")
    kept = load_positions(tmp_path / "nan.npy", nan="drop")
    assert kept.shape == (46, 8) and np.isfinite(kept).all()
    with pytest.raises(ValueError, match="nan must be"):
        load_positions(tmp_path / "nan.npy", nan="ignore")
    np.save(tmp_path / "obj.npy", np.array([object()]), allow_pickle=True)
    with pytest.raises(ValueError, match="dtype object"):
        load_positions(tmp_path / "obj.npy")


def test_load_positions_with_system_checks_dim_and_removes_mean(tmp_path: Path) -> None:
    x, _ = _data(dim=8)
    np.save(tmp_path / "x.npy", x + 3.0)
    out = load_positions(tmp_path / "x.npy", system="dw4")  # dw4: 4 particles in 2-D, mean-free
    p = out.reshape(-1, 4, 2)
    np.testing.assert_allclose(p.mean(axis=1), 0.0, atol=1e-12)
    ref = (x + 3.0).reshape(-1, 4, 2)
    np.testing.assert_allclose(p, ref - ref.mean(axis=1, keepdims=True), atol=1e-12)
    with pytest.raises(ValueError, match="dim 39, but the array has 8 columns"):
        load_positions(tmp_path / "x.npy", system="lj13")


def test_info_attribute_json_is_sorted_and_parseable(tmp_path: Path) -> None:
    x, _ = _data()
    path = write_dataset(tmp_path / "d.h5", x, system="dw4", provenance=PROVENANCE)
    with h5py.File(path, "r") as fh:
        raw = fh.attrs["generator_settings"]
    assert json.loads(raw) == PROVENANCE["settings"]
