"""MCMC transition kernels (MALA, HMC) on a batch of independent chains.

Each kernel leaves invariant the density exp(log_prob(x)) it is given; one row of ``x`` is one
chain, with its own step size (a ``(batch,)`` tensor, or a scalar shared by all). The target is
passed as an *evaluator*: a function ``x -> Evaluation(log_prob, grad, extras)`` whose ``extras``
are per-row tensors carried along with accepted moves (SMC keeps log q and u there, so that a new
temperature needs no new evaluation). Use :func:`autograd_evaluator` to build one from a
log-density, and :func:`tempered_evaluator` for the geometric path (1-b) log q - b u.

For particle systems pass ``project`` (e.g. ``lambda v: remove_mean(v, n, d)``): noise, momenta
and gradients are projected onto the mean-free subspace, so chains stay in it and the kernels
are exact w.r.t. the density on that subspace.

Periodic coordinates (angles on a circle, e.g. the dihedral columns of an internal-coordinate
latent space) take ``wrap``, a map that reduces points into the fundamental box (e.g. [-pi, pi)
on those columns). The kernel then runs on the flat cover: the proposal is drawn and the
Metropolis-Hastings ratio computed with the *unwrapped* displacement, and the target is
evaluated (value and gradient) at the wrapped point. This is exact for any step size: the
periodic extension of the target is invariant under the MALA/HMC kernel on the cover (detailed
balance holds pointwise there, and the kernel commutes with shifts by the period because the
gradient is periodic), and the projection of a shift-commuting chain to the torus is a Markov
chain reversible w.r.t. the projected target. The target must be evaluated only inside the box
(the wrapped points), so it need not even be continuous across the cut. Using instead the
minimal-image difference of wrapped points in the ratio would be exact only while every
displacement stays below half a period.

References:
    MALA: Roberts & Tweedie (1996), Bernoulli 2:341. HMC: Duane et al. (1987), Phys. Lett. B
    195:216; Neal (2011), "MCMC using Hamiltonian dynamics", arXiv:1206.1901.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Evaluation",
    "Evaluator",
    "KernelStep",
    "adapt_step_size",
    "autograd_evaluator",
    "hmc_step",
    "mala_step",
    "tempered_evaluator",
]


class Evaluation(NamedTuple):
    """The target at a batch of points.

    Attributes:
        log_prob: ``(batch,)`` log-density (up to a constant); ``-inf`` or NaN rows are rejected.
        grad: ``(batch, dim)`` its gradient w.r.t. x.
        extras: per-row tensors ``(batch, ...)`` kept in step with accepted moves.
    """

    log_prob: Tensor
    grad: Tensor
    extras: tuple[Tensor, ...] = ()


Evaluator = Callable[[Tensor], Evaluation]


class KernelStep(NamedTuple):
    """Result of one kernel step: new points, their evaluation and a ``(batch,)`` bool accept."""

    x: Tensor
    evaluation: Evaluation
    accepted: Tensor


def autograd_evaluator(log_prob: Callable[[Tensor], Tensor]) -> Evaluator:
    """Evaluator from a differentiable ``log_prob: (batch, dim) -> (batch,)`` via autograd."""

    def evaluate(x: Tensor) -> Evaluation:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            lp = log_prob(xg)
            (grad,) = torch.autograd.grad(lp.sum(), xg)
        return Evaluation(lp.detach(), grad.detach())

    return evaluate


def tempered_evaluator(
    log_q: Callable[[Tensor], Tensor], energy: Callable[[Tensor], Tensor], beta: float
) -> Evaluator:
    """Evaluator of the geometric path log pi_b = (1 - b) log q(x) - b u(x).

    ``extras`` are ``(log_q, u, grad log_q, grad u)``, from which
    :func:`~boltzflow.sampling.smc` re-forms the density at another b without new evaluations.
    """

    def evaluate(x: Tensor) -> Evaluation:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            lq = log_q(xg)
            (g_lq,) = torch.autograd.grad(lq.sum(), xg)
            xg = x.detach().requires_grad_(True)
            u = energy(xg)
            finite = torch.isfinite(u)
            (g_u,) = torch.autograd.grad(torch.where(finite, u, 0).sum(), xg)
        lq, u = lq.detach(), u.detach()
        lp = (1 - beta) * lq - beta * u if beta > 0 else lq
        grad = (1 - beta) * g_lq - beta * g_u
        return Evaluation(lp, grad, (lq, u, g_lq, g_u))

    return evaluate


def _per_row(step: Tensor | float, x: Tensor) -> Tensor:
    h = torch.as_tensor(step, dtype=x.dtype, device=x.device)
    if h.ndim == 0:
        h = h.expand(x.shape[0])
    if h.shape != (x.shape[0],) or not bool((h > 0).all()):
        raise ValueError(f"step size must be positive, scalar or ({x.shape[0]},)")
    return h


def _select(accept: Tensor, new: Evaluation, old: Evaluation) -> Evaluation:
    def pick(a: Tensor, b: Tensor) -> Tensor:
        mask = accept.reshape(-1, *([1] * (a.ndim - 1)))
        return torch.where(mask, a, b)

    extras = tuple(pick(a, b) for a, b in zip(new.extras, old.extras))
    return Evaluation(pick(new.log_prob, old.log_prob), pick(new.grad, old.grad), extras)


def _identity(v: Tensor) -> Tensor:
    return v


def _accept(log_ratio: Tensor, generator: torch.Generator | None) -> Tensor:
    log_ratio = torch.where(torch.isnan(log_ratio), float("-inf"), log_ratio)
    u = torch.rand(log_ratio.shape, generator=generator, dtype=log_ratio.dtype)
    return torch.log(u.to(log_ratio.device)) < log_ratio


def mala_step(
    x: Tensor,
    current: Evaluation,
    evaluate: Evaluator,
    step_size: Tensor | float,
    *,
    generator: torch.Generator | None = None,
    project: Callable[[Tensor], Tensor] | None = None,
    wrap: Callable[[Tensor], Tensor] | None = None,
) -> KernelStep:
    """One Metropolis-adjusted Langevin step per chain.

    Proposal y = x + h grad log pi(x) + sqrt(2h) xi with xi ~ N(0, I); accepted with probability
    min(1, pi(y) k(x|y) / (pi(x) k(y|x))), k(y|x) = N(y; x + h grad log pi(x), 2h I).

    Args:
        x: ``(batch, dim)`` current points.
        current: ``evaluate(x)``.
        evaluate: the target (see :class:`Evaluation`).
        step_size: h, scalar or ``(batch,)``.
        generator: CPU torch generator for reproducible noise.
        project: linear projection applied to gradients and noise (mean-free systems).
        wrap: reduction of periodic coordinates into their box (module docstring); ``x`` must
            already be inside it.
    """
    proj = project or _identity
    h = _per_row(step_size, x)[:, None]
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    g_x = proj(current.grad)
    y = x + h * g_x + torch.sqrt(2 * h) * proj(noise)  # on the cover when ``wrap`` is given
    y_box = y if wrap is None else wrap(y)
    new = evaluate(y_box)
    g_y = proj(new.grad)
    fwd = ((y - x - h * g_x) ** 2).sum(-1)
    bwd = ((x - y - h * g_y) ** 2).sum(-1)
    log_ratio = new.log_prob - current.log_prob + (fwd - bwd) / (4 * h[:, 0])
    accept = _accept(log_ratio, generator)
    x_new = torch.where(accept[:, None], y_box, x)
    return KernelStep(x_new, _select(accept, new, current), accept)


def hmc_step(
    x: Tensor,
    current: Evaluation,
    evaluate: Evaluator,
    step_size: Tensor | float,
    *,
    n_leapfrog: int = 5,
    generator: torch.Generator | None = None,
    project: Callable[[Tensor], Tensor] | None = None,
    wrap: Callable[[Tensor], Tensor] | None = None,
) -> KernelStep:
    """One Hamiltonian Monte Carlo step per chain (identity mass, leapfrog integrator).

    Args:
        x: ``(batch, dim)`` current points.
        current: ``evaluate(x)``.
        evaluate: the target.
        step_size: leapfrog step eps, scalar or ``(batch,)``.
        n_leapfrog: leapfrog steps L per proposal.
        generator: CPU torch generator for reproducible momenta.
        project: linear projection applied to momenta and gradients (mean-free systems).
        wrap: reduction of periodic coordinates into their box (module docstring); ``x`` must
            already be inside it.
    """
    if not isinstance(n_leapfrog, int) or n_leapfrog < 1:
        raise ValueError(f"n_leapfrog must be a positive int, got {n_leapfrog!r}")
    proj = project or _identity
    box = wrap or _identity
    eps = _per_row(step_size, x)[:, None]
    p0 = proj(torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device))
    p = p0 + 0.5 * eps * proj(current.grad)
    y = x
    new = current
    for i in range(n_leapfrog):
        y = box(y + eps * p)  # positions may be wrapped at every step: the gradient is periodic
        new = evaluate(y)
        g = proj(new.grad)
        p = p + (eps if i < n_leapfrog - 1 else 0.5 * eps) * g
    h_old = -current.log_prob + 0.5 * (p0**2).sum(-1)
    h_new = -new.log_prob + 0.5 * (p**2).sum(-1)
    accept = _accept(h_old - h_new, generator)
    x_new = torch.where(accept[:, None], y, x)
    return KernelStep(x_new, _select(accept, new, current), accept)


def adapt_step_size(
    step_size: Tensor,
    accepted: Tensor,
    target: float,
    *,
    rate: float = 0.1,
    bounds: tuple[float, float] = (1e-8, 10.0),
) -> Tensor:
    """Robbins-Monro update log h <- log h + rate * (accepted - target), clamped.

    ``accepted`` may be per chain (a ``(batch,)`` bool/float tensor) or a population mean. Caution:
    a chain whose step size is adapted from its *own* acceptance history is no longer a Markov
    chain invariant for the target (the step size carries information about its position); adapt
    from population statistics, or only during burn-in, or with diminishing ``rate``
    (Andrieu & Thoms 2008, "A tutorial on adaptive MCMC", Stat. Comput. 18:343).
    """
    h = torch.as_tensor(step_size)
    a = accepted.to(h.dtype)
    return (h * torch.exp(rate * (a - target))).clamp(*bounds)
