"""Distil a teacher CNF into an F2D2 or FALCON student with the shared training loop.

Supervision comes from the teacher (default): a cache of teacher trajectories on a uniform grid
(:mod:`boltzflow.distill.trajectories`, written once to ``OUT/trajectories.pt``) supplies points on
the teacher's marginals, its velocity and exact divergence there (diagonal targets) and exact
jumps between grid times (pair targets); the self-consistency losses (F2D2 semigroup, FALCON
MeanFlow and invertibility) act on the same points. FALCON can instead train from data alone
(``loss.target = "data"``): conditional flow matching on the linear interpolant with (equivariant)
OT couplings, MeanFlow and invertibility, without a teacher.

Each method brings its loss (its options and the weighting of its terms, next to the model:
:func:`boltzflow.distill.f2d2.f2d2_loss`, :func:`boltzflow.distill.falcon.falcon_loss`); this
module draws the minibatches and runs the shared training loop. A step's minibatch, every random
draw of its loss included, depends on ``(train.seed, step)`` alone (:class:`StudentLoss`), so it
can be built ahead (``train.data_workers``) and, under ``torchrun``, the student trains with
``DistributedDataParallel`` like the teacher (:mod:`boltzflow.train.trainer`): rank r evaluates
its share of the global batch, rank 0 makes the teacher trajectories and writes checkpoints and
the model.

The student uses the teacher's backbone type and, by default, its size and (``init_from_teacher``)
starts from its weights, i.e. as the Euler step of the teacher
(:func:`boltzflow.distill.flowmap.init_from_teacher`). ``[student.backbone]`` overrides backbone
options (e.g. ``hidden = 32`` for a smaller, faster student), which needs
``init_from_teacher = false``.

An internal-coordinate teacher (``representation = "internal"``) gives an internal-coordinate
student on the same z (the teacher's transform, TorusGaussian prior and a two-time TorusMLP;
:mod:`boltzflow.distill.flowmap`): its trajectories are recorded on z, the minibatch points are
wrapped into [-pi, pi) on the periodic columns with the pair ends on the same sheet
(:meth:`~boltzflow.distill.trajectories.Trajectories.pairs`), training data (``--data``,
Cartesian nm) are mapped to z by the teacher's transform, the data coupling and interpolant are
the wrapped OT and the geodesic of the teacher's flow matching, and ``loss.energy`` sees the
energy of z, u(x(z)) - log J(z) - sum log sigma (so that its reverse KL is the one of the
Cartesian density in the convention of DESIGN.md).

Config file (TOML; ``[profiles.NAME.*]`` override sections as for teachers)::

    method = "f2d2"            # or "falcon"
    [student]   default_steps, init_from_teacher, signed (FALCON), init_from
    [student.backbone]  backbone options replacing the teacher's (hidden, layers, ...)
    [loss]      the method's loss options: diagonal, pairs, dyadic_fraction, aligned_steps,
                target ("teacher" | "data") for both; semigroup, div_weight for F2D2
                (boltzflow.distill.f2d2.F2D2LossConfig); meanflow, inverse,
                meanflow_adaptive_power and the optional logdet, energy, energy_steps,
                likelihood, likelihood_steps for FALCON
                (boltzflow.distill.falcon.FALCONLossConfig)
    [trajectories]  n, grid, atol, rtol, batch_size, seed
    [train]     boltzflow.train.config.TrainConfig
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from boltzflow import distributed
from boltzflow.distill.base import STUDENT_FILE, Student, load_student
from boltzflow.distill.f2d2 import F2D2, F2D2LossConfig, f2d2_loss
from boltzflow.distill.falcon import FALCON, FALCONLossConfig, falcon_loss
from boltzflow.distill.flowmap import init_from_teacher
from boltzflow.distill.flowmap_loss import FlowMapLoss, FlowMapLossConfig, LossContext
from boltzflow.distill.trajectories import (
    TRAJECTORY_DIVERGENCES,
    Trajectories,
    tail_partial_file,
    teacher_trajectories,
)
from boltzflow.flows.cnf import MODEL_FILE, TRAINING_FILE, TeacherCNF, refuse_base_flow
from boltzflow.flows.flow_matching import couple, interpolate
from boltzflow.io.checkpoint import load_checkpoint, resolve_checkpoint_file
from boltzflow.io.tomlfile import dataclass_from_dict
from boltzflow.models.method import Method
from boltzflow.systems import System, load_system
from boltzflow.systems.particles import remove_mean
from boltzflow.train.config import TrainConfig, read_toml
from boltzflow.train.fit import fit_and_export
from boltzflow.train.prefetch import step_generator

__all__ = [
    "LOSSES",
    "METHODS",
    "F2D2LossConfig",
    "FALCONLossConfig",
    "MethodLoss",
    "StudentBatches",
    "StudentConfig",
    "StudentLoss",
    "StudentOptions",
    "TrajectoryConfig",
    "build_student",
    "flow_energy",
    "load_student_config",
    "student_loss",
    "teacher_system",
    "train_student",
]

TRAJECTORY_FILE = "trajectories.pt"
#: the trajectories made so far, rewritten after every batch: an interrupted run resumes there
PARTIAL_TRAJECTORY_FILE = "trajectories.partial.pt"


@dataclass(frozen=True)
class MethodLoss:
    """A flow-map method's loss: its ``[loss]`` options and its per-step loss
    (:data:`~boltzflow.distill.flowmap_loss.FlowMapLoss`)."""

    config: type[FlowMapLossConfig]
    loss: FlowMapLoss


#: method name -> its loss
LOSSES: dict[str, MethodLoss] = {
    "f2d2": MethodLoss(F2D2LossConfig, f2d2_loss),
    "falcon": MethodLoss(FALCONLossConfig, falcon_loss),
}
METHODS = tuple(LOSSES)


@dataclass
class StudentOptions:
    """Student model: steps used by default, teacher initialisation, FALCON's signed u,
    ``init_from``: a finished student (run folder or file) of the same method whose weights
    start this run (to continue training with other settings), and ``backbone``: options that
    replace the teacher's backbone options (a student of another size)."""

    default_steps: int = 4
    init_from_teacher: bool = True
    signed: bool = True
    init_from: str | None = None
    backbone: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.default_steps < 1:
            raise ValueError(f"student.default_steps must be >= 1, got {self.default_steps}")
        if not isinstance(self.backbone, dict):
            raise TypeError(f"student.backbone must be a table, got {self.backbone!r}")
        if self.backbone and self.init_from_teacher:
            raise ValueError(
                f"student.backbone {self.backbone} changes the teacher's network, so the student "
                "cannot start from the teacher's weights: set student.init_from_teacher = false"
            )


