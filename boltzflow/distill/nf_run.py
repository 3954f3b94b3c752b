"""``boltzflow distill TEACHER --method nf``: a small NF student from a teacher run folder,
by pair regression on a teacher CNF or latent matching on an NF teacher
(:mod:`boltzflow.distill.nf_train`), with defaults chosen from what the teacher's run used."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from boltzflow import distributed
from boltzflow.distill.base import STUDENT_FILE
from boltzflow.distill.nf import NFModelConfig, NFStudent
from boltzflow.distill.nf_losses import NFLossConfig
from boltzflow.distill.nf_train import (
    NF_WHY,
    check_cartesian_teacher,
    default_train_config,
    distill_nf_from_cnf,
    distill_nf_from_nf,
)
from boltzflow.io.checkpoint import load_checkpoint, resolve_checkpoint_file
from boltzflow.models.method import Method
from boltzflow.train.config import TrainConfig

__all__ = ["METHOD", "NFConfig", "build_nf", "distill_nf", "train_nf"]


def _teacher_run(folder: Path) -> dict[str, Any]:
    """The ``run`` section of a teacher's ``run.json`` (empty if there is none)."""
    run = folder / "run.json"
    if not run.is_file():
        return {}
    info = json.loads(run.read_text()).get("run", {})
    return info if isinstance(info, dict) else {}


def _default_loss(kind: str, teacher: Any, run: dict[str, Any]) -> NFLossConfig:
    """Weights by teacher kind; augmentation only by symmetries the teacher's run used.

    Rotations for particle systems; permutations only where the teacher was trained with them
    (``flow_matching.permutations`` of a CNF, ``loss.permutations`` of an NF): atoms of a
    molecule are distinct. No reflections (chirality).
    """
    particles = teacher.model_config.get("n_particles") is not None
    if kind == "cnf":
        perms = bool(run.get("teacher", {}).get("flow_matching", {}).get("permutations", False))
    else:
        perms = bool(run.get("loss", {}).get("permutations", False))
    regression = 1.0 if kind == "cnf" else 0.1
    return NFLossConfig(
        final_weight=regression,
        sample_weight=regression,
        rotations=particles,
        permutations=particles and perms,
    )


def _load_teacher(path: Path) -> tuple[str, Any]:
    """``("cnf", TeacherCNF)`` or ``("nf", NFStudent)`` from a file or run folder."""
    from boltzflow.distill.base import load_student
    from boltzflow.flows.cnf import MODEL_FILE, TRAINING_FILE, TeacherCNF

    file = resolve_checkpoint_file(path, (MODEL_FILE, STUDENT_FILE, TRAINING_FILE))
    payload = load_checkpoint(file, kind=("teacher_cnf", "student", "training"))
    kind = payload.get("model_kind") if payload["kind"] == "training" else payload["kind"]
    if kind == "teacher_cnf":
        return "cnf", TeacherCNF.load(file)
    if kind == "student" and payload.get("student_kind") == "nf":
        return "nf", load_student(file)
    raise ValueError(
        f"{file}: an NF student can be distilled from a teacher CNF or an NF, not from a "
        f"{payload.get('student_kind') or kind!r} model"
    )


