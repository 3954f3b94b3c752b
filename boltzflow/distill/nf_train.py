"""Training recipes of the NF students (all minimised with the shared
:class:`~boltzflow.train.trainer.Trainer`; loss terms in :mod:`boltzflow.distill.nf_losses`):

- :func:`train_nf`: maximum likelihood on data, ``L = -E_data[log q(x)]``.
- :func:`distill_nf_from_nf`: a student with fewer blocks matches an NF teacher's latents and
  decoded samples (Walton et al. 2025), optionally on part-synthetic batches and with the
  distillation weights annealed (:class:`~boltzflow.distill.nf_losses.NFLossConfig`).
- :func:`distill_nf_from_cnf`: regression onto the teacher CNF's ODE pairs
  ``(z0, x1 = phi(z0))`` (:func:`cnf_pairs`; dopri5, positions only, generated once and cached).

Every recipe ends in :func:`boltzflow.train.fit.fit_and_export`: fit, take the EMA weights,
write ``student.pt``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from boltzflow.distill.base import STUDENT_FILE
from boltzflow.distill.nf import NFModelConfig, NFStudent
from boltzflow.distill.nf_losses import (
    NFLossConfig,
    augment_batch,
    latent_pairs,
    nf_distillation_terms,
    pair_regression_terms,
)
from boltzflow.io.checkpoint import load_checkpoint, save_checkpoint
from boltzflow.systems.particles import remove_mean
from boltzflow.train.config import TrainConfig
from boltzflow.train.fit import fit_and_export
from boltzflow.train.trainer import LossFn

#: why the NF students refuse torchrun (:func:`boltzflow.distributed.single_process_only`)
NF_WHY = (
    "its loss draws its own minibatches from the trainer's generator, so it cannot be split "
    "over ranks (the teacher, F2D2 and FALCON can)"
)

__all__ = [
    "NF_WHY",
    "PAIRS_FILE",
    "check_cartesian_teacher",
    "cnf_pairs",
    "default_train_config",
    "distill_nf_from_cnf",
    "distill_nf_from_nf",
    "train_nf",
]

#: cache of the CNF pairs inside a run folder (see :func:`distill_nf_from_cnf`)
PAIRS_FILE = "cnf_pairs.pt"


def default_train_config(**overrides: Any) -> TrainConfig:
    """Loop settings used when none are given: 4,000 AdamW steps of 512, lr 1e-3."""
    base = {
        "steps": 4000,
        "batch_size": 512,
        "lr": 1e-3,
        "warmup_steps": 200,
        "log_every": 100,
        "checkpoint_every": 1000,
    }
    base.update(overrides)
    return TrainConfig(**base)


@dataclass(frozen=True)
class _Shape:
    """Flat dimension and particle structure of the system a student is trained for."""

    dim: int
    n: int | None
    d: int | None
    mean_free: bool

    @classmethod
    def of_model(cls, config: dict[str, Any]) -> _Shape:
        """From a model's ``model_config`` (teacher CNF or NF)."""
        return cls(
            config["dim"],
            config.get("n_particles"),
            config.get("spatial_dim"),
            bool(config.get("mean_free", False)),
        )

    @property
    def event_dim(self) -> int:
        """Dimension log q is a density on (``(n - 1) d`` when mean-free)."""
        return (self.n - 1) * self.d if self.mean_free else self.dim


def _system_facts(system: Any) -> tuple[str | None, _Shape]:
    """Name and shape of a system (or its :class:`SystemInfo`)."""
    info = getattr(system, "info", system)
    shape = _Shape(int(info.dim), info.n_particles, info.spatial_dim, bool(info.mean_free))
    return getattr(info, "name", None), shape


def _resolve_system(system: Any) -> Any:
    if isinstance(system, str):
        from boltzflow.systems.registry import system_info

        return system_info(system)
    return system


def _as_data(data: Any, shape: _Shape) -> Tensor:
    """Checked ``(N, dim)`` float32 training data (mean-free for a mean-free system)."""
    x = torch.as_tensor(data)
    if x.ndim != 2 or x.shape[1] != shape.dim:
        raise ValueError(f"training data must be (N, {shape.dim}), got {tuple(x.shape)}")
    if len(x) < 1:
        raise ValueError("training data are empty")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("training data contain NaN or infinite values")
    x = x.float()
    if shape.mean_free:
        x = remove_mean(x, shape.n, shape.d)
    return x


def _with_data_scale(model: NFModelConfig, x: Tensor, shape: _Shape) -> NFModelConfig:
    """``model`` with ``scale`` set: as given, else the RMS of ``x (N, dim)`` per subspace
    coordinate (the mean-free projection keeps ``|x|^2``)."""
    if model.scale is not None:
        scale = model.scale
    else:
        scale = float(torch.sqrt(x.double().square().sum(-1).mean() / shape.event_dim))
    return dataclasses.replace(model, scale=scale)


