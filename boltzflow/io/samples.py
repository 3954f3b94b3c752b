"""HDF5 sample store, written in chunks so an interrupted run keeps every chunk it finished.

Layout of one file:

* ``x``: ``(N, dim)`` positions (nm for molecules);
* ``log_q``, ``u``, ``log_w`` (each optional): ``(N,)`` float64 proposal log-density, reduced
  energy in kT and log weight;
* ``columns/<name>``: further ``(N,)`` numeric columns (e.g. ``nfe``, a chain index);
* root attributes: ``format`` = "boltzflow-samples", ``format_version``, ``dim``,
  ``provenance`` (JSON), ``boltzflow_version``, ``created``, ``columns`` (JSON list) and
  ``n_complete``, the number of rows of whole chunks.

Crash safety: the file is created complete (empty datasets, attributes) in a temporary file and
renamed into place, then reopened in HDF5's single-writer/multiple-reader (SWMR) mode, which orders
metadata writes so the file on disk is always valid, also when the writer is killed
(https://docs.h5py.org/en/stable/swmr.html). Each :meth:`SampleWriter.append` grows the datasets,
writes the rows, then updates ``n_complete`` and flushes; :func:`read_samples` trusts
``n_complete``, so a chunk cut short by a kill is ignored. Unlike other boltzflow outputs this
file is therefore written in place, not by temporary file + rename. A file left by a killed writer
opens with :func:`read_samples` (it falls back to SWMR read mode) and can be continued with
``SampleWriter(path, ..., mode="a")``; other HDF5 tools may need ``h5clear -s`` first.
"""

from __future__ import annotations

import datetime as _dt
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
from boltzflow.io.atomic import atomic_path

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "SampleSet", "SampleWriter", "read_samples"]

FORMAT_NAME = "boltzflow-samples"
FORMAT_VERSION = 1
_STANDARD = ("log_q", "u", "log_w")
_MODES = ("w", "x", "a")


def _to_numpy(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.bool_)
    ):
        raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}")
    return arr


