"""Self-normalised importance-sampling estimators with confidence intervals.

All take unnormalised log weights ``log_w = -u - log_q`` of N samples and return an
:class:`~boltzflow.sampling.results.Estimate` (or a :class:`FreeEnergyProfile`). Two interval
methods, chosen by ``method``:

* ``"delta"``: first-order (delta-method) standard error of the ratio estimator, with a normal
  interval ``value +- z * se``. With normalised weights W_i the variances are
  SNIS mean: sum_i W_i^2 (f_i - mu)^2 (Owen 2013, *Monte Carlo theory, methods and examples*,
  ch. 9, eq. 9.8); log Z: Var(w) / (N mean(w)^2) = N/(N-1) sum_i (W_i - 1/N)^2; ΔF = -log(P_A/P_B):
  sum_i W_i^2 (1_A(i)/P_A - 1_B(i)/P_B)^2.
* ``"bootstrap"``: B resamples of the N samples with replacement (numpy ``default_rng(seed)``,
  reproducible), the estimator recomputed on each; percentile interval (Efron & Tibshirani 1993,
  ch. 13), standard error = standard deviation of the replicates.

Free energies are in kT; log Z in nats.

Samples spread over several processes: pass ``reduction=ProcessGroupReduction()``
(:mod:`boltzflow.sampling.reduction`) and each rank its own samples. The delta-method estimates
are then formed from all-gathered sufficient statistics (LSEs and sums, O(K) floats per pass) and
equal those of one process on the union to float rounding; the bootstrap resamples the union
(gathered, in rank order), so with the same seed it gives the one-process interval. Every rank
gets the same :class:`Estimate`, and an invalid input on one rank raises on all of them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.special import logsumexp
from scipy.stats import norm

from boltzflow.sampling.reduction import LOCAL, Reduction
from boltzflow.sampling.results import Estimate

__all__ = [
    "METHODS",
    "FreeEnergyProfile",
    "bootstrap_replicates",
    "free_energy_difference",
    "free_energy_profile",
    "log_partition",
    "snis_expectation",
]

#: Interval methods understood by every estimator.
METHODS = ("delta", "bootstrap")


def _as_numpy(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _log_weights(log_w: Any, red: Reduction = LOCAL) -> tuple[np.ndarray, int]:
    """Validated float64 log weights with NaN mapped to -inf (weight zero), and N (all ranks)."""
    lw = _as_numpy(log_w, "log_w").astype(np.float64, copy=True)
    red.check(None if lw.ndim == 1 else f"log_w must be (N,), got shape {lw.shape}")
    n = red.count(lw.size)
    if n == 0:
        raise ValueError("no samples: log_w is empty")
    lw[np.isnan(lw)] = -np.inf
    infinite = bool(np.any(lw == np.inf))
    red.check("log_w contains +inf (a sample with zero proposal density)" if infinite else None)
    if red.count(int(np.isfinite(lw).sum())) == 0:
        raise ValueError(
            "all importance weights are zero (every log w is -inf or NaN): every sample has "
            "infinite energy or an invalid log q"
        )
    return lw, n


def _normalized(lw: np.ndarray, red: Reduction = LOCAL) -> np.ndarray:
    """exp(lw - LSE(lw)) with the LSE over all ranks; lw may contain -inf but some rank must
    have a finite entry."""
    return np.exp(lw - red.lse(lw))


def _check_method(method: str, level: float, n_bootstrap: int) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown interval method {method!r}; choose from {list(METHODS)}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must be in (0, 1), got {level!r}")
    if method == "bootstrap" and (not isinstance(n_bootstrap, int) or n_bootstrap < 2):
        raise ValueError(f"n_bootstrap must be an int >= 2, got {n_bootstrap!r}")


def _z(level: float) -> float:
    return float(norm.ppf(0.5 + level / 2))


def bootstrap_replicates(
    statistic: Callable[[np.ndarray], float | np.ndarray],
    n: int,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> np.ndarray:
    """Evaluate ``statistic(idx)`` on ``n_bootstrap`` index arrays drawn with replacement.

    Args:
        statistic: maps an ``(n,)`` int index array to a float or an array.
        n: number of samples.
        n_bootstrap: number of replicates B.
        seed: seed of ``numpy.random.default_rng``; the same seed gives the same replicates.

    Returns:
        ``(B,)`` or ``(B, *shape)`` replicate values.
    """
    rng = np.random.default_rng(seed)
    return np.stack([np.asarray(statistic(rng.integers(0, n, n))) for _ in range(n_bootstrap)])


def _percentile_ci(reps: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Percentile interval (outward rounding, so infinite replicates stay well defined) and sd."""
    alpha = 1.0 - level
    lo = np.quantile(reps, alpha / 2, axis=0, method="lower")
    hi = np.quantile(reps, 1 - alpha / 2, axis=0, method="higher")
    with np.errstate(invalid="ignore"):
        finite = np.isfinite(reps).all(axis=0)
        sd = np.std(np.where(np.isfinite(reps), reps, 0.0), axis=0, ddof=1)
        sd = np.where(finite, sd, np.inf)
    return lo, hi, sd


