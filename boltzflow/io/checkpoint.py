"""Checksummed, atomically written checkpoint files.

File layout: one ASCII header line

    BOLTZFLOW-CHECKPOINT 1 bytes=<payload length> sha256=<hex digest>\\n

followed by the payload written by ``torch.save``. Loading verifies the length (a truncated file
names the missing byte count) and the digest (a corrupted file says so) before unpickling with
``weights_only=True`` (tensors and plain Python containers only). Every payload records the
boltzflow and torch versions and a ``kind`` (e.g. ``"training"``, ``"teacher_cnf"``).

:func:`load_model_checkpoint` reads a model either from its finished model file or from the
training checkpoint of a run (:class:`boltzflow.train.trainer.Trainer`, kind ``"training"``,
with ``model_kind``, ``model`` and ``ema`` weights), given the file or the run folder.
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
from boltzflow.errors import InvalidFileError
from boltzflow.io.atomic import atomic_path

__all__ = [
    "CheckpointError",
    "checkpoint_digest",
    "load_checkpoint",
    "load_model_checkpoint",
    "resolve_checkpoint_file",
    "save_checkpoint",
]

_MAGIC = b"BOLTZFLOW-CHECKPOINT"
_FORMAT_VERSION = 1
_HEADER = re.compile(rb"^BOLTZFLOW-CHECKPOINT (\d+) bytes=(\d+) sha256=([0-9a-f]{64})\n")


class CheckpointError(InvalidFileError):
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


def _verified_payload(path: Path) -> tuple[bytes, str]:
    """The payload bytes of checkpoint ``path`` and their sha256, after checking the header,
    the length and the checksum (nothing is unpickled)."""
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
    return data, digest


def checkpoint_digest(path: str | os.PathLike[str]) -> str:
    """The sha256 of checkpoint ``path``'s payload, verified against its bytes (not unpickled).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not a checkpoint, truncated or corrupt.
    """
    return _verified_payload(Path(path))[1]


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
    data, _ = _verified_payload(path)
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


def resolve_checkpoint_file(path: str | os.PathLike[str], names: tuple[str, ...]) -> Path:
    """``path`` itself, or for a folder the first of ``names`` present in it.

    Raises:
        FileNotFoundError: a folder holding none of ``names``.
    """
    path = Path(path)
    if not path.is_dir():
        return path
    for name in names:
        if (path / name).is_file():
            return path / name
    listed = " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
    raise FileNotFoundError(f"{path}: no {listed} in the folder")


def load_model_checkpoint(
    path: str | os.PathLike[str],
    *,
    kind: str,
    files: tuple[str, ...],
    label: str,
    weights: str = "ema",
    map_location: str | torch.device | None = "cpu",
) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """Load a model of ``kind`` from its model file, a training checkpoint or a run folder.

    Args:
        path: a checkpoint of ``kind`` (weights under ``state_dict``), a training checkpoint
            whose ``model_kind`` is ``kind``, or a folder holding one of ``files`` (tried in
            order).
        kind: the model file's checkpoint kind (e.g. ``"teacher_cnf"``, ``"student"``).
        files: file names looked for in a folder.
        label: what the model is called in errors (e.g. ``"teacher"``).
        weights: for training checkpoints, ``"ema"`` or ``"raw"``.
        map_location: device for the tensors.

    Returns:
        the file read, its payload and the chosen state dict.

    Raises:
        FileNotFoundError: nothing loadable at ``path``.
        ValueError: corrupt file (:class:`CheckpointError`), a checkpoint of another kind or
            model, or unknown ``weights``.
    """
    path = resolve_checkpoint_file(path, files)
    payload = load_checkpoint(path, kind=(kind, "training"), map_location=map_location)
    if payload["kind"] != "training":
        return path, payload, payload["state_dict"]
    if payload.get("model_kind") != kind:
        raise ValueError(
            f"{path}: training checkpoint of a {payload.get('model_kind')!r} model, not a {label}"
        )
    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    return path, payload, payload["ema"] if weights == "ema" else payload["model"]
