"""Sample store integrity (issue #21): truncated or damaged files are errors, never zeros;
a writer that did not finish leaves a file marked partial; no 0-row file on failure."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from boltzflow.errors import InvalidFileError, PartialFileError
from boltzflow.io.samples import SampleWriter, read_samples


def _store(path, n=2000, batch=250, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim))
    log_q = rng.normal(size=n) - 5.0
    with SampleWriter(path, dim=dim, provenance={"seed": seed}, n_planned=n) as w:
        for i in range(0, n, batch):
            w.append(x[i : i + batch], log_q=log_q[i : i + batch], nfe=np.full(batch, 4))
    return x, log_q


def test_complete_store_round_trip_and_flags(tmp_path):
    path = tmp_path / "s.h5"
    x, log_q = _store(path)
    s = read_samples(path)
    assert s.complete and s.n_planned == 2000 and s.partial_note() == ""
    assert np.array_equal(s.x, x) and np.array_equal(s.log_q, log_q)
    part = read_samples(path, start=300, stop=777)  # crosses chunk boundaries
    assert np.array_equal(part.x, x[300:777]) and np.array_equal(part.log_q, log_q[300:777])
    assert read_samples(path, start=5, stop=5).n == 0


@pytest.mark.parametrize("keep", [20_000, 60_000, 100_000])
def test_truncated_file_is_an_error_not_zeros(tmp_path, keep):
    """`head -c 20000 samples.h5 > cut.h5` read as N = 2000 with zero rows before the fix."""
    path, cut = tmp_path / "s.h5", tmp_path / "cut.h5"
    _store(path)
    assert path.stat().st_size > keep
    cut.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(InvalidFileError, match=r"cut\.h5: .*(truncated|missing|damaged)"):
        read_samples(cut)


def test_flipped_data_byte_fails_the_chunk_checksum(tmp_path):
    path = tmp_path / "s.h5"
    x, _ = _store(path)
    raw = bytearray(path.read_bytes())
    needle = x[1000].tobytes()  # row 1000 lies in chunk 4 (rows 1000..1249)
    at = bytes(raw).find(needle)
    assert at > 0
    raw[at + 3] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(InvalidFileError, match=r"rows 1000\.\.1249 fail their checksum"):
        read_samples(path)
    # rows of intact chunks still read (only the chunks covering the range are checked)
    assert np.array_equal(read_samples(path, stop=1000).x, x[:1000])


def test_writer_interrupted_mid_run_leaves_a_partial_file(tmp_path):
    path = tmp_path / "s.h5"
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5000, 4))
    with pytest.raises(KeyboardInterrupt):
        with SampleWriter(path, dim=4, provenance={}, n_planned=5000) as w:
            for i in range(0, 5000, 250):
                if i == 1750:
                    raise KeyboardInterrupt
                w.append(x[i : i + 250], log_q=np.zeros(250))
    with pytest.raises(PartialFileError, match=r"1750 of 5000 planned rows.*--allow-partial"):
        read_samples(path)
    s = read_samples(path, allow_partial=True)
    assert not s.complete and s.n == 1750 and np.array_equal(s.x, x[:1750])
    assert s.partial_note() == "partial file: using 1750 of 5000 planned rows"


def test_failure_before_any_row_leaves_no_file(tmp_path):
    path = tmp_path / "s.h5"
    with pytest.raises(ValueError, match="bad settings"):
        with SampleWriter(path, dim=4, provenance={}):
            raise ValueError("bad settings")
    assert not path.exists()
    # nor does a failure after the file was created but before a row was written
    with pytest.raises(RuntimeError):
        with SampleWriter(path, dim=4, provenance={}) as w:
            w.append(np.zeros((0, 4)), log_q=np.zeros(0))
            raise RuntimeError("boom")
    assert not path.exists()
    # an existing file is not replaced by a failed writer
    _store(path, n=10, batch=10)
    with pytest.raises(ValueError):
        with SampleWriter(path, dim=8, provenance={}):
            raise ValueError("bad settings")
    assert read_samples(path).n == 10


def _v1_store(path, x, log_q, n_complete):
    """A store as written by format version 1 (no checksums, no completeness flag)."""
    with h5py.File(path, "w", libver="latest") as f:
        f.create_dataset("x", data=x, maxshape=(None, x.shape[1]), chunks=(100, x.shape[1]))
        f.create_dataset("log_q", data=log_q, maxshape=(None,), chunks=(100,))
        f.attrs.update(
            {
                "format": "boltzflow-samples",
                "format_version": 1,
                "dim": x.shape[1],
                "provenance": json.dumps({}),
                "columns": json.dumps(["log_q"]),
                "n_complete": n_complete,
            }
        )


def test_format_version_1_is_read_with_storage_checks(tmp_path):
    path = tmp_path / "v1.h5"
    x = np.arange(4000.0).reshape(1000, 4)
    _v1_store(path, x, np.ones(1000), 1000)
    s = read_samples(path)
    assert s.complete and s.n == 1000 and np.array_equal(s.x, x)
    cut = tmp_path / "cut.h5"
    cut.write_bytes(path.read_bytes()[:20_000])
    with pytest.raises(InvalidFileError, match=r"truncated|missing|damaged"):
        read_samples(cut)
    with pytest.raises(InvalidFileError, match="cannot be continued"):
        SampleWriter(path, dim=4, provenance={}, mode="a")


def test_declared_rows_beyond_the_data_are_an_error(tmp_path):
    path = tmp_path / "s.h5"
    _store(path, n=500, batch=250)
    with h5py.File(path, "r+") as f:
        f.attrs["n_complete"] = 750
    with pytest.raises(InvalidFileError, match="750 rows"):
        read_samples(path)


def test_not_a_store_and_garbage(tmp_path):
    for name, data in (("empty.h5", b""), ("junk.h5", b"\x89HDF\r\n\x1a\n" + b"\0" * 300)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InvalidFileError, match=name):
            read_samples(tmp_path / name)
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = np.zeros((3, 2))
    with pytest.raises(InvalidFileError, match="not a boltzflow sample store"):
        read_samples(tmp_path / "other.h5")
