"""Importance weights in log space and the Kish effective sample size.

One sign convention everywhere: log w = -u(x) - log q(x), with u the reduced target energy and
log q the proposal's log-density at the same points.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ess_fraction", "kish_ess", "log_weights", "normalized_weights"]


def log_weights(u: Tensor, log_q: Tensor) -> Tensor:
    """Unnormalised log importance weights ``-u - log_q``, shape ``(N,)``.

    Rows where either input is NaN get ``-inf`` (weight zero); ``u = +inf`` likewise gives ``-inf``.

    Raises:
        ValueError: on mismatched shapes.
    """
    u = torch.as_tensor(u)
    log_q = torch.as_tensor(log_q, dtype=u.dtype, device=u.device)
    if u.shape != log_q.shape or u.ndim != 1:
        raise ValueError(f"u and log_q must both be (N,), got {tuple(u.shape)} and {tuple(log_q.shape)}")
    log_w = -u - log_q
    bad = torch.isnan(log_w) | (log_w == float("inf"))
    return torch.where(bad, torch.full_like(log_w, float("-inf")), log_w)


def _check_some_finite(log_w: Tensor) -> None:
    if log_w.numel() == 0:
        raise ValueError("no samples: log_w is empty")
    if not bool(torch.isfinite(log_w).any()):
        raise ValueError(
            "all importance weights are zero (every log w is -inf or NaN): every sample has infinite "
            "energy or an invalid log q"
        )


def normalized_weights(log_w: Tensor) -> Tensor:
    """Self-normalised weights ``w_i / sum_j w_j`` computed with logsumexp, shape ``(N,)``."""
    log_w = torch.as_tensor(log_w)
    _check_some_finite(log_w)
    return torch.exp(log_w - torch.logsumexp(log_w, dim=0))


def kish_ess(log_w: Tensor) -> float:
    """Kish effective sample size exp(2 LSE(log w) - LSE(2 log w)), in [1, N]."""
    log_w = torch.as_tensor(log_w)
    _check_some_finite(log_w)
    return float(torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)))


def ess_fraction(log_w: Tensor) -> float:
    """Kish ESS divided by N (report N beside it)."""
    return kish_ess(log_w) / torch.as_tensor(log_w).numel()
