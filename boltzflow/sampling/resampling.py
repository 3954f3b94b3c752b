"""Resampling of weighted samples: multinomial and systematic.

Both draw indices with probabilities equal to the self-normalised weights. Systematic resampling
(Kitagawa 1996, J. Comput. Graph. Stat. 5:1) uses one uniform shared by N evenly spaced points and
has lower variance than multinomial; see Douc, Cappé, Moulines (2005), arXiv:cs/0507025.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from boltzflow.sampling.results import WeightedSamples
from boltzflow.sampling.weights import normalized_weights

__all__ = [
    "RESAMPLERS",
    "multinomial_resample",
    "resample",
    "resample_indices",
    "systematic_resample",
]


def _cdf(log_w: Tensor) -> Tensor:
    w = normalized_weights(torch.as_tensor(log_w).to(torch.float64).cpu())
    cdf = torch.cumsum(w, 0)
    cdf[-1] = 1.0  # guard against round-off leaving the last entry just below 1
    return cdf


def _generator(seed: int) -> torch.Generator:
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return torch.Generator().manual_seed(seed)


def _check_n(n: int | None, default: int) -> int:
    n = default if n is None else n
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"number of resampled points must be a positive int, got {n!r}")
    return n


def multinomial_resample(log_w: Tensor, n: int | None = None, *, seed: int = 0) -> Tensor:
    """Indices drawn i.i.d. with probabilities ``softmax(log_w)``.

    Args:
        log_w: ``(N,)`` log weights.
        n: number of indices (default N).
        seed: RNG seed.

    Returns:
        ``(n,)`` int64 indices into the N samples (CPU).
    """
    cdf = _cdf(log_w)
    n = _check_n(n, cdf.numel())
    u = torch.rand(n, generator=_generator(seed), dtype=torch.float64)
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.numel() - 1)


def systematic_resample(log_w: Tensor, n: int | None = None, *, seed: int = 0) -> Tensor:
    """Systematic resampling: points ``(k + U) / n``, k = 0..n-1, with one U ~ Uniform(0, 1).

    Each sample i is copied either floor(n W_i) or ceil(n W_i) times.

    Args:
        log_w: ``(N,)`` log weights.
        n: number of indices (default N).
        seed: RNG seed.

    Returns:
        ``(n,)`` int64 indices into the N samples, sorted (CPU).
    """
    cdf = _cdf(log_w)
    n = _check_n(n, cdf.numel())
    u0 = torch.rand(1, generator=_generator(seed), dtype=torch.float64)
    points = (torch.arange(n, dtype=torch.float64) + u0) / n
    return torch.searchsorted(cdf, points, right=True).clamp_(max=cdf.numel() - 1)


#: Resampling schemes by name.
RESAMPLERS: dict[str, Callable[..., Tensor]] = {
    "multinomial": multinomial_resample,
    "systematic": systematic_resample,
}


def resample_indices(
    log_w: Tensor, n: int | None = None, *, method: str = "systematic", seed: int = 0
) -> Tensor:
    """Indices from the scheme named ``method`` (one of :data:`RESAMPLERS`).

    Raises:
        ValueError: unknown method (the message lists the valid names).
    """
    if method not in RESAMPLERS:
        raise ValueError(f"unknown resampling method {method!r}; choose from {sorted(RESAMPLERS)}")
    return RESAMPLERS[method](log_w, n, seed=seed)


def resample(
    samples: WeightedSamples, n: int | None = None, *, method: str = "systematic", seed: int = 0
) -> WeightedSamples:
    """Resample to ``n`` equally weighted samples.

    Every output row gets ``log_w = LSE(log w) - log N`` (the input's log Z estimate), so the
    resampled set still estimates the same normalising constant; ``log_q`` becomes the effective
    value ``-u - log_w``.
    """
    idx = resample_indices(samples.log_w, n, method=method, seed=seed)
    log_z = float(torch.logsumexp(samples.log_w, 0)) - math.log(len(samples))
    u = samples.u[idx.to(samples.u.device)]
    log_w = torch.full_like(u, log_z)
    return WeightedSamples(samples.x[idx.to(samples.x.device)], -u - log_w, u, log_w)
