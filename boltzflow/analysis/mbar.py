"""MBAR free-energy profile along a periodic coordinate from umbrella windows.

The windows sample biased densities p_k(φ) ∝ p(φ) exp(−w_k(φ)) with the periodic harmonic bias
w_k(φ) = ½ κ d(φ, c_k)² (Torrie & Valleau, J. Comput. Phys. 23, 187 (1977)), or, on a 2-D grid
of windows restrained in φ and ψ, w_k(φ, ψ) = ½ κ_φ d(φ, c_k^φ)² + ½ κ_ψ d(ψ, c_k^ψ)²; every
window runs at the same temperature, so the unbiased reduced energy cancels and the reduced bias
matrix u_kn = w_k(x_n) (every sample n in every window k) is all MBAR needs (Shirts & Chodera,
J. Chem. Phys. 129, 124105 (2008)). MBAR's free energies f_k give the unbiased weight of each
sample, W_n ∝ 1 / Σ_k N_k exp(f_k − u_kn), and from those (always along φ, whatever the bias)

- the profile F(φ) = −log(P(bin) / bin width), shifted to minimum 0 (the convention of
  :func:`boltzflow.sampling.estimators.free_energy_profile`, so flows and this reference compare
  bin by bin);
- ΔF = −log(P(lo < φ < hi) / P(otherwise)) in kT (DESIGN.md's ALDP metric with (lo, hi) = (0, 2)).

Both are free-energy differences between "perturbed states" (the unbiased density restricted to a
bin or region, reduced energy 0 inside and +inf outside), so pymbar's
``compute_perturbed_free_energies`` returns them together with their asymptotic standard errors
(``uncertainty="analytical"``, the covariance of Shirts & Chodera 2008, eq. (D), for independent
samples). ``uncertainty="bootstrap"`` instead resamples each window's decorrelated samples with
replacement, re-solves MBAR and reports the standard deviation of the replicates (and their
percentile interval for ΔF).

Correlated samples: each window's series is subsampled at its statistical inefficiency g
(``pymbar.timeseries``; Chodera et al., J. Chem. Theory Comput. 3, 26 (2007)), estimated from the
bias coordinate φ − c_k (wrapped, continuous across ±π) and, if given, from cos ψ and sin ψ (the
slow orthogonal motion; ψ − c_k^ψ when ψ is restrained too); the largest g is used.

Overlap: pymbar's overlap matrix O (O_ij the probability that a sample of window i is seen in
window j; rows sum to 1) is reported through its smallest entry between neighbouring windows
(:func:`neighbour_pairs`: next centres along each restrained axis); below about 0.03 the
neighbours barely overlap and MBAR's estimates are not to be trusted (Klimovich, Shirts & Mobley,
J. Comput.-Aided Mol. Des. 29, 397 (2015)).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import logsumexp
from scipy.stats import norm

from boltzflow.sampling.estimators import FreeEnergyProfile
from boltzflow.sampling.results import Estimate
from boltzflow.sampling.weights import kish_ess

__all__ = [
    "UmbrellaProfile",
    "bias_matrix",
    "mbar_profile",
    "neighbour_pairs",
    "periodic_distance",
    "wrap_angle",
]

UNCERTAINTY_METHODS = ("analytical", "bootstrap")


def wrap_angle(angle: Any) -> np.ndarray:
    """Angles mapped into (−π, π]."""
    a = np.asarray(angle, dtype=np.float64)
    w = np.remainder(a + math.pi, 2 * math.pi) - math.pi
    return np.where(w <= -math.pi, w + 2 * math.pi, w)


def periodic_distance(phi: Any, center: Any) -> np.ndarray:
    """d(φ, c) = min(|φ − c|, 2π − |φ − c|) in [0, π] (radians), broadcast over the inputs."""
    delta = np.abs(wrap_angle(np.asarray(phi, dtype=np.float64) - np.asarray(center, np.float64)))
    return np.minimum(delta, 2 * math.pi - delta)


def bias_matrix(x: np.ndarray, centers: Any, kappa: float | Sequence[float]) -> np.ndarray:
    """Reduced bias u_kn = Σ_d ½ κ_d d(x_nd, c_kd)², shape ``(K, N)``.

    Args:
        x: ``(N,)`` angles (one restrained coordinate) or ``(N, D)``.
        centers: ``(K,)`` or ``(K, D)`` centres, radians.
        kappa: κ in kT/rad², one for all coordinates or one per coordinate ``(D,)``.
    """
    c = np.asarray(centers, dtype=np.float64)
    c = c.reshape(-1, 1) if c.ndim == 1 else c
    xs = np.asarray(x, dtype=np.float64).reshape(-1, c.shape[1])
    k = np.broadcast_to(np.asarray(kappa, dtype=np.float64).reshape(-1), (c.shape[1],))
    u = np.zeros((c.shape[0], xs.shape[0]))
    for d in range(c.shape[1]):
        u += 0.5 * k[d] * periodic_distance(xs[None, :, d], c[:, d, None]) ** 2
    return u


def neighbour_pairs(centers: Any) -> list[tuple[int, int]]:
    """Pairs ``(i, j)`` of neighbouring windows: along each axis d, the windows that share their
    other coordinates, taken in increasing angle, and each paired with the next (periodically).

    ``centers`` is ``(K,)`` or ``(K, D)`` radians. On a full n₁ × n₂ grid these are the 4-neighbour
    pairs of the torus (n₁·n₂ per axis of length > 2); along a 1-D circle, consecutive centres.
    """
    c = wrap_angle(np.asarray(centers, dtype=np.float64))
    c = c.reshape(-1, 1) if c.ndim == 1 else c
    pairs: list[tuple[int, int]] = []
    key = np.round(c, 9)
    for d in range(c.shape[1]):
        others = [tuple(row) for row in np.delete(key, d, axis=1)]
        groups: dict[tuple[float, ...], list[int]] = {}
        for i, o in enumerate(others):
            groups.setdefault(o, []).append(i)
        for members in groups.values():
            line = sorted(members, key=lambda i: c[i, d])
            if len(line) < 2:
                continue
            links = list(itertools.pairwise(line))
            if len(line) > 2:
                links.append((line[-1], line[0]))  # round the circle
            pairs += [(min(i, j), max(i, j)) for i, j in links]
    return sorted(set(pairs))


@contextlib.contextmanager
def _quiet_pymbar() -> Iterator[Any]:
    """Import pymbar with its import-time banners (no JAX, timeseries caveat) silenced."""
    logger = logging.getLogger("pymbar")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import pymbar
        from pymbar import timeseries  # noqa: F401

        yield pymbar
    finally:
        logger.setLevel(level)


@dataclass(frozen=True)
class UmbrellaProfile:
    """F(φ) and ΔF from umbrella windows by MBAR.

    Attributes:
        profile: F(φ) on the bins (kT, minimum 0, ``inf`` for empty bins), with ``stderr`` the
            standard error of each bin's −log P and the band ``value ± z·se`` (analytical) or the
            bootstrap percentile band.
        delta_f: ΔF = −log(P(lo < φ < hi) / P(otherwise)) in kT with its standard error and CI;
            ``n`` is the number of decorrelated samples, ``ess`` the Kish ESS of the MBAR weights
            of the unbiased state.
        region: ``(lo, hi)`` of ΔF's region, radians.
        window_f: ``(K,)`` MBAR free energies f_k of the biased windows (kT, f_0 = 0).
        statistical_inefficiency: ``(K,)`` g of each window (in samples).
        n_used: ``(K,)`` decorrelated samples used per window.
        n_total: ``(K,)`` samples given per window.
        uncertainty: ``"analytical"`` or ``"bootstrap(B=...)"``.
        neighbour_overlap: smallest overlap-matrix entry min(O_ij, O_ji) over the neighbouring
            windows of :func:`neighbour_pairs` (NaN with a single window).
        neighbour_overlap_pair: the ``(i, j)`` windows where it occurs (``(-1, -1)`` if none).
        overlap_scalar: pymbar's overlap scalar, 1 − the second largest eigenvalue of O (0: two
            groups of windows that do not see each other).
        restrained: the restrained coordinates, ``("phi",)`` or ``("phi", "psi")``.
    """

    profile: FreeEnergyProfile
    delta_f: Estimate
    region: tuple[float, float]
    window_f: np.ndarray
    statistical_inefficiency: np.ndarray
    n_used: np.ndarray
    n_total: np.ndarray
    uncertainty: str
    neighbour_overlap: float = math.nan
    neighbour_overlap_pair: tuple[int, int] = (-1, -1)
    overlap_scalar: float = math.nan
    restrained: tuple[str, ...] = ("phi",)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "profile": self.profile.to_dict(),
            "delta_f": self.delta_f.to_dict(),
            "region": list(self.region),
            "window_f": self.window_f.tolist(),
            "statistical_inefficiency": self.statistical_inefficiency.tolist(),
            "n_used": self.n_used.tolist(),
            "n_total": self.n_total.tolist(),
            "uncertainty": self.uncertainty,
            "neighbour_overlap_min": self.neighbour_overlap,
            "neighbour_overlap_pair": list(self.neighbour_overlap_pair),
            "overlap_scalar": self.overlap_scalar,
            "restrained": list(self.restrained),
        }


def _inefficiency(timeseries: Any, series: Sequence[np.ndarray]) -> float:
    g = 1.0
    for s in series:
        if s.size > 3 and np.ptp(s) > 0:
            g = max(g, float(timeseries.statistical_inefficiency(s)))
    return g


def _state_matrix(
    phi: np.ndarray, edges: np.ndarray, region: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Reduced energies of the perturbed states: [all, region, rest, bin_0, ...], and bin ids."""
    lo, hi = region
    in_region = (phi > lo) & (phi < hi)
    b = np.clip(np.searchsorted(edges, phi, side="right") - 1, 0, len(edges) - 2)
    masks = [np.ones_like(in_region), in_region, ~in_region]
    masks += [b == j for j in range(len(edges) - 1)]
    return np.where(np.stack(masks), 0.0, np.inf), b


