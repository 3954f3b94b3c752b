"""Reading ``.npy`` arrays with clear errors: one reader for every ``.npy`` input.

:func:`read_npy` turns an empty, truncated, padded, garbage, pickled (object) or non-numeric
``.npy`` file into :class:`~boltzflow.errors.InvalidFileError` naming the file, instead of an
``EOFError`` traceback or a silently wrong array. The header's dtype and shape must account for
the file size exactly (NumPy's own loader ignores trailing bytes). ``.npy`` has no checksum: a
damaged data byte cannot be detected.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from numpy.lib import format as npy_format

from boltzflow.errors import InvalidFileError

__all__ = ["read_npy"]


def read_npy(path: str | os.PathLike[str], *, numeric: bool = True) -> np.ndarray:
    """Read a ``.npy`` file (never unpickling), checking its header against the file size.

    Args:
        path: the file.
        numeric: require a numeric (bool, integer, float or complex) dtype.

    Raises:
        FileNotFoundError: no such file.
        InvalidFileError: empty, not a ``.npy`` file, damaged header, truncated or trailing
            data, object (pickled) or structured dtype, or non-numeric with ``numeric``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"array file not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise InvalidFileError(f"{path}: empty file (0 bytes), not a .npy array")
    try:
        with path.open("rb") as fh:
            version = npy_format.read_magic(fh)
            if version == (1, 0):
                shape, _fortran, dtype = npy_format.read_array_header_1_0(fh)
            elif version in ((2, 0), (3, 0)):
                shape, _fortran, dtype = npy_format.read_array_header_2_0(fh)
            else:
                raise ValueError(f"unsupported .npy version {version}")
            offset = fh.tell()
    except (ValueError, EOFError, OSError, SyntaxError, UnicodeDecodeError, TypeError) as err:
        raise InvalidFileError(f"{path}: not a valid .npy file ({err})") from err
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise InvalidFileError(
            f"{path}: .npy holds dtype {dtype} (objects or records); a plain numeric array "
            "is expected (pickled arrays are never loaded)"
        )
    if numeric and dtype.kind not in "biufc":
        raise InvalidFileError(f"{path}: expected a numeric array, got dtype {dtype}")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    expected = offset + count * dtype.itemsize
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise InvalidFileError(
            f"{path}: {what}: header says {dtype} {tuple(shape)} ({expected} bytes in all), "
            f"the file is {size} bytes"
        )
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:  # pragma: no cover - checked above
        raise InvalidFileError(f"{path}: cannot read as a .npy array ({err})") from err
    if array.shape != tuple(shape) or array.dtype != dtype:  # pragma: no cover
        raise InvalidFileError(f"{path}: .npy header and data disagree")
    return array