@dataclass
class TrajectoryConfig:
    """Teacher trajectory cache: ``n`` trajectories on ``grid`` uniform intervals (a power of 2
    so that 1, 2, 4, ... step jumps lie on the grid), plus ``tail_fraction · n`` more started
    from the prior widened by ``tail_scale`` (the prior's tails, where a student's log q is
    otherwise never supervised); ``divergence = "quadrature"`` integrates log p by
    ``quadrature_points`` Gauss-Legendre nodes per grid interval. The fields are keywords of
    :func:`boltzflow.distill.trajectories.teacher_trajectories`."""

    n: int = 16384
    grid: int = 16
    atol: float = 1e-5
    rtol: float = 1e-5
    batch_size: int = 1000
    seed: int = 12345
    tail_fraction: float = 0.0
    tail_scale: float = 1.5
    divergence: str = "exact"
    quadrature_points: int = 3

    def __post_init__(self) -> None:
        if self.divergence not in TRAJECTORY_DIVERGENCES:
            raise ValueError(
                f"trajectories.divergence must be one of {list(TRAJECTORY_DIVERGENCES)}, got "
                f"{self.divergence!r}"
            )
        if self.quadrature_points < 1:
            raise ValueError(
                f"trajectories.quadrature_points must be >= 1, got {self.quadrature_points}"
            )
        if self.n < 1 or self.batch_size < 1:
            raise ValueError("trajectories.n and trajectories.batch_size must be >= 1")
        if self.grid < 1 or self.grid & (self.grid - 1):
            raise ValueError(f"trajectories.grid must be a power of 2, got {self.grid}")
        if not 0.0 <= self.tail_fraction <= 1.0:
            raise ValueError(
                f"trajectories.tail_fraction must be in [0, 1], got {self.tail_fraction}"
            )
        if not self.tail_scale >= 1.0:
            raise ValueError(f"trajectories.tail_scale must be >= 1, got {self.tail_scale}")

    def options(self) -> dict[str, Any]:
        """Keywords of :func:`~boltzflow.distill.trajectories.teacher_trajectories`; the tail
        settings only when tail trajectories are asked for (so that caches made before they
        existed stay valid)."""
        out = dataclasses.asdict(self)
        if self.tail_fraction == 0.0:
            del out["tail_fraction"], out["tail_scale"]
        if self.divergence == "exact":
            del out["divergence"], out["quadrature_points"]
        return out