def _unbiased_log_weights(u_kn: np.ndarray, n_k: np.ndarray, f_k: np.ndarray) -> np.ndarray:
    """log W_n of the unbiased state (unnormalised): −log Σ_k N_k exp(f_k − u_kn)."""
    with np.errstate(divide="ignore"):
        return -logsumexp(f_k[:, None] - u_kn, b=n_k[:, None], axis=0)


def _from_log_weights(
    log_w: np.ndarray, phi: np.ndarray, edges: np.ndarray, region: tuple[float, float]
) -> tuple[float, np.ndarray]:
    """ΔF and −log P(bin) from unbiased log weights."""
    lw = log_w - logsumexp(log_w)
    lo, hi = region
    in_region = (phi > lo) & (phi < hi)
    with np.errstate(divide="ignore"):
        delta = -(logsumexp(lw[in_region]) - logsumexp(lw[~in_region]))
        b = np.clip(np.searchsorted(edges, phi, side="right") - 1, 0, len(edges) - 2)
        p = np.bincount(b, weights=np.exp(lw), minlength=len(edges) - 1)
        return float(delta), -np.log(p)


#: Windows above which MBAR is solved with pymbar's "robust" protocol (adaptive Newton /
#: self-consistent iteration, then L-BFGS-B) instead of its default (hybr, then adaptive).
#: On a 24 × 24 (φ, ψ) grid of ALDP windows hybr did not converge and the default took 2.3×
#: longer than "robust" (39.5 s against 17.0 s of CPU for 11,520 samples, same f_k to 1e-13).
MANY_WINDOWS = 64


