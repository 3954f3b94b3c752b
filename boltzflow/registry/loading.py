"""``load_model(path)``: any trained model (teacher CNF, student, baseline) from its file or run
folder, with the system check of :mod:`boltzflow.models.protocol`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["MODEL_FILES", "load_model", "model_kind"]

#: file names a run folder may hold, in the order :func:`load_model` looks for them
MODEL_FILES = ("student.pt", "teacher.pt", "checkpoint.pt")


def _model_file(path: Path) -> Path:
    if path.is_dir():
        for name in MODEL_FILES:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: no model file in this folder (looked for {MODEL_FILES})")
    if not path.is_file():
        raise FileNotFoundError(f"model not found: {path}")
    return path


def model_kind(path: str | os.PathLike[str]) -> str:
    """``"teacher_cnf"`` or ``"student"``: what the checkpoint at ``path`` (file or run folder)
    holds.

    Raises:
        FileNotFoundError: nothing loadable at ``path``.
        ValueError: a corrupt file, or a checkpoint of something that is not a model.
    """
    from boltzflow.io.checkpoint import load_checkpoint

    file = _model_file(Path(path))
    payload = load_checkpoint(file)
    kind = payload.get("kind")
    if kind == "training":  # a training checkpoint records the model it trains
        kind = payload.get("model_kind")
    if kind not in ("teacher_cnf", "student"):
        raise ValueError(f"{file}: holds a {kind!r} checkpoint, not a teacher or a student")
    return str(kind)


def load_model(
    path: str | os.PathLike[str],
    *,
    system: Any = None,
    map_location: str | torch.device | None = "cpu",
) -> Any:
    """Load any trained model from a file or a run folder.

    Args:
        path: a model file (``teacher.pt``, ``student.pt``), a training checkpoint, or a run
            folder holding one.
        system: the system (name or :class:`~boltzflow.systems.System`) it will be used with;
            if given it must match the one the model was trained for.
        map_location: device for the tensors.

    Returns:
        a model of the protocol of :mod:`boltzflow.models.protocol`.

    Raises:
        FileNotFoundError: nothing loadable at ``path``.
        ValueError: corrupt file, unknown kind, or a model trained for another system.
    """
    if model_kind(path) == "teacher_cnf":
        from boltzflow.flows.cnf import TeacherCNF

        return TeacherCNF.load(path, system=system, map_location=map_location)
    from boltzflow.distill import load_student

    return load_student(path, system=system, map_location=map_location)
