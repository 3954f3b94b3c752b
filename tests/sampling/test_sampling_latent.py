"""SMC in a few-step sampler's latent space (:mod:`boltzflow.sampling.latent`).

The toy: a target on a circle x a line, u(theta, y) = -kappa cos(theta - pi) + (y - m)^2 / 2
(a von Mises centred on the cut at ±pi times a unit normal; log Z and E[cos theta] in closed
form), and a deliberately mismatched exact sampler from a TorusGaussian prior (one periodic
column): K steps theta <- wrap(theta + a sin theta), y <- c y + d, each invertible with an exact
log-determinant. A real FALCON student checks the route through ``Student.sample_from``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special

from boltzflow.distill.falcon import FALCON
from boltzflow.flows.priors import StandardGaussian, TorusGaussian
from boltzflow.io.samples import read_samples
from boltzflow.sampling import log_partition, log_weights, smc, snis_expectation
from boltzflow.sampling.latent import (
    LatentSMCOptions,
    LatentTarget,
    PriorProposal,
    check_latent_smc_options,
    refine_latent,
    write_latent_samples,
)
from boltzflow.systems import load_system
from boltzflow.systems.base import System, SystemInfo
from boltzflow.systems.internal_coords import wrap_angle

F64 = torch.float64
KAPPA, MEAN = 2.0, 1.0


class CircleLine(System):
    """u(theta, y) = -kappa cos(theta - pi) + (y - m)^2 / 2 on [-pi, pi) x R."""

    def __init__(self) -> None:
        super().__init__(
            SystemInfo(
                name="circle_line", dim=2, n_particles=None, spatial_dim=None, temperature=None
            )
        )

    def _energy(self, x: torch.Tensor) -> torch.Tensor:
        return -KAPPA * torch.cos(x[:, 0] - math.pi) + 0.5 * (x[:, 1] - MEAN) ** 2

    @property
    def exact_log_z(self) -> float:
        return math.log(2 * math.pi * special.iv(0, KAPPA)) + 0.5 * math.log(2 * math.pi)

    @property
    def exact_mean_cos(self) -> float:
        return -special.iv(1, KAPPA) / special.iv(0, KAPPA)


class TwistSampler(torch.nn.Module):
    """K steps theta <- wrap(theta + a sin theta), y <- c y + d from TorusGaussian(2, [0]):
    exact log q(x) = log p(z) - sum_k [log(1 + a cos theta_k) + log c]."""

    def __init__(self, a: float = 0.7, c: float = 1.8, d: float = 0.0) -> None:
        super().__init__()
        self.prior = TorusGaussian(2, [0])
        self.register_buffer("coef", torch.tensor([a, c, d], dtype=F64))
        self.default_steps = 2

    def sample_from(self, z: torch.Tensor, steps: int | None = None) -> tuple:
        a, c, d = self.coef
        theta, y = z[:, 0], z[:, 1]
        ladj = torch.zeros_like(theta)
        for _ in range(steps or self.default_steps):
            ladj = ladj + torch.log1p(a * torch.cos(theta)) + torch.log(c)
            theta = wrap_angle(theta + a * torch.sin(theta), periodic=True)
            y = c * y + d
        return torch.stack([theta, y], dim=1), self.prior.log_prob(z) - ladj


@pytest.fixture(scope="module")
def toy() -> tuple[CircleLine, TwistSampler]:
    return CircleLine(), TwistSampler()


def test_no_moves_no_resampling_is_the_samplers_importance_sampling(toy):
    system, model = toy
    r = refine_latent(
        model,
        system,
        400,
        n_steps=5,
        n_kernel_steps=0,
        resample_threshold=0.0,
        seed=7,
        progress=False,
    )
    z, _ = PriorProposal(model.prior, dtype=F64).sample(400, seed=7)
    x, log_q = model.sample_from(z)
    lw = log_weights(system.energy(x), log_q)
    assert torch.equal(r.z, z) and torch.equal(r.samples.x, x)
    torch.testing.assert_close(r.samples.log_w, lw, atol=1e-12, rtol=0)
    torch.testing.assert_close(r.samples.u, system.energy(x), atol=1e-12, rtol=0)
    ref = log_partition(lw)
    assert r.log_z.value == pytest.approx(ref.value, abs=1e-12)
    assert r.log_z.stderr == pytest.approx(ref.stderr, rel=1e-9)
    assert r.ess_fraction == pytest.approx(r.initial_ess_fraction, rel=1e-12)
    assert r.energy_evaluations_per_sample == r.force_evaluations_per_sample == 1


@pytest.mark.parametrize("kernel", ["mala", "hmc"])
def test_latent_smc_recovers_log_z_and_an_observable(toy, kernel):
    system, model = toy
    n = 2000
    r = refine_latent(
        model,
        system,
        n,
        adaptive_ess=0.8,
        kernel=kernel,
        n_kernel_steps=3,
        n_leapfrog=3,
        step_size=0.3,
        level=0.99,
        seed=1,
        progress=False,
    )
    cos = snis_expectation(torch.cos(r.samples.x[:, 0]), r.samples.log_w, clusters=r.smc.eves)
    print(
        f"{kernel}: ESS/N {r.initial_ess_fraction:.3f} -> {r.ess_fraction:.3f} (N={n}), "
        f"{len(r.smc.betas) - 1} temperatures, acceptance {r.smc.acceptance.mean():.2f}, "
        f"Eves {r.smc.n_eves}; log Z {r.log_z} vs {system.exact_log_z:.4f}; "
        f"E[cos] {cos.value:.4f} ± {cos.stderr:.4f} vs {system.exact_mean_cos:.4f}"
    )
    # seeds 0-5 gave log Z within -0.9..+1.8 se and E[cos] within -1.9..+2.6 se
    assert r.smc.resampled.any() and r.ess_fraction > 2 * r.initial_ess_fraction
    assert abs(r.log_z.value - system.exact_log_z) < 3 * r.log_z.stderr
    assert abs(cos.value - system.exact_mean_cos) < 3 * cos.stderr
    # the final samples are the sampler's images of the final latent points, with u(x)
    x, _ = model.sample_from(r.z)
    torch.testing.assert_close(r.samples.x, x, atol=1e-12, rtol=0)
    torch.testing.assert_close(r.samples.u, system.energy(x), atol=1e-10, rtol=0)
    torch.testing.assert_close(r.samples.log_w, -r.samples.u - r.samples.log_q)


def test_periodic_columns_wrap_instead_of_being_rejected(toy):
    """Moves across the cut: with wrapping every latent angle stays in [-pi, pi); the same run
    with the prior's box as a hard wall (no wrap) loses the moves that leave it."""
    system, model = toy
    target = LatentTarget(model, system)
    assert target.periodic.tolist() == [True, False] and not target.mean_free
    z = torch.tensor([[3.1, 0.2], [-3.1, -0.3], [7.0, 1.0]], dtype=F64)
    wrapped = target.wrap(z)
    assert torch.allclose(wrapped[:2], z[:2], atol=1e-14, rtol=0) and float(
        wrapped[2, 0]
    ) == pytest.approx(7.0 - 2 * math.pi)
    assert float(target.energy(z[2:])[0]) == math.inf  # outside the prior's box
    opts = dict(n_steps=2, n_kernel_steps=5, step_size=0.1, adapt=False, seed=3, progress=False)
    r = refine_latent(model, system, 500, **opts)
    theta = r.z[:, 0]
    assert float(theta.min()) >= -math.pi and float(theta.max()) < math.pi
    walled = smc(target, PriorProposal(model.prior, dtype=F64), 500, **opts)
    print(
        f"acceptance wrapped {r.smc.acceptance.mean():.3f}, walled {walled.acceptance.mean():.3f}"
    )
    # measured 0.919 vs 0.876 at the first temperature (the target's mass sits at the cut)
    assert r.smc.acceptance[0] > walled.acceptance[0] + 0.02


