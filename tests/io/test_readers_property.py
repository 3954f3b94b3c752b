"""Property tests for every file reader (issue #21, "nothing silently wrong").

Each reader is fed damaged versions of a valid file: truncations, byte flips (anywhere, and
concentrated on the metadata at the start and the end of the file), appended junk, random bytes,
empty files, and arrays of the wrong dtype or shape. It must either return exactly the original
arrays or raise :class:`~boltzflow.errors.InvalidFileError` (checkpoints: its subclass
``CheckpointError``) -- never a different array, never another exception type.

Exceptions to "exactly the original": ``.npy`` and TOML carry no checksum, so a flip inside the
``.npy`` data (or of the byte-order character) or inside a TOML value can give another valid file;
for them the property is the exception type only, plus exactness for truncations.

The examples are derandomized and bounded (see ``_SETTINGS``); the module runs in about 10-20 s
on one core.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from boltzflow.data import load_positions, read_dataset, write_dataset
from boltzflow.errors import InvalidFileError
from boltzflow.io.arrays import read_npy
from boltzflow.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from boltzflow.io.samples import SampleWriter, read_samples
from boltzflow.io.tomlfile import parse_toml, read_toml_file

_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_ROOT = Path(__file__).resolve().parents[2]


@functools.cache
def _workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="bf-readers-"))


# -- originals ------------------------------------------------------------------------------------
@functools.cache
def _sample_store() -> tuple[bytes, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    x, log_q, nfe = rng.normal(size=(300, 3)), rng.normal(size=300), np.arange(300)
    path = _workdir() / "orig_samples.h5"
    with SampleWriter(path, dim=3, provenance={"t": 1}, chunk_rows=64, n_planned=300) as w:
        for i in range(0, 300, 100):
            w.append(x[i : i + 100], log_q=log_q[i : i + 100], nfe=nfe[i : i + 100])
    return path.read_bytes(), {"x": x, "log_q": log_q, "nfe": nfe}


@functools.cache
def _dataset() -> tuple[bytes, dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    x, u = rng.normal(size=(120, 4)), rng.normal(size=120)
    prov = {"generator": "t", "settings": {}, "seed": 1, "system_parameters": {}}
    path = write_dataset(
        _workdir() / "orig_data.h5",
        x,
        system="dw4",
        provenance={**prov, "temperature": None},
        energies=u,
        extra={"chain": np.arange(120) % 7},
    )
    return path.read_bytes(), {"positions": x, "energies": u, "chain": np.arange(120) % 7}


@functools.cache
def _checkpoint() -> tuple[bytes, dict[str, torch.Tensor]]:
    w = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.tensor([1, 2, 3])}
    path = save_checkpoint(_workdir() / "orig.pt", {"kind": "test", **w})
    return path.read_bytes(), w


@functools.cache
def _npy() -> tuple[bytes, np.ndarray]:
    x = np.random.default_rng(2).normal(size=(40, 6))
    path = _workdir() / "orig.npy"
    np.save(path, x)
    return path.read_bytes(), x


# -- damage ---------------------------------------------------------------------------------------
def _positions(size: int) -> st.SearchStrategy[int]:
    """Anywhere, or within the first / last 4 KiB (HDF5 superblock, object headers, indices)."""
    return st.one_of(
        st.integers(0, size - 1),
        st.integers(0, min(size, 4096) - 1),
        st.integers(max(0, size - 4096), size - 1),
    )


def _damage(data: st.DataObject, raw: bytes) -> tuple[str, bytes, set[int]]:
    """A damaged copy of ``raw``: (kind, bytes, positions of flipped bytes)."""
    kind = data.draw(st.sampled_from(["truncate", "flip", "append", "garbage", "empty"]))
    if kind == "truncate":
        k = data.draw(_positions(len(raw)))
        return kind, raw[:k], set()
    if kind == "flip":
        out = bytearray(raw)
        flips = data.draw(
            st.lists(st.tuples(_positions(len(raw)), st.integers(1, 255)), min_size=1, max_size=3)
        )
        for at, mask in flips:
            out[at] ^= mask
        return kind, bytes(out), {at for at, _ in flips}
    if kind == "append":
        return kind, raw + data.draw(st.binary(min_size=1, max_size=64)), set()
    if kind == "garbage":
        return kind, data.draw(st.binary(min_size=1, max_size=600)), set()
    return kind, b"", set()


def _write(name: str, content: bytes) -> Path:
    path = _workdir() / name
    path.write_bytes(content)
    return path


def _same(a: np.ndarray | None, b: np.ndarray) -> bool:
    return a is not None and a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


# -- sample store ---------------------------------------------------------------------------------
@_SETTINGS
@given(data=st.data())
def test_sample_store_damage(data):
    raw, orig = _sample_store()
    kind, damaged, _ = _damage(data, raw)
    path = _write("samples.h5", damaged)
    try:
        s = read_samples(path)
    except InvalidFileError as err:
        assert str(path) in str(err)
        return
    assert _same(s.x, orig["x"]) and _same(s.log_q, orig["log_q"]), kind
    assert _same(s.columns["nfe"], orig["nfe"]), kind


_BAD_ARRAYS = hnp.arrays(
    dtype=st.sampled_from([np.float64, np.float32, np.int32, np.uint8, np.bool_]),
    shape=hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5),
)


@_SETTINGS
@given(key=st.sampled_from(["x", "log_q", "columns/nfe", "integrity/row_end"]), new=_BAD_ARRAYS)
def test_sample_store_wrong_dtype_or_shape(key, new):
    raw, _ = _sample_store()
    path = _write("samples_shape.h5", raw)
    with h5py.File(path, "r+") as f:
        del f[key]
        f.create_dataset(key, data=new)
    with pytest.raises(InvalidFileError):
        read_samples(path)


# -- datasets -------------------------------------------------------------------------------------
@_SETTINGS
@given(data=st.data())
def test_dataset_damage(data):
    raw, orig = _dataset()
    kind, damaged, _ = _damage(data, raw)
    path = _write("data.h5", damaged)
    try:
        ds = read_dataset(path)
        x = load_positions(path)
    except InvalidFileError as err:
        assert str(path) in str(err)
        return
    assert _same(ds.positions, orig["positions"]) and _same(x, orig["positions"]), kind
    assert _same(ds.energies, orig["energies"]) and _same(ds.extra["chain"], orig["chain"])


@_SETTINGS
@given(key=st.sampled_from(["positions", "energies", "chain"]), new=_BAD_ARRAYS)
def test_dataset_wrong_dtype_or_shape(key, new):
    raw, _ = _dataset()
    path = _write("data_shape.h5", raw)
    with h5py.File(path, "r+") as f:
        del f[key]
        f.create_dataset(key, data=new)
    with pytest.raises(InvalidFileError):
        read_dataset(path)


# -- checkpoints ----------------------------------------------------------------------------------
@_SETTINGS
@given(data=st.data())
def test_checkpoint_damage(data):
    raw, orig = _checkpoint()
    kind, damaged, _ = _damage(data, raw)
    path = _write("ckpt.pt", damaged)
    try:
        payload = load_checkpoint(path)
    except CheckpointError as err:
        assert str(path) in str(err)
        return
    for name, value in orig.items():
        assert torch.equal(payload[name], value) and payload[name].dtype == value.dtype, kind


# -- .npy -----------------------------------------------------------------------------------------
@_SETTINGS
@given(data=st.data())
def test_npy_damage(data):
    raw, orig = _npy()
    kind, damaged, flipped = _damage(data, raw)
    path = _write("x.npy", damaged)
    try:
        x = read_npy(path)
        y = load_positions(path)
    except InvalidFileError as err:
        assert str(path) in str(err)
        return
    header_end = raw.index(b"\n") + 1
    byte_order = raw.index(b"'<f8'") + 1
    undetectable = any(at >= header_end or at == byte_order for at in flipped)
    if not undetectable:  # .npy has no checksum: a flipped data byte is another valid file
        assert _same(x, orig) and _same(y, orig), kind


@_SETTINGS
@given(
    x=hnp.arrays(
        dtype=st.one_of(
            hnp.floating_dtypes(),
            hnp.integer_dtypes(),
            hnp.boolean_dtypes(),
            hnp.complex_number_dtypes(),
            hnp.unicode_string_dtypes(),
            hnp.datetime64_dtypes(),
        ),
        shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
    )
)
def test_npy_dtypes_and_shapes(x):
    """load_positions gives the exact (N, dim) array or InvalidFileError (NaN rows: ValueError)."""
    path = _workdir() / "any.npy"
    np.save(path, x)
    try:
        y = load_positions(path, nan="keep")
    except InvalidFileError as err:
        assert str(path) in str(err)
        assert x.ndim != 2 or x.dtype.kind not in "fiu"
        return
    assert x.ndim == 2 and x.dtype.kind in "fiu"
    expected = x if x.dtype.kind == "f" else x.astype(np.float64)
    assert y.dtype == expected.dtype and np.array_equal(y, expected, equal_nan=True)


def test_npy_object_and_empty(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "empty.npy").write_bytes(b"")
    for name in ("obj.npy", "empty.npy"):
        with pytest.raises(InvalidFileError, match=name):
            load_positions(tmp_path / name)


# -- TOML -----------------------------------------------------------------------------------------
@functools.cache
def _workflow_copy() -> tuple[bytes, Path]:
    """workflows/quickstart.toml with its configs, copied so that damaged copies resolve them."""
    dst = _workdir() / "wf"
    shutil.copytree(_ROOT / "workflows" / "configs", dst / "configs", dirs_exist_ok=True)
    return (_ROOT / "workflows" / "quickstart.toml").read_bytes(), dst


@settings(_SETTINGS, max_examples=40)
@given(data=st.data())
def test_toml_damage(data):
    from boltzflow.workflow.spec import load_workflow

    raw, folder = _workflow_copy()
    _, damaged, _ = _damage(data, raw)
    path = folder / "wf.toml"
    path.write_bytes(damaged)
    try:
        parsed = read_toml_file(path)
    except InvalidFileError as err:
        assert str(path) in str(err)
    else:  # TOML has no checksum: damage may give another valid document, but never junk types
        assert isinstance(parsed, dict)
        if damaged == raw:
            assert parsed == parse_toml(raw.decode())
    # the workflow loader: only its documented error types, each with a message
    try:
        load_workflow(path, output=_workdir() / "wf-out")
    except (ValueError, TypeError, KeyError, FileNotFoundError) as err:
        assert str(err)
