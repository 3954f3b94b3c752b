"""SNIS, log Z, ΔF and profile estimators: closed forms, statistics, bootstrap reproducibility."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from boltzflow.sampling import (
    free_energy_difference,
    free_energy_profile,
    log_partition,
    log_weights,
    snis_expectation,
)


def _gaussian_is(n: int, s: float, seed: int, dim: int = 1):
    """Proposal N(0, s^2 I), target exp(-|x|^2/2) with log Z = dim/2 log(2 pi)."""
    g = torch.Generator().manual_seed(seed)
    x = s * torch.randn(n, dim, generator=g, dtype=torch.float64)
    log_q = (-0.5 * (x / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)).sum(1)
    u = 0.5 * (x**2).sum(1)
    return x, log_weights(u, log_q)


def test_equal_weights_closed_forms():
    f = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    lw = np.zeros(5)
    e = snis_expectation(f, lw)
    assert e.value == pytest.approx(4.0)
    assert e.stderr == pytest.approx(np.std(f) / math.sqrt(5))  # population sd / sqrt(N)
    assert e.ci_high - e.value == pytest.approx(1.959963984540054 * e.stderr)
    assert e.n == 5 and e.ess == pytest.approx(5.0)
    z = log_partition(lw + 3.0)
    assert z.value == pytest.approx(3.0) and z.stderr == pytest.approx(0.0, abs=1e-15)
    in_a = np.array([True, True, False, False, False])
    d = free_energy_difference(in_a, ~in_a, lw)
    assert d.value == pytest.approx(-math.log(2 / 3))
    # delta method with equal weights: Var = (1/N)(1/P_A + 1/P_B)
    assert d.stderr == pytest.approx(math.sqrt((1 / 0.4 + 1 / 0.6) / 5))


def test_snis_and_log_z_within_standard_errors():
    x, lw = _gaussian_is(20_000, 1.5, seed=0, dim=2)
    exact_log_z = math.log(2 * math.pi)
    z = log_partition(lw)
    k = abs(z.value - exact_log_z) / z.stderr
    assert k < 4, f"log Z {z.value:.4f} ± {z.stderr:.4f} vs exact {exact_log_z:.4f}: {k:.1f} se"
    m = snis_expectation((x**2).sum(1), lw)  # E_p |x|^2 = 2
    k = abs(m.value - 2.0) / m.stderr
    assert k < 4, f"E|x|^2 {m.value:.4f} ± {m.stderr:.4f} vs exact 2: {k:.1f} se"


def test_delta_and_bootstrap_agree_and_bootstrap_is_seeded():
    x, lw = _gaussian_is(3000, 1.3, seed=1)
    f = x[:, 0] ** 2
    d = snis_expectation(f, lw)
    b1 = snis_expectation(f, lw, method="bootstrap", n_bootstrap=300, seed=7)
    b2 = snis_expectation(f, lw, method="bootstrap", n_bootstrap=300, seed=7)
    b3 = snis_expectation(f, lw, method="bootstrap", n_bootstrap=300, seed=8)
    assert b1 == b2 and b1.ci_low != b3.ci_low
    assert b1.method == "bootstrap(B=300)" and b1.value == d.value
    # the bootstrap sd estimates the same standard error: within ~15% at B = 300
    assert b1.stderr == pytest.approx(d.stderr, rel=0.15)
    zb = log_partition(lw, method="bootstrap", n_bootstrap=300, seed=0)
    assert zb.stderr == pytest.approx(log_partition(lw).stderr, rel=0.15)


def test_snis_delta_interval_coverage():
    # 200 repetitions of N = 400: 95% intervals should cover E_p[x^2] = 1 about 190 times.
    hits = 0
    for seed in range(200):
        x, lw = _gaussian_is(400, 1.4, seed=100 + seed)
        hits += snis_expectation(x[:, 0] ** 2, lw).contains(1.0)
    # binomial sd at p = 0.95, n = 200 is 3.1; the delta interval is first-order, allow -5 sd
    assert 174 <= hits <= 200, f"coverage {hits}/200"


def test_free_energy_difference_gaussian_half_lines():
    # P(x < -1) / P(x > 0.5) under N(0, 1)
    from scipy.stats import norm

    x, lw = _gaussian_is(50_000, 1.5, seed=2)
    a, b = (x[:, 0] < -1).numpy(), (x[:, 0] > 0.5).numpy()
    exact = -math.log(norm.cdf(-1) / norm.sf(0.5))
    for method in ("delta", "bootstrap"):
        d = free_energy_difference(a, b, lw, method=method, n_bootstrap=200, seed=0)
        k = abs(d.value - exact) / d.stderr
        assert k < 4, f"{method}: ΔF {d.value:.4f} ± {d.stderr:.4f} vs {exact:.4f} ({k:.1f} se)"


def test_free_energy_difference_soft_membership_and_errors():
    lw = np.zeros(4)
    d = free_energy_difference(np.array([0.5, 0.5, 1.0, 0.0]), np.array([0.5, 0.5, 0.0, 1.0]), lw)
    assert d.value == pytest.approx(-math.log(2.0 / 2.0))
    with pytest.raises(ValueError, match="state B has zero weight"):
        free_energy_difference(np.ones(4, bool), np.zeros(4, bool), lw)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        free_energy_difference(np.full(4, 2.0), np.ones(4), lw)
    with pytest.raises(TypeError, match="boolean mask"):
        free_energy_difference(np.ones(4, int), np.ones(4, int), lw)
    with pytest.raises(ValueError, match="unknown interval method"):
        log_partition(lw, method="jackknife")


def test_profile_exact_and_band():
    values = np.array([0.1, 0.2, 0.3, 0.6])
    p = free_energy_profile(values, np.zeros(4), bins=2, value_range=(0.0, 1.0), method="delta")
    assert p.free_energy.tolist() == pytest.approx([0.0, math.log(3)])
    assert p.probability.tolist() == pytest.approx([0.75, 0.25])
    assert p.centers[0].tolist() == pytest.approx([0.25, 0.75])
    # weights shift the profile: w = 3 on the last sample gives equal bins
    p = free_energy_profile(
        values, np.log([1, 1, 1, 3.0]), bins=2, value_range=(0, 1), method="delta"
    )
    assert p.free_energy.tolist() == pytest.approx([0.0, 0.0], abs=1e-12)


def test_profile_1d_gaussian_within_band():
    x, lw = _gaussian_is(20_000, 1.5, seed=3)
    p = free_energy_profile(x[:, 0], lw, bins=20, value_range=(-2.0, 2.0), n_bootstrap=100)
    c = p.centers[0]
    from scipy.stats import norm

    e = p.edges[0]
    exact = -np.log((norm.cdf(e[1:]) - norm.cdf(e[:-1])) / (e[1] - e[0]))  # exact bin F
    # compare shapes: F - F(centre bin), allowing 4 standard errors per bin
    ref = np.argmin(np.abs(c))
    err = np.abs((p.free_energy - p.free_energy[ref]) - (exact - exact[ref]))
    se = np.sqrt(p.stderr**2 + p.stderr[ref] ** 2)
    assert np.all(err < 4 * se + 1e-12), f"max {np.max(err / se):.1f} se"
    assert np.all(p.ci_low <= p.free_energy + 1e-12) and np.all(p.free_energy <= p.ci_high + 1e-12)


def test_profile_2d_shapes():
    x, lw = _gaussian_is(2000, 1.5, seed=4, dim=2)
    p = free_energy_profile(
        x.numpy(), lw, bins=(8, 6), value_range=[(-3, 3), (-3, 3)], n_bootstrap=20
    )
    assert p.free_energy.shape == (8, 6) and p.ci_high.shape == (8, 6)
    assert np.nanmin(p.free_energy) == 0.0
    import json

    json.dumps(p.to_dict(), allow_nan=False)  # empty bins become null, not NaN


def test_clustered_delta_counts_duplicates_once():
    """Every sample duplicated (weights halved), the duplicates labelled as one cluster: the
    clustered delta-method errors equal those of the original samples, the unclustered ones
    are too small by sqrt(2); singleton clusters give the plain delta method."""
    rng = np.random.default_rng(0)
    n = 300
    lw = rng.normal(size=n)
    f = rng.normal(size=n)
    lw2, f2 = np.repeat(lw, 2), np.repeat(f, 2)
    pairs = np.repeat(np.arange(n), 2)
    for est in (
        lambda v, w, **k: snis_expectation(v, w, **k),
        lambda v, w, **k: free_energy_difference(v > 0.3, v <= 0.3, w, **k),
    ):
        base = est(f, lw)
        dup = est(f2, lw2)
        clustered = est(f2, lw2, clusters=pairs)
        assert clustered.value == pytest.approx(base.value, rel=1e-12)
        assert clustered.stderr == pytest.approx(base.stderr, rel=1e-9)
        assert dup.stderr == pytest.approx(base.stderr / np.sqrt(2), rel=1e-9)
        assert clustered.method == "delta-clustered" and base.method == "delta"
        single = est(f, lw, clusters=np.arange(n))
        assert single.stderr == pytest.approx(base.stderr, rel=1e-12)
    with pytest.raises(ValueError, match="delta method only"):
        snis_expectation(f, lw, method="bootstrap", clusters=np.arange(n))
    with pytest.raises(ValueError, match="non-negative integer"):
        snis_expectation(f, lw, clusters=np.arange(n) - 1.5)