def test_counts_per_final_sample(toy):
    system, model = toy
    r = refine_latent(model, system, 100, n_steps=3, n_kernel_steps=4, seed=0, progress=False)
    assert r.energy_evaluations_per_sample == r.force_evaluations_per_sample == 1 + 3 * 4
    h = refine_latent(
        model,
        system,
        100,
        n_steps=3,
        kernel="hmc",
        n_kernel_steps=2,
        n_leapfrog=5,
        seed=0,
        progress=False,
    )
    assert h.smc.n_energy_evaluations == h.smc.n_force_evaluations == 100 * (1 + 3 * 2 * 5)
    assert r.seconds > 0


def test_a_falcon_students_latent_smc_starts_from_its_own_samples():
    """Through Student.sample_from: no moves reproduce the student's samples and weights on
    GMM-40 exactly; one MALA temperature runs with finite weights."""
    gmm = load_system("gmm_40")
    torch.manual_seed(0)
    model = FALCON.build(
        "mlp", prior=StandardGaussian(2), backbone_options={"hidden": 16, "layers": 2}, scale=20.0
    ).double()
    x, log_q = model.sample(300, steps=2, seed=4)
    lw = log_weights(gmm.energy(x), log_q)
    r = refine_latent(
        model,
        gmm,
        300,
        steps=2,
        n_steps=1,
        n_kernel_steps=0,
        resample_threshold=0.0,
        seed=4,
        progress=False,
    )
    assert torch.equal(r.samples.x, x)
    torch.testing.assert_close(r.samples.log_w, lw, atol=1e-10, rtol=0)
    moved = refine_latent(
        model, gmm, 64, steps=2, n_steps=1, n_kernel_steps=1, seed=4, progress=False
    )
    assert torch.isfinite(moved.samples.log_w).all() and model.training