def _seeded_student(
    model: NFModelConfig, shape: _Shape, *, seed: int, system: str | None
) -> NFStudent:
    """A fresh student, its parameters initialised after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)  # parameter initialisation
    return NFStudent.build(
        model,
        dim=shape.dim,
        n_particles=shape.n,
        spatial_dim=shape.d,
        mean_free=shape.mean_free,
        system=system,
    )


def _fit_student(
    student: NFStudent,
    loss_fn: LossFn,
    train: TrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    run_config: dict[str, Any],
    resume: bool,
    progress: bool,
) -> NFStudent:
    """:func:`~boltzflow.train.fit.fit_and_export` of a student: the EMA weights in
    ``out_dir/student.pt`` (with the parameter count) once the run is finished."""
    return fit_and_export(
        student,
        loss_fn,
        train,
        out_dir,
        filename=STUDENT_FILE,
        model_kind="student",
        run_config=run_config,
        extra={"student_kind": student.student_kind, "system": student.system},
        file_extra={"n_parameters": student.n_parameters},
        resume=resume,
        progress=progress,
    )


# -- maximum likelihood -------------------------------------------------------------------------
def train_nf(
    data: Any,
    out_dir: str | os.PathLike[str],
    *,
    system: Any,
    model: NFModelConfig | None = None,
    train: TrainConfig | None = None,
    loss: NFLossConfig | None = None,
    resume: bool = True,
    progress: bool = True,
    run_info: dict[str, Any] | None = None,
) -> NFStudent:
    """Train a coupling flow by maximum likelihood on data (an NF teacher, or a from-scratch
    baseline student).

    Args:
        data: ``(N, dim)`` configurations (data units; centre of mass removed here if needed).
        out_dir: run folder (``checkpoint.pt``, ``metrics.jsonl``, ``run.json``, ``student.pt``).
        system: :class:`~boltzflow.systems.System`, its :class:`SystemInfo` or its name.
        model: architecture (default :class:`NFModelConfig`).
        train: loop settings (default :func:`default_train_config`); ``train.seed`` seeds the
            initialisation and every minibatch.
        loss: only the augmentation flags are used.
        resume: continue from ``out_dir/checkpoint.pt`` if present.
        run_info: extra JSON-able facts recorded in the run config.

    Returns:
        the flow with EMA weights, in eval mode.
    """
    model = model or NFModelConfig()
    train = train or default_train_config()
    loss = loss or NFLossConfig()
    name, shape = _system_facts(_resolve_system(system))
    x = _as_data(data, shape)
    model = _with_data_scale(model, x, shape)
    student = _seeded_student(model, shape, seed=train.seed, system=name)
    x = x / model.scale
    batch, n, d = train.batch_size, shape.n, shape.d

    def loss_fn(m: nn.Module, gen: torch.Generator, step: int) -> Tensor:
        p = next(m.parameters())
        (xb,) = augment_batch([x[torch.randint(len(x), (batch,), generator=gen)]], gen, loss, n, d)
        u = m.to_flow_coords(xb.to(device=p.device, dtype=p.dtype))
        return -m.log_prob_flow(u).mean()

    run_config = {
        "method": "nf_mle",
        "system": name,
        "model": dataclasses.asdict(model),
        "loss": dataclasses.asdict(loss),
        "n_data": len(x),
        **(run_info or {}),
    }
    return _fit_student(
        student, loss_fn, train, out_dir, run_config=run_config, resume=resume, progress=progress
    )


# -- NF -> NF distillation ----------------------------------------------------------------------
def _anneal_factor(step: int, steps: int) -> float:
    """Linear decay of the distillation weights from 1 at step 0 to 0 at ``steps``."""
    return max(0.0, 1.0 - step / max(steps, 1))


def _weighted_total(terms: dict[str, Tensor], w: NFLossConfig, step: int, steps: int) -> Tensor:
    """The distillation loss of :func:`nf_distillation_terms`' terms: NLL plus the latent,
    final and sample terms, the latter three annealed (``w.anneal``) by :func:`_anneal_factor`."""
    kd = _anneal_factor(step, steps) if w.anneal else 1.0
    return w.nll_weight * terms["nll"] + kd * (
        w.latent_weight * terms["latent"]
        + w.final_weight * terms["final"]
        + w.sample_weight * terms["sample"]
    )


@torch.no_grad()
def _teacher_draws(teacher: NFStudent, k: int, gen: torch.Generator, like: Tensor) -> Tensor:
    """``(k, event_dim)`` fresh teacher samples in flow coordinates (noise drawn from ``gen``)."""
    eps = torch.randn(k, teacher.flow.dim, generator=gen).to(device=like.device, dtype=like.dtype)
    return teacher.flow.decode(eps)[0]


def distill_nf_from_nf(
    teacher: NFStudent,
    data: Any,
    out_dir: str | os.PathLike[str],
    *,
    model: NFModelConfig | None = None,
    train: TrainConfig | None = None,
    loss: NFLossConfig | None = None,
    resume: bool = True,
    progress: bool = True,
    run_info: dict[str, Any] | None = None,
) -> NFStudent:
    """Distil a smaller coupling flow from an NF teacher (Walton et al. 2025; the terms of
    :func:`~boltzflow.distill.nf_losses.nf_distillation_terms`).

    Args:
        teacher: the trained NF (frozen here).
        data: ``(N, dim)`` training configurations (data units).
        out_dir: run folder.
        model: student architecture; ``scale`` is forced to the teacher's.
        train, loss, resume, progress, run_info: as in :func:`train_nf`.

    Raises:
        ValueError: student has more blocks than the teacher, or a ``scale`` differing from it.
    """
    model = model or NFModelConfig()
    train = train or default_train_config()
    loss = loss or NFLossConfig()
    if model.scale is not None and not math.isclose(model.scale, teacher.scale, rel_tol=1e-6):
        raise ValueError(
            f"student scale {model.scale} differs from the teacher's {teacher.scale}: latent "
            "matching needs the same units (leave nf.scale unset)"
        )
    model = dataclasses.replace(model, scale=teacher.scale)
    latent_pairs(model.blocks, teacher.n_blocks)  # validates the block counts
    shape = _Shape.of_model(teacher.model_config)
    n, d = shape.n, shape.d
    x = _as_data(data, shape) / teacher.scale
    student = _seeded_student(model, shape, seed=train.seed, system=teacher.system)
    teacher = copy.deepcopy(teacher).to(train.device).eval()  # frozen copy
    for p in teacher.parameters():
        p.requires_grad_(False)
    batch = train.batch_size
    n_syn = round(loss.synthetic_fraction * batch)
    w = loss
    steps = train.steps

    def loss_fn(m: nn.Module, gen: torch.Generator, step: int) -> tuple[Tensor, dict[str, float]]:
        p = next(m.parameters())
        parts = []
        if batch > n_syn:
            idx = torch.randint(len(x), (batch - n_syn,), generator=gen)
            (xb,) = augment_batch([x[idx]], gen, loss, n, d)
            parts.append(m.to_flow_coords(xb.to(device=p.device, dtype=p.dtype)))
        if n_syn:
            parts.append(_teacher_draws(teacher, n_syn, gen, p))
        u = torch.cat(parts)
        eps = None
        if w.sample_weight > 0:
            eps = torch.randn(batch, m.flow.dim, generator=gen).to(device=p.device, dtype=p.dtype)
        terms = nf_distillation_terms(
            m, teacher, u, eps, latents=w.latent_weight > 0 or w.final_weight > 0
        )
        total = _weighted_total(terms, w, step, steps)
        return total, {k: float(v.detach()) for k, v in terms.items()}

    run_config = {
        "method": "nf_from_nf",
        "system": teacher.system,
        "teacher": {"model_config": teacher.model_config, "n_parameters": teacher.n_parameters},
        "model": dataclasses.asdict(model),
        "loss": dataclasses.asdict(loss),
        "n_data": len(x),
        **(run_info or {}),
    }
    return _fit_student(
        student, loss_fn, train, out_dir, run_config=run_config, resume=resume, progress=progress
    )


# -- CNF -> NF distillation ---------------------------------------------------------------------
def cnf_pairs(
    teacher: Any,
    n: int,
    *,
    seed: int = 0,
    method: str = "dopri5",
    atol: float = 1e-5,
    rtol: float = 1e-5,
    steps: int | None = None,
    batch_size: int = 1000,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Noise/sample pairs of a teacher CNF: ``z0`` drawn from its prior, ``x1`` its ODE image.

    Positions only are integrated (no divergence, :meth:`TeacherCNF.push_prior`), so this costs
    one solve per batch.

    Args:
        teacher: a :class:`~boltzflow.flows.cnf.TeacherCNF`.
        n: number of pairs.
        seed: seeds the noise.
        method, atol, rtol, steps: ODE settings (:func:`boltzflow.flows.ode.integrate`).
        batch_size: rows per solve.
        progress: show progress over the ``n`` solves.

    Returns:
        ``z0 (n, dim)`` in the teacher's flow units (prior noise) and ``x1 (n, dim)`` in data
        units, float32, on CPU.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got {n}, {batch_size}")
    zs, xs = [], []
    for z0, res in teacher.push_prior(
        n,
        seed=seed,
        method=method,
        atol=atol,
        rtol=rtol,
        steps=steps,
        divergence="none",
        batch_size=batch_size,
        progress=progress,
        desc="teacher pairs",
    ):
        x1 = res.x
        if teacher.mean_free:
            x1 = remove_mean(x1, teacher.prior.n_particles, teacher.prior.spatial_dim)
        zs.append(z0)
        xs.append(x1 * teacher.scale)
    return torch.cat(zs).float().cpu(), torch.cat(xs).float().cpu()


def check_cartesian_teacher(teacher: Any) -> None:
    """Refuse a teacher on internal coordinates: this NF distils Cartesian (noise, sample) pairs.

    Raises:
        ValueError: ``teacher`` has an internal-coordinate transform.
    """
    if getattr(teacher, "transform", None) is not None:
        raise ValueError(
            "the nf method distils a Cartesian teacher; this teacher lives on internal "
            "coordinates: distil it with f2d2, falcon or the Euler baselines, or train an "
            "internal-coordinate NF on data with `boltzflow train nf`"
        )


def distill_nf_from_cnf(
    teacher: Any,
    out_dir: str | os.PathLike[str],
    *,
    system: str | None = None,
    n_pairs: int = 10_000,
    pair_settings: dict[str, Any] | None = None,
    model: NFModelConfig | None = None,
    train: TrainConfig | None = None,
    loss: NFLossConfig | None = None,
    resume: bool = True,
    progress: bool = True,
    run_info: dict[str, Any] | None = None,
) -> NFStudent:
    """Distil a coupling flow from a teacher CNF by regression on its (noise, sample) pairs.

    The pairs are generated once with seed ``train.seed`` and cached in ``out_dir/cnf_pairs.pt``
    (reused when their count and seed match). Objective:
    :func:`~boltzflow.distill.nf_losses.pair_regression_terms` with the weights of ``loss``.

    Args:
        teacher: a :class:`~boltzflow.flows.cnf.TeacherCNF`.
        out_dir: run folder.
        system: system name recorded in the student (None: unrecorded).
        n_pairs: number of ODE pairs.
        pair_settings: ODE settings for :func:`cnf_pairs` (``method``, ``atol``, ``rtol``,
            ``steps``, ``batch_size``).
        model: student architecture (``scale`` None: RMS of the teacher's samples).
        train, loss, resume, progress, run_info: as in :func:`train_nf`.

    Raises:
        ValueError: an internal-coordinate teacher (:func:`check_cartesian_teacher`).
    """
    check_cartesian_teacher(teacher)
    model = model or NFModelConfig()
    train = train or default_train_config()
    loss = loss or NFLossConfig(final_weight=1.0, sample_weight=1.0)
    pair_settings = dict(pair_settings or {})
    cfg = teacher.model_config
    shape = _Shape.of_model(cfg)
    n, d = shape.n, shape.d
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs_path = out / PAIRS_FILE
    pairs = None
    if pairs_path.is_file():
        cached = load_checkpoint(pairs_path, kind="nf_pairs")
        if cached["n"] == n_pairs and cached["seed"] == train.seed:
            pairs = (cached["z0"], cached["x1"])
    if pairs is None:
        pairs = cnf_pairs(teacher, n_pairs, seed=train.seed, progress=progress, **pair_settings)
        save_checkpoint(
            pairs_path,
            {
                "kind": "nf_pairs",
                "n": n_pairs,
                "seed": train.seed,
                "z0": pairs[0],
                "x1": pairs[1],
                "settings": pair_settings,
            },
        )
    z0, x1 = pairs
    model = _with_data_scale(model, x1, shape)
    student = _seeded_student(model, shape, seed=train.seed, system=system)
    x1 = x1 / model.scale
    batch = train.batch_size
    w = loss

    def loss_fn(m: nn.Module, gen: torch.Generator, step: int) -> tuple[Tensor, dict[str, float]]:
        p = next(m.parameters())
        idx = torch.randint(len(x1), (batch,), generator=gen)
        zb, xb = augment_batch([z0[idx], x1[idx]], gen, loss, n, d)
        zu = m.to_flow_coords(zb.to(device=p.device, dtype=p.dtype))
        xu = m.to_flow_coords(xb.to(device=p.device, dtype=p.dtype))
        terms = pair_regression_terms(m, zu, xu, sample=w.sample_weight > 0)
        total = (
            w.nll_weight * terms["nll"]
            + w.final_weight * terms["final"]
            + w.sample_weight * terms["sample"]
        )
        return total, {k: float(v.detach()) for k, v in terms.items()}

    run_config = {
        "method": "nf_from_cnf",
        "system": system,
        "teacher": {"model_config": cfg},
        "n_pairs": n_pairs,
        "pair_settings": pair_settings,
        "model": dataclasses.asdict(model),
        "loss": dataclasses.asdict(loss),
        **(run_info or {}),
    }
    return _fit_student(
        student, loss_fn, train, out_dir, run_config=run_config, resume=resume, progress=progress
    )
