"""GMM-40: FAB's means, log Z = 0 by quadrature, exact samples, mode masses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from boltzflow.systems import load_system


@pytest.fixture(scope="module")
def gmm():
    return load_system("gmm_40")


def test_means_are_fabs(gmm) -> None:
    gen = torch.Generator().manual_seed(0)  # same stream as torch.manual_seed(0)
    loc = (torch.rand((40, 2), generator=gen) - 0.5) * 2 * 40
    assert gmm.means.shape == (40, 2)
    assert torch.equal(gmm.means, loc.double()), "shipped means differ from FAB's recipe"
    assert float(gmm.means[0, 0]) == float(loc[0, 0]) and float(gmm.means[39, 1]) == float(
        loc[39, 1]
    )
    assert gmm.std == pytest.approx(math.log1p(math.e), abs=1e-15)
    assert gmm.log_z == 0.0


def test_log_z_zero_by_trapezoid(gmm) -> None:
    # the trapezoid rule on a Gaussian is spectrally accurate: error ~ exp(-2 pi^2 std^2 / h^2)
    h = 0.25
    g = torch.arange(-50.0, 50.0 + h / 2, h, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    u = gmm.energy(torch.stack([xx.reshape(-1), yy.reshape(-1)], -1)).reshape(len(g), len(g))
    p = torch.exp(-u).numpy()
    z = np.trapezoid(np.trapezoid(p, dx=h, axis=1), dx=h)
    assert z == pytest.approx(1.0, abs=1e-8), f"Z = {z}"
    torch.testing.assert_close(
        torch.logsumexp(gmm.component_log_probs(torch.zeros(1, 2, dtype=torch.float64)), -1),
        -gmm.energy(torch.zeros(1, 2, dtype=torch.float64)),
    )


def test_exact_samples_per_mode(gmm) -> None:
    n = 40_000
    x, comp = gmm.sample_with_components(n, seed=5)
    assert torch.equal(x, gmm.sample_exact(n, seed=5))
    assert not torch.equal(x[:10], gmm.sample_exact(10, seed=6))
    counts = torch.bincount(comp, minlength=40).double() / n
    se = math.sqrt((1 / 40) * (39 / 40) / n)
    worst = float((counts - 1 / 40).abs().max())
    # max over 40 modes: 4 SE leaves a family-wise false-alarm rate of about 0.3%
    assert worst < 4 * se, f"worst per-mode fraction off by {worst:.5f}; binomial SE {se:.5f} (k=4)"
    # given its component, a sample is N(mu_k, std^2 I): |x - mu|^2 / std^2 ~ chi^2 with 2 dof
    r2 = ((x - gmm.means[comp]).pow(2).sum(-1) / gmm.std**2).numpy()
    ks = stats.kstest(r2, stats.chi2(df=2).cdf)
    assert ks.pvalue > 0.01, f"radial KS p = {ks.pvalue:.3g}"
    # soft labels from the density itself: E[r_k(x)] = 1/40 exactly
    r = gmm.responsibilities(x)
    soft = r.mean(0)
    soft_se = r.std(0) / math.sqrt(n)
    z = ((soft - 1 / 40) / soft_se).abs().max()
    assert z < 4.5, f"responsibility means off by {z:.2f} SE at worst (limit 4.5)"


def test_mode_assignment_and_masses(gmm) -> None:
    means = gmm.means
    assert torch.equal(gmm.mode_assignment(means), torch.arange(40))
    assert gmm.exact_mode_mass([0, 1, 2]) == 3 / 40
    assert gmm.exact_mode_mass([4, 4]) == 1 / 40
    assert gmm.exact_mode_mass(range(40)) == 1.0
    with pytest.raises(ValueError, match=r"\[40\]"):
        gmm.exact_mode_mass([0, 40])
    torch.testing.assert_close(
        gmm.responsibilities(means).sum(-1), torch.ones(40, dtype=torch.float64)
    )


def test_reference_configuration_is_first_mean(gmm) -> None:
    assert torch.equal(gmm.reference_configuration(), gmm.means[:1])
