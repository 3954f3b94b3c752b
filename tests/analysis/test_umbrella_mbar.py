"""MBAR profile of umbrella windows against a 1-D periodic potential with an exact answer.

u(φ) = a cos φ + b cos 2φ + s sin φ on the circle; window k samples
p_k(φ) ∝ exp(−u(φ) − ½ κ d(φ, c_k)²) exactly by rejection from the uniform density (envelope
the density's maximum on a fine grid, plus a margin). The exact F(φ) per bin and
ΔF = −log(P(0 < φ < 2) / P(otherwise)) come from quadrature. Estimates must lie within 4
reported standard errors of the exact values (fixed seed).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.integrate import quad

from boltzflow.analysis.mbar import bias_matrix, mbar_profile, periodic_distance

A, B, S = 1.0, -1.5, 2.0
KAPPA = 20.0
BINS = 24


def _u(phi: np.ndarray) -> np.ndarray:
    return A * np.cos(phi) + B * np.cos(2 * phi) + S * np.sin(phi)


def _exact_windows(centers: np.ndarray, n: int, rng: np.random.Generator) -> list[np.ndarray]:
    grid = np.linspace(-math.pi, math.pi, 200_001)
    out = []
    for c in centers:
        energy = _u(grid) + 0.5 * KAPPA * periodic_distance(grid, c) ** 2
        floor = energy.min() - 1e-3  # envelope exp(-floor) >= the density everywhere
        got: list[np.ndarray] = []
        total = 0
        while total < n:
            x = rng.uniform(-math.pi, math.pi, size=20 * n)
            e = _u(x) + 0.5 * KAPPA * periodic_distance(x, c) ** 2
            acc = x[rng.uniform(size=x.size) < np.exp(-(e - floor))]
            got.append(acc)
            total += acc.size
        out.append(np.concatenate(got)[:n])
    return out


def _exact_neg_log_p(lo: float, hi: float) -> float:
    z = quad(lambda p: math.exp(-_u(np.array(p))), -math.pi, math.pi, limit=200)[0]
    return -math.log(quad(lambda p: math.exp(-_u(np.array(p))), lo, hi, limit=200)[0] / z)


def test_bias_matrix_is_periodic():
    u = bias_matrix(np.array([math.pi - 0.1, -math.pi + 0.1]), [math.pi], 2.0)
    np.testing.assert_allclose(u, [[0.01, 0.01]], rtol=1e-12)


@pytest.mark.parametrize("uncertainty", ["analytical", "bootstrap"])
def test_mbar_profile_matches_quadrature(uncertainty):
    rng = np.random.default_rng(5)
    centers = np.linspace(-math.pi, math.pi, 16, endpoint=False)
    phi = _exact_windows(centers, 400, rng)
    res = mbar_profile(
        phi, centers, KAPPA, BINS, subsample=False, uncertainty=uncertainty, n_bootstrap=20
    )
    z_ref = quad(lambda p: math.exp(-_u(np.array(p))), -math.pi, math.pi, limit=200)[0]
    p_region = quad(lambda p: math.exp(-_u(np.array(p))), 0.0, 2.0)[0] / z_ref
    exact_df = -math.log(p_region / (1 - p_region))
    est = res.delta_f
    print(f"ΔF {est.value:.4f} ± {est.stderr:.4f} ({uncertainty}), exact {exact_df:.4f}")
    assert 0 < est.stderr < 0.2
    assert abs(est.value - exact_df) < 4 * est.stderr

    edges = res.profile.edges[0]
    width = edges[1] - edges[0]
    exact_nlp = np.array([_exact_neg_log_p(a, b) for a, b in itertools.pairwise(edges)])
    est_nlp = -np.log(res.profile.probability)
    z = (est_nlp - exact_nlp) / res.profile.stderr
    print("max |z| over bins:", np.abs(z).max())
    assert np.all(np.abs(z) < 4)
    exact_f = exact_nlp + math.log(width)
    exact_f -= exact_f.min()
    assert np.abs(res.profile.free_energy - exact_f).max() < 0.5
    assert res.n_used.sum() == 16 * 400 and res.profile.n == 16 * 400


def test_subsampling_finds_correlation():
    """Each exact sample repeated 5 times: g ≈ 5, about N/5 samples kept, same answer."""
    rng = np.random.default_rng(7)
    centers = np.linspace(-math.pi, math.pi, 12, endpoint=False)
    phi = _exact_windows(centers, 300, rng)
    res = mbar_profile([np.repeat(p, 5) for p in phi], centers, KAPPA, 12, subsample=True)
    plain = mbar_profile(phi, centers, KAPPA, 12, subsample=False)
    assert np.all((res.statistical_inefficiency > 3) & (res.statistical_inefficiency < 8))
    assert np.all(res.n_total == 1500)
    assert 0.6 * 3600 < res.n_used.sum() < 1.4 * 3600  # N / g with N = 12 * 1500
    assert abs(res.delta_f.value - plain.delta_f.value) < 3 * plain.delta_f.stderr
    assert 0.5 < res.delta_f.stderr / plain.delta_f.stderr < 2.5
