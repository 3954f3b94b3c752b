"""F2D2: one flow map for positions and log density (Ai, He, Gu, Salakhutdinov, Kolter, Boffi,
Simchowitz 2025, "Joint Distillation for Fast Likelihood Evaluation and Sampling in Flow-based
Models", arXiv:2512.02636).

The coupled ODE of a CNF, dx/dt = v(t, x) and d log p/dt = -div v(t, x), has a joint flow map
that F2D2 parameterises linearly in the step (their joint map Phi_Y):

    X(x, s, t) = x + (t - s) u(x, s, t),      log p_t = log p_s - (t - s) D(x, s, t),

with u the average velocity and D the average divergence along the step,
D(x, s, t) = 1/(t - s) int_s^t div v(tau, X(x, s, tau)) dtau. One network with a shared backbone
gives u (the backbone's output) and D (an extra head on the backbone's pooled features). Both
directions use the same map: s < t samples (noise -> data), s > t scores given points.

Targets (the losses below, weighted by :func:`f2d2_loss` with an :class:`F2D2LossConfig`):

- diagonal: u(x, t, t) = v(t, x) and D(x, t, t) = div v(t, x) (teacher velocity and its exact
  divergence);
- semigroup self-consistency (shortcut models, Frans et al. 2024, arXiv:2410.12557; flow map
  matching, Boffi et al. 2024, arXiv:2406.07507): one jump s -> t equals the two jumps s -> m -> t
  for positions, and (t - s) D(x, s, t) = (m - s) D(x, s, m) + (t - m) D(X(x, s, m), m, t),
  with the two-jump side as a stop-gradient target;
- teacher pairs (optional): exact jumps read off cached teacher trajectories.

Sampling takes two settings of its own: ``guidance`` (default 0, off), the paper's
maximum-likelihood self-guidance, one gradient step of the noise uphill on the student's one-jump
log-likelihood before the K jumps, with log q the exact density of the guided map
(:mod:`boltzflow.distill.f2d2_guidance`); and ``exact_logdet`` (default off), log q from the exact
Jacobian log-determinant of each jump the sampler applies instead of the divergence head
(:meth:`~boltzflow.distill.flowmap.FlowMapStudent.push_exact`): the same samples, weighted by
their own density, at FALCON's cost; what checks the head.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from boltzflow.distill.base import register_student
from boltzflow.distill.f2d2_guidance import (
    LikelihoodGuidance,
    check_guidance,
    likelihood_guidance,
)
from boltzflow.distill.flowmap import FeatureTap, FlowMapStudent
from boltzflow.distill.flowmap_loss import FlowMapLossConfig, LossContext
from boltzflow.models.protocol import LOG_Q_KINDS, FlowOutput

__all__ = [
    "F2D2",
    "F2D2LossConfig",
    "f2d2_diagonal_loss",
    "f2d2_loss",
    "f2d2_pair_loss",
    "f2d2_semigroup_loss",
]


class _DivergenceHead(nn.Module):
    """Scalar head on pooled backbone features; the last layer starts at zero (D = 0)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        last = nn.Linear(width, 1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), last)

    def forward(self, features: Tensor) -> Tensor:
        return self.mlp(features)[:, 0]