def _solver(n_windows: int) -> str | None:
    return "robust" if n_windows > MANY_WINDOWS else None


def _check_centers(centers: Any, k: int, kappa: Any) -> tuple[np.ndarray, np.ndarray]:
    """Centres as ``(K, D)`` (D = 1 or 2) wrapped, κ as ``(D,)``; ValueError otherwise."""
    c = np.asarray(centers, dtype=np.float64)
    c = c.reshape(-1, 1) if c.ndim == 1 else c
    if c.ndim != 2 or c.shape[1] not in (1, 2) or c.shape[0] != k or k == 0:
        raise ValueError(
            f"need one centre (φ) or one (φ, ψ) pair per window: {k} windows, centres of "
            f"shape {np.shape(centers)}"
        )
    if not np.isfinite(c).all():
        raise ValueError("centres must be finite angles")
    kap = np.asarray(kappa, dtype=np.float64).reshape(-1)
    if kap.size == 1:
        kap = np.repeat(kap, c.shape[1])
    if kap.size != c.shape[1] or not (np.isfinite(kap).all() and (kap > 0).all()):
        raise ValueError(
            f"kappa must be positive (kT/rad²), one value or one per restrained coordinate "
            f"({c.shape[1]}), got {kappa!r}"
        )
    return wrap_angle(c), kap


