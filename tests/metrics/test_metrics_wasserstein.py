"""Exact 1-D Wasserstein distances and torus W2 against closed forms and POT."""

from __future__ import annotations

import math

import numpy as np
import ot
import pytest
from scipy.stats import wasserstein_distance

from boltzflow.metrics import energy_w1, energy_w2, torus_w2, wasserstein_1d


def test_shift_gives_the_shift():
    a = np.random.default_rng(0).normal(size=300)
    for p in (1, 2, 3):
        assert wasserstein_1d(a, a + 0.7, p=p) == pytest.approx(0.7, abs=1e-12)


def test_w1_matches_scipy_with_weights():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=200), rng.exponential(size=150)
    wa, wb = rng.random(200), rng.random(150)
    ours = wasserstein_1d(a, b, p=1, weights_a=wa, weights_b=wb)
    assert ours == pytest.approx(wasserstein_distance(a, b, wa, wb), rel=1e-10)


def test_w2_is_the_root_of_pot_emd():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=60), rng.gamma(2.0, size=45)
    wb = rng.random(45)
    cost = (a[:, None] - b[None, :]) ** 2
    w2_sq = ot.emd2(np.full(60, 1 / 60), wb / wb.sum(), cost)
    assert energy_w2(a, b, wb) == pytest.approx(math.sqrt(w2_sq), rel=1e-9)
    assert energy_w1(a, b) == pytest.approx(wasserstein_distance(a, b), rel=1e-10)


def test_infinite_values_and_zero_weights():
    assert math.isinf(wasserstein_1d([0.0, 1.0], [0.0, math.inf]))
    # an infinite energy with zero weight is ignored
    assert wasserstein_1d([0.0, 1.0], [0.0, 1.0, math.inf], weights_b=[1, 1, 0]) == 0.0
    with pytest.raises(ValueError, match="NaN"):
        wasserstein_1d([0.0], [math.nan])


def test_torus_w2_wraps_and_matches_brute_force():
    # points at -3.1 and 3.1 are 0.083 apart on the circle, not 6.2
    assert torus_w2([[-3.1]], [[3.1]]) == pytest.approx(2 * math.pi - 6.2, abs=1e-12)
    rng = np.random.default_rng(3)
    a = rng.uniform(-math.pi, math.pi, size=(40, 2))
    b = rng.uniform(-math.pi, math.pi, size=(30, 2))
    w = rng.random(30)
    d = np.abs(a[:, None] - b[None]) % (2 * math.pi)
    cost = (np.minimum(d, 2 * math.pi - d) ** 2).sum(-1)
    exact = math.sqrt(ot.emd2(np.full(40, 1 / 40), w / w.sum(), cost))
    assert torus_w2(a, b, weights=w) == pytest.approx(exact, rel=1e-9)
    # identical sets: zero
    assert torus_w2(a, a) == pytest.approx(0.0, abs=1e-12)


def test_torus_w2_subsampling_is_seeded_and_close():
    rng = np.random.default_rng(4)
    a = rng.vonmises(0.5, 2.0, size=(3000, 2))
    b = rng.vonmises(0.5, 2.0, size=(3000, 2)) + 0.3
    w1 = torus_w2(a, b, max_points=500, seed=1)
    assert w1 == torus_w2(a, b, max_points=500, seed=1)
    # a rigid shift by 0.3 in both angles: W2 = 0.3 * sqrt(2); subsampling adds O(N^-1/2) noise
    assert w1 == pytest.approx(0.3 * math.sqrt(2), abs=0.12)


def test_torus_w2_known_answers_on_the_circle():
    # two point masses a distance d apart on the circle: W2 = d (the shorter way round)
    assert torus_w2([0.5], [1.7]) == pytest.approx(1.2, abs=1e-12)
    assert torus_w2([-2.9], [2.9]) == pytest.approx(2 * math.pi - 5.8, abs=1e-12)  # wraps at ±π
    assert torus_w2([0.0], [math.pi]) == pytest.approx(math.pi, abs=1e-12)  # antipodes
    # two equal point masses each: every mass moves 0.1 across ±π (not 6.18 the long way)
    assert torus_w2([-3.0, 3.0], [3.1, -3.1]) == pytest.approx(0.1, abs=1e-12)
    # an evenly spaced ring shifted by s < half its spacing: each point moves s, so W2 = s,
    # also for the points that cross ±π after the shift
    ring = -math.pi + 0.4 + 2 * math.pi * np.arange(12) / 12
    shifted = np.remainder(ring + 0.2 + math.pi, 2 * math.pi) - math.pi
    assert shifted.min() < ring.min()  # the last point wrapped round to -π
    assert torus_w2(ring, shifted) == pytest.approx(0.2, abs=1e-12)
    # on the torus the squared distances add: shifts (0.2, 0.1) give sqrt(0.05)
    grid = np.stack([ring, np.roll(ring, 5)], 1)
    moved = np.remainder(grid + np.array([0.2, 0.1]) + math.pi, 2 * math.pi) - math.pi
    assert torus_w2(grid, moved) == pytest.approx(math.sqrt(0.05), abs=1e-12)
    # importance weights select the points they put mass on
    assert torus_w2([1.0], [1.0, -2.0], weights=[1.0, 0.0]) == pytest.approx(0.0, abs=1e-12)
