"""AIS/SMC refinement: ESS gain from a poor proposal with log Z inside its CI; reduction to IS."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from boltzflow.sampling import ais, log_partition, log_weights, smc
from boltzflow.sampling.proposals import ManyWellProposal, MeanFreeGaussianProposal
from boltzflow.sampling.smc import next_beta
from boltzflow.systems import load_system


@pytest.fixture(scope="module")
def many_well():
    return load_system("many_well_32")


@pytest.mark.parametrize("kernel", ["mala", "hmc"])
def test_smc_refines_poor_many_well_proposal(many_well, kernel):
    # x1 wells three times too wide: plain IS has ESS/N ~ 2e-3 at dim 32.
    prop = ManyWellProposal.from_system(many_well, std_scale=3.0)
    r = smc(
        many_well,
        prop,
        1000,
        n_steps=20,
        kernel=kernel,
        step_size=0.05,
        n_leapfrog=3,
        level=0.99,
        seed=0,
    )
    gain = r.ess_fraction / r.initial_ess_fraction
    print(
        f"{kernel}: ESS/N {r.initial_ess_fraction:.4f} -> {r.ess_fraction:.3f} (N=1000), "
        f"log Z {r.log_z} vs exact {many_well.log_z:.4f}"
    )
    assert gain >= 3, f"ESS/N gain {gain:.2f} < 3"
    assert r.log_z.contains(many_well.log_z), (
        f"log Z {r.log_z.value:.4f} ± {r.log_z.stderr:.4f} (99% CI {r.log_z.ci_low:.4f}, "
        f"{r.log_z.ci_high:.4f}) misses exact {many_well.log_z:.4f}"
    )
    assert r.log_z.method == ("eve" if r.resampled.any() else "delta")
    assert len(r.ess_history) == 20 and r.betas[0] == 0 and r.betas[-1] == 1
    print(f"acceptance {r.acceptance.mean():.3f}, Eves {r.n_eves}, resampled {r.resampled.sum()}x")
    assert 0.2 < r.acceptance.mean() < 0.99
    s = r.samples
    assert torch.allclose(s.log_w, -s.u - s.log_q)


def test_ais_improves_without_resampling(many_well):
    prop = ManyWellProposal.from_system(many_well, std_scale=3.0)
    r = ais(many_well, prop, 1000, n_steps=20, level=0.99, seed=1)
    print(f"AIS: ESS/N {r.initial_ess_fraction:.4f} -> {r.ess_fraction:.4f}, log Z {r.log_z}")
    assert not r.resampled.any() and r.log_z.method == "delta" and r.n_eves == 1000
    assert r.ess_fraction >= 3 * r.initial_ess_fraction
    # AIS weights stay heavy-tailed here (ESS/N ~ 0.02-0.08), and the delta interval is known to
    # under-cover then (measured 13/16 seeds inside the 99% CI); only a 5-se sanity bound.
    k = abs(r.log_z.value - many_well.log_z) / r.log_z.stderr
    assert k < 5, f"{r.log_z} vs {many_well.log_z}: {k:.1f} se"


def test_no_moves_no_resampling_is_plain_importance_sampling(many_well):
    prop = ManyWellProposal.from_system(many_well, std_scale=1.5)
    r = smc(many_well, prop, 500, n_steps=7, n_kernel_steps=0, resample_threshold=0.0, seed=3)
    x, lq = prop.sample(500, seed=3)
    lw = log_weights(many_well.energy(x), lq)
    assert torch.equal(r.samples.x, x)
    assert torch.allclose(r.samples.log_w, lw, atol=1e-9, rtol=0)
    ref = log_partition(lw)
    assert r.log_z.value == pytest.approx(ref.value, abs=1e-9)
    assert r.log_z.stderr == pytest.approx(ref.stderr, rel=1e-9)
    assert r.initial_ess_fraction == pytest.approx(r.ess_fraction, rel=1e-9)


def test_smc_is_reproducible_and_keeps_particles_mean_free():
    dw4 = load_system("dw4")
    prop = MeanFreeGaussianProposal(4, 2, std=2.0)
    a = smc(dw4, prop, 200, n_steps=5, seed=5)
    b = smc(dw4, prop, 200, n_steps=5, seed=5)
    assert torch.equal(a.samples.x, b.samples.x) and torch.equal(a.samples.log_w, b.samples.log_w)
    com = a.samples.x.reshape(200, 4, 2).mean(1)
    assert float(com.abs().max()) < 1e-12
    assert math.isfinite(a.log_z.value)


def test_smc_rejects_bad_arguments(many_well):
    prop = ManyWellProposal.from_system(many_well)
    with pytest.raises(ValueError, match="unknown kernel"):
        smc(many_well, prop, 10, kernel="gibbs")
    with pytest.raises(ValueError, match="betas must increase"):
        smc(many_well, prop, 10, betas=[0.0, 0.7, 0.5, 1.0])
    with pytest.raises(TypeError, match="never resamples"):
        ais(many_well, prop, 10, resample_threshold=0.3)


def test_smc_log_z_interval_coverage_over_seeds(many_well):
    # 20 independent SMC runs: the 95% (Eve) interval should cover the exact log Z in 16-20.
    prop = ManyWellProposal.from_system(many_well, std_scale=3.0)
    hits = 0
    for seed in range(20):
        r = smc(many_well, prop, 1000, n_steps=20, step_size=0.05, seed=100 + seed)
        hits += r.log_z.contains(many_well.log_z)
    print(f"SMC log Z 95% CI coverage: {hits}/20")
    assert 16 <= hits <= 20, f"coverage {hits}/20 outside [80%, 100%]"


def test_next_beta_keeps_the_conditional_ess():
    gen = torch.Generator().manual_seed(0)
    log_w = torch.randn(400, generator=gen, dtype=torch.float64)
    inc = 5 * torch.randn(400, generator=gen, dtype=torch.float64)
    inc[:7] = -math.inf  # invalid particles: weight zero after any step
    b = next_beta(log_w, inc, 0.2, 0.9)
    assert 0.2 < b < 1
    lw = log_w - torch.logsumexp(log_w, 0)
    ok = torch.isfinite(inc)
    lw, v = lw[ok], (b - 0.2) * inc[ok]
    cess = torch.exp(2 * torch.logsumexp(lw + v, 0) - torch.logsumexp(lw + 2 * v, 0))
    limit = torch.exp(torch.logsumexp(lw, 0))
    assert float(cess / limit) == pytest.approx(0.9, abs=1e-6)
    assert next_beta(log_w, 1e-3 * inc.clamp(min=-1), 0.5, 0.9) == 1.0  # a mild remainder


def test_adaptive_schedule_counts_evaluations_and_recovers_log_z(many_well):
    # Over seeds 0-7 these settings gave log Z within -1.7..+0.7 se of the exact value. Two MALA
    # steps per temperature lag behind the tempered targets and bias log Z low: with a harder
    # proposal (std_scale 3) 12 adaptive temperatures (adaptive_ess 0.8) missed it by 3-5 se,
    # 12 linear ones by about 2 se; without moves both schedules agree with plain IS.
    prop = ManyWellProposal.from_system(many_well, std_scale=2.0)
    r = smc(
        many_well, prop, 500, adaptive_ess=0.9, n_kernel_steps=2, step_size=0.05, level=0.99, seed=2
    )
    k = len(r.betas) - 1
    print(f"adaptive: {k} temperatures, ESS/N {r.ess_fraction:.3f}, log Z {r.log_z}")
    assert r.betas[0] == 0 and r.betas[-1] == 1 and np.all(np.diff(r.betas) > 0)
    assert len(r.ess_history) == len(r.acceptance) == len(r.step_sizes) == k
    # one energy and force per particle for the initial pass, then one per MALA step
    assert r.n_energy_evaluations == r.n_force_evaluations == 500 * (1 + 2 * k)
    assert r.energy_evaluations_per_sample == 1 + 2 * k
    assert r.log_z.contains(many_well.log_z), f"{r.log_z} vs {many_well.log_z}"
    assert r.eves.shape == (500,) and len(torch.unique(r.eves)) == r.n_eves
    assert r.seconds > 0
    with pytest.raises(ValueError, match="either betas or adaptive_ess"):
        smc(many_well, prop, 10, betas=[0.0, 1.0], adaptive_ess=0.5)
    with pytest.raises(ValueError, match="max_steps"):
        smc(many_well, prop, 50, adaptive_ess=0.999, max_steps=2, n_kernel_steps=0)


def test_hmc_counts_a_force_per_leapfrog_step(many_well):
    prop = ManyWellProposal.from_system(many_well)
    r = smc(many_well, prop, 64, n_steps=4, kernel="hmc", n_kernel_steps=2, n_leapfrog=3, seed=0)
    assert r.n_energy_evaluations == r.n_force_evaluations == 64 * (1 + 4 * 2 * 3)
    r0 = smc(many_well, prop, 64, n_steps=4, n_kernel_steps=0, seed=0)
    assert r0.force_evaluations_per_sample == r0.energy_evaluations_per_sample == 1
