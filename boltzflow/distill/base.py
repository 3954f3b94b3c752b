"""The interface every distilled student shares: few-step sampling with log q, likelihoods,
and checkpoints that remember which system the student was trained for.

A student is a map between the prior (noise, z) and the data side (x) in a chosen number of
``steps``. Subclasses implement two methods on flow units (``x / scale``):

- ``push(z, steps) -> (x, ladj)``: noise -> data;
- ``pull(x, steps) -> (z, ladj)``: data -> noise;

where in both cases ``ladj`` is the student's log|det dx/dz| of the noise -> data direction at
that pair, so that ``log q(x) = log p(z) - ladj`` (the change of variables, Papamakarios et al.
2021, arXiv:1912.02762, eq. 2). Students whose log-determinant is itself learned (F2D2) return
their estimate. :class:`Student` then supplies batching, seeding, unit scaling, the mean-free
check and persistence. For mean-free particle systems every density is on the (n - 1) d
subspace, as for the teacher (:mod:`boltzflow.flows.priors`).

Internal coordinates (a student built with ``transform``, an
:class:`~boltzflow.systems.internal_coords.InternalCoordinates` in periodic mode, like the
internal-coordinate teacher of :mod:`boltzflow.flows.cnf`): ``push`` and ``pull`` act on the
transform's z (``prior.dim = 3n - 6``, the dihedral columns of
:attr:`Student.periodic` on the circle, wrapped into [-pi, pi) after every step by
:meth:`Student._project`), while :meth:`Student.iter_samples` and :meth:`Student.log_prob` take
and return Cartesian x (nm, ``dim = 3n``) with log q(x) = log q(z) - log J(z) - sum log sigma and
the extra column ``log_q_internal``
(:meth:`~boltzflow.systems.internal_coords.InternalCoordinates.cartesian_density`, the density
convention of DESIGN.md). ``log_prob`` accepts any rigid placement of x.

Checkpoint payload (:func:`boltzflow.io.checkpoint.save_checkpoint`, kind ``"student"``):
``student_kind`` (registry name), ``system`` (name or None), ``model_config`` (what
``from_config`` needs), ``state_dict``, ``extra``.
"""

from __future__ import annotations

import abc
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from boltzflow.flows.flow_matching import wrap_columns
from boltzflow.flows.priors import (
    Prior,
    PriorFlowMixin,
    TorusGaussian,
    build_prior,
    check_points,
    finite_points,
)
from boltzflow.io.checkpoint import load_model_checkpoint, save_checkpoint
from boltzflow.models.protocol import (
    FlowOutput,
    SamplingMixin,
    check_batch_size,
    check_count,
    check_skip,
    check_steps,
    check_trained_for,
)
from boltzflow.systems.internal_coords import (
    LOG_Q_CONVENTION,
    LOG_Q_INTERNAL,
    InternalCoordinates,
)
from boltzflow.systems.particles import remove_mean

__all__ = ["STUDENTS", "STUDENT_FILE", "Student", "load_student", "register_student"]

#: registry name -> class (filled by :func:`register_student`)
STUDENTS: dict[str, type[Student]] = {}
#: file name of a finished student inside its run folder
STUDENT_FILE = "student.pt"
_TRAINING_FILE = "checkpoint.pt"


def register_student(name: str) -> Any:
    """Class decorator: make a :class:`Student` subclass loadable by ``name``."""

    def wrap(cls: type[Student]) -> type[Student]:
        cls.student_kind = name
        STUDENTS[name] = cls
        return cls

    return wrap


