"""Many-Well-32: exact log Z against independent integration, exact samples against the density."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from boltzflow.systems import load_system

A, B, C = -0.5, -6.0, 1.0


@pytest.fixture(scope="module")
def mw():
    return load_system("many_well_32")


def _x1_grid() -> tuple[np.ndarray, np.ndarray]:
    t = np.linspace(-6.0, 6.0, 600_001)
    return t, np.exp(-(A * t + B * t**2 + C * t**4))


def test_log_z_matches_published_value_and_trapezoid(mw) -> None:
    assert round(mw.log_z, 3) == 164.696
    t, p = _x1_grid()
    z1 = np.trapezoid(p, t)
    assert z1 == pytest.approx(11784.50927, rel=1e-9)
    log_z = 16 * (math.log(z1) + 0.5 * math.log(2 * math.pi))
    assert mw.log_z == pytest.approx(log_z, abs=1e-8)


def test_small_override_and_energy_formula() -> None:
    mw2 = load_system("many_well_32", n_wells=2)
    assert mw2.dim == 4
    x = torch.tensor([[1.0, 2.0, -0.5, 0.0]], dtype=torch.float64)
    f = lambda t: A * t + B * t**2 + C * t**4  # noqa: E731
    assert float(mw2.energy(x)) == pytest.approx(f(1.0) + 2.0 + f(-0.5), abs=1e-14)
    assert mw2.log_z == pytest.approx(load_system("many_well_32").log_z / 8, abs=1e-10)


def test_exact_samples_ks(mw) -> None:
    x = mw.sample_exact(5_000, seed=3)
    assert x.shape == (5_000, 32) and x.dtype == torch.float64
    x1 = x[:, 0::2].reshape(-1).numpy()
    x2 = x[:, 1::2].reshape(-1).numpy()
    t, p = _x1_grid()
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (p[1:] + p[:-1]) * np.diff(t))])
    cdf /= cdf[-1]
    ks1 = stats.kstest(x1, lambda v: np.interp(v, t, cdf))
    ks2 = stats.kstest(x2, "norm")
    assert ks1.pvalue > 0.01, f"x1 marginal: KS statistic {ks1.statistic:.4f}, p = {ks1.pvalue:.3g}"
    assert ks2.pvalue > 0.01, f"x2 marginal: KS statistic {ks2.statistic:.4f}, p = {ks2.pvalue:.3g}"
    # the deep well (x1 > 0) holds mass P = 0.8443 (from the grid); binomial standard error
    deep = float(cdf[-1] - np.interp(0.0, t, cdf))
    frac = float((x1 > 0).mean())
    se = math.sqrt(deep * (1 - deep) / len(x1))
    assert abs(frac - deep) < 4 * se, (
        f"deep-well fraction {frac:.4f}, expected {deep:.4f} ± {se:.4f}"
    )


def test_ks_detects_a_wrong_sampler(mw) -> None:
    """The KS test above has power: a Laplace approximation of the two wells fails it."""
    rng = np.random.default_rng(0)
    t, p = _x1_grid()
    cdf = np.cumsum(p) / p.sum()
    minima = mw.well.minima
    widths = np.array([1 / math.sqrt(mw.well.second_derivative(m)) for m in minima])
    deep = float(1 - np.interp(0.0, t, cdf))
    comp = rng.choice(2, size=5_000, p=[1 - deep, deep])
    fake = minima[comp] + widths[comp] * rng.standard_normal(5_000)
    assert stats.kstest(fake, lambda v: np.interp(v, t, cdf)).pvalue < 1e-4


def test_sampler_reproducible_by_seed(mw) -> None:
    a, b, c = mw.sample_exact(50, seed=7), mw.sample_exact(50, seed=7), mw.sample_exact(50, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_exact_samples_mean_energy_and_log_z_estimate(mw) -> None:
    """⟨u⟩ under exact samples equals the quadrature value; importance sampling of Z from them."""
    x = mw.sample_exact(4_000, seed=1)
    u = mw.energy(x).numpy()
    t, p = _x1_grid()
    z1 = np.trapezoid(p, t)
    mean_f = np.trapezoid(p * (A * t + B * t**2 + C * t**4), t) / z1
    expected = 16 * (mean_f + 0.5)
    se = u.std() / math.sqrt(len(u))
    assert abs(u.mean() - expected) < 4 * se, (
        f"<u> = {u.mean():.3f} ± {se:.3f}, expected {expected:.3f}"
    )
