"""ΔF between sets of modes: 95% intervals cover the exact value in 80-100% of 20 seeds.

GMM-40: soft memberships sum_{k in S} r_k(x) have expectation |S|/40 exactly, so
ΔF(S, T) = -log(|S| / |T|). Many-Well-32: the wells of each x1 split at the barrier; their masses
come from 1-D quadrature (scipy quad, independent of the proposal's own quadrature), and the
states "wells 1 and 2 both right" / "both left" have ΔF = -2 log(m_right / m_left).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from boltzflow.sampling import free_energy_difference, log_weights
from boltzflow.sampling.proposals import GaussianMixtureProposal, ManyWellProposal
from boltzflow.systems import load_system

SEEDS = range(20)


def _coverage(estimates, exact):
    hits = sum(e.contains(exact) for e in estimates)
    z = [(e.value - exact) / e.stderr for e in estimates]
    return hits, z


def test_gmm40_mode_set_free_energy_coverage():
    gmm = load_system("gmm_40")
    prop = GaussianMixtureProposal(gmm.means, stds=1.4 * gmm.std)  # good, not exact
    a_set, b_set = list(range(10)), list(range(10, 30))
    exact = -math.log(gmm.exact_mode_mass(a_set) / gmm.exact_mode_mass(b_set))  # log 2
    results = {"delta": [], "bootstrap": []}
    for seed in SEEDS:
        x, lq = prop.sample(2000, seed=seed)
        lw = log_weights(gmm.energy(x), lq)
        r = gmm.responsibilities(x)
        in_a, in_b = r[:, a_set].sum(1).numpy(), r[:, b_set].sum(1).numpy()
        results["delta"].append(free_energy_difference(in_a, in_b, lw))
        results["bootstrap"].append(
            free_energy_difference(in_a, in_b, lw, method="bootstrap", n_bootstrap=200, seed=seed)
        )
    for method, ests in results.items():
        hits, z = _coverage(ests, exact)
        print(f"GMM-40 ΔF {method}: coverage {hits}/20, z-scores {np.round(z, 2).tolist()}")
        assert 16 <= hits <= 20, f"{method}: 95% CI covered exact ΔF {exact:.4f} in {hits}/20"


@pytest.fixture(scope="module")
def well_masses():
    f = lambda t: math.exp(-(-0.5 * t - 6.0 * t**2 + t**4) - 9.0)  # noqa: E731
    roots = np.sort(np.roots([4.0, 0.0, -12.0, -0.5]).real)
    barrier = float(roots[1])
    left = quad(f, -10, barrier, points=[roots[0]], epsrel=1e-12)[0]
    right = quad(f, barrier, 10, points=[roots[2]], epsrel=1e-12)[0]
    return barrier, left / (left + right), right / (left + right)


def test_many_well_mode_set_free_energy_coverage(well_masses):
    barrier, m_left, m_right = well_masses
    mw = load_system("many_well_32")
    prop = ManyWellProposal.from_system(mw)
    exact = -2 * math.log(m_right / m_left)
    results = {"delta": [], "bootstrap": []}
    for seed in SEEDS:
        x, lq = prop.sample(5000, seed=1000 + seed)
        lw = log_weights(mw.energy(x), lq)
        right = x[:, [0, 2]] > barrier  # x1 of wells 1 and 2
        in_a = right.all(1).numpy()
        in_b = (~right).all(1).numpy()
        results["delta"].append(free_energy_difference(in_a, in_b, lw))
        results["bootstrap"].append(
            free_energy_difference(in_a, in_b, lw, method="bootstrap", n_bootstrap=200, seed=seed)
        )
    for method, ests in results.items():
        hits, z = _coverage(ests, exact)
        print(f"Many-Well ΔF {method}: coverage {hits}/20, z-scores {np.round(z, 2).tolist()}")
        assert 16 <= hits <= 20, f"{method}: 95% CI covered exact ΔF {exact:.4f} in {hits}/20"
    assert torch.is_tensor(x)
