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

Checkpoint payload (:func:`boltzflow.train.checkpoint.save_checkpoint`, kind ``"student"``):
``student_kind`` (registry name), ``system`` (name or None), ``model_config`` (what
``from_config`` needs), ``state_dict``, ``extra``.
"""

from __future__ import annotations

import abc
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from boltzflow.flows.priors import (
    Prior,
    PriorFlowMixin,
    build_prior,
    check_points,
)
from boltzflow.io.checkpoint import load_model_checkpoint, save_checkpoint
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


def _system_name(system: Any) -> str | None:
    if system is None or isinstance(system, str):
        return system
    name = getattr(system, "name", None)
    if isinstance(name, str):
        return name
    raise TypeError(f"system must be a name or a System, got {type(system).__name__}")


class Student(PriorFlowMixin, nn.Module, abc.ABC):
    """Few-step model with ``sample(n, steps)`` and ``log_prob(x, steps)``.

    Args:
        prior: base density (mean-free Gaussian for particle systems).
        model_config: JSON-able description from which :meth:`from_config` rebuilds the model.
        system: name of the system the student was trained for (checked on load).
        scale: the student works on ``x / scale`` (as :class:`~boltzflow.flows.cnf.TeacherCNF`).
        default_steps: steps used when a call gives none.
    """

    student_kind: ClassVar[str] = "student"

    def __init__(
        self,
        prior: Prior,
        *,
        model_config: dict[str, Any],
        system: str | None = None,
        scale: float = 1.0,
        default_steps: int = 4,
    ) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        if default_steps < 1:
            raise ValueError(f"default_steps must be >= 1, got {default_steps}")
        self.prior = prior
        self.dim = prior.dim
        self.scale = float(scale)
        self.system = system
        self.default_steps = int(default_steps)
        self.model_config = dict(model_config)

    # -- what subclasses implement --------------------------------------------------------------
    @abc.abstractmethod
    def push(self, z: Tensor, steps: int) -> tuple[Tensor, Tensor]:
        """Noise -> data in flow units: ``(x (B, dim), log|det dx/dz| (B,))``."""

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
        steps = self.default_steps if steps is None else int(steps)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return steps

    def _project(self, x: Tensor) -> Tensor:
        if self.mean_free:
            return remove_mean(x, self.prior.n_particles, self.prior.spatial_dim)
        return x

    def check_points(self, x: Tensor) -> Tensor:
        """Validate ``(N, dim)`` points (mean-free where required); cast to the model's dtype.

        Raises:
            ValueError: wrong shape, or points off the mean-free subspace.
        """
        return check_points(self.prior, x, self._param())

    def sample(
        self, n: int, steps: int | None = None, *, seed: int = 0, batch_size: int = 4096
    ) -> tuple[Tensor, Tensor]:
        """Draw ``n`` samples with their log density in ``steps`` steps.

        Args:
            n: number of samples.
            steps: number of steps (default :attr:`default_steps`).
            seed: seeds the prior draw; the same seed gives the same output.
            batch_size: rows per batch.

        Returns:
            ``x (n, dim)`` (data units, mean-free for particle systems) and ``log_q (n,)``.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        steps = self._steps(steps)
        p = self._param()
        gen = torch.Generator().manual_seed(seed)
        z_all = self.prior.sample(n, generator=gen, dtype=p.dtype, device=p.device)
        xs, lqs = [], []
        was_training = self.training
        self.eval()
        try:
            for start in range(0, n, batch_size):
                z = z_all[start : start + batch_size]
                x, ladj = self.push(z, steps)
                xs.append(self._project(x.detach()) * self.scale)
                lqs.append((self.prior.log_prob(z) - ladj).detach() - self._log_scale())
        finally:
            self.train(was_training)
        return torch.cat(xs), torch.cat(lqs)

    def log_prob(self, x: Tensor, steps: int | None = None, *, batch_size: int = 4096) -> Tensor:
        """``(N,)`` log q of ``(N, dim)`` data-unit points, mapping them to noise in ``steps``."""
        x = self.check_points(x)
        steps = self._steps(steps)
        out = []
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(x), batch_size):
                z, ladj = self.pull(x[start : start + batch_size] / self.scale, steps)
                out.append((self.prior.log_prob(z) - ladj).detach() - self._log_scale())
        finally:
            self.train(was_training)
        return torch.cat(out) if out else x.new_zeros(0)

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
    wanted = _system_name(system)
    if wanted is not None and trained_for is not None and wanted != trained_for:
        raise ValueError(
            f"{path}: this {kind} student was trained for system {trained_for!r}, not {wanted!r}"
        )
    model = STUDENTS[kind].from_config(payload["model_config"], system=trained_for)
    dim = getattr(system, "dim", None)
    if dim is not None and int(dim) != model.dim:
        raise ValueError(f"{path}: student has dim {model.dim}, system {wanted!r} has dim {dim}")
    model.load_state_dict(state)
    return model.to(map_location) if map_location is not None else model


def prior_from_config(config: dict[str, Any]) -> Prior:
    """The prior recorded in a student's ``model_config["prior"]``."""
    return build_prior(config["prior"])
