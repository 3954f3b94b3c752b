"""Negative log-likelihood of reference samples under a model."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy.stats import norm

from boltzflow.sampling.results import Estimate

__all__ = ["nll"]


def nll(log_q_reference: Any, *, level: float = 0.95) -> Estimate:
    """Mean negative log-likelihood -E_p[log q(x)] over reference samples x ~ p, in nats.

    The value depends on the measure ``log_q`` is a density for: for particle systems boltzflow
    uses the mean-free subspace ((n-1)·d dimensions, see DESIGN.md), so it is not comparable with
    numbers normalised per dimension or in other coordinates without conversion. Its floor is the
    target's entropy log Z + <u>.

    Args:
        log_q_reference: ``(N,)`` model log-densities at reference samples.
        level: confidence level of the normal interval (standard error = sd / sqrt(N)).

    Raises:
        ValueError: if empty or containing NaN.
    """
    if isinstance(log_q_reference, torch.Tensor):
        log_q_reference = log_q_reference.detach().cpu().numpy()
    lq = np.asarray(log_q_reference, dtype=np.float64).reshape(-1)
    if lq.size == 0 or np.isnan(lq).any():
        raise ValueError("log_q_reference must be non-empty and free of NaN")
    value = float(-lq.mean())
    se = float(lq.std(ddof=1) / math.sqrt(lq.size)) if lq.size > 1 else math.inf
    z = float(norm.ppf(0.5 + level / 2))
    if not math.isfinite(value):
        se = math.inf
    n = lq.size
    return Estimate(value, value - z * se, value + z * se, se, n, float(n), "mean", level)
