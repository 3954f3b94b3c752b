"""Train a teacher CNF by (equivariant-OT) flow matching on a data set of configurations.

One step: draw a data minibatch x1 (and, for non-equivariant particle backbones, rotate it by
random rotations), draw prior samples x0, re-pair them by the configured coupling, and regress the
velocity on x1 - x0 at a uniform random time (:mod:`boltzflow.flows.flow_matching`). All of it
draws from the trainer's generator, so runs reproduce and resume exactly.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from boltzflow.flows.cnf import MODEL_FILE, TeacherCNF
from boltzflow.flows.flow_matching import couple, flow_matching_loss, random_rotations, rotate
from boltzflow.systems.particles import remove_mean
from boltzflow.train.config import SampleConfig, TeacherConfig
from boltzflow.train.trainer import Trainer

__all__ = ["SystemShape", "build_teacher", "teacher_loss", "train_teacher"]


@dataclass(frozen=True)
class SystemShape:
    """What the teacher needs to know about a system: its dimension and particle structure."""

    dim: int
    n_particles: int | None = None
    spatial_dim: int | None = None
    mean_free: bool = False

    @classmethod
    def of(cls, system: Any) -> SystemShape:
        """From a :class:`~boltzflow.systems.base.System` or :class:`SystemInfo`."""
        info = getattr(system, "info", system)
        return cls(info.dim, info.n_particles, info.spatial_dim, bool(info.mean_free))

    @classmethod
    def from_name(cls, name: str) -> SystemShape:
        """From a registered system's definition file (does not build the system)."""
        from boltzflow.systems.base import SystemInfo
        from boltzflow.systems.registry import definition

        spec = definition(name)
        return cls.of(SystemInfo.from_spec(spec, spec.get("parameters", {})))


def _sampling(cfg: SampleConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def build_teacher(cfg: TeacherConfig, shape: SystemShape) -> TeacherCNF:
    """A fresh (untrained) teacher for ``shape`` as described by ``cfg.model``/``cfg.sample``."""
    particles = shape.n_particles is not None and shape.spatial_dim is not None
    if cfg.model.backbone != "mlp" and not particles:
        raise ValueError(
            f"backbone {cfg.model.backbone!r} needs a particle system; use backbone = 'mlp'"
        )
    return TeacherCNF.build(
        cfg.model.backbone,
        dim=shape.dim,
        n_particles=shape.n_particles,
        spatial_dim=shape.spatial_dim,
        mean_free=shape.mean_free,
        backbone_options=cfg.model.backbone_options(),
        sampling=_sampling(cfg.sample),
        scale=cfg.model.scale,
    )


def teacher_loss(teacher: TeacherCNF, data: Tensor, cfg: TeacherConfig, shape: SystemShape) -> Any:
    """The per-step loss closure ``loss(model, generator, step)`` for :class:`Trainer`."""
    n, d = shape.n_particles, shape.spatial_dim
    fm = cfg.flow_matching
    particles = n is not None and d is not None
    augment = fm.augment_rotations
    if augment is None:
        augment = particles and not getattr(teacher.net, "equivariant", False)
    if augment and not particles:
        raise ValueError("flow_matching.augment_rotations needs a particle system")
    if fm.coupling == "equivariant_ot" and not particles:
        raise ValueError("coupling 'equivariant_ot' needs a particle system; use 'ot'")
    batch = cfg.train.batch_size
    data = data / teacher.scale  # the flow's units

    def loss(model: nn.Module, gen: torch.Generator, step: int) -> Tensor:
        p = next(model.parameters())
        idx = torch.randint(len(data), (batch,), generator=gen)
        x1 = data[idx].to(device=p.device, dtype=p.dtype)
        if augment:
            x1 = rotate(x1, random_rotations(batch, d, generator=gen).to(p.device), n, d)
        x0 = model.prior.sample(batch, generator=gen, dtype=p.dtype, device=p.device)
        x0 = couple(
            x0,
            x1,
            fm.coupling,
            n_particles=n,
            spatial_dim=d,
            reflections=fm.reflections,
            permutations=fm.permutations,
        )
        return flow_matching_loss(
            model.net, x0, x1, generator=gen, sigma=fm.sigma, n_particles=n, spatial_dim=d
        )

    return loss


def train_teacher(
    cfg: TeacherConfig,
    data: Tensor,
    out_dir: str | os.PathLike[str],
    shape: SystemShape,
    *,
    resume: bool = True,
    stop_at: int | None = None,
    progress: bool = True,
    run_info: dict[str, Any] | None = None,
) -> TeacherCNF:
    """Train a teacher and write ``out_dir/teacher.pt`` (EMA weights) when finished.

    Args:
        cfg: the run configuration.
        data: ``(N, dim)`` training configurations (float32 is fine); for mean-free systems the
            centre of mass is removed here (idempotent).
        out_dir: run folder (``checkpoint.pt``, ``metrics.jsonl``, ``run.json``, ``teacher.pt``).
        shape: the system's dimension and particle structure.
        resume: continue from an existing checkpoint in ``out_dir``.
        stop_at: stop early after this many steps (checkpointed; resume later).
        run_info: extra JSON-able facts recorded in the run config (data path, system name).

    Returns:
        the teacher with EMA weights, in eval mode, on the training device.
    """
    data = torch.as_tensor(data)
    if data.ndim != 2 or data.shape[1] != shape.dim:
        raise ValueError(f"training data must be (N, {shape.dim}), got {tuple(data.shape)}")
    if not bool(torch.isfinite(data).all()):
        raise ValueError("training data contain NaN or infinite values")
    data = data.float()
    if shape.mean_free:
        data = remove_mean(data, shape.n_particles, shape.spatial_dim)
    torch.manual_seed(cfg.train.seed)  # parameter initialisation
    teacher = build_teacher(cfg, shape)
    run_config = {"teacher": cfg.to_dict(), "n_data": len(data), **(run_info or {})}
    trainer = Trainer(
        teacher,
        teacher_loss(teacher, data, cfg, shape),
        cfg.train,
        out_dir,
        model_kind="teacher_cnf",
        model_config=teacher.model_config,
        run_config=run_config,
        extra={"sampling": teacher.sampling},
        progress=progress,
    )
    trainer.fit(resume=resume, stop_at=stop_at)
    ema = trainer.ema_model()
    ema.eval()
    if trainer.step >= cfg.train.steps:
        ema.save(Path(out_dir) / MODEL_FILE, extra={"steps": trainer.step, "run": run_config})
    return ema
