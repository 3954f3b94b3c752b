"""Proposals (exact log-densities) and MALA/HMC kernels (invariance, per-chain step sizes)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from boltzflow.sampling.kernels import (
    Evaluation,
    adapt_step_size,
    autograd_evaluator,
    hmc_step,
    mala_step,
    tempered_evaluator,
)
from boltzflow.sampling.proposals import (
    GaussianMixtureProposal,
    GaussianProposal,
    KernelDensityProposal,
    MeanFreeGaussianProposal,
    Proposal,
)
from boltzflow.systems.particles import remove_mean


def test_gaussian_proposal_matches_torch_distribution():
    p = GaussianProposal(3, mean=torch.tensor([1.0, -2.0, 0.5]), std=torch.tensor([0.5, 2.0, 1.0]))
    x, lq = p.sample(100, seed=0)
    ref = torch.distributions.Normal(p.mean, p.std).log_prob(x).sum(1)
    assert torch.allclose(lq, ref, atol=1e-12)
    assert isinstance(p, Proposal)
    x2, _ = p.sample(100, seed=0)
    assert torch.equal(x, x2)


def test_mixture_proposal_matches_brute_force():
    means = torch.tensor([[0.0, 0.0], [3.0, 1.0], [-2.0, 4.0]], dtype=torch.float64)
    p = GaussianMixtureProposal(
        means, stds=torch.tensor([0.5, 1.0, 2.0]), weights=[1, 2, 1], chunk_size=7
    )
    x, lq = p.sample(50, seed=1)
    comps = torch.stack(
        [
            torch.distributions.Normal(m, s).log_prob(x).sum(1)
            for m, s in zip(means, [0.5, 1.0, 2.0])
        ],
        1,
    )
    ref = torch.logsumexp(
        comps + torch.log(torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64)), 1
    )
    assert torch.allclose(lq, ref, atol=1e-12)


def test_mean_free_gaussian_density_on_subspace():
    # n = 2 particles in 1-D: the subspace is the line (t, -t); with orthonormal coordinate
    # s = sqrt(2) t, q(s) must be N(s; 0, std^2).
    p = MeanFreeGaussianProposal(2, 1, std=0.7)
    x, lq = p.sample(1000, seed=2)
    assert float(x.sum(1).abs().max()) < 1e-12
    s = x[:, 0] * math.sqrt(2)
    ref = torch.distributions.Normal(0.0, 0.7).log_prob(s)
    assert torch.allclose(lq, ref, atol=1e-12)
    # Var of s is std^2 within 4 standard errors (se of a variance ~ std^2 sqrt(2/N))
    assert abs(float(s.var()) - 0.49) < 4 * 0.49 * math.sqrt(2 / 1000)


def test_kernel_density_proposal_mean_free():
    # 2 particles in 1-D: subspace coordinate s = (x0 - x1) / sqrt(2); kernels at centres s_k
    centers = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    p = KernelDensityProposal(centers, 0.3, n_particles=2, spatial_dim=1, chunk_size=2)
    x, lq = p.sample(400, seed=3)
    assert float(x.sum(1).abs().max()) < 1e-12
    s = (x[:, 0] - x[:, 1]) / math.sqrt(2)
    sk = (centers[:, 0] - centers[:, 1]) / math.sqrt(2)
    ref = torch.logsumexp(torch.distributions.Normal(sk, 0.3).log_prob(s[:, None]), 1) - math.log(3)
    assert torch.allclose(lq, ref, atol=1e-12)
    full = KernelDensityProposal(centers, 0.3)
    xf, lqf = full.sample(5, seed=0)
    assert torch.allclose(lqf, GaussianMixtureProposal(centers, 0.3).log_prob(xf), atol=1e-12)
    with pytest.raises(ValueError, match="both"):
        KernelDensityProposal(centers, 0.3, n_particles=2)


def _gaussian_target(cov: torch.Tensor):
    prec = torch.linalg.inv(cov)

    def log_prob(x):
        return -0.5 * ((x @ prec) * x).sum(1)

    return autograd_evaluator(log_prob)


@pytest.mark.parametrize("kernel", ["mala", "hmc"])
def test_kernels_leave_gaussian_invariant(kernel):
    cov = torch.tensor([[1.0, 0.6], [0.6, 2.0]], dtype=torch.float64)
    evaluate = _gaussian_target(cov)
    g = torch.Generator().manual_seed(0)
    n = 4000
    x = torch.randn(n, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    ev = evaluate(x)
    # per-chain step sizes spanning two decades: invariance must hold for each
    h = torch.logspace(-2, 0, n, dtype=torch.float64)
    acc = []
    for _ in range(10):
        if kernel == "mala":
            step = mala_step(x, ev, evaluate, h, generator=g)
        else:
            step = hmc_step(x, ev, evaluate, h, n_leapfrog=3, generator=g)
        x, ev = step.x, step.evaluation
        acc.append(step.accepted.double().mean().item())
    emp = torch.cov(x.T)
    se = torch.sqrt((cov**2 + torch.outer(cov.diag(), cov.diag())) / n)  # se of sample covariance
    z = ((emp - cov).abs() / se).max().item()
    assert z < 4.5, f"{kernel}: covariance off by {z:.1f} standard errors: {emp.tolist()}"
    assert 0.3 < np.mean(acc) < 1.0
    assert torch.allclose(ev.log_prob, evaluate(x).log_prob)


def test_mala_small_step_accepts_and_projection_keeps_mean_free():
    evaluate = autograd_evaluator(lambda x: -0.5 * (x**2).sum(1))
    g = torch.Generator().manual_seed(1)
    x = remove_mean(torch.randn(100, 6, generator=g, dtype=torch.float64), 3, 2)
    proj = lambda v: remove_mean(v, 3, 2)  # noqa: E731
    step = mala_step(x, evaluate(x), evaluate, 1e-6, generator=g, project=proj)
    assert step.accepted.all()
    assert float(step.x.reshape(100, 3, 2).mean(1).abs().max()) < 1e-12


def test_kernel_rejects_infinite_energy_proposals():
    # target zero outside the unit interval: proposals outside must be rejected
    def log_prob(x):
        inside = (x.abs() < 1).all(1)
        return torch.where(inside, -0.5 * (x**2).sum(1), torch.full_like(x[:, 0], -math.inf))

    evaluate = autograd_evaluator(log_prob)
    x = torch.zeros(500, 1, dtype=torch.float64)
    ev = evaluate(x)
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        step = mala_step(x, ev, evaluate, 2.0, generator=g)
        x, ev = step.x, step.evaluation
    assert float(x.abs().max()) < 1 and torch.isfinite(ev.log_prob).all()


def test_tempered_evaluator_and_adaptation():
    log_q = lambda x: -0.5 * (x**2).sum(1)  # noqa: E731
    energy = lambda x: 2.0 * (x**2).sum(1)  # noqa: E731
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    ev = tempered_evaluator(log_q, energy, 0.25)(x)
    assert isinstance(ev, Evaluation)
    assert ev.log_prob.item() == pytest.approx(0.75 * -2.5 - 0.25 * 10.0)
    assert torch.allclose(ev.grad, 0.75 * -x - 0.25 * 4 * x)
    h = adapt_step_size(torch.tensor([0.1, 0.1]), torch.tensor([True, False]), 0.5, rate=0.2)
    assert h.tolist() == pytest.approx([0.1 * math.exp(0.1), 0.1 * math.exp(-0.1)])
    with pytest.raises(ValueError, match="step size must be positive"):
        mala_step(x, ev, tempered_evaluator(log_q, energy, 0.25), -1.0)


@pytest.mark.parametrize(("kernel", "step"), [("mala", 2.0), ("mala", 0.3), ("hmc", 1.0)])
def test_wrapped_kernels_leave_a_von_mises_invariant_for_any_step(kernel, step):
    """A von Mises density on the circle centred on the cut (mode at ±pi), started from exact
    draws: 50 wrapped steps keep it (mean cos within 4 se of -I1/I0, KS p > 1e-3), points stay
    in [-pi, pi). At MALA step 2 most displacements exceed pi: there the minimal-image
    difference of wrapped points would bias E[cos] to about -0.56 (checked when written); the
    cover displacement the kernels use is exact."""
    from scipy import special, stats

    from boltzflow.systems.internal_coords import wrap_angle

    kappa, n = 2.0, 4000

    def wrap(v: torch.Tensor) -> torch.Tensor:
        return wrap_angle(v, periodic=True)

    evaluate = autograd_evaluator(lambda x: kappa * torch.cos(x[:, 0] - math.pi))
    draws = stats.vonmises(kappa).rvs(n, random_state=np.random.default_rng(0))
    x = wrap(torch.tensor(draws, dtype=torch.float64)[:, None] + math.pi)
    current, gen, accepted = evaluate(x), torch.Generator().manual_seed(1), 0.0
    for _ in range(50):
        if kernel == "mala":
            out = mala_step(x, current, evaluate, step, generator=gen, wrap=wrap)
        else:
            out = hmc_step(x, current, evaluate, step, n_leapfrog=3, generator=gen, wrap=wrap)
        x, current = out.x, out.evaluation
        accepted += float(out.accepted.double().mean()) / 50
    assert float(x.min()) >= -math.pi and float(x.max()) < math.pi
    cos = torch.cos(x[:, 0])
    exact = -special.iv(1, kappa) / special.iv(0, kappa)
    se = float(cos.std()) / math.sqrt(n)
    mean = float(cos.mean())
    print(f"{kernel} step {step}: acceptance {accepted:.2f}, E[cos] {mean:.4f} ± {se:.4f}")
    assert 0.2 < accepted < 0.99
    assert abs(float(cos.mean()) - exact) < 4 * se, f"E[cos] {float(cos.mean()):.4f} vs {exact:.4f}"
    ks = stats.kstest(wrap(x[:, 0] - math.pi).numpy(), stats.vonmises(kappa).cdf)
    assert ks.pvalue > 1e-3, f"KS p = {ks.pvalue:.2g}"
