"""Importance weights in log space and the Kish effective sample size.

One sign convention everywhere: log w = -u(x) - log q(x), with u the reduced target energy and
log q the proposal's log-density at the same points. This module is the one implementation of
weights and ESS in boltzflow; everything else calls it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ClippedWeights",
    "clip_log_weights",
    "ess_fraction",
    "forward_ess_fraction",
    "kish_ess",
    "kish_ess_from_lse",
    "log_weights",
    "normalized_weights",
]


def log_weights(u: Tensor, log_q: Tensor) -> Tensor:
    """Unnormalised log importance weights ``-u - log_q``, shape ``(N,)``.

    Rows where either input is NaN get ``-inf`` (weight zero); ``u = +inf`` likewise gives ``-inf``.

    Raises:
        ValueError: on mismatched shapes.
    """
    u = torch.as_tensor(u)
    log_q = torch.as_tensor(log_q, dtype=u.dtype, device=u.device)
    if u.shape != log_q.shape or u.ndim != 1:
        raise ValueError(
            f"u and log_q must both be (N,), got {tuple(u.shape)} and {tuple(log_q.shape)}"
        )
    log_w = -u - log_q
    bad = torch.isnan(log_w) | (log_w == float("inf"))
    return torch.where(bad, torch.full_like(log_w, float("-inf")), log_w)


def _check_some_finite(log_w: Tensor) -> None:
    if log_w.numel() == 0:
        raise ValueError("no samples: log_w is empty")
    if not bool(torch.isfinite(log_w).any()):
        raise ValueError(
            "all importance weights are zero (every log w is -inf or NaN): every sample has "
            "infinite energy or an invalid log q"
        )


def normalized_weights(log_w: Tensor) -> Tensor:
    """Self-normalised weights ``w_i / sum_j w_j`` computed with logsumexp, shape ``(N,)``."""
    log_w = torch.as_tensor(log_w)
    _check_some_finite(log_w)
    return torch.exp(log_w - torch.logsumexp(log_w, dim=0))


def kish_ess_from_lse(lse_w: float, lse_w2: float) -> float:
    """Kish ESS from its two sufficient statistics, exp(2 LSE(log w) - LSE(2 log w)).

    Args:
        lse_w: LSE(log w) over the N samples.
        lse_w2: LSE(2 log w) over the same samples.
    """
    return math.exp(2 * lse_w - lse_w2)


def kish_ess(log_w: Tensor) -> float:
    """Kish effective sample size exp(2 LSE(log w) - LSE(2 log w)), in [1, N]."""
    log_w = torch.as_tensor(log_w)
    _check_some_finite(log_w)
    lse_w, lse_w2 = torch.logsumexp(log_w, 0), torch.logsumexp(2 * log_w, 0)
    return kish_ess_from_lse(float(lse_w), float(lse_w2))


def ess_fraction(log_w: Tensor) -> float:
    """Kish ESS divided by N (report N beside it)."""
    return kish_ess(log_w) / torch.as_tensor(log_w).numel()


def forward_ess_fraction(log_w_reference: Tensor) -> float:
    """Forward ESS / N estimated from log weights evaluated on *target* (reference) samples.

    With w = exp(-u)/q and x ~ p = exp(-u)/Z, E_p[w] = Z E_q[(w/Z)^2] and E_p[1/w] = 1/Z, so the
    reverse-sampled ESS fraction 1 / E_q[(w/Z)^2] equals 1 / (E_p[w] E_p[1/w]); estimated here as
    N^2 / (sum_i w_i * sum_i 1/w_i) over the N reference samples (Midgley et al. 2023, FAB,
    arXiv:2208.01893, App. on forward ESS). Unlike the Kish ESS of proposal samples it sees modes
    the proposal misses. In log space: exp(2 log N - LSE(log w) - LSE(-log w)).

    Args:
        log_w_reference: ``(N,)`` log weights ``-u(x) - log q(x)`` at reference samples x ~ p.

    Returns:
        The forward ESS fraction in (0, 1]; 0 if any reference sample has zero proposal density
        (``log_w = +inf``), which means the proposal misses part of the target.
    """
    log_w = torch.as_tensor(log_w_reference, dtype=torch.float64)
    if log_w.ndim != 1 or log_w.numel() == 0:
        raise ValueError(f"log_w_reference must be non-empty (N,), got shape {tuple(log_w.shape)}")
    if bool(torch.isnan(log_w).any()):
        raise ValueError("log_w_reference contains NaN (undefined energy or log q at a sample)")
    if bool((log_w == float("inf")).any()):
        return 0.0
    if not bool(torch.isfinite(log_w).any()):
        raise ValueError("every reference sample has zero target weight (all log w are -inf)")
    n = log_w.numel()
    val = 2 * math.log(n) - torch.logsumexp(log_w, 0) - torch.logsumexp(-log_w, 0)
    return float(torch.exp(val))


@dataclass(frozen=True)
class ClippedWeights:
    """Log weights after clipping the largest ones (see :func:`clip_log_weights`).

    Attributes:
        log_w: ``(N,)`` clipped log weights.
        n_clipped: number of weights lowered.
        fraction_clipped: ``n_clipped / N`` (report it with every clipped estimate).
        mass_clipped: fraction of the total (unclipped) normalised weight that was removed.
        threshold: the log weight the clipped ones were lowered to.
    """

    log_w: Tensor
    n_clipped: int
    fraction_clipped: float
    mass_clipped: float
    threshold: float


def clip_log_weights(log_w: Tensor, fraction: float) -> ClippedWeights:
    """Lower the largest ``ceil(fraction * N)`` weights to the largest weight left unclipped.

    Truncated importance sampling (Ionides 2008, J. Comput. Graph. Stat. 17:295): trades a small
    bias for variance. ``fraction = 0`` returns the weights unchanged.

    Args:
        log_w: ``(N,)`` log weights.
        fraction: fraction of samples to clip, in ``[0, 1)``.

    Raises:
        ValueError: if ``fraction`` is outside ``[0, 1)`` or no weight is positive.
    """
    log_w = torch.as_tensor(log_w)
    _check_some_finite(log_w)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"clip fraction must be in [0, 1), got {fraction!r}")
    n = log_w.numel()
    k = math.ceil(fraction * n)
    if k == 0:
        return ClippedWeights(log_w.clone(), 0, 0.0, 0.0, float(log_w.max()))
    if k >= n:
        raise ValueError(f"clip fraction {fraction} of N={n} samples would clip every weight")
    clean = torch.where(torch.isnan(log_w), torch.full_like(log_w, float("-inf")), log_w)
    threshold = torch.topk(clean, k + 1).values[-1]
    if not bool(torch.isfinite(threshold)):
        raise ValueError(
            f"cannot clip {k} of {n} weights: fewer than {k + 1} samples have nonzero weight"
        )
    clipped = torch.minimum(clean, threshold)
    total = torch.logsumexp(clean, 0)
    mass = float(1 - torch.exp(torch.logsumexp(clipped, 0) - total))
    return ClippedWeights(clipped, k, k / n, max(mass, 0.0), float(threshold))
