"""Resampling: systematic copies floor/ceil(n W_i) times, multinomial is unbiased, seeded."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from boltzflow.sampling import (
    WeightedSamples,
    multinomial_resample,
    resample,
    resample_indices,
    systematic_resample,
)


def _log_w(n: int = 50, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lw = torch.randn(n, generator=g, dtype=torch.float64) * 2
    lw[::7] = float("-inf")  # some zero weights
    return lw


@pytest.mark.parametrize("seed", range(5))
def test_systematic_counts_are_floor_or_ceil(seed):
    lw = _log_w(seed=seed)
    w = torch.softmax(lw, 0)
    n = 1000
    counts = torch.bincount(systematic_resample(lw, n, seed=seed), minlength=lw.numel())
    expected = n * w
    assert int(counts.sum()) == n
    assert bool((counts >= torch.floor(expected - 1e-9)).all())
    assert bool((counts <= torch.ceil(expected + 1e-9)).all())
    assert int(counts[::7].sum()) == 0


def test_multinomial_counts_match_weights():
    lw = _log_w()
    w = torch.softmax(lw, 0).numpy()
    n = 200_000
    counts = np.bincount(multinomial_resample(lw, n, seed=3).numpy(), minlength=w.size)
    sd = np.sqrt(n * w * (1 - w))
    z = np.abs(counts - n * w)[w > 0] / sd[w > 0]
    assert z.max() < 5, f"largest deviation {z.max():.2f} binomial standard errors (limit 5)"
    assert counts[::7].sum() == 0


def test_resampling_is_reproducible_and_validates():
    lw = _log_w()
    for method in ("systematic", "multinomial"):
        a = resample_indices(lw, 100, method=method, seed=4)
        b = resample_indices(lw, 100, method=method, seed=4)
        c = resample_indices(lw, 100, method=method, seed=5)
        assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="choose from"):
        resample_indices(lw, method="stratified-ish")
    with pytest.raises(ValueError, match="positive int"):
        systematic_resample(lw, 0)


def test_resample_keeps_log_z():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 2, generator=g, dtype=torch.float64)
    s = WeightedSamples.from_energies(x, torch.zeros(300), 0.5 * (x**2).sum(1))
    r = resample(s, 120, seed=1)
    assert len(r) == 120
    log_z = float(torch.logsumexp(s.log_w, 0)) - math.log(300)
    assert float(torch.logsumexp(r.log_w, 0)) - math.log(120) == pytest.approx(log_z)
    assert r.ess_fraction == pytest.approx(1.0)
    assert torch.allclose(r.log_w, -r.u - r.log_q)