def _delta_estimate(
    value: float,
    se: float,
    level: float,
    lw: np.ndarray,
    n: int,
    red: Reduction = LOCAL,
    label: str = "delta",
) -> Estimate:
    z = _z(level)
    ess = red.kish_ess(lw)
    return Estimate(value, value - z * se, value + z * se, se, n, ess, label, level)


def _clusters(clusters: Any, n: int, method: str) -> np.ndarray | None:
    """Validated ``(n,)`` non-negative int cluster labels (None stays None)."""
    if clusters is None:
        return None
    if method != "delta":
        raise ValueError("clusters are supported by the delta method only")
    c = _as_numpy(clusters, "clusters")
    if c.shape != (n,) or not np.issubdtype(c.dtype, np.integer) or (c.size and c.min() < 0):
        raise ValueError(f"clusters must be ({n},) non-negative integer labels")
    return c.astype(np.int64)


def _sum_of_squares(
    terms: np.ndarray, clusters: np.ndarray | None, red: Reduction = LOCAL
) -> float:
    """sum_i t_i^2, or with clusters sum_c (sum_{i in c} t_i)^2 (correlated samples of one
    cluster contribute their summed influence; Chan & Lai 2013, Lee & Whiteley 2018). Clusters
    are one process's (the callers gather the union first); without them the sum is over all
    ranks."""
    if clusters is not None:
        terms = np.bincount(clusters, weights=terms)
        return float(np.sum(terms**2))
    return float(red.sum(terms**2))


def _bootstrap_estimate(value: float, reps: np.ndarray, level: float, lw: np.ndarray) -> Estimate:
    lo, hi, sd = _percentile_ci(reps, level)
    ess = LOCAL.kish_ess(lw)
    label = f"bootstrap(B={len(reps)})"
    return Estimate(value, float(lo), float(hi), float(sd), lw.size, ess, label, level)


def _gathered(red: Reduction, *arrays: Any) -> list[np.ndarray]:
    """The union of each array over the ranks (for the bootstrap), as numpy arrays."""
    return [red.gather(_as_numpy(a, "array")) for a in arrays]


