"""MALA, HMC and parallel tempering on systems with exact answers.

Standard errors come from many independent chains: the per-chain averages are independent, so
SE = std(chain averages) / sqrt(n_chains), whatever the autocorrelation within a chain.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from boltzflow.data.mcmc import (
    TARGET_ACCEPTANCE,
    geometric_ladder,
    hmc,
    mala,
    parallel_tempering,
    run_chains,
)
from boltzflow.systems.base import System, SystemInfo
from boltzflow.systems.particles import as_particles, pair_indices

K_SE = 5.0  # tolerance in standard errors


class Gaussian2D(System):
    """u(x) = Σ (x_i − μ_i)² / (2 σ_i²): a 2-D Gaussian with known moments."""

    MU = torch.tensor([1.0, -2.0], dtype=torch.float64)
    SIGMA = torch.tensor([1.0, 0.5], dtype=torch.float64)

    def __init__(self) -> None:
        super().__init__(
            SystemInfo(name="gauss2d", dim=2, n_particles=None, spatial_dim=None, temperature=None)
        )

    def _energy(self, x: Tensor) -> Tensor:
        return (((x - self.MU.to(x)) / self.SIGMA.to(x)) ** 2).sum(-1) / 2


class DoubleWell1D(System):
    """u(x) = h (x² − 1)² + t x: barrier ≈ h kT between wells at ±1, tilted by t."""

    def __init__(self, h: float = 10.0, tilt: float = 0.5) -> None:
        super().__init__(
            SystemInfo(name="dw1d", dim=1, n_particles=None, spatial_dim=None, temperature=None)
        )
        self.h, self.tilt = h, tilt

    def _energy(self, x: Tensor) -> Tensor:
        return self.h * (x[:, 0] ** 2 - 1) ** 2 + self.tilt * x[:, 0]

    def p_right(self) -> float:
        """P(x > 0) by quadrature on a fine grid."""
        x = np.linspace(-3, 3, 600_001)
        w = np.exp(-(self.h * (x**2 - 1) ** 2 + self.tilt * x))
        return float(np.trapezoid(w * (x > 0), x) / np.trapezoid(w, x))


class Springs(System):
    """n particles in d dims joined by unit springs to every other: translation invariant.

    u = ½ Σ_{i<j} |x_i − x_j|² is a positive-definite quadratic form on the (n−1)·d-dimensional
    mean-free subspace, so ⟨u⟩ = (n−1)·d / 2 exactly there.
    """

    def __init__(self, n: int = 3, d: int = 2) -> None:
        super().__init__(
            SystemInfo(
                name="springs",
                dim=n * d,
                n_particles=n,
                spatial_dim=d,
                temperature=None,
                mean_free=True,
            )
        )

    def _energy(self, x: Tensor) -> Tensor:
        p = as_particles(x, self.n_particles, self.spatial_dim)
        i, j = pair_indices(self.n_particles)
        return 0.5 * (p[..., i, :] - p[..., j, :]).pow(2).sum((-1, -2))


def _chain_mean_se(values: Tensor, n_chains: int) -> tuple[float, float]:
    """Mean and its standard error from the per-chain averages of time-major ``values``."""
    per_chain = values.reshape(-1, n_chains, *values.shape[1:]).mean(0)
    return float(per_chain.mean(0)), float(per_chain.std(0) / math.sqrt(n_chains))


def _check(name: str, observed: float, se: float, expected: float) -> None:
    assert abs(observed - expected) < K_SE * se, (
        f"{name}: observed {observed:.4f} ± {se:.4f} (SE), expected {expected:.4f}: "
        f"off by more than {K_SE} standard errors"
    )


@pytest.mark.parametrize("sampler", [mala, hmc], ids=["mala", "hmc"])
def test_gaussian_moments_and_adaptation(sampler) -> None:
    system = Gaussian2D()
    n_chains = 200
    x0 = torch.zeros(n_chains, 2, dtype=torch.float64)
    steps = 1000 if sampler is mala else 200
    res = sampler(system, x0, n_steps=steps, burn_in=300, stride=5, seed=3, progress=False)
    assert res.samples.shape == (steps // 5 * n_chains, 2)
    torch.testing.assert_close(res.energies, system.energy(res.samples))
    for k in range(2):
        mu, sig = float(system.MU[k]), float(system.SIGMA[k])
        m, se = _chain_mean_se(res.samples[:, k], n_chains)
        _check(f"{sampler.__name__} mean[{k}]", m, se, mu)
        v, se_v = _chain_mean_se((res.samples[:, k] - mu) ** 2, n_chains)
        _check(f"{sampler.__name__} var[{k}]", v, se_v, sig**2)
    target = TARGET_ACCEPTANCE[sampler.__name__]
    acc = float(res.acceptance[0])
    assert abs(acc - target) < 0.1, f"acceptance {acc:.3f}, target {target} ± 0.1"
    assert res.swap_acceptance.numel() == 0


def test_no_adaptation_keeps_step_size() -> None:
    system = Gaussian2D()
    x0 = torch.zeros(100, 2, dtype=torch.float64)
    res = mala(
        system, x0, n_steps=100, burn_in=100, step_size=3.0, adapt=False, seed=0, progress=False
    )
    assert float(res.step_size[0]) == pytest.approx(3.0, rel=1e-12)
    assert float(res.acceptance[0]) < 0.3  # far too large a step: adaptation was really off


@pytest.mark.parametrize("kernel", ["mala", "hmc"])
def test_bit_for_bit_reproducible_by_seed(kernel: str) -> None:
    system = Gaussian2D()
    x0 = torch.zeros(16, 2, dtype=torch.float64)
    kw = dict(
        n_steps=40,
        burn_in=20,
        stride=2,
        kernel=kernel,
        temperatures=[1.0, 2.0],
        n_leapfrog=3,
        progress=False,
    )
    a = run_chains(system, x0, seed=11, **kw)
    b = run_chains(system, x0, seed=11, **kw)
    c = run_chains(system, x0, seed=12, **kw)
    assert torch.equal(a.samples, b.samples) and torch.equal(a.energies, b.energies)
    assert torch.equal(a.step_size, b.step_size)
    assert not torch.equal(a.samples, c.samples)


def test_mean_free_particles_stay_mean_free_with_exact_energy() -> None:
    system = Springs(n=3, d=2)
    n_chains = 200
    x0 = torch.randn(n_chains, 6, dtype=torch.float64) + 5.0  # not mean-free: projected
    res = mala(system, x0, n_steps=600, burn_in=200, stride=3, seed=1, progress=False)
    centre = as_particles(res.samples, 3, 2).mean(-2)
    assert float(centre.abs().max()) < 1e-12
    m, se = _chain_mean_se(res.energies, n_chains)
    _check("springs <u>", m, se, (3 - 1) * 2 / 2)


def test_parallel_tempering_crosses_a_high_barrier() -> None:
    system = DoubleWell1D(h=10.0, tilt=0.5)
    exact = system.p_right()
    n_chains = 128
    x0 = -torch.ones(n_chains, 1, dtype=torch.float64)  # every chain starts in the left well
    res = parallel_tempering(
        system,
        x0,
        n_steps=2000,
        n_temps=6,
        t_max=20.0,
        burn_in=500,
        stride=5,
        seed=2,
        progress=False,
    )
    frac, se = _chain_mean_se((res.samples[:, 0] > 0).double(), n_chains)
    _check("PT P(x > 0)", frac, se, exact)
    assert 0.15 < exact < 0.35  # the test is about proportions, not a 50/50 split
    assert bool((res.swap_acceptance > 0.2).all()), res.swap_acceptance
    assert torch.allclose(res.temperatures, geometric_ladder(6, 20.0))
    # Without tempering the same chains rarely leave the left well: the barrier is real.
    plain = mala(system, x0, n_steps=2000, burn_in=500, stride=5, seed=2, progress=False)
    stuck = float((plain.samples[:, 0] > 0).double().mean())
    assert stuck < exact / 3, f"plain MALA P(x > 0) = {stuck:.3f}, exact {exact:.3f}"


def test_geometric_ladder_and_validation() -> None:
    ladder = geometric_ladder(3, 9.0)
    torch.testing.assert_close(ladder, torch.tensor([1.0, 3.0, 9.0], dtype=torch.float64))
    assert geometric_ladder(1, 1.0).tolist() == [1.0]
    with pytest.raises(ValueError, match="t_max"):
        geometric_ladder(3, 0.5)
    system = Gaussian2D()
    x0 = torch.zeros(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown kernel 'nuts'"):
        run_chains(system, x0, n_steps=1, kernel="nuts")
    with pytest.raises(ValueError, match=r"increase from 1\.0"):
        run_chains(system, x0, n_steps=1, temperatures=[2.0, 3.0])
    with pytest.raises(ValueError, match=r"x0 must be \(n_chains, 2\)"):
        run_chains(system, torch.zeros(4, 3, dtype=torch.float64), n_steps=1)
    with pytest.raises(ValueError, match="stride"):
        run_chains(system, x0, n_steps=1, stride=0)
    with pytest.raises(TypeError, match="floating-point"):
        run_chains(system, torch.zeros(4, 2, dtype=torch.long), n_steps=1)


@pytest.mark.gpu
def test_parallel_tempering_runs_on_cuda() -> None:
    system = Gaussian2D()
    x0 = torch.zeros(64, 2, dtype=torch.float64, device="cuda")
    res = parallel_tempering(
        system,
        x0,
        n_steps=400,
        n_temps=2,
        t_max=2.0,
        burn_in=200,
        stride=4,
        seed=0,
        progress=False,
    )
    assert res.samples.device.type == "cuda"
    m, se = _chain_mean_se(res.samples[:, 0].cpu(), 64)
    _check("cuda mean[0]", m, se, float(system.MU[0]))