def _open_read(path: Path) -> h5py.File:
    """Open for reading; falls back to SWMR mode for a file whose SWMR writer was killed."""
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise
    except OSError as err:
        if not path.is_file():
            raise FileNotFoundError(f"sample file not found: {path}") from err
        try:
            return h5py.File(path, "r", libver="latest", swmr=True)
        except OSError:
            raise ValueError(f"{path}: not a readable HDF5 sample file ({err})") from err


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

    Example:
        >>> with SampleWriter("s.h5", dim=8, provenance={"model": "cnf"}) as w:  # doctest: +SKIP
        ...     w.append(x, log_q=log_q, nfe=nfe)

    The columns written by the first :meth:`append` (or found in an existing file) are fixed: every
    later append must give the same ones.
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
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {list(_MODES)}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(provenance, Mapping):
            raise TypeError(f"provenance must be a dict, got {type(provenance).__name__}")
        if position_dtype not in ("float64", "float32"):
            raise ValueError(f"position_dtype must be float64 or float32, got {position_dtype!r}")
        self.path = Path(path)
        self.dim = dim
        self.provenance = json.loads(json.dumps(dict(provenance), default=str))
        self.position_dtype = position_dtype
        self.chunk_rows = int(chunk_rows)
        self._file: h5py.File | None = None
        self._columns: tuple[str, ...] | None = None
        self._n = 0
        self._closed = False
        if mode == "x" and self.path.exists():
            raise ValueError(f"{self.path} exists (mode 'x' never overwrites)")
        if mode == "a" and self.path.exists():
            self._resume()

    # -- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> SampleWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def n_complete(self) -> int:
        """Rows written in complete chunks so far."""
        return self._n

    @property
    def columns(self) -> tuple[str, ...] | None:
        """Column names besides ``x`` (None before the first append)."""
        return self._columns

    def close(self) -> None:
        """Flush and close; a store with no appended chunk is still written (empty)."""
        if self._closed:
            return
        if self._file is None:
            self._create(())
        if self._file is not None:
            self._file.flush()
            self._file.close()
            self._file = None
        self._closed = True

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
        for key, data in (("x", xs), *((self._key(k), v) for k, v in cols.items())):
            ds = f[key]
            ds.resize(new, axis=0)
            ds[self._n : new] = data
        f.attrs["n_complete"] = new
        f.flush()
        self._n = new
        return new

    # -- internals -------------------------------------------------------------------------------
    @staticmethod
    def _key(name: str) -> str:
        return name if name in _STANDARD else f"columns/{name}"

    def _create(self, names: tuple[str, ...], dtypes: Mapping[str, np.dtype] | None = None) -> None:
        """Write a complete empty store to a temp file, rename it into place, reopen in SWMR."""
        dtypes = dtypes or {}
        for name in names:
            if name in ("x", "columns") or "/" in name:
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
                        self._key(name), shape=(0,), maxshape=(None,), chunks=(rows,), dtype=dtype
                    )
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
                    }
                )
        self._columns = names
        self._open_swmr()

    def _open_swmr(self) -> None:
        self._file = h5py.File(self.path, "r+", libver="latest")
        self._file.swmr_mode = True

    def _resume(self) -> None:
        """Continue an existing store: check it, drop rows past n_complete, reopen for append."""
        with _open_read(self.path) as f:
            if f.attrs.get("format") != FORMAT_NAME:
                raise ValueError(f"{self.path}: not a boltzflow sample store")
            if int(f.attrs["dim"]) != self.dim:
                raise ValueError(f"{self.path}: stored dim {int(f.attrs['dim'])} != {self.dim}")
            self.provenance = json.loads(f.attrs["provenance"])
            self._columns = tuple(json.loads(f.attrs["columns"]))
            self._n = int(f.attrs["n_complete"])
        try:
            self._open_swmr()
        except OSError:
            # A killed SWMR writer leaves the file marked open; rewrite a clean copy first.
            self._rewrite_clean()
            self._open_swmr()
        for key in ("x", *(self._key(k) for k in self._columns)):
            self._file[key].resize(self._n, axis=0)
        self._file.flush()

    def _rewrite_clean(self) -> None:
        """Copy the complete rows and attributes into a fresh file that replaces this one."""
        with atomic_path(self.path, suffix=".h5") as tmp:
            with _open_read(self.path) as src, h5py.File(tmp, "w", libver="latest") as dst:
                for key, value in src.attrs.items():
                    dst.attrs[key] = value
                for key in ("x", *(self._key(k) for k in self._columns)):
                    ds = src[key]
                    data = ds[: self._n]
                    dst.create_dataset(
                        key,
                        data=data,
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
    """

    x: np.ndarray
    log_q: np.ndarray | None
    u: np.ndarray | None
    log_w: np.ndarray | None
    columns: dict[str, np.ndarray] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def n(self) -> int:
        """Number of rows N."""
        return int(self.x.shape[0])

    def __len__(self) -> int:
        return self.n


def read_samples(
    path: str | os.PathLike[str], *, start: int = 0, stop: int | None = None
) -> SampleSet:
    """Read rows ``[start, stop)`` of the complete chunks of a sample store.

    Rows past the ``n_complete`` attribute (a chunk cut short by a killed writer) are ignored.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a boltzflow sample store.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sample file not found: {path}")
    with _open_read(path) as f:
        if f.attrs.get("format") != FORMAT_NAME:
            raise ValueError(f"{path}: not a boltzflow sample store (format attribute missing)")
        n = int(f.attrs["n_complete"])
        stop = n if stop is None else min(stop, n)
        sl = slice(max(0, start), max(0, stop))
        names = json.loads(f.attrs["columns"])
        data = {name: f[name if name in _STANDARD else f"columns/{name}"][sl] for name in names}
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
        for key in ("provenance", "columns"):
            attrs[key] = json.loads(attrs[key])
        x = f["x"][sl]
    return SampleSet(
        x=x,
        log_q=data.pop("log_q", None),
        u=data.pop("u", None),
        log_w=data.pop("log_w", None),
        columns=data,
        provenance=attrs["provenance"],
        attrs=attrs,
        path=path,
    )
