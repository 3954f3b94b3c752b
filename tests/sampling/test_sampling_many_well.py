"""Many-Well-32 importance sampling against the exact log Z = 164.696 (FAB)."""

from __future__ import annotations

import math

import pytest
import torch

from boltzflow.sampling import ess_fraction, log_partition, log_weights
from boltzflow.sampling.proposals import ExactProposal, ManyWellProposal, quartic_well
from boltzflow.systems import load_system


@pytest.fixture(scope="module")
def many_well():
    return load_system("many_well_32")


def test_quartic_well_matches_fab_constant():
    # FAB: integral of exp(-(-0.5 t - 6 t^2 + t^4)) = 11784.50927 (given to 10 digits)
    w = quartic_well(-0.5, -6.0, 1.0)
    assert w.log_z == pytest.approx(math.log(11784.50927), abs=1e-8)
    assert sum(w.masses) == pytest.approx(1.0, abs=1e-12)
    assert w.means[0] < w.barrier < w.means[1]


def test_many_well_log_z_with_1e6_samples(many_well):
    prop = ManyWellProposal.from_system(many_well)
    assert prop.exact_log_z == pytest.approx(many_well.log_z, abs=1e-6)
    assert many_well.log_z == pytest.approx(164.696, abs=5e-4)
    parts = []
    with torch.no_grad():
        for k in range(10):  # 10 chunks of 1e5 keep memory at ~30 MB per chunk
            x, lq = prop.sample(100_000, seed=k)
            parts.append(log_weights(many_well.energy(x), lq))
    log_w = torch.cat(parts)
    est = log_partition(log_w, level=0.99)
    err = est.value - many_well.log_z
    print(f"Many-Well-32, N = 1e6: log Z {est}, error {err:+.5f}, ESS/N {ess_fraction(log_w):.4f}")
    assert est.n == 1_000_000
    assert est.contains(many_well.log_z), (
        f"exact {many_well.log_z:.5f} outside 99% CI [{est.ci_low:.5f}, {est.ci_high:.5f}] "
        f"(estimate {est.value:.5f}, se {est.stderr:.5f}, {err / est.stderr:.1f} se)"
    )
    assert abs(err) < 0.05
    assert 0.05 < ess_fraction(log_w) < 0.99  # good but not exact


def test_exact_proposal_gives_unit_ess(many_well):
    prop = ExactProposal(many_well)
    x, lq = prop.sample(5000, seed=0)
    log_w = log_weights(many_well.energy(x), lq)
    assert ess_fraction(log_w) == pytest.approx(1.0, abs=1e-12)
    assert log_partition(log_w).value == pytest.approx(many_well.log_z, abs=1e-9)


def test_proposal_log_prob_is_normalised(many_well):
    # the 1-D x1 mixture integrates to one (quadrature), so the product proposal does too
    import numpy as np

    prop = ManyWellProposal(2, std_scale=1.3)
    t = torch.linspace(-8, 8, 200_001, dtype=torch.float64)
    x = torch.stack([t, torch.zeros_like(t)], 1)
    dens = torch.exp(prop.log_prob(x) + 0.5 * math.log(2 * math.pi))  # divide out N(0; 0, 1)
    assert np.trapezoid(dens.numpy(), t.numpy()) == pytest.approx(1.0, abs=1e-10)
    with pytest.raises(ValueError, match="even"):
        ManyWellProposal(3)