def mbar_profile(
    phi_by_window: Sequence[Any],
    centers: Any,
    kappa: float | Sequence[float],
    bins: int = 36,
    *,
    region: tuple[float, float] = (0.0, 2.0),
    psi_by_window: Sequence[Any] | None = None,
    subsample: bool = True,
    uncertainty: str = "analytical",
    n_bootstrap: int = 100,
    level: float = 0.95,
    seed: int = 0,
) -> UmbrellaProfile:
    """F(φ) on bins and ΔF(lo < φ < hi vs the rest) from umbrella windows, by MBAR.

    Windows restrained in φ alone have ``(K,)`` centres; windows restrained in φ and ψ (a 2-D
    grid) have ``(K, 2)`` centres ``(c^φ, c^ψ)`` and need ``psi_by_window``. The profile and ΔF
    are along φ either way.

    Args:
        phi_by_window: K arrays of φ (radians, any 2π branch), one per window, in time order.
        centers: ``(K,)`` restraint centres c_k in radians, or ``(K, 2)`` centres in (φ, ψ).
        kappa: force constant κ in kT/rad² (bias ½ κ d(φ, c_k)²), or ``(κ_φ, κ_ψ)`` for 2-D
            centres (one number: the same κ on both).
        bins: number of equal bins on (−π, π].
        region: ``(lo, hi)`` in radians within (−π, π] for ΔF.
        psi_by_window: K arrays of ψ: with 1-D centres used only to estimate the statistical
            inefficiency (through cos ψ and sin ψ); with 2-D centres also in the bias.
        subsample: subsample each window at its statistical inefficiency (pymbar.timeseries);
            False treats every sample as independent (exact samples, as in the tests).
        uncertainty: ``"analytical"`` (pymbar's asymptotic covariance) or ``"bootstrap"``.
        n_bootstrap: bootstrap replicates (``uncertainty="bootstrap"``; each re-solves MBAR,
            which on a 24 × 24 grid costs about as much as the first solve: about a minute).
        level: confidence level of the CI of ΔF and the band of F.
        seed: bootstrap seed.

    Returns:
        :class:`UmbrellaProfile`.

    Raises:
        ValueError: inconsistent inputs, an empty window, or a region with no samples on one side.
    """
    k = len(phi_by_window)
    c, kap = _check_centers(centers, k, kappa)
    two_d = c.shape[1] == 2
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive int, got {bins!r}")
    lo, hi = (float(x) for x in region)
    if not (-math.pi <= lo < hi <= math.pi):
        raise ValueError(f"region must satisfy -pi <= lo < hi <= pi, got {region!r}")
    if uncertainty not in UNCERTAINTY_METHODS:
        raise ValueError(f"uncertainty must be one of {UNCERTAINTY_METHODS}, got {uncertainty!r}")
    if psi_by_window is None and two_d:
        raise ValueError("centres in (φ, ψ) need psi_by_window (the ψ samples are biased too)")
    if psi_by_window is not None and len(psi_by_window) != k:
        raise ValueError(f"psi_by_window has {len(psi_by_window)} windows, phi_by_window {k}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")

    with _quiet_pymbar() as pymbar:
        kept, g_k, n_tot = [], np.ones(k), np.zeros(k, dtype=np.int64)
        for i in range(k):
            phi = wrap_angle(np.asarray(phi_by_window[i], dtype=np.float64).reshape(-1))
            if phi.size == 0 or not np.isfinite(phi).all():
                raise ValueError(f"window {i}: φ must be a non-empty array of finite angles")
            x = phi[:, None]
            n_tot[i] = phi.size
            if psi_by_window is not None:
                psi = wrap_angle(np.asarray(psi_by_window[i], dtype=np.float64).reshape(-1))
                if psi.size != phi.size or not np.isfinite(psi).all():
                    raise ValueError(
                        f"window {i}: ψ must be finite angles, as many as φ "
                        f"({psi.size} ψ, {phi.size} φ)"
                    )
                if two_d:
                    x = np.stack([phi, psi], axis=1)
            if subsample:
                # Deviations from the centre: continuous across ±π for a window's narrow spread.
                series = [wrap_angle(x[:, d] - c[i, d]) for d in range(x.shape[1])]
                if psi_by_window is not None and not two_d:
                    series += [np.cos(psi), np.sin(psi)]
                g_k[i] = _inefficiency(pymbar.timeseries, series)
                idx = pymbar.timeseries.subsample_correlated_data(series[0], g=g_k[i])
                x = x[np.asarray(idx, dtype=np.int64)]
            kept.append(x)
        n_k = np.array([len(x) for x in kept], dtype=np.int64)
        x_n = np.concatenate(kept)
        phi_n = x_n[:, 0]
        u_kn = bias_matrix(x_n, c, kap)
        mbar = pymbar.MBAR(u_kn, n_k, solver_protocol=_solver(k))
        f_k = np.asarray(mbar.f_k, dtype=np.float64)
        if k > 1:
            ov = mbar.compute_overlap()
            overlap = np.asarray(ov["matrix"], dtype=np.float64)
            o_scalar = float(np.real(ov["scalar"]))
        else:
            overlap, o_scalar = np.ones((1, 1)), math.nan
        edges = np.linspace(-math.pi, math.pi, bins + 1)
        u_ln, _ = _state_matrix(phi_n, edges, (lo, hi))
        occupied = np.isfinite(u_ln).any(axis=1)
        if not occupied[1] or not occupied[2]:
            raise ValueError(f"no samples on one side of the region {region!r}: ΔF undefined")
        rows = np.flatnonzero(occupied)
        res = mbar.compute_perturbed_free_energies(u_ln[rows], uncertainty_method=None)
        delta, d_delta = (
            np.full((len(u_ln), len(u_ln)), np.nan),
            np.full((len(u_ln), len(u_ln)), np.nan),
        )
        delta[np.ix_(rows, rows)] = res["Delta_f"]
        d_delta[np.ix_(rows, rows)] = res["dDelta_f"]
        del mbar, res

    pairs = neighbour_pairs(c)
    o_pair, o_min = (-1, -1), math.nan
    if pairs:
        vals = [min(overlap[i, j], overlap[j, i]) for i, j in pairs]
        o_pair = pairs[int(np.argmin(vals))]
        o_min = float(np.min(vals))

    log_w = _unbiased_log_weights(u_kn, n_k, f_k)
    ess = float(kish_ess(log_w))
    n = int(n_k.sum())
    width = 2 * math.pi / bins
    # −log P(bin) = f_bin − f_all; F = −log(P / width), shifted to minimum 0.
    neg_log_p = np.where(occupied[3:], delta[0, 3:], np.inf)
    f_raw = neg_log_p + math.log(width)
    f_prof = f_raw - np.min(f_raw[np.isfinite(f_raw)])
    dF = float(delta[2, 1])  # f_region − f_rest = −log(P_region / P_rest)
    z = float(norm.ppf(0.5 + level / 2))
    if uncertainty == "analytical":
        se_bins = np.where(occupied[3:], d_delta[0, 3:], np.inf)
        se_df = float(d_delta[2, 1])
        ci_df = (dF - z * se_df, dF + z * se_df)
        with np.errstate(invalid="ignore"):  # empty bins: inf − inf; their band is (inf, inf)
            band = (
                np.where(occupied[3:], f_prof - z * se_bins, np.inf),
                np.where(occupied[3:], f_prof + z * se_bins, np.inf),
            )
        label = "analytical"
    else:
        rng = np.random.default_rng(seed)
        starts = np.concatenate([[0], np.cumsum(n_k)[:-1]])
        reps_df, reps_f = [], []
        with _quiet_pymbar() as pymbar:
            for _ in range(int(n_bootstrap)):
                take = np.concatenate([s + rng.integers(0, m, size=m) for s, m in zip(starts, n_k)])
                ub = u_kn[:, take]
                mb = pymbar.MBAR(ub, n_k, initial_f_k=f_k, solver_protocol=_solver(k))
                lw_b = _unbiased_log_weights(ub, n_k, np.asarray(mb.f_k, dtype=np.float64))
                d_b, nlp_b = _from_log_weights(lw_b, phi_n[take], edges, (lo, hi))
                reps_df.append(d_b)
                reps_f.append(nlp_b + math.log(width) - np.min(f_raw[np.isfinite(f_raw)]))
        reps_df_a, reps_f_a = np.asarray(reps_df), np.asarray(reps_f)
        se_df = float(np.std(reps_df_a, ddof=1))
        q = [50 * (1 - level), 50 * (1 + level)]
        ci_df = tuple(float(v) for v in np.percentile(reps_df_a, q))
        with np.errstate(invalid="ignore"):
            se_bins = np.std(np.where(np.isfinite(reps_f_a), reps_f_a, np.nan), axis=0, ddof=1)
            se_bins = np.where(np.isfinite(reps_f_a).all(axis=0), se_bins, np.inf)
            band = tuple(np.percentile(reps_f_a, q, axis=0))
        label = f"bootstrap(B={int(n_bootstrap)})"
    profile = FreeEnergyProfile(
        edges=(edges,),
        free_energy=f_prof,
        ci_low=np.asarray(band[0]),
        ci_high=np.asarray(band[1]),
        stderr=np.asarray(se_bins),
        probability=np.exp(-neg_log_p),
        n=n,
        ess=ess,
        method=f"mbar-{label}",
        level=level,
    )
    estimate = Estimate(
        value=dF,
        ci_low=float(ci_df[0]),
        ci_high=float(ci_df[1]),
        stderr=se_df,
        n=n,
        ess=ess,
        method=f"mbar-{label}",
        level=level,
    )
    return UmbrellaProfile(
        profile=profile,
        delta_f=estimate,
        region=(lo, hi),
        window_f=f_k - f_k[0],
        statistical_inefficiency=g_k,
        n_used=n_k,
        n_total=n_tot,
        uncertainty=label,
        neighbour_overlap=o_min,
        neighbour_overlap_pair=o_pair,
        overlap_scalar=o_scalar,
        restrained=("phi", "psi") if two_d else ("phi",),
    )
