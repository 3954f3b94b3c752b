"""Checksummed, atomically written checkpoint files.

File layout: one ASCII header line

    BOLTZFLOW-CHECKPOINT 1 bytes=<payload length> sha256=<hex digest>\\n

followed by the payload written by ``torch.save``. Loading verifies the length (a truncated file
names the missing byte count) and the digest (a corrupted file says so) before unpickling with
``weights_only=True`` (tensors and plain Python containers only). Every payload records the
boltzflow and torch versions and a ``kind`` (e.g. ``"training"``, ``"teacher_cnf"``).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path
from typing import Any

import torch

from boltzflow import __version__
from boltzflow.io.atomic import atomic_path

__all__ = ["CheckpointError", "load_checkpoint", "save_checkpoint"]

_MAGIC = b"BOLTZFLOW-CHECKPOINT"
_FORMAT_VERSION = 1
_HEADER = re.compile(rb"^BOLTZFLOW-CHECKPOINT (\d+) bytes=(\d+) sha256=([0-9a-f]{64})\n")


class CheckpointError(ValueError):
    """A checkpoint file is not a boltzflow checkpoint, is truncated, corrupt or of another kind."""


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """Write ``payload`` (tensors, numbers, strings, lists, dicts) atomically to ``path``.

    ``package_version``, ``torch_version`` and ``format_version`` are added to the payload.

    Returns:
        the path written.
    """
    if "kind" not in payload:
        raise ValueError("checkpoint payload needs a 'kind' entry")
    body = dict(payload)
    body.update(
        package_version=__version__,
        torch_version=str(torch.__version__),
        format_version=_FORMAT_VERSION,
    )
    buf = io.BytesIO()
    torch.save(body, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    header = f"BOLTZFLOW-CHECKPOINT {_FORMAT_VERSION} bytes={len(data)} sha256={digest}\n"
    path = Path(path)
    with atomic_path(path, suffix=".pt") as tmp, tmp.open("wb") as fh:
        fh.write(header.encode("ascii"))
        fh.write(data)
    return path


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    kind: str | tuple[str, ...] | None = None,
    map_location: str | torch.device | None = "cpu",
) -> dict[str, Any]:
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: checkpoint file.
        kind: accepted ``kind`` value(s); None accepts any.
        map_location: where tensors are loaded.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: (a ValueError) not a checkpoint, truncated, corrupt, newer format or
            unexpected kind.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    raw = path.read_bytes()
    if not raw.startswith(_MAGIC):
        raise CheckpointError(f"{path}: not a boltzflow checkpoint (missing header)")
    match = _HEADER.match(raw[:200])
    if match is None:
        raise CheckpointError(f"{path}: corrupt checkpoint header")
    version, n_bytes, digest = int(match[1]), int(match[2]), match[3].decode()
    if version > _FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {version} is newer than this boltzflow ({__version__}) "
            f"reads (format {_FORMAT_VERSION}); upgrade boltzflow"
        )
    data = raw[match.end() :]
    if len(data) < n_bytes:
        raise CheckpointError(
            f"{path}: truncated checkpoint: {len(data)} of {n_bytes} payload bytes present"
        )
    if len(data) > n_bytes or hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(f"{path}: corrupt checkpoint: sha256 checksum mismatch")
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as err:  # the digest matched, so this is a writer/reader mismatch
        raise CheckpointError(f"{path}: cannot unpickle checkpoint payload: {err}") from err
    if kind is not None:
        kinds = (kind,) if isinstance(kind, str) else tuple(kind)
        if payload.get("kind") not in kinds:
            raise CheckpointError(
                f"{path}: checkpoint kind {payload.get('kind')!r}, expected one of {list(kinds)}"
            )
    return payload
