"""HDF5 dataset files with provenance and a content checksum; loading of plain arrays.

A boltzflow dataset is one HDF5 file holding

* ``positions``: ``(N, dim)`` configurations (nm for molecules), one sample a row;
* ``energies`` (optional): ``(N,)`` reduced energies u(x) in kT;
* any number of ``extra`` arrays (e.g. the replica or chain index of each row);

and root attributes naming the system and its parameters, the temperature, the generator and its
settings, the seed, the boltzflow version, the creation time, the format version, whether the
generation finished (``complete``, 0 or 1, and ``n_planned``, the rows it was asked for) and a
SHA-256 checksum over the stored arrays and (format 2) the completeness attributes. Files are
written atomically (temporary file + rename, see :mod:`boltzflow.io.atomic`), so a reader never
sees a half-written dataset.

A generation that did not finish (MD stopped by Ctrl-C keeps its frames) is written marked
partial; :func:`read_dataset` refuses it with :class:`~boltzflow.errors.PartialFileError` unless
``allow_partial=True``, so it does not pass for complete data in a workflow. Format 1 files have
no ``complete`` attribute: they count as partial where their provenance statistics say
``interrupted``. Every damaged, truncated or foreign file raises
:class:`~boltzflow.errors.InvalidFileError` naming it.
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
from boltzflow.io.arrays import read_npy
from boltzflow.io.atomic import atomic_path
from boltzflow.systems.particles import remove_mean

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Dataset",
    "content_checksum",
    "load_positions",
    "read_dataset",
    "write_dataset",
]

FORMAT_NAME = "boltzflow-dataset"
FORMAT_VERSION = 2

#: Keys every ``provenance`` dict given to :func:`write_dataset` must hold.
PROVENANCE_KEYS = ("generator", "settings", "seed", "system_parameters", "temperature")

_REQUIRED_ATTRS = (
    "format",
    "format_version",
    "system",
    "system_parameters",
    "temperature",
    "generator",
    "generator_settings",
    "seed",
    "boltzflow_version",
    "created",
    "checksum_sha256",
)
_JSON_ATTRS = ("system_parameters", "generator_settings", "provenance")
_RESERVED = ("positions", "energies")
_HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")


@dataclass(frozen=True)
class Dataset:
    """A dataset read from disk by :func:`read_dataset`.

    Attributes:
        positions: ``(N, dim)`` configurations as stored (float32 or float64).
        energies: ``(N,)`` reduced energies in kT, or None.
        attrs: root attributes; JSON attributes decoded, ``temperature`` None for toy systems.
        path: the file it came from.
        extra: further arrays stored beside the positions.
        complete: False for a generation that did not finish (read with ``allow_partial``).
        n_planned: rows the generation was asked for.
    """

    positions: np.ndarray
    energies: np.ndarray | None
    attrs: dict[str, Any]
    path: Path
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    complete: bool = True
    n_planned: int | None = None

    def __len__(self) -> int:
        return int(self.positions.shape[0])

    @property
    def dim(self) -> int:
        return int(self.positions.shape[1])


def content_checksum(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over names, dtypes, shapes and little-endian bytes of ``arrays`` (sorted by name)."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        a = np.asarray(arrays[name])
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        digest.update(f"{name}|{a.dtype.str}|{a.shape}\n".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


def _completeness(complete: bool, n_planned: int) -> np.ndarray:
    """The completeness attributes as an array covered by the format-2 checksum."""
    return np.array([int(complete), int(n_planned)], dtype=np.int64)


def _json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, default=_json_default)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{what} must be JSON-serialisable: {err}") from err


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "tolist"):  # torch tensors without importing torch here
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"object of type {type(value).__name__} is not JSON serialisable")


def _float_array(value: Any, name: str, ndim: int) -> np.ndarray:
    a = np.asarray(value)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a numeric array, got dtype {a.dtype}")
    if a.dtype.kind != "f":
        a = a.astype(np.float64)
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    n_bad = int((~np.isfinite(a.reshape(a.shape[0], -1))).any(axis=1).sum()) if a.size else 0
    if n_bad:
        raise ValueError(f"{name}: {n_bad} of {a.shape[0]} rows are not finite (NaN or inf)")
    return a


def write_dataset(
    path: str | os.PathLike[str],
    positions: np.ndarray,
    *,
    system: str,
    provenance: dict[str, Any],
    energies: np.ndarray | None = None,
    extra: dict[str, np.ndarray] | None = None,
    complete: bool | None = None,
    n_planned: int | None = None,
) -> Path:
    """Write a dataset file atomically.

    Args:
        path: target file (``.h5``); parent folders are created; an existing file is replaced
            only once the new one is complete.
        positions: ``(N, dim)`` finite configurations (float32 or float64 kept as given).
        system: system name (see :func:`boltzflow.systems.available`).
        provenance: must hold ``generator`` (str), ``settings`` (dict), ``seed`` (int or None),
            ``system_parameters`` (dict) and ``temperature`` (kelvin, or None for toy systems);
            the whole dict (statistics included) is also stored as JSON in ``provenance``.
        energies: optional ``(N,)`` finite reduced energies in kT.
        extra: optional further numeric arrays, stored as datasets of the same name.
        complete: whether the generation finished; None: unless ``provenance["statistics"]
            ["interrupted"]`` is true. A partial dataset is refused by :func:`read_dataset`
            unless it is asked for.
        n_planned: rows the generation was asked for (default: ``provenance["n_requested"]``
            for a partial dataset, else the rows given).

    Returns:
        The path written.

    Raises:
        ValueError: bad shapes, non-finite values, missing provenance keys or reserved names.
        TypeError: non-numeric arrays or provenance that is not JSON-serialisable.
    """
    positions = _float_array(positions, "positions", 2)
    arrays: dict[str, np.ndarray] = {"positions": positions}
    if energies is not None:
        energies = _float_array(energies, "energies", 1)
        if energies.shape[0] != positions.shape[0]:
            raise ValueError(
                f"energies has {energies.shape[0]} rows but positions has {positions.shape[0]}"
            )
        arrays["energies"] = energies
    for name, value in (extra or {}).items():
        if name in _RESERVED or not name or "/" in name or name.startswith("__"):
            raise ValueError(f"extra array name {name!r} is reserved or invalid")
        arrays[name] = np.asarray(value)
    missing = [k for k in PROVENANCE_KEYS if k not in provenance]
    if missing:
        raise ValueError(f"provenance is missing keys {missing}; required: {list(PROVENANCE_KEYS)}")
    temperature = provenance["temperature"]
    seed = provenance["seed"]
    if complete is None:
        complete = not _interrupted(provenance)
    n_rows = int(positions.shape[0])
    if n_planned is None:
        n_planned = n_rows if complete else int(provenance.get("n_requested", -1))
    attrs: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "system": str(system),
        "system_parameters": _json(provenance["system_parameters"], "system_parameters"),
        # HDF5 attributes cannot hold None: NaN marks a dimensionless (toy) system.
        "temperature": float("nan") if temperature is None else float(temperature),
        "generator": str(provenance["generator"]),
        "generator_settings": _json(provenance["settings"], "settings"),
        "seed": -1 if seed is None else int(seed),
        "boltzflow_version": boltzflow.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "provenance": _json(provenance, "provenance"),
        "n_samples": n_rows,
        "dim": int(positions.shape[1]),
        "complete": int(bool(complete)),
        "n_planned": int(n_planned),
    }
    attrs["checksum_sha256"] = content_checksum(
        {**arrays, "__completeness__": _completeness(bool(complete), int(n_planned))}
    )
    target = Path(path)
    # libver "latest": object headers with checksums, so HDF5 detects damaged metadata (older
    # layouts can crash HDF5 when damaged attributes are read)
    with atomic_path(target, suffix=".h5") as tmp, h5py.File(tmp, "w", libver="latest") as fh:
        for name, value in arrays.items():
            fh.create_dataset(name, data=value)
        for key, value in attrs.items():
            fh.attrs[key] = value
    return target


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _interrupted(provenance: Any) -> bool:
    """Whether a provenance dict records an interrupted generation (statistics.interrupted)."""
    stats = provenance.get("statistics") if isinstance(provenance, Mapping) else None
    return bool(isinstance(stats, Mapping) and stats.get("interrupted"))


def _open_error(path: Path, err: Exception) -> InvalidFileError:
    return InvalidFileError(f"{path}: not an HDF5 file / corrupt HDF5 file ({err})")


def read_dataset(
    path: str | os.PathLike[str], *, verify: bool = True, allow_partial: bool = False
) -> Dataset:
    """Read and validate a dataset written by :func:`write_dataset`.

    Args:
        path: the ``.h5`` file.
        verify: recompute the SHA-256 checksum and compare it with the stored one.
        allow_partial: read a dataset whose generation did not finish (``Dataset.complete``
            is then False).

    Raises:
        FileNotFoundError: no such file.
        PartialFileError: the generation did not finish and ``allow_partial`` is False.
        InvalidFileError: (a ValueError) not an HDF5 file or corrupt; not a boltzflow dataset
            (missing datasets or attributes); wrong shapes; checksum mismatch (file modified or
            corrupt).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    try:
        return _read_dataset(path, verify, allow_partial)
    except (InvalidFileError, FileNotFoundError):
        raise
    except Exception as err:  # h5py errors on damaged files: OSError, KeyError, RuntimeError...
        raise InvalidFileError(
            f"{path}: damaged dataset file ({type(err).__name__}: {err})"
        ) from err


