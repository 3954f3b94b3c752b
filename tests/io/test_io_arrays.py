"""``read_npy``: damaged ``.npy`` files are InvalidFileError naming the file (issue #21)."""

from __future__ import annotations

import numpy as np
import pytest

from boltzflow.data import load_positions
from boltzflow.errors import InvalidFileError
from boltzflow.io.arrays import read_npy


def _npy(tmp_path, x=None):
    path = tmp_path / "x.npy"
    np.save(path, np.arange(24.0).reshape(6, 4) if x is None else x)
    return path, path.read_bytes()


def test_exact_round_trip(tmp_path):
    path, _ = _npy(tmp_path)
    x = read_npy(path)
    assert x.dtype == np.float64 and np.array_equal(x, np.arange(24.0).reshape(6, 4))


def test_zero_byte_file(tmp_path):
    """Was an EOFError traceback."""
    (tmp_path / "e.npy").write_bytes(b"")
    with pytest.raises(InvalidFileError, match=r"e\.npy: empty file"):
        read_npy(tmp_path / "e.npy")
    with pytest.raises(InvalidFileError, match=r"e\.npy: empty file"):
        load_positions(tmp_path / "e.npy")


@pytest.mark.parametrize("cut", [5, 60, 127, 128, 200, -1])
def test_truncated(tmp_path, cut):
    path, raw = _npy(tmp_path)
    path.write_bytes(raw[:cut])
    with pytest.raises(InvalidFileError, match=r"x\.npy: "):
        read_npy(path)


def test_trailing_bytes_and_shrunk_shape_header(tmp_path):
    """NumPy ignores data past the header's shape: a damaged shape gives a wrong array."""
    path, raw = _npy(tmp_path)
    path.write_bytes(raw + b"\0" * 8)
    with pytest.raises(InvalidFileError, match="trailing bytes"):
        read_npy(path)
    path.write_bytes(raw.replace(b"(6, 4)", b"(5, 4)"))
    assert np.load(path).shape == (5, 4)  # what the plain loader does
    with pytest.raises(InvalidFileError, match="trailing bytes"):
        read_npy(path)


def test_garbage_object_and_text(tmp_path):
    (tmp_path / "g.npy").write_bytes(b"not an array at all" * 10)
    with pytest.raises(InvalidFileError, match=r"g\.npy: not a valid \.npy"):
        read_npy(tmp_path / "g.npy")
    np.save(tmp_path / "o.npy", np.array([None, 1], dtype=object), allow_pickle=True)
    with pytest.raises(InvalidFileError, match="never loaded"):
        read_npy(tmp_path / "o.npy")
    np.save(tmp_path / "s.npy", np.array(["a", "b"]))
    with pytest.raises(InvalidFileError, match="numeric"):
        read_npy(tmp_path / "s.npy")
    assert read_npy(tmp_path / "s.npy", numeric=False).tolist() == ["a", "b"]
    with pytest.raises(FileNotFoundError):
        read_npy(tmp_path / "missing.npy")
