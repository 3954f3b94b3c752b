"""Small coupling normalizing flows as students: trained by maximum likelihood, distilled from a
larger NF teacher, or distilled from a teacher CNF.

:class:`NFStudent` wraps a :class:`~boltzflow.flows.coupling.CouplingFlow` in the
:class:`~boltzflow.distill.base.Student` interface (registry name ``"nf"``). One pass through
all blocks maps noise to data exactly, so ``steps`` is accepted and ignored and log q is exact.
For mean-free particle systems the flow acts on the ``(n - 1) d`` coordinates of the mean-free
subspace in the fixed orthonormal basis of :class:`~boltzflow.flows.coupling.MeanFreeBasis`;
log q is the density on that subspace (the convention of :mod:`boltzflow.flows.priors`), and the
latent is the mean-free Gaussian noise of the teacher CNF.

Objectives (all minimised with the shared :class:`~boltzflow.train.trainer.Trainer`):

- :func:`train_nf`: maximum likelihood on data, ``L = -E_data[log q(x)]``.
- :func:`distill_nf_from_nf` (Walton et al. 2025, "Distilling Normalizing Flows", CVPR 2025
  eLVM workshop, arXiv:2506.21003): a student with fewer blocks minimises

      L = w_nll NLL_S(x) + w_lat mean_j MSE(h_S^j(x), h_T^{m(j)}(x)) + w_fin MSE(f_S(x), f_T(x))
          + w_smp MSE(g_S(eps), g_T(eps)),   eps ~ N(0, I),

  i.e. maximum likelihood plus matching the teacher's intermediate latents (output of student
  block ``j`` against teacher block ``m(j) = round((j + 1) K_T / K_S) - 1``, the paper's
  "intermediate latent" distillation, matched at every ``K_T / K_S``-th teacher block as in the
  authors' code, which matches every 4th Glow step), the final latent ("latent" distillation)
  and samples decoded by both flows from the *same* noise ("synthesized" distillation). MSE is
  the elementwise mean, as in the authors' code (``nn.MSELoss``); all in flow units.
  Options: part of each batch drawn from the teacher instead of the data, and distillation
  weights annealed linearly to 0 (:class:`NFLossConfig`).
- :func:`distill_nf_from_cnf`: regression onto the teacher CNF's ODE pairs ``(z0, x1 = phi(z0))``
  (dopri5, positions only, generated once and cached):

      L = w_nll NLL_S(x1) + w_fin MSE(f_S(x1), z0) + w_smp MSE(g_S(z0), x1),

  the knowledge-distillation-of-a-flow recipe of Baranchuk et al. 2021 ("Distilling the
  Knowledge from Normalizing Flows", ICML INNF+ workshop) applied to an invertible student, so
  log q stays exact.

Optional data augmentation (random O(d) rotations and particle permutations, applied to a pair
or to teacher/student inputs alike) matches the target's symmetries; the EGNN teacher CNF is
E(n)-equivariant, so rotated/permuted pairs are pairs of the same teacher.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from boltzflow.distill.base import STUDENT_FILE, Student, register_student
from boltzflow.flows.coupling import TRANSFORMS, CouplingFlow, MeanFreeBasis
from boltzflow.flows.priors import (
    MeanFreeGaussian,
    Prior,
    build_prior,
    gaussian_prior,
    standard_normal_log_prob,
)
from boltzflow.systems.particles import remove_mean
from boltzflow.train.checkpoint import load_checkpoint, resolve_checkpoint_file, save_checkpoint
from boltzflow.train.config import TrainConfig
from boltzflow.train.trainer import Trainer

__all__ = [
    "NFLossConfig",
    "NFModelConfig",
    "NFStudent",
    "cnf_pairs",
    "default_train_config",
    "distill_nf",
    "distill_nf_from_cnf",
    "distill_nf_from_nf",
    "latent_pairs",
    "nf_distillation_terms",
    "train_nf",
]

PAIRS_FILE = "cnf_pairs.pt"


# -- configuration ----------------------------------------------------------------------------
@dataclass
class NFModelConfig:
    """Architecture of a coupling flow (see :class:`~boltzflow.flows.coupling.CouplingFlow`).

    ``scale``: the flow works on ``x / scale``; None picks the RMS of the (mean-free) training
    coordinates, or the teacher's scale when distilling from an NF (latents must share units).
    """

    blocks: int = 4
    couplings_per_block: int = 2
    hidden: int = 64
    depth: int = 2
    transform: str = "spline"
    bins: int = 8
    bound: float = 5.0
    mask_seed: int = 0
    scale: float | None = None

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise ValueError(f"nf.transform {self.transform!r} is not one of {list(TRANSFORMS)}")
        for name in ("blocks", "couplings_per_block", "hidden", "depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"nf.{name} must be >= 1, got {getattr(self, name)}")
        if self.bins < 2 or not self.bound > 0:
            raise ValueError(
                f"nf.bins must be >= 2 and nf.bound > 0, got {self.bins}, {self.bound}"
            )
        if self.scale is not None and not self.scale > 0:
            raise ValueError(f"nf.scale must be positive, got {self.scale}")

    def flow_options(self) -> dict[str, Any]:
        """Keywords for :class:`CouplingFlow` (all but ``scale``)."""
        out = dataclasses.asdict(self)
        out.pop("scale")
        return out


@dataclass
class NFLossConfig:
    """Loss weights and augmentation (see the module docstring for the objectives).

    Defaults: NLL weight 1 and 0.1 for each distillation term, the 0.9 : 0.1 NLL-to-KD ratio of
    Walton et al.'s tabular configs (github.com/vklyukin/nf_distillation,
    ``conf/training/tabular.yaml``). On DW4 (``workflows/nf_distillation_dw4.py``) no setting
    tried beat the same student trained from scratch (see that script). For a CNF teacher
    :func:`distill_nf_from_cnf` defaults to regression weights 1 (``final``, ``sample``).

    ``synthetic_fraction`` (NF teacher only): that share of every minibatch is drawn fresh
    from the teacher (``x = g_T(eps)``, no augmentation) instead of the data, the
    "synthesized" data of Walton et al.; all terms are evaluated on the mixed batch.
    ``anneal``: the distillation weights (latent, final, sample; not the NLL) decay linearly
    from their value at step 0 to 0 at the last step.

    ``latent_weight`` is ignored for a CNF teacher (it has no blocks). ``rotations``,
    ``reflections`` (O(d) instead of SO(d)) and ``permutations`` augment particle systems.
    """

    nll_weight: float = 1.0
    latent_weight: float = 0.1
    final_weight: float = 0.1
    sample_weight: float = 0.1
    synthetic_fraction: float = 0.0
    anneal: bool = False
    rotations: bool = False
    reflections: bool = False
    permutations: bool = False

    def __post_init__(self) -> None:
        for name in ("nll_weight", "latent_weight", "final_weight", "sample_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.synthetic_fraction <= 1:
            raise ValueError(
                f"loss.synthetic_fraction must be in [0, 1], got {self.synthetic_fraction}"
            )


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


# -- the student ------------------------------------------------------------------------------
@register_student("nf")
class NFStudent(Student):
    """A coupling normalizing flow with the :class:`Student` interface.

    Args:
        flow: the coupling flow on ``R^{event_dim}``.
        prior: mean-free Gaussian (particle systems) or standard Gaussian.
        model_config: description for :meth:`from_config` (see :meth:`build`).
        system: system name, checked on load.
        scale: coordinate unit of the flow.
    """

    def __init__(
        self,
        flow: CouplingFlow,
        prior: Prior,
        *,
        model_config: dict[str, Any],
        system: str | None = None,
        scale: float = 1.0,
    ) -> None:
        super().__init__(
            prior, model_config=model_config, system=system, scale=scale, default_steps=1
        )
        if flow.dim != prior.event_dim:
            raise ValueError(f"flow dim {flow.dim} != prior event_dim {prior.event_dim}")
        self.flow = flow
        self.basis = (
            MeanFreeBasis(prior.n_particles, prior.spatial_dim)
            if isinstance(prior, MeanFreeGaussian)
            else None
        )

    @classmethod
    def build(
        cls,
        config: NFModelConfig | None = None,
        *,
        dim: int,
        n_particles: int | None = None,
        spatial_dim: int | None = None,
        mean_free: bool = False,
        system: str | None = None,
    ) -> NFStudent:
        """A fresh (identity) flow for a system of flat dimension ``dim``.

        Args:
            config: architecture (``config.scale`` None means 1.0 here).
            dim: flat coordinate dimension.
            n_particles, spatial_dim: particle structure (needed when ``mean_free``).
            mean_free: work on the mean-free subspace.
            system: system name recorded for load-time checks.
        """
        config = config or NFModelConfig()
        prior = gaussian_prior(
            dim, n_particles=n_particles, spatial_dim=spatial_dim, mean_free=mean_free
        )
        flow = CouplingFlow(prior.event_dim, **config.flow_options())
        scale = 1.0 if config.scale is None else float(config.scale)
        model_config = {
            "dim": dim,
            "n_particles": n_particles,
            "spatial_dim": spatial_dim,
            "mean_free": mean_free,
            "prior": prior.config(),
            "flow": flow.config(),
            "scale": scale,
        }
        return cls(flow, prior, model_config=model_config, system=system, scale=scale)

    @classmethod
    def from_config(cls, config: dict[str, Any], *, system: str | None = None) -> NFStudent:
        prior = build_prior(config["prior"])
        flow = CouplingFlow(**config["flow"])
        return cls(
            flow, prior, model_config=config, system=system, scale=float(config.get("scale", 1))
        )

    # -- maps (flow units) ----------------------------------------------------------------------
    @property
    def n_parameters(self) -> int:
        """Trainable parameters."""
        return self.flow.n_parameters

    @property
    def n_blocks(self) -> int:
        return self.flow.n_blocks

    def to_flow_coords(self, x: Tensor) -> Tensor:
        """``(B, dim)`` flow-unit points -> ``(B, event_dim)`` coordinates the flow acts on."""
        return self.basis.to_subspace(x) if self.basis is not None else x

    def from_flow_coords(self, u: Tensor) -> Tensor:
        """Inverse of :meth:`to_flow_coords` (mean-free output)."""
        return self.basis.from_subspace(u) if self.basis is not None else u

    def push(self, z: Tensor, steps: int) -> tuple[Tensor, Tensor]:
        """Noise -> data (flow units); ``steps`` is ignored (one exact pass)."""
        x, ladj = self.flow.decode(self.to_flow_coords(z))
        return self.from_flow_coords(x), ladj

    def pull(self, x: Tensor, steps: int) -> tuple[Tensor, Tensor]:
        """Data -> noise (flow units); ``ladj`` of the noise -> data direction."""
        z, ladj = self.flow.encode(self.to_flow_coords(x))
        return self.from_flow_coords(z), -ladj

    def log_prob_flow(self, u: Tensor) -> Tensor:
        """``(B,)`` log density of flow coordinates ``u (B, event_dim)`` (no unit constant)."""
        z, ladj = self.flow.encode(u)
        return standard_normal_log_prob(z, self.flow.dim) + ladj


# -- helpers ----------------------------------------------------------------------------------
def latent_pairs(student_blocks: int, teacher_blocks: int) -> list[tuple[int, int]]:
    """Matched ``(student block, teacher block)`` indices: student block ``j`` against teacher
    block ``round((j + 1) K_T / K_S) - 1``; the last pair is the final latent.

    Raises:
        ValueError: the student has more blocks than the teacher.
    """
    if not 1 <= student_blocks <= teacher_blocks:
        raise ValueError(
            f"latent matching needs 1 <= student blocks <= teacher blocks, got "
            f"{student_blocks} and {teacher_blocks}"
        )
    ratio = teacher_blocks / student_blocks
    return [(j, round((j + 1) * ratio) - 1) for j in range(student_blocks)]


def _system_facts(system: Any) -> tuple[str | None, int, int | None, int | None, bool]:
    info = getattr(system, "info", system)
    return (
        getattr(info, "name", None),
        int(info.dim),
        info.n_particles,
        info.spatial_dim,
        bool(info.mean_free),
    )


def _resolve_system(system: Any) -> Any:
    if isinstance(system, str):
        from boltzflow.systems.base import SystemInfo
        from boltzflow.systems.registry import definition

        spec = definition(system)
        return SystemInfo.from_spec(spec, spec.get("parameters", {}))
    return system


def _as_data(data: Any, dim: int, n: int | None, d: int | None, mean_free: bool) -> Tensor:
    x = torch.as_tensor(data)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"training data must be (N, {dim}), got {tuple(x.shape)}")
    if len(x) < 1:
        raise ValueError("training data are empty")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("training data contain NaN or infinite values")
    x = x.float()
    if mean_free:
        x = remove_mean(x, n, d)
    return x


def _rms_scale(x: Tensor, event_dim: int) -> float:
    """RMS per subspace coordinate (the mean-free projection keeps ``|x|^2``)."""
    return float(torch.sqrt(x.double().square().sum(-1).mean() / event_dim))


def _augment(
    xs: list[Tensor], gen: torch.Generator, cfg: NFLossConfig, n: int | None, d: int | None
) -> list[Tensor]:
    """Apply the same random rotation/reflection/permutation to every tensor in ``xs``."""
    if n is None or d is None or not (cfg.rotations or cfg.reflections or cfg.permutations):
        return xs
    from boltzflow.flows.flow_matching import random_rotations

    b = len(xs[0])
    rot = torch.eye(d).expand(b, d, d)
    if cfg.rotations:
        rot = random_rotations(b, d, generator=gen)
    if cfg.reflections:
        sign = torch.randint(0, 2, (b,), generator=gen).float() * 2 - 1
        flip = torch.ones(b, d)
        flip[:, 0] = sign
        rot = rot * flip[:, None, :]  # R diag(s): an improper rotation where s = -1
    perm = torch.argsort(torch.rand(b, n, generator=gen), dim=1) if cfg.permutations else None
    out = []
    for x in xs:
        p = x.reshape(b, n, d)
        p = p @ rot.transpose(1, 2).to(device=x.device, dtype=x.dtype)
        if perm is not None:
            p = p.gather(1, perm.to(x.device)[..., None].expand(b, n, d))
        out.append(p.reshape(b, n * d))
    return out


def _mse(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).square().mean()


def _fit(
    student: NFStudent,
    loss_fn: Any,
    train: TrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    run_config: dict[str, Any],
    resume: bool,
    progress: bool,
) -> NFStudent:
    """Run the shared :class:`Trainer`; write ``student.pt`` (EMA weights) when finished."""
    trainer = Trainer(
        student,
        loss_fn,
        train,
        out_dir,
        model_kind="student",
        model_config=student.model_config,
        run_config=run_config,
        extra={"student_kind": student.student_kind, "system": student.system},
        progress=progress,
    )
    trainer.fit(resume=resume)
    ema = trainer.ema_model()
    ema.eval()
    if trainer.step >= train.steps:
        ema.save(
            Path(out_dir) / STUDENT_FILE,
            extra={
                "steps": trainer.step,
                "elapsed_s": trainer.elapsed,
                "n_parameters": ema.n_parameters,
                "run": run_config,
            },
        )
    return ema


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
    name, dim, n, d, mean_free = _system_facts(_resolve_system(system))
    x = _as_data(data, dim, n, d, mean_free)
    event_dim = (n - 1) * d if mean_free else dim
    scale = model.scale if model.scale is not None else _rms_scale(x, event_dim)
    model = dataclasses.replace(model, scale=scale)
    torch.manual_seed(train.seed)  # parameter initialisation
    student = NFStudent.build(
        model, dim=dim, n_particles=n, spatial_dim=d, mean_free=mean_free, system=name
    )
    x = x / scale
    batch = train.batch_size

    def loss_fn(m: nn.Module, gen: torch.Generator, step: int) -> Tensor:
        p = next(m.parameters())
        (xb,) = _augment([x[torch.randint(len(x), (batch,), generator=gen)]], gen, loss, n, d)
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
    return _fit(
        student, loss_fn, train, out_dir, run_config=run_config, resume=resume, progress=progress
    )


# -- NF -> NF distillation ----------------------------------------------------------------------
def _anneal_factor(step: int, steps: int) -> float:
    """Linear decay of the distillation weights from 1 at step 0 to 0 at ``steps``."""
    return max(0.0, 1.0 - step / max(steps, 1))


@torch.no_grad()
def _teacher_draws(teacher: NFStudent, k: int, gen: torch.Generator, like: Tensor) -> Tensor:
    """``(k, event_dim)`` fresh teacher samples in flow coordinates (noise drawn from ``gen``)."""
    eps = torch.randn(k, teacher.flow.dim, generator=gen).to(device=like.device, dtype=like.dtype)
    return teacher.flow.decode(eps)[0]


def nf_distillation_terms(
    student: NFStudent,
    teacher: NFStudent,
    u: Tensor,
    eps: Tensor | None,
    *,
    latents: bool = True,
) -> dict[str, Tensor]:
    """The four terms of the NF -> NF objective on one minibatch (flow coordinates).

    Args:
        student, teacher: flows sharing ``scale`` and dimension.
        u: ``(B, event_dim)`` data (or teacher samples) in flow coordinates.
        eps: ``(B', event_dim)`` noise for the decoded-sample term (None skips it).
        latents: compute the latent-matching terms (False: ``latent`` and ``final`` are 0 and
            the teacher's encode pass is skipped).

    Returns:
        ``nll``, ``latent`` (intermediate blocks; 0 when the student has one block), ``final``
        and ``sample`` (0 without ``eps``), each a scalar tensor.
    """
    z_s, ladj_s, lat_s = student.flow.encode(u, return_latents=True)
    nll = -(standard_normal_log_prob(z_s, student.flow.dim) + ladj_s).mean()
    latent = final = u.new_zeros(())
    if latents:
        with torch.no_grad():
            _, _, lat_t = teacher.flow.encode(u, return_latents=True)
        pairs = latent_pairs(student.n_blocks, teacher.n_blocks)
        inter = [_mse(lat_s[j], lat_t[k]) for j, k in pairs[:-1]]
        latent = torch.stack(inter).mean() if inter else u.new_zeros(())
        j, k = pairs[-1]
        final = _mse(lat_s[j], lat_t[k])
    sample = u.new_zeros(())
    if eps is not None:
        with torch.no_grad():
            x_t, _ = teacher.flow.decode(eps)
        x_s, _ = student.flow.decode(eps)
        sample = _mse(x_s, x_t)
    return {"nll": nll, "latent": latent, "final": final, "sample": sample}


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
    """Distil a smaller coupling flow from an NF teacher (Walton et al. 2025; module docstring).

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
    cfg = teacher.model_config
    n, d, mean_free = cfg["n_particles"], cfg["spatial_dim"], cfg["mean_free"]
    x = _as_data(data, cfg["dim"], n, d, mean_free) / teacher.scale
    torch.manual_seed(train.seed)
    student = NFStudent.build(
        model,
        dim=cfg["dim"],
        n_particles=n,
        spatial_dim=d,
        mean_free=mean_free,
        system=teacher.system,
    )
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
            (xb,) = _augment([x[idx]], gen, loss, n, d)
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
        kd = _anneal_factor(step, steps) if w.anneal else 1.0
        total = w.nll_weight * terms["nll"] + kd * (
            w.latent_weight * terms["latent"]
            + w.final_weight * terms["final"]
            + w.sample_weight * terms["sample"]
        )
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
    return _fit(
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
) -> tuple[Tensor, Tensor]:
    """Noise/sample pairs of a teacher CNF: ``z0`` drawn from its prior, ``x1`` its ODE image.

    Positions only are integrated (no divergence), so this costs one solve per batch.

    Args:
        teacher: a :class:`~boltzflow.flows.cnf.TeacherCNF`.
        n: number of pairs.
        seed: seeds the noise.
        method, atol, rtol, steps: ODE settings (:func:`boltzflow.flows.ode.integrate`).
        batch_size: rows per solve.

    Returns:
        ``z0 (n, dim)`` in the teacher's flow units (prior noise) and ``x1 (n, dim)`` in data
        units, float32, on CPU.
    """
    from boltzflow.flows.ode import integrate

    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got {n}, {batch_size}")
    p = next(teacher.parameters())
    gen = torch.Generator().manual_seed(seed)
    z0 = teacher.prior.sample(n, generator=gen, dtype=p.dtype, device=p.device)
    xs = []
    was_training = teacher.training
    teacher.eval()
    try:
        for start in range(0, n, batch_size):
            res = integrate(
                teacher.net,
                z0[start : start + batch_size],
                t0=0.0,
                t1=1.0,
                method=method,
                atol=atol,
                rtol=rtol,
                steps=steps,
                divergence="none",
            )
            x1 = res.x
            if teacher.mean_free:
                x1 = remove_mean(x1, teacher.prior.n_particles, teacher.prior.spatial_dim)
            xs.append(x1 * teacher.scale)
    finally:
        teacher.train(was_training)
    return z0.float().cpu(), torch.cat(xs).float().cpu()


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
    (reused when their count and seed match). Objective: module docstring.

    Args:
        teacher: a :class:`~boltzflow.flows.cnf.TeacherCNF`.
        out_dir: run folder.
        system: system name recorded in the student (None: unrecorded).
        n_pairs: number of ODE pairs.
        pair_settings: ODE settings for :func:`cnf_pairs` (``method``, ``atol``, ``rtol``,
            ``steps``, ``batch_size``).
        model: student architecture (``scale`` None: RMS of the teacher's samples).
        train, loss, resume, progress, run_info: as in :func:`train_nf`.
    """
    model = model or NFModelConfig()
    train = train or default_train_config()
    loss = loss or NFLossConfig(final_weight=1.0, sample_weight=1.0)
    pair_settings = dict(pair_settings or {})
    cfg = teacher.model_config
    dim, n, d = cfg["dim"], cfg.get("n_particles"), cfg.get("spatial_dim")
    mean_free = bool(cfg.get("mean_free", False))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs_path = out / PAIRS_FILE
    pairs = None
    if pairs_path.is_file():
        cached = load_checkpoint(pairs_path, kind="nf_pairs")
        if cached["n"] == n_pairs and cached["seed"] == train.seed:
            pairs = (cached["z0"], cached["x1"])
    if pairs is None:
        pairs = cnf_pairs(teacher, n_pairs, seed=train.seed, **pair_settings)
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
    event_dim = (n - 1) * d if mean_free else dim
    scale = model.scale if model.scale is not None else _rms_scale(x1, event_dim)
    model = dataclasses.replace(model, scale=scale)
    torch.manual_seed(train.seed)
    student = NFStudent.build(
        model, dim=dim, n_particles=n, spatial_dim=d, mean_free=mean_free, system=system
    )
    x1 = x1 / scale
    batch = train.batch_size
    w = loss

    def loss_fn(m: nn.Module, gen: torch.Generator, step: int) -> tuple[Tensor, dict[str, float]]:
        p = next(m.parameters())
        idx = torch.randint(len(x1), (batch,), generator=gen)
        zb, xb = _augment([z0[idx], x1[idx]], gen, loss, n, d)
        zu = m.to_flow_coords(zb.to(device=p.device, dtype=p.dtype))
        xu = m.to_flow_coords(xb.to(device=p.device, dtype=p.dtype))
        z_s, ladj = m.flow.encode(xu)
        nll = -(standard_normal_log_prob(z_s, m.flow.dim) + ladj).mean()
        final = _mse(z_s, zu)
        sample = xu.new_zeros(())
        if w.sample_weight > 0:
            sample = _mse(m.flow.decode(zu)[0], xu)
        total = w.nll_weight * nll + w.final_weight * final + w.sample_weight * sample
        return total, {
            "nll": float(nll.detach()),
            "final": float(final.detach()),
            "sample": float(sample.detach()),
        }

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
    return _fit(
        student, loss_fn, train, out_dir, run_config=run_config, resume=resume, progress=progress
    )


# -- CLI entry ----------------------------------------------------------------------------------
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
        train: loop settings (default :func:`default_train_config`).
        loss: weights and augmentation (default: regression weights 1 for a CNF teacher,
            distillation weights 0.1 for an NF teacher; random rotations for particle systems,
            permutations where the teacher's run used them, no reflections).
        n_pairs, pair_settings: CNF pairs (see :func:`distill_nf_from_cnf`).
        seed: overrides ``train.seed``.

    Raises:
        FileNotFoundError: no teacher at ``teacher_dir`` or no data file.
        ValueError: an unsupported teacher, a system that differs from the teacher's, or an NF
            teacher without ``data``.
    """
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
    info = {"teacher_path": str(path)}
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
            model=model,
            train=train,
            loss=loss,
            resume=resume,
            progress=progress,
            run_info=info,
        )
    if data is None:
        raise ValueError("distilling from an NF teacher needs training data (data=PATH)")
    if isinstance(data, (str, os.PathLike)):
        from boltzflow.data import load_positions

        info["data"] = str(data)
        data = load_positions(data, system=system) if system else load_positions(data)
    return distill_nf_from_nf(
        teacher,
        data,
        out_dir,
        model=model,
        train=train,
        loss=loss,
        resume=resume,
        progress=progress,
        run_info=info,
    )