def distill_nf(
    teacher_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    data: Any = None,
    system: str | None = None,
    model: NFModelConfig | None = None,
    train: TrainConfig | None = None,
    loss: NFLossConfig | None = None,
    n_pairs: int = 10_000,
    pair_settings: dict[str, Any] | None = None,
    seed: int | None = None,
    resume: bool = True,
    progress: bool = True,
) -> NFStudent:
    """``boltzflow distill TEACHER_DIR --method nf -o DIR``: a small NF from a teacher CNF (pair
    regression) or from an NF teacher (latent matching), chosen by what ``teacher_dir`` holds.

    Args:
        teacher_dir: teacher run folder or model file (``teacher.pt``/``checkpoint.pt`` of a
            teacher CNF, or ``student.pt`` of an NF).
        out_dir: output run folder (``student.pt`` when finished).
        data: training configurations for an NF teacher: a path (``.npy``/HDF5, read with
            :func:`boltzflow.data.load_positions`) or an ``(N, dim)`` array; must be None for a
            teacher CNF.
        system: system name; default: the one recorded with the teacher.
        model: student architecture (default :class:`NFModelConfig`: 4 blocks x 2 spline
            couplings, width 64, about 71k parameters in 6 dimensions).
        train: loop settings (default :func:`~boltzflow.distill.nf_train.default_train_config`).
        loss: weights and augmentation (default: regression weights 1 for a CNF teacher,
            distillation weights 0.1 for an NF teacher; random rotations for particle systems,
            permutations where the teacher's run used them, no reflections).
        n_pairs, pair_settings: CNF pairs (see
            :func:`~boltzflow.distill.nf_train.distill_nf_from_cnf`).
        seed: overrides ``train.seed``.

    Raises:
        FileNotFoundError: no teacher at ``teacher_dir`` or no data file.
        ValueError: an unsupported teacher, a system that differs from the teacher's, or an NF
            teacher without ``data``.
    """
    distributed.single_process_only("training the nf student", NF_WHY)
    path = Path(teacher_dir)
    kind, teacher = _load_teacher(path)
    run = _teacher_run(path if path.is_dir() else path.parent)
    recorded = run.get("system") or run.get("teacher", {}).get("system")
    if kind == "nf":
        recorded = teacher.system
    recorded = recorded if isinstance(recorded, str) else None
    if system is not None and recorded is not None and system != recorded:
        raise ValueError(f"{path}: the teacher was trained for {recorded!r}, not {system!r}")
    system = system or recorded
    train = train or default_train_config()
    if seed is not None:
        train = dataclasses.replace(train, seed=seed)
    loss = loss or _default_loss(kind, teacher, run)
    info = {"teacher_path": str(path)}  # run_info of the recipe (gains "data" below)
    common = {
        "model": model,
        "train": train,
        "loss": loss,
        "resume": resume,
        "progress": progress,
        "run_info": info,
    }
    if kind == "cnf":
        if data is not None:
            raise ValueError(
                "data is not used when distilling from a teacher CNF: the student regresses on "
                "the teacher's own (noise, sample) ODE pairs; drop data"
            )
        return distill_nf_from_cnf(
            teacher,
            out_dir,
            system=system,
            n_pairs=n_pairs,
            pair_settings=pair_settings,
            **common,
        )
    if data is None:
        raise ValueError("distilling from an NF teacher needs training data (data=PATH)")
    if isinstance(data, (str, os.PathLike)):
        from boltzflow.data import load_positions

        info["data"] = str(data)
        data = load_positions(data, system=system) if system else load_positions(data)
    if len(data) == 0:
        raise ValueError("no training configurations (0 rows) to distil an NF teacher on")
    return distill_nf_from_nf(teacher, data, out_dir, **common)


@dataclass
class NFConfig:
    """An NF student distilled from a teacher CNF by regression on its (noise, sample) pairs
    (:func:`~boltzflow.distill.nf_train.distill_nf_from_cnf`; workflow ``method = "nf"``)."""

    model: NFModelConfig = field(default_factory=NFModelConfig)
    train: TrainConfig = field(default_factory=default_train_config)
    loss: NFLossConfig | None = None
    n_pairs: int = 10_000
    pair_settings: dict[str, Any] = field(default_factory=dict)


def build_nf(cfg: NFConfig, teacher: Any, *, system: str | None) -> NFStudent:
    """An untrained NF student for ``teacher``'s system (dimension and particle structure).

    Raises:
        ValueError: an internal-coordinate teacher.
    """
    check_cartesian_teacher(teacher)
    tc = teacher.model_config
    return NFStudent.build(
        cfg.model,
        dim=teacher.dim,
        n_particles=tc.get("n_particles"),
        spatial_dim=tc.get("spatial_dim"),
        mean_free=teacher.mean_free,
        system=system,
    )


def train_nf(
    cfg: NFConfig,
    teacher: Any,
    output: str | os.PathLike[str],
    *,
    system: str | None = None,
    data: Any = None,
    resume: bool = True,
    progress: bool = True,
    run_info: dict[str, Any] | None = None,
) -> NFStudent:
    """The registry's training function: pair regression on ``teacher`` (a CNF), writing
    ``output/student.pt``. ``data`` must be None (the pairs come from the teacher)."""
    distributed.single_process_only("training the nf student", NF_WHY)
    if data is not None:
        raise ValueError("the nf method regresses on the teacher's ODE pairs: drop --data")
    return distill_nf_from_cnf(
        teacher,
        output,
        system=system,
        n_pairs=cfg.n_pairs,
        pair_settings=cfg.pair_settings,
        model=cfg.model,
        train=cfg.train,
        loss=cfg.loss,
        resume=resume,
        progress=progress,
        run_info=run_info,
    )


#: registry entry (:mod:`boltzflow.registry.methods`)
METHOD = Method(
    name="nf",
    model=NFStudent,
    config=NFConfig,
    build=build_nf,
    train=train_nf,
    log_q_kind=NFStudent.log_q_kind,
    uses_steps=False,
    description="small coupling normalizing flow regressed on the teacher (exact one-pass log q)",
)
