"""Sums over samples that may be spread over several processes.

The estimators of :mod:`boltzflow.sampling.estimators` are written once, in terms of a few
reductions over the N samples: sums of per-sample terms, log-sum-exps of log weights, counts and,
for the bootstrap, the samples themselves. A :class:`Reduction` does these over the samples this
process holds; :class:`ProcessGroupReduction` over the union of every rank's samples
(:mod:`boltzflow.distributed`), combining the ranks exactly:

* ``lse``: each rank's LSE of its own values, all-gathered (K floats), then the LSE of those;
  LSE(union) = LSE_r(LSE(part r)) holds exactly in real arithmetic, so log Z and the Kish ESS
  exp(2 LSE(log w) - LSE(2 log w)) agree with one process on the union to float rounding;
* ``sum``: each rank's partial sum (a scalar, or the bins of a histogram), all-gathered and
  added in rank order (identical on every rank);
* ``gather``: the union itself, in rank order (the bootstrap resamples the union, so its
  replicates are those of one process on the union with the same seed).

Estimators that need a global quantity inside a per-sample term (the normalised weight
W_i = exp(log w_i - LSE)) reduce in passes: first the LSE, then the sums that use it. The
message sizes are O(K) floats per pass, independent of N (except ``gather``: 8 bytes per
sample and column).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
from scipy.special import logsumexp

from boltzflow import distributed
from boltzflow.sampling.weights import kish_ess, kish_ess_from_lse

__all__ = ["LOCAL", "ProcessGroupReduction", "Reduction", "default_reduction"]

T = TypeVar("T")


class Reduction:
    """Reductions over the samples of this process alone (the single-process case)."""

    #: True when the samples are spread over several processes
    distributed: bool = False

    def sum(self, values: np.ndarray) -> np.ndarray:
        """Sum over samples (axis 0): a float64 scalar array, or ``values.shape[1:]``."""
        return self.add(np.sum(np.asarray(values, dtype=np.float64), axis=0))

    def add(self, partial: np.ndarray) -> np.ndarray:
        """Add up per-process partial sums of any shape (e.g. the bins of a histogram)."""
        return np.asarray(partial, dtype=np.float64)

    def lse(self, values: np.ndarray, b: np.ndarray | None = None) -> float:
        """log sum_i b_i exp(values_i) over samples (``-inf`` for no samples or all b = 0)."""
        v = np.asarray(values, dtype=np.float64)
        if v.size == 0 or (b is not None and not np.any(b)):
            return -np.inf
        return float(logsumexp(v, b=b))

    def count(self, n: int) -> int:
        """Total of a per-process count."""
        return int(n)

    def kish_ess(self, log_w: np.ndarray) -> float:
        """Kish ESS of the log weights (:func:`~boltzflow.sampling.weights.kish_ess`)."""
        return kish_ess(torch.from_numpy(np.asarray(log_w, dtype=np.float64)))

    def gather(self, values: np.ndarray) -> np.ndarray:
        """All samples' values (here: ``values``)."""
        return np.asarray(values)

    def check(self, error: str | None) -> None:
        """Raise ``ValueError(error)`` if any process has one (here: this one)."""
        if error is not None:
            raise ValueError(error)

    def run(self, fn: Callable[[], T]) -> T:
        """``fn()``; when it raises on one process, every process raises (here: just call it)."""
        return fn()


class ProcessGroupReduction(Reduction):
    """Reductions over the union of the samples of every rank of the process group.

    Every rank must call the same reductions in the same order (they are collectives).
    """

    distributed = True

    def add(self, partial: np.ndarray) -> np.ndarray:
        part = np.asarray(partial, dtype=np.float64)
        parts = distributed.all_gather_arrays(part.reshape(1, -1))
        return np.sum(np.concatenate(parts), axis=0).reshape(part.shape)

    def lse(self, values: np.ndarray, b: np.ndarray | None = None) -> float:
        part = super().lse(values, b)
        parts = np.concatenate(distributed.all_gather_arrays(np.array([part], dtype=np.float64)))
        if not np.isfinite(parts).any():
            return float(parts.max())  # -inf everywhere (no weight), or NaN/+inf passed on
        return float(logsumexp(parts))

    def count(self, n: int) -> int:
        return int(sum(distributed.all_gather_objects(int(n))))

    def kish_ess(self, log_w: np.ndarray) -> float:
        lw = np.asarray(log_w, dtype=np.float64)
        return kish_ess_from_lse(self.lse(lw), self.lse(2 * lw))

    def gather(self, values: np.ndarray) -> np.ndarray:
        return distributed.all_gather_concat(np.asarray(values))

    def check(self, error: str | None) -> None:
        distributed.collective_check(error)

    def run(self, fn: Callable[[], T]) -> T:
        return distributed.run_on_all(fn)


#: the single-process reduction
LOCAL = Reduction()


def default_reduction() -> Reduction:
    """:class:`ProcessGroupReduction` inside a process group of several ranks, else
    :data:`LOCAL`."""
    return ProcessGroupReduction() if distributed.info().distributed else LOCAL