def test_refine_latent_rejects_what_it_sets_itself(toy):
    system, model = toy
    with pytest.raises(TypeError, match="sets 'wrap' itself"):
        refine_latent(model, system, 10, wrap=lambda z: z)
    with pytest.raises(TypeError, match="sample_from"):
        LatentTarget(object(), system)  # type: ignore[arg-type]


def test_chunked_energy_and_gradient_equal_one_pass(toy):
    """The chunked latent energy (each chunk's gradient taken at once, memory bounded) gives
    the single-graph values and gradients; a run with small chunks is the same run."""
    system, model = toy
    z, _ = PriorProposal(model.prior, dtype=F64).sample(50, seed=2)
    one = LatentTarget(model, system, batch_size=1000)
    chunked = LatentTarget(model, system, batch_size=7)
    za = z.clone().requires_grad_(True)
    ua = one.reduced_energy(za)
    (ga,) = torch.autograd.grad(ua.sum(), za)
    zb = z.clone().requires_grad_(True)
    ub = chunked.energy(zb)
    (gb,) = torch.autograd.grad((2.0 * ub).sum(), zb)
    torch.testing.assert_close(ub, ua, atol=1e-12, rtol=0)
    torch.testing.assert_close(gb, 2.0 * ga, atol=1e-12, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(chunked.energy(z), ua.detach(), atol=1e-12, rtol=0)
    opts = dict(n_steps=3, n_kernel_steps=2, step_size=0.2, seed=5, progress=False)
    a = refine_latent(model, system, 64, **opts)
    b = refine_latent(model, system, 64, batch_size=10, **opts)
    torch.testing.assert_close(a.samples.x, b.samples.x, atol=1e-12, rtol=0)
    torch.testing.assert_close(a.samples.log_w, b.samples.log_w, atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="batch_size"):
        LatentTarget(model, system, batch_size=0)


def test_options_record_gives_the_smc_keywords():
    """LatentSMCOptions: the defaults of workflows/aldp_smc.py, an adaptive or an evenly spaced
    schedule, and errors that name the field."""
    assert LatentSMCOptions().smc_kwargs() == {
        "kernel": "mala",
        "adaptive_ess": 0.9,
        "n_kernel_steps": 5,
        "step_size": 0.05,
        "n_leapfrog": 5,
        "resample_threshold": 0.8,
    }
    fixed = LatentSMCOptions(n_temperatures=3, kernel="hmc").smc_kwargs()
    assert fixed["n_steps"] == 3 and "adaptive_ess" not in fixed and fixed["kernel"] == "hmc"
    for bad, match in (
        ({"kernel": "gibbs"}, r"kernel: 'gibbs' is not one of \['hmc', 'mala'\]"),
        ({"adaptive_ess": 1.0}, r"adaptive_ess must be a number in \(0, 1\), got 1.0"),
        ({"n_temperatures": -1}, "n_temperatures must be an integer >= 0"),
        ({"n_kernel_steps": 1.5}, "n_kernel_steps must be an integer >= 0"),
        ({"step_size": 0.0}, "step_size must be a positive number"),
        ({"n_leapfrog": 0}, "n_leapfrog must be a positive integer"),
        ({"resample_threshold": 1.5}, r"resample_threshold must be a number in \[0, 1\]"),
    ):
        with pytest.raises(ValueError, match=match):
            LatentSMCOptions(**bad)
    with pytest.raises(ValueError, match=r"^smc\.step_size must be"):
        check_latent_smc_options({"step_size": -1}, "smc.")


def test_written_store_carries_the_final_weights_and_ancestors(toy, tmp_path):
    """write_latent_samples: x, u, the final SMC weights, the effective log q = -u - log w and
    the initial ancestors, read back as any sample store; log Z from the stored weights is the
    SMC's own point estimate."""
    system, model = toy
    opts = LatentSMCOptions(n_temperatures=3, n_kernel_steps=2, step_size=0.3)
    r = refine_latent(model, system, 200, seed=2, progress=False, **opts.smc_kwargs())
    assert r.smc.resampled.any()  # so that the ancestors are not the identity
    path = tmp_path / "smc.h5"
    write_latent_samples(path, r, provenance={"model": "toy+smc"})
    s = read_samples(path)
    assert s.provenance == {"model": "toy+smc"} and s.n == 200
    np.testing.assert_array_equal(s.x, r.samples.x.numpy())
    np.testing.assert_array_equal(s.log_w, r.samples.log_w.numpy())
    np.testing.assert_array_equal(s.u, r.samples.u.numpy())
    np.testing.assert_allclose(s.log_q, -s.u - s.log_w, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(s.columns["eve"], r.smc.eves.numpy())
    assert s.columns["eve"].dtype == np.int64
    assert len(np.unique(s.columns["eve"])) == r.smc.n_eves < 200
    assert log_partition(s.log_w).value == pytest.approx(r.log_z.value, abs=1e-10)
