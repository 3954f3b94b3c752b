"""The torus x Gaussian prior of internal-coordinate flows."""

from __future__ import annotations

import math

import pytest
import torch

from boltzflow.flows.priors import TorusGaussian, build_prior


def test_torus_gaussian_samples_density_and_config():
    prior = TorusGaussian(5, periodic=[1, 4])
    gen = torch.Generator().manual_seed(0)
    z = prior.sample(20000, generator=gen, dtype=torch.float64)
    assert z.shape == (20000, 5)
    ang = z[:, [1, 4]]
    assert bool(((ang >= -math.pi) & (ang < math.pi)).all())
    # uniform angles: mean 0, variance pi^2/3 (standard error of the variance ~ 0.02 here)
    assert abs(float(ang.var()) - math.pi**2 / 3) < 0.1
    assert abs(float(z[:, [0, 2, 3]].var()) - 1.0) < 0.05
    lp = prior.log_prob(z)
    expected = -0.5 * z[:, [0, 2, 3]].square().sum(-1) - 1.5 * math.log(2 * math.pi)
    expected = expected - 2 * math.log(2 * math.pi)
    torch.testing.assert_close(lp, expected)
    outside = z[:3].clone()
    outside[:, 1] = math.pi + 0.1
    assert bool(torch.isinf(prior.log_prob(outside)).all())
    again = build_prior(prior.config())
    assert isinstance(again, TorusGaussian) and again.periodic == (1, 4)


def test_torus_gaussian_normalised_in_one_dimension():
    """Integrate exp(log p) of a 1 periodic + 1 Gaussian column on a grid: total mass 1."""
    prior = TorusGaussian(2, periodic=[0])
    a = torch.linspace(-math.pi, math.pi, 401, dtype=torch.float64)[:-1]
    b = torch.linspace(-8, 8, 801, dtype=torch.float64)
    grid = torch.cartesian_prod(a, b)
    mass = prior.log_prob(grid).exp().sum() * (2 * math.pi / 400) * (16 / 800)
    assert abs(float(mass) - 1.0) < 1e-3


def test_torus_gaussian_rejects_bad_columns():
    with pytest.raises(ValueError, match="periodic columns"):
        TorusGaussian(3, periodic=[3])