def _read_dataset(path: Path, verify: bool, allow_partial: bool) -> Dataset:
    if not h5py.is_hdf5(path):
        raise InvalidFileError(f"{path}: not an HDF5 file / corrupt (no HDF5 signature)")
    try:
        with h5py.File(path, "r") as fh:
            attrs = {k: _decode(v) for k, v in fh.attrs.items()}
            missing = [k for k in _REQUIRED_ATTRS if k not in attrs]
            if "positions" not in fh or missing:
                what = (["dataset 'positions'"] if "positions" not in fh else []) + missing
                raise InvalidFileError(
                    f"{path}: not a boltzflow dataset: missing {', '.join(what)} "
                    "(use load_positions for plain HDF5 files)"
                )
            arrays = {
                name: np.asarray(obj[()])
                for name, obj in fh.items()
                if isinstance(obj, h5py.Dataset)
            }
    except OSError as err:  # h5py signals truncated/corrupt files with OSError
        raise _open_error(path, err) from err
    version = attrs["format_version"]
    if (
        attrs["format"] != FORMAT_NAME
        or not isinstance(version, int)
        or not 1 <= version <= FORMAT_VERSION
    ):
        raise InvalidFileError(
            f"{path}: format {attrs['format']!r} version {version} is not "
            f"readable by this boltzflow (reads {FORMAT_NAME!r} versions 1 to {FORMAT_VERSION})"
        )
    positions = arrays.pop("positions")
    energies = arrays.pop("energies", None)
    if positions.ndim != 2:
        raise InvalidFileError(
            f"{path}: positions must be 2-D (N, dim), got shape {positions.shape}"
        )
    if energies is not None and energies.shape != (positions.shape[0],):
        raise InvalidFileError(
            f"{path}: energies must have shape ({positions.shape[0]},), got {energies.shape}"
        )
    for key in _JSON_ATTRS:
        if key in attrs:
            try:
                attrs[key] = json.loads(attrs[key])
            except (TypeError, json.JSONDecodeError) as err:
                raise InvalidFileError(
                    f"{path}: attribute {key!r} is not valid JSON: {err}"
                ) from err
    n = int(positions.shape[0])
    if version >= 2:
        complete, n_planned = attrs.get("complete"), attrs.get("n_planned")
        if complete not in (0, 1) or not isinstance(n_planned, int) or n_planned < -1:
            raise InvalidFileError(
                f"{path}: attributes 'complete' / 'n_planned' missing or damaged "
                f"({complete!r}, {n_planned!r})"
            )
        complete = bool(complete)
    else:  # format 1: only the provenance statistics tell of an interrupted run
        complete = not _interrupted(attrs.get("provenance"))
        n_planned = n if complete else -1
    if verify:
        stored = {"positions": positions, **arrays}
        if energies is not None:
            stored["energies"] = energies
        if version >= 2:
            stored["__completeness__"] = _completeness(complete, n_planned)
        actual = content_checksum(stored)
        if actual != attrs["checksum_sha256"]:
            raise InvalidFileError(
                f"{path}: checksum mismatch (stored {str(attrs['checksum_sha256'])[:12]}..., "
                f"computed {actual[:12]}...): file modified or corrupt"
            )
    planned = None if n_planned == -1 else n_planned
    if not complete and not allow_partial:
        raise PartialFileError(
            f"{path}: partial dataset: its generation did not finish (interrupted); "
            f"{n} of {'an unknown number of' if planned is None else planned} planned samples. "
            "Regenerate it, or read it with allow_partial=True"
        )
    if attrs["temperature"] != attrs["temperature"]:  # NaN -> dimensionless system
        attrs["temperature"] = None
    if attrs["seed"] == -1:
        attrs["seed"] = None
    return Dataset(
        positions=positions,
        energies=energies,
        attrs=attrs,
        path=path,
        extra=arrays,
        complete=complete,
        n_planned=planned,
    )


