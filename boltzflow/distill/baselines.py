"""Naive few-step baselines: the teacher's own velocity integrated by K Euler steps.

Two ways to carry log q through the K steps x_{k+1} = x_k + h v(t_k, x_k), h = 1/K:

- ``logdet="euler"``: the divergence accumulated by the same Euler rule,
  log q -= h div v(t_k, x_k). This is not the density of the discrete map; its importance
  weights collapse (DESIGN.md: ESS/N ~ 1e-4 on DW4 at K = 4-16).
- ``logdet="exact"``: the exact log-determinant of each discrete step,
  log q -= log|det(I + h dv/dx(t_k, x_k))| (full Jacobian on the flow's subspace,
  :func:`boltzflow.distill.flowmap.map_and_logdet`, as FALCON). This is the
  exact change of variables of the K-step Euler map (where it is injective): a fair few-step flow
  that needs no training. A student that does not beat it learned nothing the teacher did not
  already give.

With an internal-coordinate teacher the steps run on its z and each is wrapped into [-pi, pi) on
the periodic columns (a piecewise translation: the step's log-determinant is unchanged; v is
periodic there, so the step is a map of the torus); samples and log q come out Cartesian as the
teacher's (:class:`~boltzflow.distill.base.Student`).

Likelihoods of given points (``log_prob``) run the Euler rule backward in time,
x_k = x_{k+1} - h v(t_{k+1}, x_{k+1}), which is not the exact inverse of the forward scheme; the
NLL of a baseline is therefore a few-step estimate, not the density of its samples.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from boltzflow.distill.base import STUDENT_FILE, Student, register_student
from boltzflow.distill.flowmap import map_and_logdet, subspace_basis, time_grid
from boltzflow.flows.cnf import TeacherCNF, refuse_base_flow
from boltzflow.flows.ode import exact_divergence
from boltzflow.models.method import Method
from boltzflow.models.protocol import LOG_Q_KINDS

__all__ = ["LOGDETS", "METHODS", "EulerBaseline", "EulerConfig", "build_baseline", "train_baseline"]

LOGDETS = ("euler", "exact")


@register_student("euler")
class EulerBaseline(Student):
    """K Euler steps of a teacher's velocity with Euler-rule or exact per-step log q.

    Args:
        teacher: the teacher CNF (its backbone is shared, not copied).
        logdet: ``"euler"`` or ``"exact"`` (see the module docstring).
        system: the system name the teacher was trained for.
    """

    def __init__(self, teacher: TeacherCNF, *, logdet: str = "exact", system: str | None = None):
        if logdet not in LOGDETS:
            raise ValueError(f"unknown logdet {logdet!r}; valid: {list(LOGDETS)}")
        refuse_base_flow(teacher, "an Euler baseline")
        config = {
            "teacher": teacher.model_config,
            "logdet": logdet,
            "prior": teacher.prior.config(),
        }
        super().__init__(
            teacher.prior,
            model_config=config,
            system=system,
            scale=teacher.scale,
            transform=teacher.transform,
        )
        self.net: nn.Module = teacher.net
        self.logdet = logdet

    @property
    def log_q_kind(self) -> str:  # type: ignore[override]
        """Euler-rule divergence or the exact step log-determinant."""
        return LOG_Q_KINDS["euler_rule" if self.logdet == "euler" else "step_logdet"]

    @classmethod
    def from_config(cls, config: dict[str, Any], *, system: str | None = None) -> EulerBaseline:
        return cls(
            TeacherCNF.from_config(config["teacher"]), logdet=config["logdet"], system=system
        )

    def _step(self, x: Tensor, t: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """``x + h v(t, x)`` (unwrapped) and the step's contribution to log|det dx_out/dx_in|
        ``(B,)``."""
        if self.logdet == "euler":
            v, div = exact_divergence(self.net, t, x)
            return x + h * v, h * div

        return map_and_logdet(lambda y: y + h * self.net(t, y), x, subspace_basis(self.prior, x))

    def push(self, z: Tensor, steps: int) -> tuple[Tensor, Tensor]:
        """K forward Euler steps; ``ladj`` accumulated by the chosen rule (differentiable)."""
        grid = time_grid(steps, like=z)
        total = z.new_zeros(len(z))
        for k in range(steps):
            z, inc = self._step(z, grid[k], grid[k + 1] - grid[k])
            z = self._project(z)
            total = total + inc
        return z, total

    def pull(self, x: Tensor, steps: int) -> tuple[Tensor, Tensor]:
        """K Euler steps backward in time (t = 1 -> 0); ``ladj`` of the noise -> data direction."""
        grid = time_grid(steps, reverse=True, like=x)
        total = x.new_zeros(len(x))
        with torch.no_grad():
            for k in range(steps):
                x, inc = self._step(x, grid[k], grid[k + 1] - grid[k])
                x = self._project(x)
                total = total - inc
        return x, total


@dataclass
class EulerConfig:
    """A K-step Euler baseline: how it carries log q (``"euler"`` or ``"exact"``)."""

    logdet: str = "exact"

    def __post_init__(self) -> None:
        if self.logdet not in LOGDETS:
            raise ValueError(f"unknown logdet {self.logdet!r}; valid: {list(LOGDETS)}")


def build_baseline(cfg: EulerConfig, teacher: TeacherCNF, *, system: str | None) -> EulerBaseline:
    """The baseline on ``teacher``'s velocity (nothing to train)."""
    return EulerBaseline(teacher, logdet=cfg.logdet, system=system)


def train_baseline(
    cfg: EulerConfig,
    teacher: TeacherCNF,
    output: str | os.PathLike[str],
    *,
    system: str | None = None,
    **_: Any,
) -> EulerBaseline:
    """Build a baseline and write ``output/student.pt``: it has no training, so data, resume,
    progress and run_info have nothing to act on."""
    model = build_baseline(cfg, teacher, system=system)
    model.save(Path(output) / STUDENT_FILE)
    return model


#: registry entries (:mod:`boltzflow.registry.methods`)
METHODS = [
    Method(
        name=name,
        model=EulerBaseline,
        config=EulerConfig,
        build=build_baseline,
        train=train_baseline,
        log_q_kind=LOG_Q_KINDS[kind],
        uses_steps=True,
        description=description,
        defaults={"logdet": logdet},
    )
    for name, logdet, kind, description in (
        ("euler", "euler", "euler_rule", "K Euler steps of the teacher, Euler-rule log q"),
        ("euler-exact", "exact", "step_logdet", "K Euler steps of the teacher, exact log-det"),
    )
]
