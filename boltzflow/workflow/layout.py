"""Where a workflow's files live and what it samples: names shared by the stages, the report and
the benchmark.

Output folder layout::

    data/train.h5, data/reference.h5      boltzflow datasets (generated, or copied from a file)
    teacher/teacher.pt                    teacher CNF (EMA weights; checkpoint.pt, metrics.jsonl)
    students/trajectories-<id>.pt         cached teacher trajectories shared by F2D2/FALCON
    students/<name>/student.pt            each student
    samples/<label>.h5                    (x, log q, u, log w) per model and step count
    samples/<student>-K<k>-smc.h5         ``[smc]``: the student's latent-SMC particles (+ eve)
    samples.h5                            the report's proposal samples (a copy)
    report.md, report.json                teacher vs students table, estimates with CIs
    analysis/                             reweighting report of the proposal, plots (PNG)
    benchmark.md, benchmark.json          ``boltzflow benchmark`` only
    manifest.json                         stage keys and output fingerprints (the cache)
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

from boltzflow.io.atomic import atomic_path
from boltzflow.workflow.spec import Workflow, sample_label, smc_label

__all__ = [
    "REFERENCE_FILE",
    "TEACHER_FILE",
    "TRAIN_FILE",
    "copy_atomic",
    "sample_plan",
    "smc_model",
    "stage_device",
    "teacher_sampling",
]

TRAIN_FILE = "data/train.h5"
REFERENCE_FILE = "data/reference.h5"
TEACHER_FILE = "teacher/teacher.pt"


def teacher_sampling(wf: Workflow) -> dict[str, Any]:
    """The teacher's ODE settings for sampling: ``[teacher.sample]`` (+ the batch override)."""
    settings = dataclasses.asdict(wf.teacher.config.sample)
    if wf.sample.teacher_batch_size is not None:
        settings["batch_size"] = wf.sample.teacher_batch_size
    return settings


def stage_device(wf: Workflow) -> str:
    """Device for sampling: the workflow's, else the teacher's training device."""
    return wf.device or wf.teacher.config.train.device


def sample_plan(wf: Workflow) -> dict[str, list[tuple[str, int | None]]]:
    """``{model: [(label, steps), ...]}`` of the sample files the workflow writes: the teacher,
    every student, and last the ``[smc]`` refinement (model :func:`smc_model`)."""
    plan: dict[str, list[tuple[str, int | None]]] = {}
    if wf.sample.teacher:
        plan["teacher"] = [("teacher", None)]
    for name, st in wf.students.items():
        steps: list[int | None] = list(wf.sample.steps) if st.uses_steps else [None]
        plan[name] = [(sample_label(name, k), k) for k in steps]
    if wf.smc is not None:
        plan[smc_model(wf)] = [(smc_label(wf.smc), wf.smc.steps)]
    return plan


def smc_model(wf: Workflow) -> str:
    """The model name of the ``[smc]`` samples in :func:`sample_plan`: ``<student>+smc`` (no
    student name has a ``+``)."""
    if wf.smc is None:
        raise ValueError("the workflow has no [smc] table")
    return f"{wf.smc.student}+smc"


def copy_atomic(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` through a temporary file + rename."""
    with atomic_path(dst, suffix=dst.suffix) as tmp:
        shutil.copyfile(src, tmp)