@register_student("f2d2")
class F2D2(FlowMapStudent):
    """Joint flow map of positions and log density (see the module docstring).

    Args:
        net: two-time backbone ``net(t, x, s=s) -> u (B, dim)``.
        prior: base density.
        model_config: description for :meth:`from_config` (see
            :meth:`~boltzflow.distill.flowmap.FlowMapStudent.build`).
        system, scale, default_steps: see :class:`~boltzflow.distill.base.Student`.
    """

    log_q_kind = LOG_Q_KINDS["learned_head"]

    def __init__(self, net: nn.Module, prior: Any, **kwargs: Any) -> None:
        super().__init__(net, prior, **kwargs)
        self.tap = FeatureTap(net)
        self.head = _DivergenceHead(self.tap.width)
        # D = div_shift + div_scale * head(features): the head works in normalised units
        # (set from the teacher's divergence statistics before training, stored with the model).
        self.register_buffer("div_shift", torch.zeros(()))
        self.register_buffer("div_scale", torch.ones(()))

    def set_divergence_scale(self, shift: float, scale: float) -> None:
        """Set the affine output map of the divergence head (typical mean and spread of D)."""
        if not scale > 0:
            raise ValueError(f"divergence scale must be positive, got {scale}")
        self.div_shift.fill_(float(shift))
        self.div_scale.fill_(float(scale))

    def forward(self, x: Tensor, s: Tensor | float, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """Average velocity ``u (B, dim)`` and average divergence ``D (B,)`` over [s, t]."""
        u = self.net(t, x, s=s)
        return u, self.div_shift + self.div_scale * self.head(self.tap.pooled())

    def jump(
        self, x: Tensor, s: Tensor | float, t: Tensor | float
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One step: ``X(x, s, t) (B, dim)``, ``(t - s) D (B,)`` (= int_s^t div) and ``D``."""
        u, div = self(x, s, t)
        h = torch.as_tensor(t, dtype=x.dtype, device=x.device) - torch.as_tensor(
            s, dtype=x.dtype, device=x.device
        )
        if h.ndim == 1:
            return x + h[:, None] * u, h * div, div
        return x + h * u, h * div, div

    def iter_samples(
        self,
        n: int,
        *,
        steps: int | None = None,
        seed: int = 0,
        batch_size: int | None = None,
        progress: bool = False,
        skip: int = 0,
        guidance: float = 0.0,
        exact_logdet: bool = False,
    ) -> Iterator[FlowOutput]:
        """:meth:`Student.iter_samples <boltzflow.distill.base.Student.iter_samples>` with
        maximum-likelihood self-guidance of scale ``guidance`` (flow units squared per nat;
        0: none, the unguided sampler exactly). With guidance each batch costs one more forward
        pass (counted in ``nfe``), a backward pass and the m = (n - 1) d (or dim) Hessian rows
        through it; log q stays the density of what is sampled
        (:mod:`boltzflow.distill.f2d2_guidance`). With ``exact_logdet`` the same samples get log q
        from the exact log-determinant of every jump's Jacobian instead of the divergence head
        (``event_dim`` reverse-mode products per jump).

        Raises:
            ValueError: a negative or non-finite ``guidance`` (at the call), guidance on an
                internal-coordinate student, or a scale at which the guided noise map is not
                invertible at a drawn point (when that batch is drawn).
        """
        guidance = check_guidance(guidance)
        if guidance and self.transform is not None:
            raise ValueError("guidance is implemented for Cartesian F2D2 students only")
        return super().iter_samples(
            n,
            steps=steps,
            seed=seed,
            batch_size=batch_size,
            progress=progress,
            skip=skip,
            guidance=guidance,
            exact_logdet=bool(exact_logdet),
        )

    def _draw_batch(
        self, z: Tensor, steps: int, *, guidance: float = 0.0, exact_logdet: bool = False
    ) -> tuple[Tensor, Tensor, int]:
        push = self.push_exact if exact_logdet else self.push
        if not guidance:
            y, ladj = push(z, steps)
            return y, ladj, steps
        y, ladj = self._push_guided(likelihood_guidance(self, z), steps, guidance, push)
        return y, ladj, steps + 1

    def _push_guided(
        self,
        field: LikelihoodGuidance,
        steps: int,
        guidance: float,
        push: Callable[[Tensor, int], tuple[Tensor, Tensor]] | None = None,
    ) -> tuple[Tensor, Tensor]:
        # log q = log p(z) - log det(dz'/dz) - ladj_K(z'): the guided ladj relative to p(z)
        z_guided, log_det = field.step(guidance)
        y, ladj = (push or self.push)(z_guided, steps)
        return y, ladj + log_det

    def draw_guided(
        self, field: LikelihoodGuidance, *, steps: int, guidance: float
    ) -> tuple[Tensor, Tensor]:
        """Samples of the guided sampler from the noise of a precomputed field, so that one
        Hessian serves every scale and step count (what ``sample(..., guidance=...)`` does
        batch by batch, for the same noise).

        Args:
            field: :func:`~boltzflow.distill.f2d2_guidance.likelihood_guidance` at noise
                ``field.z (B, dim)`` drawn from the prior.
            steps: jumps after the guided step.
            guidance: scale (>= 0; 0 gives the unguided sampler from the same noise).

        Returns:
            ``x (B, dim)`` (data units) and ``log_q (B,)``.

        Raises:
            ValueError: an invalid scale or one at which the guided map is not invertible at a
                point of ``field``.
        """
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                y, ladj = self._push_guided(field, self._steps(steps), guidance)
                x, log_q, _ = self._output(field.z, y, ladj)
        finally:
            self.train(was_training)
        return x, log_q

    def _jump_ladj(self, x: Tensor, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        # push: ladj = sum_k (t_k+1 - t_k) D_k (= int_0^1 div v); pull: the backward jumps'
        # summed (t - s) D is -int_0^1 div v, negated by FlowMapStudent.pull
        x, inc, _ = self.jump(x, s, t)
        return x, inc


# -- losses -----------------------------------------------------------------------------------
# Divergence errors are measured in units of the model's ``div_scale`` (1 if it has none), so
# that ``div_weight`` balances positions and log density independently of the system.
def _div_scale(model: nn.Module) -> Tensor | float:
    return getattr(model, "div_scale", 1.0)


def f2d2_diagonal_loss(
    model: F2D2, x: Tensor, t: Tensor, v: Tensor, div: Tensor, *, div_weight: float = 1.0
) -> tuple[Tensor, dict[str, float]]:
    """Diagonal targets: ``u(x, t, t) = v`` and ``D(x, t, t) = div``.

    Args:
        x: ``(B, dim)`` points at times ``t (B,)``; ``v (B, dim)`` teacher velocity there and
            ``div (B,)`` its exact divergence.

    Returns:
        loss (per-sample squared error summed over coordinates, batch mean) and its parts.
    """
    u, d = model(x, t, t)
    lu = (u - v).pow(2).sum(-1).mean()
    ld = ((d - div) / _div_scale(model)).pow(2).mean()
    return lu + div_weight * ld, {"diag_u": float(lu.detach()), "diag_div": float(ld.detach())}


def f2d2_pair_loss(
    model: F2D2,
    x_s: Tensor,
    s: Tensor,
    x_t: Tensor,
    t: Tensor,
    delta_logp: Tensor,
    *,
    div_weight: float = 1.0,
) -> tuple[Tensor, dict[str, float]]:
    """Exact jumps from teacher trajectories: ``X(x_s, s, t) = x_t`` and
    ``(t - s) D = -(log p_t - log p_s) = -delta_logp`` (errors measured per unit time)."""
    u, d = model(x_s, s, t)
    h = t - s
    u_star = (x_t - x_s) / h[:, None]
    d_star = -delta_logp / h
    lu = (u - u_star).pow(2).sum(-1).mean()
    ld = ((d - d_star) / _div_scale(model)).pow(2).mean()
    return lu + div_weight * ld, {"pair_u": float(lu.detach()), "pair_div": float(ld.detach())}


def f2d2_semigroup_loss(
    model: F2D2,
    x: Tensor,
    s: Tensor,
    t: Tensor,
    m: Tensor,
    *,
    div_weight: float = 1.0,
) -> tuple[Tensor, dict[str, float]]:
    """Self-consistency: the jump s -> t against the two jumps s -> m -> t (stop-gradient).

    Errors are divided by ``t - s`` (average-velocity units), so the loss does not vanish for
    short steps. Zero for an exact flow map (tested on a linear field).

    Args:
        x: ``(B, dim)`` points at times ``s (B,)``; ``t, m (B,)`` end and intermediate times.
    """
    with torch.no_grad():
        x1, inc1, _ = model.jump(x, s, m)
        x2, inc2, _ = model.jump(x1, m, t)
        h = (t - s)[:, None]
        u_star = (x2 - x) / h
        d_star = (inc1 + inc2) / (t - s)
    u, d = model(x, s, t)
    lu = (u - u_star).pow(2).sum(-1).mean()
    ld = ((d - d_star) / _div_scale(model)).pow(2).mean()
    return lu + div_weight * ld, {"semi_u": float(lu.detach()), "semi_div": float(ld.detach())}


@dataclass
class F2D2LossConfig(FlowMapLossConfig):
    """F2D2's ``[loss]``: weights ``diagonal``, ``pairs`` and ``semigroup`` of the terms above,
    ``div_weight`` scaling their divergence parts, and the pair options of
    :class:`~boltzflow.distill.flowmap_loss.FlowMapLossConfig`. ``target`` must be
    ``"teacher"``: the divergence targets come from the teacher."""

    semigroup: float = 1.0
    div_weight: float = 1.0

    nonnegative: ClassVar[tuple[str, ...]] = ("diagonal", "pairs", "semigroup", "div_weight")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target != "teacher":
            raise ValueError("F2D2 needs the teacher's divergence: loss.target must be 'teacher'")


def f2d2_loss(
    model: F2D2, batch: dict[str, Tensor], cfg: F2D2LossConfig, context: LossContext
) -> tuple[Tensor, dict[str, float]]:
    """F2D2's loss of one step: the weighted sum of the diagonal, teacher-pair and semigroup
    terms on a teacher batch (keys in :mod:`boltzflow.distill.flowmap_loss`); a zero weight
    leaves its term out. F2D2 draws nothing beyond the batch (``context`` is unused).

    Returns:
        the scalar loss and its parts (``diag_u``, ``diag_div``, ``pair_u``, ...).
    """
    bt = batch
    total = next(model.parameters()).new_zeros(())
    parts: dict[str, float] = {}
    if cfg.diagonal:
        val, more = f2d2_diagonal_loss(
            model, bt["x_k"], bt["t_k"], bt["v_k"], bt["div_k"], div_weight=cfg.div_weight
        )
        total, parts = total + cfg.diagonal * val, {**parts, **more}
    if cfg.pairs:
        val, more = f2d2_pair_loss(
            model, bt["x_s"], bt["s"], bt["x_t"], bt["t"], bt["dlogp"], div_weight=cfg.div_weight
        )
        total, parts = total + cfg.pairs * val, {**parts, **more}
    if cfg.semigroup:
        mid = bt["s"] + bt["m"] * (bt["t"] - bt["s"])
        val, more = f2d2_semigroup_loss(
            model, bt["x_s"], bt["s"], bt["t"], mid, div_weight=cfg.div_weight
        )
        total, parts = total + cfg.semigroup * val, {**parts, **more}
    return total, parts
