"""Weights: extreme log weights, all-zero weights, forward ESS, clipping, WeightedSamples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from boltzflow.sampling import (
    WeightedSamples,
    clip_log_weights,
    ess_fraction,
    forward_ess_fraction,
    free_energy_difference,
    free_energy_profile,
    kish_ess,
    log_partition,
    log_weights,
    normalized_weights,
    snis_expectation,
    systematic_resample,
)


def test_weights_spanning_1e300_do_not_overflow():
    # w = e^690 ~ 1e300 and e^-690 ~ 1e-300 side by side (float64 max is ~1.8e308).
    log_w = torch.tensor([690.0, -690.0, 0.0, 690.0], dtype=torch.float64)
    w = normalized_weights(log_w)
    assert torch.isfinite(w).all()
    # logsumexp near 690 carries a relative round-off of ~690 * 2.2e-16
    assert [w[0].item(), w[3].item()] == pytest.approx([0.5, 0.5], rel=1e-12)
    assert 0.0 <= w[1].item() < 1e-250 and 0.0 < w[2].item() < 1e-250
    assert kish_ess(log_w) == pytest.approx(2.0, rel=1e-12)
    est = log_partition(log_w)
    assert est.value == pytest.approx(690 + math.log(2) - math.log(4), rel=1e-14)
    assert math.isfinite(est.stderr) and math.isfinite(est.ci_low)
    values = np.array([1.0, 5.0, 7.0, 3.0])
    assert snis_expectation(values, log_w).value == pytest.approx(2.0, rel=1e-12)
    boot = snis_expectation(values, log_w, method="bootstrap", n_bootstrap=50)
    assert math.isfinite(boot.value) and math.isfinite(boot.stderr)
    in_a = np.array([True, False, False, False])
    dF = free_energy_difference(in_a, ~in_a, log_w)
    assert dF.value == pytest.approx(0.0, abs=1e-12)
    prof = free_energy_profile(values, log_w, bins=2, value_range=(0.0, 8.0), method="delta")
    assert np.isfinite(prof.free_energy).all()
    idx = systematic_resample(log_w, 1000, seed=0)
    assert set(idx.tolist()) == {0, 3}


def test_random_weights_spanning_1e300():
    g = torch.Generator().manual_seed(0)
    log_w = torch.rand(100_000, generator=g, dtype=torch.float64) * 1380 - 690
    for fn in (kish_ess, ess_fraction):
        assert math.isfinite(fn(log_w))
    assert math.isfinite(log_partition(log_w).value)


def test_all_infinite_energies_raise_clear_error():
    u = torch.full((10,), float("inf"), dtype=torch.float64)
    lq = torch.zeros(10, dtype=torch.float64)
    log_w = log_weights(u, lq)
    assert (log_w == float("-inf")).all()
    for fn in (kish_ess, normalized_weights, log_partition):
        with pytest.raises(ValueError, match="all importance weights are zero"):
            fn(log_w)
    samples = WeightedSamples.from_energies(torch.zeros(10, 2), lq, u)
    with pytest.raises(ValueError, match="infinite energy"):
        samples.ess  # noqa: B018


def test_nan_energy_gets_zero_weight():
    u = torch.tensor([1.0, float("nan"), 2.0], dtype=torch.float64)
    log_w = log_weights(u, torch.zeros(3, dtype=torch.float64))
    assert log_w[1] == float("-inf")
    expected = (math.exp(-1) + math.exp(-2)) ** 2 / (math.exp(-2) + math.exp(-4))
    assert kish_ess(log_w) == pytest.approx(expected)


def test_forward_ess_matches_closed_form_for_gaussians():
    # q = N(0, s^2), p = N(0, 1) (u = x^2/2): 1 / E_q[(p/q)^2] = sqrt(2 s^2 - 1) / s^2.
    s, n = 1.5, 100_000
    g = torch.Generator().manual_seed(1)
    exact = math.sqrt(2 * s**2 - 1) / s**2
    x_ref = torch.randn(n, generator=g, dtype=torch.float64)
    log_q = lambda x: -0.5 * (x / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)  # noqa: E731
    fwd = forward_ess_fraction(log_weights(0.5 * x_ref**2, log_q(x_ref)))
    x_q = s * torch.randn(n, generator=g, dtype=torch.float64)
    rev = ess_fraction(log_weights(0.5 * x_q**2, log_q(x_q)))
    # Both estimators have relative error well below 1% at this N for bounded weights.
    assert fwd == pytest.approx(exact, abs=0.01), f"forward ESS {fwd} vs exact {exact}"
    assert rev == pytest.approx(exact, abs=0.01), f"reverse ESS {rev} vs exact {exact}"


def test_forward_ess_is_zero_when_proposal_misses_a_reference_sample():
    assert forward_ess_fraction(torch.tensor([0.0, float("inf")])) == 0.0
    assert forward_ess_fraction(torch.zeros(7)) == pytest.approx(1.0)


def test_clip_log_weights_exact():
    log_w = torch.log(torch.tensor([1.0, 2.0, 3.0, 100.0], dtype=torch.float64))
    c = clip_log_weights(log_w, 0.25)
    assert c.n_clipped == 1 and c.fraction_clipped == 0.25
    assert torch.exp(c.log_w).tolist() == pytest.approx([1.0, 2.0, 3.0, 3.0])
    assert c.mass_clipped == pytest.approx((106 - 9) / 106)
    assert clip_log_weights(log_w, 0.0).n_clipped == 0
    with pytest.raises(ValueError, match="clip every weight"):
        clip_log_weights(log_w, 0.99)
    with pytest.raises(ValueError, match="must be in"):
        clip_log_weights(log_w, 1.5)


def test_weighted_samples_checks_lengths():
    x = torch.zeros(5, 3)
    with pytest.raises(ValueError, match="log_q must have shape"):
        WeightedSamples(x, torch.zeros(4), torch.zeros(5), torch.zeros(5))
    with pytest.raises(ValueError, match="x must be"):
        WeightedSamples(torch.zeros(5), torch.zeros(5), torch.zeros(5), torch.zeros(5))
    ws = WeightedSamples.from_energies(x, torch.zeros(5), torch.arange(5.0))
    assert len(ws) == 5 and ws.log_w.tolist() == [-0.0, -1.0, -2.0, -3.0, -4.0]
    assert len(ws[torch.tensor([True, False, True, False, True])]) == 3