# ------------------------------------------------------------------------------------------------
def snis_expectation(
    values: Any,
    log_w: Any,
    *,
    method: str = "delta",
    level: float = 0.95,
    n_bootstrap: int = 1000,
    seed: int = 0,
    reduction: Reduction | None = None,
    clusters: Any | None = None,
) -> Estimate:
    """Self-normalised estimate of E_p[f] = sum_i W_i f_i with a confidence interval.

    Args:
        values: ``(N,)`` observable values f(x_i) (any units; the estimate has the same units).
            Values of zero-weight samples may be non-finite and are ignored.
        log_w: ``(N,)`` log weights.
        method: ``"delta"`` or ``"bootstrap"``.
        level: confidence level.
        n_bootstrap: bootstrap replicates B.
        seed: bootstrap seed.
        reduction: how to combine samples held by several processes (module docstring);
            None: this process holds them all.
        clusters: ``(N,)`` integer labels of correlated groups, e.g. the SMC Eves
            (:attr:`~boltzflow.sampling.smc.SMCResult.eves`): the delta-method variance sums
            each group's influence before squaring (method label ``"delta-clustered"``); with
            one sample per group it is the plain delta method. Under a distributed reduction
            each rank passes the labels of its own samples (global labels: a group may span
            ranks), and the union is gathered.

    Raises:
        ValueError: on mismatched shapes, all-zero weights, or a non-finite value with nonzero
            weight.
    """
    _check_method(method, level, n_bootstrap)
    red = reduction or LOCAL
    if red.distributed and (method == "bootstrap" or clusters is not None):
        # the bootstrap resamples the union; clusters may span ranks: both need all the rows
        f_all, lw_all, *c_all = _gathered(
            red, values, log_w, *([] if clusters is None else [clusters])
        )
        return snis_expectation(
            f_all,
            lw_all,
            method=method,
            level=level,
            n_bootstrap=n_bootstrap,
            seed=seed,
            clusters=c_all[0] if c_all else None,
        )
    lw, n = _log_weights(log_w, red)
    groups = _clusters(clusters, lw.size, method)
    f = _as_numpy(values, "values").astype(np.float64)
    red.check(
        None
        if f.shape == lw.shape
        else f"values must have shape {lw.shape} like log_w, got {f.shape}"
    )
    live = np.isfinite(lw)
    bad = not np.isfinite(f[live]).all()
    red.check("observable is NaN or infinite at a sample with nonzero weight" if bad else None)
    f = np.where(live, f, 0.0)
    w = _normalized(lw, red)
    mu = float(red.sum(w * f))
    if method == "delta":
        se = math.sqrt(_sum_of_squares(w * (f - mu), groups, red))
        label = "delta" if groups is None else "delta-clustered"
        return _delta_estimate(mu, se, level, lw, n, red, label)

    def stat(idx: np.ndarray) -> float:
        lwb = lw[idx]
        if not np.isfinite(lwb).any():
            return np.nan
        wb = _normalized(lwb)
        return float(np.sum(wb * f[idx]))

    reps = bootstrap_replicates(stat, lw.size, n_bootstrap=n_bootstrap, seed=seed)
    reps = reps[~np.isnan(reps)]  # replicates that drew only zero-weight samples
    return _bootstrap_estimate(mu, reps, level, lw)


def log_partition(
    log_w: Any,
    *,
    method: str = "delta",
    level: float = 0.95,
    n_bootstrap: int = 1000,
    seed: int = 0,
    reduction: Reduction | None = None,
) -> Estimate:
    """log Z = LSE(log w) - log N, the log of the importance-sampling estimate of Z = E_q[w].

    The delta-method standard error is that of log(mean w): sqrt(Var(w) / (N mean(w)^2)),
    computed from normalised weights so nothing overflows. If the target is exp(-u) on the
    mean-free subspace, Z is w.r.t. that subspace too (as log q is).

    Args:
        log_w: ``(N,)`` log weights.
        method: ``"delta"`` or ``"bootstrap"``.
        level: confidence level.
        n_bootstrap: bootstrap replicates B.
        seed: bootstrap seed.
        reduction: how to combine samples held by several processes (module docstring);
            None: this process holds them all.
    """
    _check_method(method, level, n_bootstrap)
    red = reduction or LOCAL
    if method == "bootstrap" and red.distributed:
        (lw_all,) = _gathered(red, log_w)
        return log_partition(lw_all, method=method, level=level, n_bootstrap=n_bootstrap, seed=seed)
    lw, n = _log_weights(log_w, red)
    lse = red.lse(lw)
    value = float(lse - math.log(n))
    if method == "delta":
        w = np.exp(lw - lse)
        var = float(red.sum((w - 1.0 / n) ** 2)) * n / max(n - 1, 1)
        return _delta_estimate(value, math.sqrt(var), level, lw, n, red)

    def stat(idx: np.ndarray) -> float:
        return float(logsumexp(lw[idx]) - math.log(n))

    reps = bootstrap_replicates(stat, n, n_bootstrap=n_bootstrap, seed=seed)
    return _bootstrap_estimate(value, reps, level, lw)