class Student(SamplingMixin, PriorFlowMixin, nn.Module, abc.ABC):
    """Few-step model with ``sample(n, steps)`` and ``log_prob(x, steps)``.

    Args:
        prior: base density (mean-free Gaussian for particle systems).
        model_config: JSON-able description from which :meth:`from_config` rebuilds the model.
        system: name of the system the student was trained for (checked on load).
        scale: the student works on ``x / scale`` (as :class:`~boltzflow.flows.cnf.TeacherCNF`).
        default_steps: steps used when a call gives none.
        transform: internal-coordinate transform (periodic mode; ``prior`` then a
            :class:`~boltzflow.flows.priors.TorusGaussian` on its z with the same periodic
            columns, ``scale`` 1): the student maps z and reports Cartesian x (module docstring).
            Not part of the module tree (fixed by ``model_config``, float64 buffers that must not
            follow ``.float()``).

    Raises:
        ValueError: a non-positive ``scale`` or ``default_steps``, or a ``transform`` that does
            not match ``prior`` (dimension, periodic columns) or ``scale``.
        TypeError: a ``transform`` that is not an ``InternalCoordinates``.
    """

    student_kind: ClassVar[str] = "student"
    #: how log q is obtained (a value of :data:`boltzflow.models.protocol.LOG_Q_KINDS`)
    log_q_kind: ClassVar[str] = ""
    #: whether ``steps`` selects the discretisation (False for one-pass flows)
    uses_steps: ClassVar[bool] = True
    #: default rows per batch of ``sample`` and ``log_prob``: on one CPU thread 256 rows were
    #: the fastest or within 10 % of it for the DW4, LJ13 and ALDP students, 4,096 rows up to
    #: 2 times slower (the EGNN's edge tensors leave the cache; docs/benchmarks.md)
    batch_size: ClassVar[int] = 256

    def __init__(
        self,
        prior: Prior,
        *,
        model_config: dict[str, Any],
        system: str | None = None,
        scale: float = 1.0,
        default_steps: int = 4,
        transform: InternalCoordinates | None = None,
    ) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        if default_steps < 1:
            raise ValueError(f"default_steps must be >= 1, got {default_steps}")
        self.prior = prior
        self.dim = prior.dim
        if transform is not None:
            _check_transform(transform, prior, scale)
            self.dim = 3 * transform.n_atoms
        object.__setattr__(self, "transform", transform)
        self.scale = float(scale)
        self.system = system
        self.default_steps = int(default_steps)
        self.model_config = dict(model_config)

    # -- what subclasses implement --------------------------------------------------------------
    @abc.abstractmethod
    def push(self, z: Tensor, steps: int) -> tuple[Tensor, Tensor]:
        """Noise -> data in flow units: ``(x (B, dim), log|det dx/dz| (B,))``, differentiable
        in ``z`` while autograd is enabled (callers that need no graph, such as
        :meth:`iter_samples`, run it under ``torch.no_grad``)."""

    @abc.abstractmethod
    def pull(self, x: Tensor, steps: int) -> tuple[Tensor, Tensor]:
        """Data -> noise in flow units: ``(z (B, dim), log|det dx/dz| (B,))`` (noise -> data
        direction, so that ``log q(x) = log p(z) - ladj``)."""

    @classmethod
    @abc.abstractmethod
    def from_config(cls, config: dict[str, Any], *, system: str | None = None) -> Student:
        """Rebuild an (untrained) student from :attr:`model_config`."""

    # -- shared machinery ------------------------------------------------------------------------
    def _steps(self, steps: int | None) -> int:
        """``steps`` or the default, checked."""
        return self.default_steps if check_steps(steps) is None else int(steps)

    @property
    def periodic(self) -> Tensor | None:
        """Boolean ``(prior.dim,)`` mask of the periodic (dihedral) columns of z; None without
        an internal-coordinate transform."""
        return None if self.transform is None else self.transform.periodic_mask()

    @property
    def representation(self) -> str:
        """Where the flow lives: ``"cartesian"`` x, or ``"internal"`` coordinates of a molecule
        (as :attr:`boltzflow.flows.cnf.TeacherCNF.representation`). An internal-coordinate model
        keeps the handedness of its training molecule; a Cartesian E(3) flow may mirror it."""
        return "cartesian" if self.transform is None else "internal"

    @property
    def log_q_convention(self) -> str | None:
        """What log q is a density of, where it is not the plain density of x (sample files)."""
        return LOG_Q_CONVENTION if self.transform is not None else None

    def _wrap(self, x: Tensor) -> Tensor:
        """``x (B, prior.dim)`` with the periodic columns wrapped into [-pi, pi) (a new tensor;
        ``x`` itself without periodic columns). Differentiable: a piecewise translation."""
        return x if self.transform is None else wrap_columns(x, self.periodic)

    def wrap_difference(self, d: Tensor) -> Tensor:
        """A difference of two points, ``(B, prior.dim)``, with the periodic columns taken the
        short way round the circle (wrapped into [-pi, pi))."""
        return self._wrap(d)

    def _project(self, x: Tensor) -> Tensor:
        """Back onto the space the flow lives on: the mean-free subspace for particle systems,
        the periodic columns wrapped into [-pi, pi) in internal coordinates."""
        if self.mean_free:
            return remove_mean(x, self.prior.n_particles, self.prior.spatial_dim)
        return self._wrap(x)

    def check_points(self, x: Tensor) -> Tensor:
        """Validate ``(N, dim)`` points (mean-free where required; Cartesian x for an
        internal-coordinate student); cast to the model's dtype.

        Raises:
            ValueError: wrong shape, non-finite values, or points off the mean-free subspace.
        """
        if self.transform is not None:
            return finite_points(x, self.dim, self._param())
        return check_points(self.prior, x, self._param())

    def to_internal(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Cartesian ``x (B, 3n)`` (nm, any rigid placement) -> ``z (B, 3n - 6)`` in the
        model's dtype and ``log_det (B,)`` float64 with log q(x) = log q(z) + log_det.

        Raises:
            ValueError: a student without an internal-coordinate transform.
        """
        if self.transform is None:
            raise ValueError("to_internal needs an internal-coordinate student")
        z, log_det = self.transform(x.to(torch.float64))
        return z.to(self._param().dtype), log_det

    def _output(
        self, z: Tensor, y: Tensor, ladj: Tensor
    ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Data-unit samples ``x``, their ``log_q`` and extra columns from the prior points
        ``z``, the pushed points ``y`` (flow units) and ``ladj`` (differentiable: the graph
        runs through whatever ``y`` and ``ladj`` carry)."""
        log_q_flow = self.prior.log_prob(z) - ladj
        if self.transform is None:
            x = self._project(y) * self.scale
            return x, log_q_flow - self._log_scale(), {}
        dtype = self._param().dtype
        out = self.transform.cartesian_density(y, log_q_flow)
        return out.x.to(dtype), out.log_q.to(dtype), {LOG_Q_INTERNAL: out.log_q_internal.to(dtype)}

    def sample_from(self, z: Tensor, steps: int | None = None) -> tuple[Tensor, Tensor]:
        """The few-step sampler applied to given prior points, differentiable in ``z``.

        Runs in the model's current mode (call ``eval()`` first for sampling); gradients flow
        through the ``steps`` network passes, the log-determinant (F2D2's divergence head,
        FALCON's Jacobian) and, for an internal-coordinate student, the transform to Cartesian
        x. With the same ``z`` it gives the same ``x`` and ``log_q`` as :meth:`iter_samples`.

        Args:
            z: ``(B, prior.dim)`` prior points in the model's dtype (periodic columns in
                [-pi, pi); mean-free for particle systems).
            steps: number of steps (default :attr:`default_steps`).

        Returns:
            ``x (B, dim)`` data-unit samples and ``log_q (B,)`` in the one density convention
            (Cartesian nm and log q(x) = log q(z) - log J(z) - sum log sigma in internal
            coordinates), both in the model's dtype.
        """
        y, ladj = self.push(z, self._steps(steps))
        x, log_q, _ = self._output(z, y, ladj)
        return x, log_q

    def iter_samples(
        self,
        n: int,
        *,
        steps: int | None = None,
        seed: int = 0,
        batch_size: int | None = None,
        progress: bool = False,
        skip: int = 0,
        **settings: Any,
    ) -> Iterator[FlowOutput]:
        """Yield ``n`` samples with their log density in ``steps`` steps, batch by batch.

        Args:
            n: number of samples.
            steps: number of steps (default :attr:`default_steps`).
            seed: seeds the prior draw (all ``n`` points first); the same seed gives the same
                output.
            batch_size: rows per batch (default :attr:`batch_size`).
            progress: unused (the few-step students are fast); accepted for the protocol.
            skip: draw all ``n`` prior points but yield only rows ``skip`` on (to resume an
                interrupted draw: the same rows as without it).
            **settings: a subclass's own sampling settings (:meth:`_draw_batch`; F2D2's
                ``guidance``); the base class has none and raises ``TypeError`` for any.

        Yields:
            :class:`~boltzflow.models.protocol.FlowOutput` per batch: ``x (B, dim)`` (data units,
            mean-free for particle systems; Cartesian nm in the standard frame for an
            internal-coordinate student, with the column ``log_q_internal``), ``log_q (B,)`` and
            ``steps`` network evaluations.
        """
        check_count(n)
        check_skip(skip, n)
        batch_size = check_batch_size(batch_size) or self.batch_size
        steps = self._steps(steps)
        p = self._param()
        gen = torch.Generator().manual_seed(seed)
        z_all = self.prior.sample(n, generator=gen, dtype=p.dtype, device=p.device)
        was_training = self.training
        self.eval()
        try:
            for start in range(skip, n, batch_size):
                t0, c0 = time.perf_counter(), time.process_time()
                z = z_all[start : start + batch_size]
                with torch.no_grad():
                    y, ladj, nfe = self._draw_batch(z, steps, **settings)
                    x, log_q, columns = self._output(z, y, ladj)
                if x.is_cuda:
                    torch.cuda.synchronize(x.device)
                seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
                yield FlowOutput(x, log_q, nfe, nfe, 0, seconds, cpu, columns)
        finally:
            self.train(was_training)

    def _draw_batch(self, z: Tensor, steps: int, **settings: Any) -> tuple[Tensor, Tensor, int]:
        """Prior points ``z (B, dim)`` -> pushed points ``(B, dim)`` (flow units), ``ladj (B,)``
        with ``log q = log p(z) - ladj``, and the network evaluations per sample.

        Raises:
            TypeError: any ``settings`` (subclasses with sampling settings override this).
        """
        if settings:
            raise TypeError(f"{type(self).__name__} has no sampling settings {sorted(settings)}")
        y, ladj = self.push(z, steps)
        return y, ladj, steps if self.uses_steps else 1

    def log_prob(
        self, x: Tensor, *, steps: int | None = None, batch_size: int | None = None
    ) -> Tensor:
        """``(N,)`` log q of ``(N, dim)`` data-unit points, mapping them to noise in ``steps``
        (Cartesian x in nm, any rigid placement, for an internal-coordinate student).

        Raises:
            ValueError: wrong shape, non-finite values, points off the mean-free subspace, or
                a non-positive ``steps``/``batch_size``.
        """
        x = self.check_points(x)
        steps = self._steps(steps)
        batch_size = check_batch_size(batch_size) or self.batch_size
        out = []
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(x), batch_size):
                out.append(self._log_prob_batch(x[start : start + batch_size], steps))
        finally:
            self.train(was_training)
        return torch.cat(out) if out else x.new_zeros(0)

    def _log_prob_batch(self, x: Tensor, steps: int) -> Tensor:
        """``(B,)`` log q of checked data-unit points (see :meth:`log_prob`)."""
        with torch.no_grad():
            if self.transform is None:
                z, ladj = self.pull(x / self.scale, steps)
                return (self.prior.log_prob(z) - ladj).detach() - self._log_scale()
            y, log_det = self.to_internal(x)
            z, ladj = self.pull(y, steps)
            log_q_flow = self.prior.log_prob(self._wrap(z)) - ladj
            return (log_q_flow.double() + log_det).to(x.dtype)

    # -- persistence -----------------------------------------------------------------------------
    def payload(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The checkpoint payload (see the module docstring)."""
        return {
            "kind": "student",
            "student_kind": self.student_kind,
            "system": self.system,
            "model_config": self.model_config,
            "state_dict": self.state_dict(),
            "extra": dict(extra or {}),
        }

    def save(self, path: str | os.PathLike[str], *, extra: dict[str, Any] | None = None) -> Path:
        """Write the student to one checksummed checkpoint file (atomically)."""
        return save_checkpoint(path, self.payload(extra))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        system: Any = None,
        map_location: str | torch.device | None = "cpu",
    ) -> Student:
        """Load a student (see :func:`load_student`); raises if it is of another class."""
        model = load_student(path, system=system, map_location=map_location)
        if not isinstance(model, cls):
            raise ValueError(f"{path}: holds a {type(model).__name__}, not a {cls.__name__}")
        return model


def load_student(
    path: str | os.PathLike[str],
    *,
    system: Any = None,
    weights: str = "ema",
    map_location: str | torch.device | None = "cpu",
) -> Student:
    """Load any registered student from a file or a run folder.

    Args:
        path: a file written by :meth:`Student.save`, a training checkpoint of a student
            (:class:`boltzflow.train.trainer.Trainer` with ``model_kind="student"``), or a run
            folder holding ``student.pt`` or ``checkpoint.pt``.
        system: the system (name or :class:`~boltzflow.systems.System`) it will be used with;
            if given it must match the one the student was trained for.
        weights: for training checkpoints, ``"ema"`` or ``"raw"``.
        map_location: device for the tensors.

    Raises:
        FileNotFoundError: nothing loadable at ``path``.
        ValueError: corrupt file, unknown student kind, or a student of another system.
    """
    path, payload, state = load_model_checkpoint(
        path,
        kind="student",
        files=(STUDENT_FILE, _TRAINING_FILE),
        label="student",
        weights=weights,
        map_location=map_location,
    )
    kind = payload.get("student_kind")
    if kind not in STUDENTS:
        raise ValueError(f"{path}: unknown student kind {kind!r}; known: {sorted(STUDENTS)}")
    trained_for = payload.get("system")
    model = STUDENTS[kind].from_config(payload["model_config"], system=trained_for)
    check_trained_for(path, f"{kind} student", trained_for, system, model.dim)
    model.load_state_dict(state)
    return model.to(map_location) if map_location is not None else model


def _check_transform(transform: InternalCoordinates, prior: Prior, scale: float) -> None:
    """Raise unless ``transform`` fits a student on ``prior`` at ``scale``.

    Raises:
        TypeError: ``transform`` is not an :class:`InternalCoordinates`.
        ValueError: not periodic, another dimension or periodic columns than ``prior`` (which
            must be a :class:`TorusGaussian`), or a scale other than 1.
    """
    if not isinstance(transform, InternalCoordinates):
        raise TypeError(f"transform must be InternalCoordinates, got {type(transform).__name__}")
    periodic = tuple(transform.periodic_mask().nonzero().flatten().tolist())
    if (
        not transform.periodic
        or transform.dim != prior.dim
        or scale != 1.0
        or not isinstance(prior, TorusGaussian)
        or prior.periodic != periodic
    ):
        raise ValueError(
            f"an internal-coordinate student needs a periodic transform, scale 1 and a "
            f"TorusGaussian prior on its z with its periodic columns; got transform dim "
            f"{transform.dim} (periodic mode {transform.periodic}), prior {prior}, scale {scale}"
        )


def transform_from_config(config: dict[str, Any]) -> InternalCoordinates | None:
    """The internal-coordinate transform recorded in a student's ``model_config`` (None for a
    Cartesian student)."""
    data = config.get("internal_coordinates")
    return None if data is None else InternalCoordinates.from_dict(data)


def prior_from_config(config: dict[str, Any]) -> Prior:
    """The prior recorded in a student's ``model_config["prior"]``."""
    return build_prior(config["prior"])
