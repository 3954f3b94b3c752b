"""HDF5 sample store, written in chunks so an interrupted run keeps every chunk it finished.

Layout of one file (format version 2):

* ``x``: ``(N, dim)`` positions (nm for molecules);
* ``log_q``, ``u``, ``log_w`` (each optional): ``(N,)`` float64 proposal log-density, reduced
  energy in kT and log weight;
* ``columns/<name>``: further ``(N,)`` numeric columns (e.g. ``nfe``, a chain index);
* ``integrity/row_end``, ``integrity/sha256``: for every appended chunk, its end row and the
  SHA-256 of its rows in every dataset (names, dtypes, shapes, row range, little-endian bytes);
* root attributes: ``format`` = "boltzflow-samples", ``format_version``, ``dim``,
  ``provenance`` (JSON), ``boltzflow_version``, ``created``, ``columns`` (JSON list),
  ``n_complete`` (the number of rows of whole chunks), ``n_planned`` (rows the writer was asked
  for, -1 if not said) and ``complete`` (0 until the writer finished successfully, then 1).

Crash safety: the file is created complete (empty datasets, attributes) in a temporary file and
renamed into place, then reopened in HDF5's single-writer/multiple-reader (SWMR) mode, which orders
metadata writes so the file on disk is always valid, also when the writer is killed
(https://docs.h5py.org/en/stable/swmr.html). Each :meth:`SampleWriter.append` grows the datasets,
writes the rows and the chunk's checksum, then updates ``n_complete`` and flushes, so a chunk cut
short by a kill is ignored. Unlike other boltzflow outputs this file is therefore written in
place, not by temporary file + rename; a file left by a killed writer opens with
:func:`read_samples` (it falls back to SWMR read mode) and can be continued with
``SampleWriter(path, ..., mode="a")``; other HDF5 tools may need ``h5clear -s`` first.

Nothing silently wrong: :func:`read_samples` checks that every declared row is stored inside the
file (a truncated file reads as an error, never as zeros) and matches its chunk checksum, and it
refuses a file whose writer did not finish (:class:`~boltzflow.errors.PartialFileError`) unless
``allow_partial=True``. Files of format version 1 (no checksums, no ``complete`` flag) are read
with the trust they had: ``n_complete`` rows, checked only for being stored inside the file.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

import boltzflow
from boltzflow.errors import InvalidFileError, PartialFileError
from boltzflow.io.atomic import atomic_path

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SampleSet",
    "SampleWriter",
    "read_samples",
    "recorded_provenance",
]

FORMAT_NAME = "boltzflow-samples"
FORMAT_VERSION = 2
_STANDARD = ("log_q", "u", "log_w")
_MODES = ("w", "x", "a")
_ENDS = "integrity/row_end"
_DIGESTS = "integrity/sha256"


def _to_numpy(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_)
    ):
        raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}")
    return arr


def recorded_provenance(provenance: Mapping[str, Any]) -> dict[str, Any]:
    """``provenance`` as a store records it (JSON round trip; non-JSON values as strings)."""
    return json.loads(json.dumps(dict(provenance), default=str))


def _key(name: str) -> str:
    return name if name in _STANDARD else f"columns/{name}"


def chunk_digest(start: int, end: int, arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of rows ``[start, end)``: names, dtypes, shapes and little-endian bytes."""
    digest = hashlib.sha256(f"rows {start}:{end}\n".encode())
    for name in sorted(arrays):
        a = np.asarray(arrays[name])
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        digest.update(f"{name}|{a.dtype.str}|{a.shape}\n".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _stored_eof(path: Path) -> int | None:
    """The end-of-file address in the HDF5 superblock (at offset 0), or None if unreadable."""
    with path.open("rb") as fh:
        head = fh.read(64)
    if len(head) < 48 or not head.startswith(_SIGNATURE):
        return None
    version = head[8]
    if version in (2, 3):  # sig, version, offset size, length size, flags, base, ext, eof
        size, at = head[9], 12 + 2 * head[9]
    elif version in (0, 1):  # ... flags (4), [v1: 4 bytes], base, free space, eof
        size = head[13]
        at = 24 + (4 if version == 1 else 0) + 2 * size
    else:
        return None
    if size != 8 or len(head) < at + 8:
        return None
    return int.from_bytes(head[at : at + 8], "little")


def _open_read(path: Path) -> h5py.File:
    """Open for reading; falls back to SWMR mode for a file whose SWMR writer was killed."""
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise
    except OSError as err:
        if not path.is_file():
            raise FileNotFoundError(f"sample file not found: {path}") from err
        if "consistency flags" not in str(err) and "already open" not in str(err):
            # only a killed SWMR writer's file needs SWMR read mode, which skips checks that
            # keep HDF5 from hanging on damaged files
            raise InvalidFileError(
                f"{path}: not a readable HDF5 sample file (truncated or damaged: {err})"
            ) from err
        stored, size = _stored_eof(path), path.stat().st_size
        if stored is not None and stored > size:
            # SWMR read mode skips HDF5's own end-of-file check (and can hang on such a file)
            raise InvalidFileError(
                f"{path}: truncated: the file is {size} bytes, its HDF5 superblock says {stored}"
            ) from err
        try:
            return h5py.File(path, "r", libver="latest", swmr=True)
        except OSError:
            raise InvalidFileError(
                f"{path}: not a readable HDF5 sample file (truncated or damaged: {err})"
            ) from err


class SampleWriter:
    """Append samples to an HDF5 store chunk by chunk (see the module docstring for the layout).

    Args:
        path: the ``.h5`` file.
        dim: number of coordinates per sample.
        provenance: JSON-serialisable description of where the samples come from (model,
            checkpoint, system, settings, seed, ...); non-JSON values are stored as strings.
        mode: ``"w"`` create or replace, ``"x"`` create and fail if the file exists, ``"a"``
            continue an existing store (created if absent; its ``dim`` must match and
            ``provenance`` is kept).
        position_dtype: storage dtype of ``x`` (``"float64"`` or ``"float32"``).
        chunk_rows: HDF5 chunk height (rows); independent of how many rows one append writes.
        n_planned: rows the caller means to write (stored; reported for a partial file).

    Example:
        >>> with SampleWriter("s.h5", dim=8, provenance={"model": "cnf"}) as w:  # doctest: +SKIP
        ...     w.append(x, log_q=log_q, nfe=nfe)

    The columns written by the first :meth:`append` (or found in an existing file) are fixed: every
    later append must give the same ones. The file is marked complete only by :meth:`close` (or
    leaving the ``with`` block without an exception); an exception or Ctrl-C leaves it marked
    partial with the rows of its completed chunks, and a file that got no row is removed.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        dim: int,
        provenance: Mapping[str, Any],
        mode: str = "w",
        position_dtype: str = "float64",
        chunk_rows: int = 4096,
        n_planned: int | None = None,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {list(_MODES)}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(provenance, Mapping):
            raise TypeError(f"provenance must be a dict, got {type(provenance).__name__}")
        if position_dtype not in ("float64", "float32"):
            raise ValueError(f"position_dtype must be float64 or float32, got {position_dtype!r}")
        if n_planned is not None and (int(n_planned) != n_planned or n_planned < 0):
            raise ValueError(f"n_planned must be a non-negative int or None, got {n_planned!r}")
        self.path = Path(path)
        self.dim = dim
        self.provenance = recorded_provenance(provenance)
        self.position_dtype = position_dtype
        self.chunk_rows = int(chunk_rows)
        self.n_planned = None if n_planned is None else int(n_planned)
        self._file: h5py.File | None = None
        self._columns: tuple[str, ...] | None = None
        self._n = 0
        self._n_chunks = 0
        self._created = False  # this writer created the file (removed again if it gets no row)
        self._closed = False
        if mode == "x" and self.path.exists():
            raise ValueError(f"{self.path} exists (mode 'x' never overwrites)")
        if mode == "a" and self.path.exists():
            self._resume()

    # -- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> SampleWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    @property
    def n_complete(self) -> int:
        """Rows written in complete chunks so far."""
        return self._n

    @property
    def columns(self) -> tuple[str, ...] | None:
        """Column names besides ``x`` (None before the first append)."""
        return self._columns

    def close(self) -> None:
        """Mark the store complete, flush and close; a store with no chunk is written empty."""
        if self._closed:
            return
        if self._file is None:
            self._create(())
        if self._file is not None:
            self._file.attrs["complete"] = 1
            self._file.flush()
            self._file.close()
            self._file = None
        self._closed = True

    def abort(self) -> None:
        """Close after a failure: the file stays marked partial with its completed chunks; a file
        this writer created that holds no row is removed (no 0-row file is left behind)."""
        if self._closed:
            return
        self._closed = True
        if self._file is not None:
            try:
                self._file.flush()
            finally:
                self._file.close()
                self._file = None
        if self._created and self._n == 0:
            self.path.unlink(missing_ok=True)

    # -- writing ---------------------------------------------------------------------------------
    def append(
        self,
        x: Any,
        log_q: Any = None,
        u: Any = None,
        log_w: Any = None,
        **extra: Any,
    ) -> int:
        """Append one chunk of rows and flush it to disk.

        Args:
            x: ``(n, dim)`` positions.
            log_q, u, log_w: optional ``(n,)`` columns (float64).
            **extra: further ``(n,)`` numeric columns (e.g. ``nfe=...``).

        Returns:
            The number of complete rows in the file afterwards.

        Raises:
            ValueError: wrong shapes, or columns different from the first chunk's.
        """
        if self._closed:
            raise ValueError(f"{self.path}: writer is closed")
        xs = _to_numpy(x, "x")
        if xs.ndim != 2 or xs.shape[1] != self.dim:
            raise ValueError(f"x must be (n, {self.dim}), got shape {xs.shape}")
        n = xs.shape[0]
        given = {"log_q": log_q, "u": u, "log_w": log_w, **extra}
        cols: dict[str, np.ndarray] = {}
        for name, value in given.items():
            if value is None:
                continue
            arr = _to_numpy(value, name)
            if arr.shape != (n,):
                raise ValueError(f"column {name!r} must have shape ({n},), got {arr.shape}")
            cols[name] = arr.astype(np.float64) if name in _STANDARD else arr
        names = tuple(sorted(cols))
        if self._columns is None:
            self._create(names, {k: v.dtype for k, v in cols.items()})
        elif names != self._columns:
            raise ValueError(
                f"columns {list(names)} differ from this store's columns {list(self._columns)}"
            )
        if n == 0:
            return self._n
        f = self._file
        new = self._n + n
        # Cast to the stored dtypes first, so that the checksum covers exactly what is stored.
        stored = {"x": xs.astype(f["x"].dtype, copy=False)}
        stored.update({_key(k): v.astype(f[_key(k)].dtype, copy=False) for k, v in cols.items()})
        for key, data in stored.items():
            ds = f[key]
            ds.resize(new, axis=0)
            ds[self._n : new] = data
        digest = chunk_digest(self._n, new, stored)
        k = self._n_chunks + 1
        for key, value in ((_ENDS, new), (_DIGESTS, digest.encode("ascii"))):
            f[key].resize(k, axis=0)
            f[key][k - 1] = value
        f.attrs["n_complete"] = new
        f.flush()
        self._n, self._n_chunks = new, k
        return new

    # -- internals -------------------------------------------------------------------------------
    def _create(self, names: tuple[str, ...], dtypes: Mapping[str, np.dtype] | None = None) -> None:
        """Write a complete empty store to a temp file, rename it into place, reopen in SWMR."""
        dtypes = dtypes or {}
        for name in names:
            if name in ("x", "columns", "integrity") or "/" in name:
                raise ValueError(f"invalid column name {name!r}")
        rows = max(1, min(self.chunk_rows, 1 << 20))
        with atomic_path(self.path, suffix=".h5") as tmp:
            with h5py.File(tmp, "w", libver="latest") as f:
                f.create_dataset(
                    "x",
                    shape=(0, self.dim),
                    maxshape=(None, self.dim),
                    chunks=(rows, self.dim),
                    dtype=self.position_dtype,
                )
                for name in names:
                    dtype = np.float64 if name in _STANDARD else dtypes[name]
                    f.create_dataset(
                        _key(name), shape=(0,), maxshape=(None,), chunks=(rows,), dtype=dtype
                    )
                for key, dtype in ((_ENDS, np.int64), (_DIGESTS, "S64")):
                    f.create_dataset(key, shape=(0,), maxshape=(None,), chunks=(256,), dtype=dtype)
                f.attrs.update(
                    {
                        "format": FORMAT_NAME,
                        "format_version": FORMAT_VERSION,
                        "dim": self.dim,
                        "provenance": json.dumps(self.provenance),
                        "boltzflow_version": boltzflow.__version__,
                        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                        "columns": json.dumps(list(names)),
                        "n_complete": 0,
                        "n_planned": -1 if self.n_planned is None else self.n_planned,
                        "complete": 0,
                    }
                )
        self._columns = names
        self._created = True
        self._open_swmr()

    def _open_swmr(self) -> None:
        self._file = h5py.File(self.path, "r+", libver="latest")
        self._file.swmr_mode = True

    def _resume(self) -> None:
        """Continue an existing store: verify it, drop rows past n_complete, reopen for append."""
        old = read_samples(self.path, allow_partial=True)
        if int(old.attrs["format_version"]) < FORMAT_VERSION:
            raise InvalidFileError(
                f"{self.path}: format version {old.attrs['format_version']} (no chunk "
                "checksums) cannot be continued; write a new store"
            )
        if old.dim != self.dim:
            raise ValueError(f"{self.path}: stored dim {old.dim} != {self.dim}")
        self.provenance = old.provenance
        self._columns = tuple(old.attrs["columns"])
        self._n = old.n
        if self.n_planned is None and old.n_planned is not None:
            self.n_planned = old.n_planned
        try:
            self._open_swmr()
        except OSError:
            # A killed SWMR writer leaves the file marked open; rewrite a clean copy first.
            self._rewrite_clean()
            self._open_swmr()
        f = self._file
        ends = f[_ENDS][:]
        self._n_chunks = int(np.searchsorted(ends, self._n, side="right"))
        for key in ("x", *(_key(k) for k in self._columns)):
            f[key].resize(self._n, axis=0)
        for key in (_ENDS, _DIGESTS):
            f[key].resize(self._n_chunks, axis=0)
        f.attrs["complete"] = 0  # partial again until this writer closes
        f.flush()

    def _rewrite_clean(self) -> None:
        """Copy the complete rows and attributes into a fresh file that replaces this one."""
        with atomic_path(self.path, suffix=".h5") as tmp:
            with _open_read(self.path) as src, h5py.File(tmp, "w", libver="latest") as dst:
                for key, value in src.attrs.items():
                    dst.attrs[key] = value
                ends = src[_ENDS][:]
                k = int(np.searchsorted(ends, self._n, side="right"))
                keys = [("x", self._n), *((_key(c), self._n) for c in self._columns)]
                for key, rows in (*keys, (_ENDS, k), (_DIGESTS, k)):
                    ds = src[key]
                    dst.create_dataset(
                        key,
                        data=ds[:rows],
                        maxshape=(None, *ds.shape[1:]),
                        chunks=ds.chunks,
                        dtype=ds.dtype,
                    )


@dataclass(frozen=True)
class SampleSet:
    """A sample store read by :func:`read_samples`.

    Attributes:
        x: ``(N, dim)`` positions as stored.
        log_q, u, log_w: ``(N,)`` float64 columns, or None where the store has none.
        columns: further ``(N,)`` columns by name.
        provenance: the writer's provenance dict.
        attrs: the root attributes (JSON ones decoded).
        path: the file.
        complete: False for a file whose writer did not finish (read with ``allow_partial``).
        n_planned: rows the writer was asked for, None if not recorded.
    """

    x: np.ndarray
    log_q: np.ndarray | None
    u: np.ndarray | None
    log_w: np.ndarray | None
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    complete: bool = True
    n_planned: int | None = None

    @property
    def n(self) -> int:
        """Number of rows N."""
        return int(self.x.shape[0])

    @property
    def dim(self) -> int:
        """Coordinates per row."""
        return int(self.x.shape[1])

    def __len__(self) -> int:
        return self.n

    def partial_note(self) -> str:
        """``"partial file: using N of M planned rows"`` (empty for a complete file)."""
        if self.complete:
            return ""
        planned = "an unknown number of" if self.n_planned is None else str(self.n_planned)
        return f"partial file: using {self.n} of {planned} planned rows"


def _int_attr(attrs: Mapping[str, Any], key: str, path: Path) -> int:
    value = attrs.get(key)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InvalidFileError(f"{path}: attribute {key!r} missing or not an integer: {value!r}")
    return int(value)


def _check_storage(ds: h5py.Dataset, n: int, size: int, path: Path) -> None:
    """Every chunk holding one of the first ``n`` rows must be allocated inside the file."""
    if n == 0:
        return
    if ds.chunks is None:
        raise InvalidFileError(f"{path}: dataset {ds.name!r} is not chunked as written")
    rows = ds.chunks[0]
    present = set()
    for i in range(ds.id.get_num_chunks()):
        info = ds.id.get_chunk_info(i)
        first = int(info.chunk_offset[0])
        if first < n and info.byte_offset + info.size > size:
            raise InvalidFileError(
                f"{path}: truncated: rows {first}..{min(first + rows, n) - 1} of {ds.name!r} "
                f"lie past the end of the file ({size} bytes)"
            )
        present.add(first)
    missing = [r for r in range(0, n, rows) if r not in present]
    if missing:
        raise InvalidFileError(
            f"{path}: rows {missing[0]}..{min(missing[0] + rows, n) - 1} of {ds.name!r} are "
            f"missing from the file ({len(missing)} of {-(-n // rows)} chunks absent)"
        )


def read_samples(
    path: str | os.PathLike[str],
    *,
    start: int = 0,
    stop: int | None = None,
    allow_partial: bool = False,
) -> SampleSet:
    """Read rows ``[start, stop)`` of the complete chunks of a sample store, verified.

    Every declared row must be stored inside the file and (format 2) match its chunk's
    checksum. Rows past the ``n_complete`` attribute (a chunk cut short by a killed writer) are
    ignored.

    Args:
        path: the ``.h5`` file.
        start, stop: row range (clipped to the complete rows).
        allow_partial: read a file whose writer did not finish (its completed chunks);
            ``SampleSet.complete`` is then False.

    Raises:
        FileNotFoundError: no such file.
        PartialFileError: the writer did not finish and ``allow_partial`` is False.
        InvalidFileError: not a boltzflow sample store, truncated or damaged (the message names
            what is missing or wrong).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sample file not found: {path}")
    try:
        with _open_read(path) as f:
            return _read(f, path, start, stop, allow_partial)
    except (InvalidFileError, FileNotFoundError):
        raise
    except Exception as err:  # h5py/HDF5 errors on damaged files: OSError, KeyError, ...
        raise InvalidFileError(
            f"{path}: damaged sample file ({type(err).__name__}: {err})"
        ) from err


def _read(f: h5py.File, path: Path, start: int, stop: int | None, allow_partial: bool) -> SampleSet:
    attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    if attrs.get("format") != FORMAT_NAME:
        raise InvalidFileError(f"{path}: not a boltzflow sample store (format attribute missing)")
    version = _int_attr(attrs, "format_version", path)
    if not 1 <= version <= FORMAT_VERSION:
        raise InvalidFileError(
            f"{path}: sample store format version {version} is not readable by this boltzflow "
            f"(reads versions 1 to {FORMAT_VERSION})"
        )
    n = _int_attr(attrs, "n_complete", path)
    dim = _int_attr(attrs, "dim", path)
    for key in ("provenance", "columns"):
        try:
            attrs[key] = json.loads(attrs[key])
        except (KeyError, TypeError, ValueError) as err:
            raise InvalidFileError(f"{path}: attribute {key!r} missing or not JSON") from err
    names = attrs["columns"]
    if not isinstance(names, list) or not all(isinstance(c, str) for c in names):
        raise InvalidFileError(f"{path}: attribute 'columns' is not a list of names")
    if not isinstance(attrs["provenance"], dict):
        raise InvalidFileError(f"{path}: attribute 'provenance' is not a JSON object")
    complete, n_planned = True, None
    if version >= 2:
        flag = _int_attr(attrs, "complete", path)
        if flag not in (0, 1):
            raise InvalidFileError(f"{path}: attribute 'complete' is {flag}, not 0 or 1")
        complete = flag == 1
        planned = _int_attr(attrs, "n_planned", path)
        n_planned = None if planned == -1 else planned
    if n < 0 or dim < 1 or (n_planned is not None and n_planned < 0):
        raise InvalidFileError(f"{path}: impossible row count {n} or dim {dim}")
    if not complete and not allow_partial:
        planned_text = "an unknown number of" if n_planned is None else str(n_planned)
        raise PartialFileError(
            f"{path}: partial file: its writer did not finish (interrupted or failed); "
            f"{n} of {planned_text} planned rows are complete. Pass allow_partial=True "
            "(CLI: --allow-partial) to use them"
        )
    size = path.stat().st_size
    keys = {"x": "x", **{name: _key(name) for name in names}}
    for name, key in keys.items():
        ds = f.get(key)
        if not isinstance(ds, h5py.Dataset):
            raise InvalidFileError(f"{path}: dataset {key!r} is missing")
        want = (dim,) if name == "x" else ()
        if ds.ndim != 1 + len(want) or ds.shape[1:] != want or ds.shape[0] < n:
            raise InvalidFileError(
                f"{path}: dataset {key!r} has shape {ds.shape}; {n} rows"
                + (f" of {dim} coordinates" if want else "")
                + " are declared"
            )
        if ds.dtype.kind not in "fiub":
            raise InvalidFileError(f"{path}: dataset {key!r} has non-numeric dtype {ds.dtype}")
        _check_storage(ds, n, size, path)
    lo = min(max(0, start), n)
    hi = n if stop is None else min(max(lo, stop), n)
    if version >= 2:
        ends = _verified_ends(f, path, n, complete)
        # read whole chunks around [lo, hi) so that each one can be checked
        i0 = int(np.searchsorted(ends, lo, side="right"))
        i1 = int(np.searchsorted(ends, hi, side="left")) + 1 if hi > lo else i0
        first = 0 if i0 == 0 else int(ends[i0 - 1])
        last = first if hi <= lo else int(ends[i1 - 1])
        data = {key: f[key][first:last] for key in keys.values()}
        digests = f[_DIGESTS]
        begin = first
        for i in range(i0, i1 if hi > lo else i0):
            end = int(ends[i])
            rows = {key: arr[begin - first : end - first] for key, arr in data.items()}
            stored = digests[i]
            if chunk_digest(begin, end, rows).encode("ascii") != bytes(stored):
                raise InvalidFileError(
                    f"{path}: rows {begin}..{end - 1} fail their checksum (chunk {i}): file damaged"
                )
            begin = end
        data = {key: arr[lo - first : hi - first] for key, arr in data.items()}
    else:
        data = {key: f[key][lo:hi] for key in keys.values()}
    cols = {name: data[key] for name, key in keys.items()}
    x = cols.pop("x")
    return SampleSet(
        x=x,
        log_q=cols.pop("log_q", None),
        u=cols.pop("u", None),
        log_w=cols.pop("log_w", None),
        columns=cols,
        provenance=attrs["provenance"],
        attrs=attrs,
        path=path,
        complete=complete,
        n_planned=n_planned,
    )


def _verified_ends(f: h5py.File, path: Path, n: int, complete: bool) -> np.ndarray:
    """Chunk end rows covering exactly ``[0, n)``, increasing. A finished writer left no
    checksum past ``n``; a killed one at most that of the chunk it was writing."""
    ends_ds, digests = f.get(_ENDS), f.get(_DIGESTS)
    if not isinstance(ends_ds, h5py.Dataset) or not isinstance(digests, h5py.Dataset):
        raise InvalidFileError(f"{path}: the chunk checksums (group 'integrity') are missing")
    if ends_ds.ndim != 1 or digests.shape != ends_ds.shape or ends_ds.dtype.kind not in "iu":
        raise InvalidFileError(f"{path}: the chunk checksum table is damaged")
    ends = ends_ds[:].astype(np.int64)
    k = int(np.searchsorted(ends, n, side="right")) if len(ends) else 0
    if len(ends) - k > (0 if complete else 1):
        raise InvalidFileError(
            f"{path}: {n} rows are declared but the chunk checksums cover {int(ends[-1])}: "
            "file damaged"
        )
    ends = ends[:k]
    if (len(ends) and (ends[0] <= 0 or np.any(np.diff(ends) <= 0))) or (
        (int(ends[-1]) if len(ends) else 0) != n
    ):
        covered = int(ends[-1]) if len(ends) else 0
        raise InvalidFileError(
            f"{path}: {n} rows are declared but the chunk checksums cover {covered}: file damaged"
        )
    return ends