@dataclass
class StudentConfig:
    """A distillation run. ``loss`` is the method's loss config (:data:`LOSSES`): given as a
    table (TOML) it is read into that class, left out it is the method's defaults."""

    method: str = "f2d2"
    system: str | None = None
    description: str = ""
    student: StudentOptions = field(default_factory=StudentOptions)
    loss: FlowMapLossConfig | None = None
    trajectories: TrajectoryConfig = field(default_factory=TrajectoryConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not one of {list(METHODS)}")
        kind = LOSSES[self.method].config
        if self.loss is None:
            self.loss = kind()
        elif isinstance(self.loss, dict):
            self.loss = dataclass_from_dict(kind, self.loss, where="loss")
        elif type(self.loss) is not kind:
            raise TypeError(
                f"loss is a {type(self.loss).__name__}; method {self.method!r} takes a "
                f"{kind.__name__}"
            )
        grid = self.trajectories.grid
        if any(k > grid for k in self.loss.aligned_steps):
            raise ValueError(
                f"loss.aligned_steps {self.loss.aligned_steps} has step counts beyond the "
                f"trajectory grid of {grid} intervals"
            )

    @classmethod
    def field_types(cls, data: dict[str, Any]) -> dict[str, type]:
        """Field types that depend on the data (for
        :func:`~boltzflow.train.config.dataclass_from_dict`): ``loss`` is read into the loss
        config of ``data["method"]``."""
        method = LOSSES.get(data.get("method", cls.method))
        return {"loss": method.config} if method is not None else {}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_student_config(
    path: str | os.PathLike[str], profile: str | None = None, **overrides: Any
) -> StudentConfig:
    """Read a student TOML config; ``overrides`` replace top-level keys (e.g. ``method``)."""
    data = read_toml(path, profile)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return dataclass_from_dict(StudentConfig, data, where=str(path))


def teacher_system(path: str | os.PathLike[str]) -> str | None:
    """The system name recorded in a teacher's model file or training checkpoint (or None)."""
    path = resolve_checkpoint_file(path, (MODEL_FILE, TRAINING_FILE))
    payload = load_checkpoint(path, kind=("teacher_cnf", "training"))
    run = payload.get("run_config") or payload.get("extra", {}).get("run") or {}
    system = run.get("system") or run.get("teacher", {}).get("system")
    return system if isinstance(system, str) else None


def build_student(cfg: StudentConfig, teacher: TeacherCNF, *, system: str | None) -> Student:
    """An untrained student with the teacher's backbone type and options (those in
    ``cfg.student.backbone`` replaced), on the teacher's internal coordinates if it has them.

    Raises:
        ValueError: a teacher with an NF base (not distillable yet: the student would learn
            the map to the NF latent, not to z).
    """
    refuse_base_flow(teacher, f"a {cfg.method} student")
    tc = teacher.model_config
    common = {
        "prior": teacher.prior,
        "n_particles": tc.get("n_particles"),
        "spatial_dim": tc.get("spatial_dim"),
        "backbone_options": {**(tc.get("backbone_options") or {}), **cfg.student.backbone},
        "system": system,
        "scale": teacher.scale,
        "default_steps": cfg.student.default_steps,
        "transform": teacher.transform,
    }
    if cfg.method == "f2d2":
        student: Student = F2D2.build(tc["backbone"], **common)
    else:
        student = FALCON.build(tc["backbone"], signed=cfg.student.signed, **common)
    if cfg.student.init_from is not None:
        previous = load_student(cfg.student.init_from, system=system)
        if type(previous) is not type(student) or previous.model_config != student.model_config:
            raise ValueError(
                f"student.init_from {cfg.student.init_from}: a {previous.student_kind} student "
                f"of another shape, cannot start a {cfg.method} run from it"
            )
        student.load_state_dict(previous.state_dict())
    elif cfg.student.init_from_teacher:
        init_from_teacher(student.net, teacher.net)
    return student


# -- minibatches ---------------------------------------------------------------------------------
def _draw_pairs(
    gen: torch.Generator,
    b: int,
    grid: int,
    dyadic_fraction: float,
    aligned_steps: list[int] | None = None,
) -> tuple:
    """Grid index pairs ``(i0, i1)``, ``i0 != i1``, half of them backward; the aligned ones are
    the jumps of ``aligned_steps`` step sampling (default: 1, 2, 4, ..., ``grid`` steps)."""
    # default order grid, grid / 2, ..., 1 steps: draw k gives span 2**k, as in earlier runs
    steps = torch.tensor(aligned_steps or [grid >> k for k in range(grid.bit_length())])
    span = grid // steps[torch.randint(0, len(steps), (b,), generator=gen)]
    start = (torch.rand(b, generator=gen) * (grid // span)).long() * span
    i0, i1 = start, start + span
    a = torch.randint(0, grid + 1, (b,), generator=gen)
    c = torch.randint(0, grid, (b,), generator=gen)
    c = c + (c >= a).long()  # uniform over the other grid times
    dyadic = torch.rand(b, generator=gen) < dyadic_fraction
    i0, i1 = torch.where(dyadic, i0, a), torch.where(dyadic, i1, c)
    back = torch.rand(b, generator=gen) < 0.5
    return torch.where(back, i1, i0), torch.where(back, i0, i1)


def flow_energy(model: Student, target: Any) -> Callable[[Tensor], Tensor]:
    """The target's reduced energy as a function of the student's flow-unit points ``(B, dim)
    -> (B,)``: u(scale x) for a Cartesian student; for an internal-coordinate student the energy
    of z, u(x(z)) - log J(z) - sum log sigma, so that log q(z) + energy(z) = log q(x) + u(x) in
    the density convention of DESIGN.md (what ``loss.energy`` needs). ``target``: anything with
    ``energy(x (B, 3n)) -> (B,)`` (a :class:`~boltzflow.systems.System`)."""
    transform = model.transform

    def energy(x: Tensor) -> Tensor:
        if transform is None:
            return target.energy(x * model.scale)
        xc, log_det = transform.inverse(x.double())
        return (target.energy(xc) - log_det).to(x.dtype)

    return energy


class StudentBatches:
    """The minibatch of one training step, a pure function of ``(seed, step)``
    (:func:`~boltzflow.train.prefetch.step_generator`): the ``make_batch`` of
    :class:`StudentLoss`, kept apart so that background workers receive only tensors and the
    prior (not the energy function, which may hold an OpenMM worker pool).

    Every random draw of the step is a row of the batch (CPU float32; keys in
    :mod:`boltzflow.distill.flowmap_loss`), in this order: a teacher batch (trajectory indices,
    pair times, diagonal grid times, intermediate fractions, end times) or a data batch (data
    indices, prior samples, their (equivariant) OT coupling to the data, interpolant and end
    times), then ``z`` prior samples if the loss uses the energy and ``x_ml`` maximum-likelihood
    points if it uses them.
    """

    def __init__(
        self,
        cfg: StudentConfig,
        prior: Any,
        *,
        trajectories: Trajectories | None,
        data: Tensor | None,
        ml_points: Tensor | None,
        periodic: Tensor | None,
    ) -> None:
        self.lc, self.b, self.seed = cfg.loss, cfg.train.batch_size, cfg.train.seed
        self.prior, self.periodic = prior, periodic
        self.trajectories, self.data, self.ml_points = trajectories, data, ml_points
        self.n_particles = getattr(prior, "n_particles", None)
        self.spatial_dim = getattr(prior, "spatial_dim", None)

    def make_batch(self, step: int) -> dict[str, Tensor]:
        """The batch of ``step``: ``batch_size`` rows of every key."""
        gen = step_generator(self.seed, step)
        bt = self._teacher(gen) if self.lc.target == "teacher" else self._data(gen)
        if self.lc.uses_energy:
            bt["z"] = self._prior(gen)
        if self.lc.uses_ml_points:
            pts = self.ml_points
            bt["x_ml"] = pts[torch.randint(len(pts), (self.b,), generator=gen)].float()
        return bt

    def _prior(self, gen: torch.Generator) -> Tensor:
        return self.prior.sample(self.b, generator=gen, dtype=torch.float32, device="cpu")

    def _teacher(self, gen: torch.Generator) -> dict[str, Tensor]:
        tr, b, lc = self.trajectories, self.b, self.lc
        grid = len(tr.times) - 1
        idx = torch.randint(len(tr), (b,), generator=gen)
        i0, i1 = _draw_pairs(gen, b, grid, lc.dyadic_fraction, lc.aligned_steps)
        k = torch.randint(0, grid + 1, (b,), generator=gen)
        x_s, x_t = tr.pairs(idx, i0, i1)
        return {
            "x_s": x_s,
            "x_t": x_t,
            "s": tr.times[i0],
            "t": tr.times[i1],
            "dlogp": tr.logp[idx, i1] - tr.logp[idx, i0],
            "v_s": tr.v[idx, i0],
            "x_k": tr.points(idx, k),
            "t_k": tr.times[k],
            "v_k": tr.v[idx, k],
            "div_k": tr.div[idx, k],
            "m": torch.rand(b, generator=gen),
            "t_any": torch.rand(b, generator=gen),
        }

    def _data(self, gen: torch.Generator) -> dict[str, Tensor]:
        b, n_p, s_d, periodic = self.b, self.n_particles, self.spatial_dim, self.periodic
        x1 = self.data[torch.randint(len(self.data), (b,), generator=gen)]
        x0 = self._prior(gen)
        mode = "equivariant_ot" if n_p is not None else "ot"
        x0 = couple(x0, x1, mode, n_particles=n_p, spatial_dim=s_d, periodic=periodic)
        s = torch.rand(b, generator=gen)
        xs, v = interpolate(x0, x1, s, periodic=periodic)
        t = torch.rand(b, generator=gen)
        return {"x_k": xs, "t_k": s, "v_k": v, "x_s": xs, "s": s, "v_s": v, "t": t, "t_any": t}


class StudentLoss:
    """A flow-map student's loss as a :class:`~boltzflow.train.trainer.BatchedLoss`: a
    minibatch of teacher trajectory points (or, with ``loss.target = "data"``, of the linear
    interpolant of coupled data and prior samples) built from the step alone
    (:class:`StudentBatches`), weighted by the method's loss (:data:`LOSSES`).

    The method losses draw nothing themselves and are means over rows of per-row terms, so the
    batch can be built ahead by background workers (``train.data_workers``) and, under
    ``torchrun``, each rank evaluates its contiguous share of the global batch: the mean over
    the ranks (DDP's gradient average) is the one-process loss of the global batch. Terms that
    leave rows out (FALCON's non-finite energies and unconverged preimages) take their mean
    over the rows kept on all ranks (:meth:`~boltzflow.distill.flowmap_loss.LossContext.kept_mean`).

    Args:
        model: the student being trained (its scale, prior and periodic columns are read).
        cfg: the run configuration (method, loss options, batch size and seed).
        trajectories: teacher trajectories (``loss.target = "teacher"``).
        data: ``(N, dim)`` training points (z for an internal-coordinate student), divided
            by ``model.scale`` here.
        target: the system whose energy ``loss.energy`` uses (the caller closes it).

    Raises:
        ValueError: what the loss needs is missing (trajectories, data or target), or a
            teacher term is on with ``loss.target = "data"``.
    """

    def __init__(
        self,
        model: Student,
        cfg: StudentConfig,
        *,
        trajectories: Trajectories | None = None,
        data: Tensor | None = None,
        target: System | None = None,
    ) -> None:
        lc = cfg.loss
        if lc.target == "teacher":
            if trajectories is None:
                raise ValueError("loss.target = 'teacher' needs teacher trajectories")
        else:
            if data is None:
                raise ValueError("loss.target = 'data' needs training data")
            for name in lc.teacher_terms:
                if getattr(lc, name) > 0:
                    raise ValueError(
                        f"loss.{name} needs teacher trajectories; set it to 0 with target='data'"
                    )
        if data is not None:
            data = (data / model.scale).float()
        if lc.uses_energy and target is None:
            raise ValueError("loss.energy needs target, the system whose energy it uses")
        # maximum-likelihood points: the data if given, else the teacher's samples
        ml_points = data
        if ml_points is None and trajectories is not None:
            ml_points = trajectories.ends()
        self.lc = lc
        self.method_loss = LOSSES[cfg.method].loss
        self.energy = flow_energy(model, target) if target is not None else None
        self.batches = StudentBatches(
            cfg,
            model.prior,
            trajectories=trajectories,
            data=data,
            ml_points=ml_points,
            periodic=model.periodic,
        )
        # the trainer (and its workers) take make_batch from here: only the batches object
        # travels to a worker process
        self.make_batch = self.batches.make_batch

    def batch_loss(
        self, model: nn.Module, batch: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, float]]:
        """The method's loss of ``model`` on ``batch`` (a whole batch, or under DDP this
        rank's rows of it), with its parts."""
        p = next(model.parameters())
        bt = {k: v.to(device=p.device, dtype=p.dtype) for k, v in batch.items()}
        context = LossContext(self.energy, shards=distributed.info().world_size)
        return self.method_loss(model, bt, self.lc, context)


def student_loss(
    model: Student,
    cfg: StudentConfig,
    *,
    trajectories: Trajectories | None = None,
    data: Tensor | None = None,
    target: System | None = None,
) -> StudentLoss:
    """The loss of a distillation run for the :class:`~boltzflow.train.trainer.Trainer`
    (:class:`StudentLoss`; same arguments)."""
    return StudentLoss(model, cfg, trajectories=trajectories, data=data, target=target)


def _trajectories(
    cfg: StudentConfig, teacher: TeacherCNF, out: Path, progress: bool
) -> Trajectories:
    """Load ``OUT/trajectories.pt`` if it was made with these settings, else generate it
    (resuming from ``OUT/trajectories.partial.pt`` where an interrupted run left one)."""
    tc = cfg.trajectories.options()
    path = out / TRAJECTORY_FILE
    if path.is_file():
        traj, info = Trajectories.load(path)
        if info.get("config") == tc:
            return traj
    out.mkdir(parents=True, exist_ok=True)
    partial = out / PARTIAL_TRAJECTORY_FILE
    traj = teacher_trajectories(teacher, **tc, progress=progress, partial=partial)
    traj.save(path, info={"config": tc})
    for done in (partial, tail_partial_file(partial)):
        done.unlink(missing_ok=True)
    return traj


def _shared_trajectories(
    cfg: StudentConfig, teacher: TeacherCNF, out: Path, progress: bool
) -> Trajectories:
    """:func:`_trajectories`; under torchrun rank 0 loads or generates them alone (one solve,
    one writer) while the other ranks wait, then they read its file."""
    me = distributed.info()
    if not me.distributed:
        return _trajectories(cfg, teacher, out, progress)
    group = distributed.wait_group()  # rank 0 may integrate for a long time
    if me.is_main:
        try:
            with distributed.alone():
                traj = _trajectories(cfg, teacher, out, progress)
        except Exception as err:
            distributed.broadcast_object(f"{type(err).__name__}: {err}", group=group)
            raise
        distributed.broadcast_object(None, group=group)
        return traj
    error = distributed.broadcast_object(None, group=group)
    if error is not None:
        raise ValueError(f"rank 0 could not make the teacher trajectories: {error}")
    return Trajectories.load(out / TRAJECTORY_FILE)[0]


def train_student(
    cfg: StudentConfig,
    teacher: TeacherCNF,
    out_dir: str | os.PathLike[str],
    *,
    system: str | None = None,
    data: Tensor | None = None,
    resume: bool = True,
    stop_at: int | None = None,
    progress: bool = True,
    run_info: dict[str, Any] | None = None,
) -> Student:
    """Distil ``teacher`` into a student and write ``OUT/student.pt`` (EMA weights) at the end.

    Args:
        cfg: the run configuration.
        teacher: the trained teacher.
        out_dir: run folder (``trajectories.pt``, ``checkpoint.pt``, ``metrics.jsonl``,
            ``run.json``, ``student.pt``).
        system: name of the teacher's system (recorded; checked when the student is loaded).
        data: ``(N, dim)`` training data (Cartesian nm for an internal-coordinate teacher,
            mapped to its z here), for FALCON with ``loss.target = "data"`` or for its
            ``loss.likelihood`` (which otherwise uses the teacher's samples).
        resume, stop_at, progress: as :meth:`boltzflow.train.trainer.Trainer.fit`.
        run_info: extra JSON-able facts for the run record (teacher path, ...).

    Returns:
        the student with EMA weights, in eval mode.

    Raises:
        ValueError: ``cfg.system`` differs from ``system``, the config does not fit the data, or
            ``train.compile`` is set (only the teacher's loss is compiled).
    """
    if cfg.system is not None and system is not None and cfg.system != system:
        raise ValueError(f"config is for system {cfg.system!r} but the teacher is for {system!r}")
    system = system or cfg.system
    if cfg.train.compile:  # the losses' JVPs, Jacobians and Newton solves are not compiled
        raise ValueError("train.compile is for the teacher's loss; set it to false for students")
    if cfg.loss.uses_energy and system is None:
        raise ValueError("loss.energy needs the student's system for its energy; none is set")
    out = Path(out_dir)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    torch.manual_seed(cfg.train.seed)
    student = build_student(cfg, teacher, system=system)
    trajectories = None
    if cfg.loss.target == "teacher":
        trajectories = _shared_trajectories(cfg, teacher, out, progress)
        if isinstance(student, F2D2) and cfg.student.init_from is None:
            div = trajectories.div.double()
            student.set_divergence_scale(float(div.mean()), float(div.std().clamp_min(1e-3)))
    elif data is None:
        raise ValueError("loss.target = 'data' needs training data")
    if data is not None:
        if not cfg.loss.uses_data:
            raise ValueError(
                "training data are used by loss.target = 'data' or loss.likelihood only; "
                "this run uses neither"
            )
        data = torch.as_tensor(data)
        if student.transform is not None:  # Cartesian frames -> the student's z
            with torch.no_grad():
                data = student.to_internal(data)[0]
        data = data.float()
        if student.mean_free:
            data = remove_mean(data, student.prior.n_particles, student.prior.spatial_dim)
    run_config = {"student": cfg.to_dict(), "system": system, **(run_info or {})}
    target = load_system(system) if cfg.loss.uses_energy else None
    try:  # an OpenMM system's worker pool stops here, also on errors and Ctrl-C
        return fit_and_export(
            student,
            student_loss(student, cfg, trajectories=trajectories, data=data, target=target),
            cfg.train,
            out,
            filename=STUDENT_FILE,
            model_kind="student",
            run_config=run_config,
            extra={"student_kind": student.student_kind, "system": system},
            resume=resume,
            stop_at=stop_at,
            progress=progress,
        )
    finally:
        if target is not None:
            target.close()


def _loss_on_data(cfg: StudentConfig) -> bool:
    """Whether ``cfg`` trains from data frames (``loss.target = "data"``) rather than the
    teacher's trajectories."""
    return cfg.loss.target == "data"


def _entry(name: str, model: type, description: str) -> Method:
    return Method(
        name=name,
        model=model,
        config=StudentConfig,
        build=build_student,
        train=train_student,
        log_q_kind=model.log_q_kind,
        uses_steps=True,
        description=description,
        defaults={"method": name},
        reads_data=_loss_on_data,
        distributed=True,
    )


#: registry entries (:mod:`boltzflow.registry.methods`)
F2D2_METHOD = _entry("f2d2", F2D2, "flow map with a learned divergence head (F2D2)")
FALCON_METHOD = _entry("falcon", FALCON, "flow map with exact per-step log-determinants (FALCON)")
