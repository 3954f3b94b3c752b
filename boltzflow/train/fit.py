"""The ending every training run shares: fit with the :class:`~boltzflow.train.trainer.Trainer`,
take the EMA weights and, once the run is finished, export them as the model file.

Used by the teacher (:func:`boltzflow.train.teacher.train_teacher`), the flow-map students
(:func:`boltzflow.distill.train_students.train_student`) and the NF students
(:mod:`boltzflow.distill.nf_train`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from boltzflow import distributed
from boltzflow.train.config import TrainConfig
from boltzflow.train.trainer import BatchedLoss, LossFn, Trainer

__all__ = ["fit_and_export"]


def fit_and_export(
    model: nn.Module,
    loss_fn: LossFn | BatchedLoss,
    train: TrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    filename: str,
    model_kind: str,
    run_config: dict[str, Any],
    extra: dict[str, Any] | None = None,
    file_extra: dict[str, Any] | None = None,
    resume: bool = True,
    stop_at: int | None = None,
    progress: bool = True,
) -> Any:
    """Fit ``model``, take its EMA weights and, once the run has reached ``train.steps``, write
    them with ``model.save`` to ``out_dir/filename``.

    Args:
        model: a fresh model with ``model_config`` and ``save(path, extra=...)``.
        loss_fn: ``loss_fn(model, generator, step)`` or a :class:`BatchedLoss` (see
            :class:`Trainer`).
        train: loop settings.
        out_dir: run folder (``checkpoint.pt``, ``metrics.jsonl``, ``run.json``, ``filename``).
        filename: the exported model file (``teacher.pt``, ``student.pt``).
        model_kind: recorded in the training checkpoints (``"teacher_cnf"``, ``"student"``).
        run_config: JSON-able run record (``run.json``; ``run`` in the model file).
        extra: more entries of every training checkpoint (see :class:`Trainer`).
        file_extra: more facts for the model file's ``extra`` (after ``steps`` and
            ``elapsed_s``, before ``run``).
        resume: continue from ``out_dir/checkpoint.pt`` if present.
        stop_at: stop after this many steps (checkpointed, no model file; resume later).
        progress: show a progress bar.

    Returns:
        a copy of ``model`` with the EMA weights, in eval mode.
    """
    trainer = Trainer(
        model,
        loss_fn,
        train,
        out_dir,
        model_kind=model_kind,
        model_config=model.model_config,
        run_config=run_config,
        extra=extra,
        progress=progress,
    )
    trainer.fit(resume=resume, stop_at=stop_at)
    ema = trainer.ema_model()
    ema.eval()
    if trainer.step >= train.steps and distributed.is_main():
        info = {"steps": trainer.step, "elapsed_s": trainer.elapsed, **(file_extra or {})}
        ema.save(Path(out_dir) / filename, extra={**info, "run": run_config})
    distributed.barrier()  # under torchrun: the model file exists for every rank on return
    return ema