def _membership(mask: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    """Boolean mask or soft membership in [0, 1], as float64."""
    m = _as_numpy(mask, name)
    if m.shape != shape:
        raise ValueError(f"{name} must have shape {shape} like log_w, got {m.shape}")
    if m.dtype == bool:
        return m.astype(np.float64)
    if not np.issubdtype(m.dtype, np.floating):
        raise TypeError(f"{name} must be a boolean mask or floats in [0, 1], got dtype {m.dtype}")
    m = m.astype(np.float64)
    tol = 1e-9  # sums of softmax probabilities may exceed 1 by round-off
    if not (np.all(m >= -tol) and np.all(m <= 1 + tol)):
        raise ValueError(f"{name}: soft memberships must lie in [0, 1]")
    return np.clip(m, 0.0, 1.0)


def free_energy_difference(
    in_a: Any,
    in_b: Any,
    log_w: Any,
    *,
    method: str = "delta",
    level: float = 0.95,
    n_bootstrap: int = 1000,
    seed: int = 0,
    reduction: Reduction | None = None,
    clusters: Any | None = None,
) -> Estimate:
    """ΔF = F_A - F_B = -log(P(A) / P(B)) in kT, from weighted indicator sums.

    P(A) = sum_i W_i a_i with a_i = 1_A(x_i), or a soft membership a_i in [0, 1] whose
    expectation is the state's probability (e.g. mixture responsibilities).

    Args:
        in_a: ``(N,)`` bool (sample i is in state A) or soft memberships in [0, 1].
        in_b: ``(N,)`` likewise for state B (states may overlap or not cover everything).
        log_w: ``(N,)`` log weights.
        method: ``"delta"`` or ``"bootstrap"`` (replicates where a state is empty give ±inf and
            widen the interval accordingly).
        level: confidence level.
        n_bootstrap: bootstrap replicates B.
        seed: bootstrap seed.
        reduction: how to combine samples held by several processes (module docstring);
            None: this process holds them all.
        clusters: ``(N,)`` integer labels of correlated groups (delta method only; see
            :func:`snis_expectation`).

    Raises:
        ValueError: if either state carries zero weight (ΔF would be infinite).
    """
    _check_method(method, level, n_bootstrap)
    red = reduction or LOCAL
    if red.distributed and (method == "bootstrap" or clusters is not None):
        a_all, b_all, lw_all, *c_all = _gathered(
            red, in_a, in_b, log_w, *([] if clusters is None else [clusters])
        )
        return free_energy_difference(
            a_all,
            b_all,
            lw_all,
            method=method,
            level=level,
            n_bootstrap=n_bootstrap,
            seed=seed,
            clusters=c_all[0] if c_all else None,
        )
    lw, n = _log_weights(log_w, red)
    groups = _clusters(clusters, lw.size, method)
    a = red.run(lambda: _membership(in_a, lw.shape, "in_a"))
    b = red.run(lambda: _membership(in_b, lw.shape, "in_b"))
    w = _normalized(lw, red)
    pa, pb = float(red.sum(w * a)), float(red.sum(w * b))
    for name, p, mask in (("A", pa, a), ("B", pb, b)):
        if p <= 0.0:
            raise ValueError(
                f"state {name} has zero weight ({red.count(int((mask > 0).sum()))} of {n} "
                "samples in it): ΔF is infinite; sample more or check the state definition"
            )
    value = -math.log(pa / pb)
    if method == "delta":
        # (w psi)^2, not w^2 psi^2: with P(A) ~ 1e-160 the factors under- and overflow apart
        # (0 * inf = NaN) while each product w_i a_i / P(A) <= 1
        se = math.sqrt(_sum_of_squares(w * a / pa - w * b / pb, groups, red))
        label = "delta" if groups is None else "delta-clustered"
        return _delta_estimate(value, se, level, lw, n, red, label)

    def stat(idx: np.ndarray) -> float:
        lwb = lw[idx]
        la = logsumexp(lwb, b=a[idx]) if a[idx].any() else -np.inf
        lb = logsumexp(lwb, b=b[idx]) if b[idx].any() else -np.inf
        if la == lb:  # both empty: no information
            return np.nan
        return float(lb - la)

    with np.errstate(divide="ignore"):
        reps = bootstrap_replicates(stat, lw.size, n_bootstrap=n_bootstrap, seed=seed)
    reps = reps[~np.isnan(reps)]
    return _bootstrap_estimate(value, reps, level, lw)


# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FreeEnergyProfile:
    """A 1-D or 2-D free-energy surface F(s) = -log p(s) + const in kT, with a confidence band.

    Attributes:
        edges: bin edges, one ``(bins_d + 1,)`` array per dimension.
        free_energy: ``(bins,)`` or ``(bins_1, bins_2)``; minimum 0, ``inf`` for empty bins.
        ci_low: lower end of the band (same shape).
        ci_high: upper end (``inf`` where the band reaches an empty bin).
        stderr: standard error of F per bin.
        probability: weighted probability of each bin (out-of-range samples count towards the
            total, so this may sum to less than 1).
        n: samples N.
        ess: Kish ESS of the weights.
        method: ``"delta"`` or ``"bootstrap(B=...)"``.
        level: confidence level of the band.
    """

    edges: tuple[np.ndarray, ...]
    free_energy: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    stderr: np.ndarray
    probability: np.ndarray
    n: int
    ess: float
    method: str
    level: float

    @property
    def centers(self) -> tuple[np.ndarray, ...]:
        """Bin centres, one array per dimension."""
        return tuple(0.5 * (e[1:] + e[:-1]) for e in self.edges)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite values become None)."""

        def clean(a: np.ndarray) -> Any:
            return np.where(np.isfinite(a), a, np.nan).tolist()

        out: dict[str, Any] = {
            "edges": [e.tolist() for e in self.edges],
            "free_energy_kT": clean(self.free_energy),
            "ci_low": clean(self.ci_low),
            "ci_high": clean(self.ci_high),
            "stderr": clean(self.stderr),
            "probability": self.probability.tolist(),
            "n": self.n,
            "ess": self.ess,
            "method": self.method,
            "level": self.level,
        }
        return _nan_to_none(out)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FreeEnergyProfile:
        """The inverse of :meth:`to_dict`: a null free energy, band end or standard error (an
        empty bin) becomes ``inf``; missing ``probability`` is derived from F.

        Raises:
            ValueError: missing keys, or arrays that do not match the edges.
        """
        for key in ("edges", "free_energy_kT"):
            if key not in data:
                raise ValueError(f"a free-energy profile needs {key!r}; got keys {sorted(data)}")
        edges = tuple(np.asarray(e, dtype=np.float64) for e in data["edges"])
        shape = tuple(len(e) - 1 for e in edges)
        if not 1 <= len(edges) <= 2 or min(shape) < 1:
            raise ValueError(f"edges must be 1 or 2 arrays of >= 2 values, got shape {shape}")

        def array(key: str, fill: float) -> np.ndarray:
            raw = data.get(key)
            if raw is None:
                return np.full(shape, fill)
            a = np.array(_none_to(raw, fill), dtype=np.float64)
            if a.shape != shape:
                raise ValueError(f"profile {key!r} has shape {a.shape}, edges say {shape}")
            return a

        free = array("free_energy_kT", math.inf)
        if data.get("probability") is not None:
            probability = array("probability", 0.0)
        else:
            p = np.exp(-free)
            probability = p / p.sum()
        return cls(
            edges=edges,
            free_energy=free,
            ci_low=array("ci_low", math.nan),
            ci_high=array("ci_high", math.inf),
            stderr=array("stderr", math.inf),
            probability=probability,
            n=int(data.get("n") or 0),
            ess=float(data.get("ess") or math.nan),
            method=str(data.get("method", "unknown")),
            level=float(data.get("level") or 0.95),
        )


def _none_to(obj: Any, fill: float) -> Any:
    if obj is None:
        return fill
    if isinstance(obj, list):
        return [_none_to(v, fill) for v in obj]
    return obj


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    return obj


def _bin_index(
    s: np.ndarray, bins: Sequence[int], ranges: Sequence[tuple[float, float]]
) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Flat bin index of each row of s (N, D); -1 outside the ranges or non-finite."""
    flat = np.zeros(s.shape[0], dtype=np.int64)
    inside = np.ones(s.shape[0], dtype=bool)
    edges = []
    for d, (nb, (lo, hi)) in enumerate(zip(bins, ranges)):
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ValueError(
                f"profile range for dimension {d} must be finite with hi > lo, got {(lo, hi)}"
            )
        col = s[:, d]
        with np.errstate(invalid="ignore"):
            k = np.floor((col - lo) / (hi - lo) * nb)
            k = np.where(col == hi, nb - 1, k)  # include the right edge
            ok = np.isfinite(col) & (k >= 0) & (k < nb)
        inside &= ok
        flat = flat * nb + np.where(ok, k, 0).astype(np.int64)
        edges.append(np.linspace(lo, hi, nb + 1))
    return np.where(inside, flat, -1), tuple(edges)