def _read_hdf5_array(path: Path, dataset: str | None) -> np.ndarray:
    if not h5py.is_hdf5(path):
        raise InvalidFileError(f"{path}: not an HDF5 file / corrupt (no HDF5 signature)")
    name = dataset or "positions"
    try:
        with h5py.File(path, "r") as fh:
            is_boltzflow = fh.attrs.get("format") in (FORMAT_NAME, FORMAT_NAME.encode())
            obj = fh.get(name)
            if not isinstance(obj, h5py.Dataset):
                found: list[str] = []
                fh.visititems(
                    lambda key, o: found.append(key) if isinstance(o, h5py.Dataset) else None
                )
                raise InvalidFileError(
                    f"{path}: no dataset {name!r}; datasets in the file: {found or 'none'}"
                )
            if not is_boltzflow or name != "positions":
                return np.asarray(obj[()])
    except InvalidFileError:
        raise
    except Exception as err:  # OSError, KeyError, RuntimeError from a damaged file
        raise _open_error(path, err) from err
    # A boltzflow dataset: read it whole so that its checksum is verified.
    return read_dataset(path).positions


def load_positions(
    path: str | os.PathLike[str],
    dataset: str | None = None,
    *,
    system: Any = None,
    nan: str = "raise",
) -> np.ndarray:
    """Load configurations ``(N, dim)`` from a ``.npy`` or HDF5 file.

    Args:
        path: ``.npy`` (read with ``allow_pickle=False``) or ``.h5``/``.hdf5``/``.hdf`` file, a
            boltzflow dataset (checksum verified) or any plain HDF5 file.
        dataset: HDF5 dataset name (default ``positions``); not allowed for ``.npy``.
        system: optional :class:`~boltzflow.systems.System` (or its name): the array must have
            ``system.dim`` columns, and for mean-free particle systems the centre of mass is
            removed (the public DW4 files are not mean-free).
        nan: ``"raise"`` (default) rejects rows with NaN/inf, naming how many; ``"drop"`` removes
            them; ``"keep"`` returns them unchanged (e.g. to evaluate them as ``u = +inf``).

    Returns:
        ``(N, dim)`` floating-point array (dtype as stored; integers become float64).

    Raises:
        FileNotFoundError: no such file.
        InvalidFileError: (a ValueError) empty, truncated or corrupt file, not numeric, not
            2-D, a partial boltzflow dataset (:class:`~boltzflow.errors.PartialFileError`).
        ValueError: unknown extension, wrong ``dim``, non-finite rows.
    """
    if nan not in ("raise", "drop", "keep"):
        raise ValueError(f"nan must be 'raise', 'drop' or 'keep', got {nan!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"positions file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        if dataset is not None:
            raise ValueError(f"{path}: dataset={dataset!r} is only meaningful for HDF5 files")
        x = read_npy(path)
    elif suffix in _HDF5_SUFFIXES:
        x = _read_hdf5_array(path, dataset)
    else:
        raise ValueError(
            f"{path}: unknown file type {suffix or '(none)'!r}; expected .npy or one of "
            f"{', '.join(_HDF5_SUFFIXES)}"
        )
    if x.dtype.kind not in "fiu":
        raise InvalidFileError(f"{path}: expected a numeric array, got dtype {x.dtype}")
    if x.dtype.kind != "f":
        x = x.astype(np.float64)
    if x.ndim != 2:
        raise InvalidFileError(f"{path}: expected a 2-D array (N, dim), got shape {x.shape}")
    finite = np.isfinite(x).all(axis=1)
    n_bad = int((~finite).sum())
    if n_bad:
        if nan == "raise":
            raise ValueError(
                f"{path}: {n_bad} of {x.shape[0]} rows contain NaN or inf "
                "(pass nan='drop' to discard them)"
            )
        if nan == "drop":
            x = x[finite]
    if system is not None:
        x = _conform_to_system(x, system, path)
    return x


def _conform_to_system(x: np.ndarray, system: Any, path: Path) -> np.ndarray:
    if isinstance(system, str):  # the static definition suffices; no need to build the system
        from boltzflow.systems.registry import system_info

        system = system_info(system)
    if x.shape[1] != system.dim:
        raise ValueError(
            f"{path}: {system.name} has dim {system.dim}, but the array has {x.shape[1]} columns"
        )
    n, d = system.n_particles, system.spatial_dim
    if system.mean_free and n is not None and d is not None:
        x = remove_mean(torch.from_numpy(x), n, d).numpy()
    return x