def free_energy_profile(
    values: Any,
    log_w: Any,
    *,
    bins: int | Sequence[int] = 50,
    value_range: Sequence[tuple[float, float]] | tuple[float, float] | None = None,
    method: str = "bootstrap",
    level: float = 0.95,
    n_bootstrap: int = 200,
    seed: int = 0,
    reduction: Reduction | None = None,
) -> FreeEnergyProfile:
    """1-D or 2-D free-energy profile from a weighted histogram, F = -log(p_bin / bin volume).

    Shifted so that its minimum is 0 (the same shift is applied to the band). With
    ``method="bootstrap"`` the band is the percentile interval of the bin probability mapped
    through -log (so it is exact under the monotone map); with ``"delta"``,
    se(F_k) = se(p_k) / p_k with Var(p_k) = sum_i W_i^2 (1_k(i) - p_k)^2.

    Args:
        values: ``(N,)`` for a 1-D profile (e.g. φ in radians) or ``(N, 2)`` for 2-D (φ, ψ).
        log_w: ``(N,)`` log weights.
        bins: bins per dimension (an int, or one per dimension).
        value_range: ``(lo, hi)`` per dimension (or one pair for 1-D); default: the data's finite
            min/max.
        method: ``"bootstrap"`` (default) or ``"delta"``.
        level: confidence level of the band.
        n_bootstrap: bootstrap replicates B.
        seed: bootstrap seed.
        reduction: how to combine samples held by several processes (module docstring:
            the delta band from all-gathered bin sums; the bootstrap on the gathered union);
            None: this process holds them all.
    """
    _check_method(method, level, n_bootstrap)
    red = reduction or LOCAL
    if method == "bootstrap" and red.distributed:
        s_all, lw_all = _gathered(red, values, log_w)
        options = {"level": level, "n_bootstrap": n_bootstrap, "seed": seed}
        return free_energy_profile(
            s_all, lw_all, bins=bins, value_range=value_range, method=method, **options
        )
    lw, n = _log_weights(log_w, red)
    s = _as_numpy(values, "values").astype(np.float64)
    if s.ndim == 1:
        s = s[:, None]
    bad = s.ndim != 2 or s.shape[0] != lw.size or s.shape[1] not in (1, 2)
    red.check(f"values must be (N,) or (N, 2) with N={lw.size}, got {s.shape}" if bad else None)
    dims = s.shape[1]
    nbins = [bins] * dims if isinstance(bins, int) else list(bins)
    if len(nbins) != dims or any(not isinstance(b, int) or b < 1 for b in nbins):
        raise ValueError(f"bins must be a positive int or {dims} positive ints, got {bins!r}")
    if value_range is None:
        live = s[np.isfinite(lw)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: NaN bounds
            bounds = [[np.nanmin(c), np.nanmax(c)] if c.size else [np.inf, -np.inf] for c in live.T]
        bounds = red.gather(np.array(bounds, dtype=np.float64)[None])  # (ranks, dims, 2)
        ranges = [
            (float(np.min(b[:, 0])), float(np.max(b[:, 1]))) for b in bounds.transpose(1, 0, 2)
        ]
    elif dims == 1 and len(value_range) == 2 and np.isscalar(value_range[0]):
        ranges = [(float(value_range[0]), float(value_range[1]))]
    else:
        ranges = [(float(lo), float(hi)) for lo, hi in value_range]
    if len(ranges) != dims:
        raise ValueError(f"value_range must give {dims} (lo, hi) pairs, got {value_range!r}")
    flat, edges = _bin_index(s, nbins, ranges)
    n_total = int(np.prod(nbins))
    volume = float(np.prod([(hi - lo) / nb for nb, (lo, hi) in zip(nbins, ranges)]))
    shape = tuple(nbins)
    w = _normalized(lw, red)
    inside = flat >= 0
    p = red.add(np.bincount(flat[inside], weights=w[inside], minlength=n_total))

    with np.errstate(divide="ignore", invalid="ignore"):
        f_raw = -np.log(p / volume)
        shift = np.min(f_raw[np.isfinite(f_raw)]) if np.isfinite(f_raw).any() else 0.0
        f = f_raw - shift
        if method == "delta":
            s2 = red.add(np.bincount(flat[inside], weights=w[inside] ** 2, minlength=n_total))
            s2_all = float(red.sum(w**2))
            var_p = (1 - p) ** 2 * s2 + p**2 * (s2_all - s2)
            se = np.where(p > 0, np.sqrt(var_p) / p, np.inf)
            z = _z(level)
            lo, hi = f - z * se, f + z * se
            label = "delta"
        else:

            def stat(idx: np.ndarray) -> np.ndarray:
                lwb = lw[idx]
                if not np.isfinite(lwb).any():
                    return np.full(n_total, np.nan)
                wb = _normalized(lwb)
                fb = flat[idx]
                ok = fb >= 0
                return np.bincount(fb[ok], weights=wb[ok], minlength=n_total)

            reps = bootstrap_replicates(stat, lw.size, n_bootstrap=n_bootstrap, seed=seed)
            reps = reps[~np.isnan(reps).any(axis=1)]
            p_lo, p_hi, _ = _percentile_ci(reps, level)
            lo = -np.log(p_hi / volume) - shift
            hi = -np.log(p_lo / volume) - shift
            f_reps = -np.log(reps / volume)
            _, _, se = _percentile_ci(f_reps, level)
            label = f"bootstrap(B={n_bootstrap})"
    ess = red.kish_ess(lw)
    return FreeEnergyProfile(
        edges=edges,
        free_energy=f.reshape(shape),
        ci_low=lo.reshape(shape),
        ci_high=hi.reshape(shape),
        stderr=se.reshape(shape),
        probability=p.reshape(shape),
        n=n,
        ess=ess,
        method=label,
        level=level,
    )
