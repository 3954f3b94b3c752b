"""Flow matching: interpolant, minibatch OT, equivariant alignment, rotations, loss; priors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from boltzflow.flows.flow_matching import (
    couple,
    equivariant_align,
    flow_matching_loss,
    interpolant_draws,
    interpolate,
    kabsch_align,
    ot_pairing,
    permutation_align,
    random_rotations,
    rotate,
)
from boltzflow.flows.priors import (
    MeanFreeGaussian,
    StandardGaussian,
    build_prior,
    check_points,
    gaussian_prior,
)
from boltzflow.systems.particles import remove_mean

F64 = torch.float64


def _mf(b: int, n: int, d: int, seed: int) -> torch.Tensor:
    x = torch.randn(b, n * d, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return remove_mean(x, n, d)


def _permute(x: torch.Tensor, perm: torch.Tensor, n: int, d: int) -> torch.Tensor:
    return x.reshape(len(x), n, d)[:, perm].reshape(x.shape)


def test_interpolant_endpoints_and_velocity():
    x0, x1 = torch.randn(5, 3), torch.randn(5, 3)
    xt, u = interpolate(x0, x1, torch.zeros(5))
    assert torch.equal(xt, x0) and torch.equal(u, x1 - x0)
    xt, _ = interpolate(x0, x1, torch.ones(5))
    assert torch.allclose(xt, x1)
    with pytest.raises(ValueError, match="noise"):
        interpolate(x0, x1, torch.ones(5), sigma=0.1)


def test_ot_pairing_is_the_brute_force_optimum():
    gen = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(6, 2, generator=gen), torch.randn(6, 2, generator=gen)
    perm = ot_pairing(x0, x1)
    cost = lambda p: float((x0[list(p)] - x1).pow(2).sum())  # noqa: E731
    best = min(cost(p) for p in itertools.permutations(range(6)))
    assert cost(perm.tolist()) == pytest.approx(best, rel=1e-6)
    assert sorted(perm.tolist()) == list(range(6))


@pytest.mark.parametrize("d", [2, 3])
def test_kabsch_recovers_a_known_rotation(d):
    x = _mf(20, 5, d, 1)
    rot = random_rotations(20, d, generator=torch.Generator().manual_seed(2), dtype=F64)
    y = rotate(x, rot, 5, d)
    assert (kabsch_align(x, y, 5, d) - y).abs().max() < 1e-10


def test_kabsch_excludes_reflections_unless_asked():
    x = _mf(10, 4, 3, 3)
    y = -x  # an improper map (inversion) in 3D
    proper = kabsch_align(x, y, 4, 3)
    improper = kabsch_align(x, y, 4, 3, reflections=True)
    assert (improper - y).abs().max() < 1e-10
    assert (proper - y).pow(2).sum(-1).min() > 1e-3


def test_rotations_are_proper_orthogonal_and_haar():
    rot = random_rotations(20000, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    eye = torch.eye(3, dtype=F64)
    assert (rot @ rot.transpose(1, 2) - eye).abs().max() < 1e-12
    assert (torch.linalg.det(rot) - 1).abs().max() < 1e-12
    # Haar: E[R] = 0 entrywise; each entry has variance 1/3
    se = math.sqrt(1 / 3 / len(rot))
    assert rot.mean(0).abs().max() < 5 * se, f"mean {rot.mean(0)} vs 0 ± {se:.4f}"


def test_permutation_align_recovers_a_known_permutation():
    x = _mf(8, 6, 3, 4)
    perm = torch.tensor([3, 0, 5, 1, 2, 4])
    y = _permute(x, perm, 6, 3)
    assert torch.equal(permutation_align(x, y, 6, 3), y)


@pytest.mark.parametrize(("n", "d"), [(4, 2), (7, 3)])
def test_equivariant_align_undoes_a_symmetry(n, d):
    x = _mf(10, n, d, 5)
    rot = random_rotations(10, d, generator=torch.Generator().manual_seed(6), dtype=F64)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(7))
    y = _permute(rotate(x, rot, n, d), perm, n, d)
    assert (equivariant_align(x, y, n, d) - y).abs().max() < 1e-8


def test_equivariant_align_never_increases_the_distance_and_is_exact_for_dw4():
    x0, x1 = _mf(32, 4, 2, 8), _mf(32, 4, 2, 9)
    aligned = equivariant_align(x0, x1, 4, 2)
    d_aligned = (aligned - x1).pow(2).sum(-1)
    assert bool((d_aligned <= (x0 - x1).pow(2).sum(-1) + 1e-12).all())
    # exhaustive check: no permutation followed by its optimal rotation does better
    for perm in itertools.permutations(range(4)):
        cand = kabsch_align(_permute(x0, torch.tensor(perm), 4, 2), x1, 4, 2)
        assert bool((d_aligned <= (cand - x1).pow(2).sum(-1) + 1e-9).all())
    assert aligned.reshape(32, 4, 2).sum(1).abs().max() < 1e-12  # still mean-free


def test_couple_modes():
    x0, x1 = _mf(16, 4, 2, 10), _mf(16, 4, 2, 11)
    assert torch.equal(couple(x0, x1, "independent"), x0)
    ot = couple(x0, x1, "ot")
    assert sorted(map(tuple, ot.tolist())) == sorted(map(tuple, x0.tolist()))
    assert (ot - x1).pow(2).sum() <= (x0 - x1).pow(2).sum()
    eq = couple(x0, x1, "equivariant_ot", n_particles=4, spatial_dim=2)
    assert (eq - x1).pow(2).sum() <= (ot - x1).pow(2).sum() + 1e-9
    with pytest.raises(ValueError, match="equivariant_ot"):
        couple(x0, x1, "sinkhorn")
    with pytest.raises(ValueError, match="n_particles"):
        couple(x0, x1, "equivariant_ot")


def test_flow_matching_loss_vanishes_for_the_true_velocity():
    shift = torch.tensor([1.0, -2.0, 0.5])
    x0 = torch.randn(64, 3)
    x1 = x0 + shift

    def net(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return shift.expand_as(x)

    assert float(flow_matching_loss(net, x0, x1)) < 1e-12
    loss = flow_matching_loss(lambda t, x: torch.zeros_like(x), x0, x1)
    assert float(loss) == pytest.approx(float(shift.pow(2).mean()), rel=1e-6)


def test_flow_matching_loss_noise_is_mean_free_for_particles():
    seen = []

    def net(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        seen.append(x)
        return torch.zeros_like(x)

    x0 = _mf(8, 4, 2, 1).float()
    flow_matching_loss(
        net,
        x0,
        x0,
        sigma=0.5,
        n_particles=4,
        spatial_dim=2,
        generator=torch.Generator().manual_seed(0),
    )
    assert seen[0].reshape(8, 4, 2).sum(1).abs().max() < 1e-5
    assert (seen[0] - x0).abs().max() > 0.1


def test_predrawn_times_and_noise_reproduce_the_generator_path():
    x0, x1 = _mf(8, 4, 2, 1).float(), _mf(8, 4, 2, 2).float()
    net = torch.nn.Linear(8, 8)
    kw = {"sigma": 0.3, "n_particles": 4, "spatial_dim": 2}
    direct = flow_matching_loss(
        lambda t, x: net(x), x0, x1, generator=torch.Generator().manual_seed(5), **kw
    )
    t, noise = interpolant_draws(8, 8, generator=torch.Generator().manual_seed(5), **kw)
    assert noise is not None and noise.reshape(8, 4, 2).sum(1).abs().max() < 1e-5
    given = flow_matching_loss(lambda t, x: net(x), x0, x1, t=t, noise=noise, **kw)
    assert torch.equal(direct, given)
    assert interpolant_draws(8, 8, generator=torch.Generator().manual_seed(5))[1] is None


def test_mean_free_gaussian_is_the_standard_normal_of_the_subspace():
    n, d = 4, 3
    prior = MeanFreeGaussian(n, d)
    assert prior.event_dim == 9
    x = prior.sample(5, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert x.reshape(5, n, d).sum(1).abs().max() < 1e-12
    # coordinates in an orthonormal basis Q of the subspace: y = Q^T x ~ N(0, I_9)
    centre = torch.eye(n, dtype=F64) - 1 / n
    q = torch.linalg.svd(torch.kron(centre, torch.eye(d, dtype=F64)))[0][:, : (n - 1) * d]
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(x @ q).sum(-1)
    assert (prior.log_prob(x) - expected).abs().max() < 1e-12
    std = StandardGaussian(5)
    z = torch.randn(3, 5, dtype=F64)
    ref = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    assert (std.log_prob(z) - ref).abs().max() < 1e-12


def test_mean_free_gaussian_covariance_is_the_projector():
    n, d, m = 3, 2, 40000
    x = MeanFreeGaussian(n, d).sample(m, generator=torch.Generator().manual_seed(1), dtype=F64)
    cov = x.T @ x / m
    proj = torch.kron(torch.eye(n, dtype=F64) - 1 / n, torch.eye(d, dtype=F64))
    se = math.sqrt(2 / m)  # sd of a sample variance of a unit normal
    assert (cov - proj).abs().max() < 5 * se


def test_prior_config_round_trip_and_errors():
    for prior in (MeanFreeGaussian(4, 2), StandardGaussian(3)):
        assert build_prior(prior.config()).config() == prior.config()
    with pytest.raises(ValueError, match="unknown prior"):
        build_prior({"kind": "laplace"})
    with pytest.raises(ValueError):
        MeanFreeGaussian(1, 3)


def test_gaussian_prior_and_point_checks():
    assert gaussian_prior(6).config() == StandardGaussian(6).config()
    prior = gaussian_prior(6, n_particles=3, spatial_dim=2, mean_free=True)
    assert prior.config() == MeanFreeGaussian(3, 2).config()
    with pytest.raises(ValueError, match="needs n_particles and spatial_dim"):
        gaussian_prior(6, mean_free=True)
    like = torch.zeros((), dtype=F64)
    x = _mf(5, 3, 2, 0).float()
    out = check_points(prior, x, like)
    assert out.dtype == F64 and out.reshape(5, 3, 2).sum(1).abs().max() < 1e-12
    assert check_points(prior, x[:0], like).shape == (0, 6)
    with pytest.raises(ValueError, match=r"not mean-free \(largest particle-mean component 1"):
        check_points(prior, x + 1.0, like)
    with pytest.raises(ValueError, match=r"expected points of shape \(N, 6\), got \(5, 4\)"):
        check_points(prior, x[:, :4], like)
    off = torch.ones(2, 6)
    assert torch.equal(check_points(StandardGaussian(6), off, like), off.double())


def test_orbit_distance_matches_pairwise_alignment():
    from boltzflow.flows.flow_matching import orbit_distance_2d

    x0, x1 = _mf(6, 4, 2, 12), _mf(5, 4, 2, 13)
    cost = orbit_distance_2d(x0, x1, 4)
    for j in range(5):
        aligned = equivariant_align(x0, x1[j].expand(6, -1), 4, 2)
        assert torch.allclose(cost[:, j], (aligned - x1[j]).pow(2).sum(-1), atol=1e-4)


def test_equivariant_ot_pairing_minimises_the_total_orbit_distance():
    from boltzflow.flows.flow_matching import orbit_distance_2d

    x0, x1 = _mf(6, 4, 2, 14), _mf(6, 4, 2, 15)
    paired = couple(x0, x1, "equivariant_ot", n_particles=4, spatial_dim=2)
    total = float((paired - x1).pow(2).sum())
    cost = orbit_distance_2d(x0, x1, 4)
    best = min(float(cost[list(p), range(6)].sum()) for p in itertools.permutations(range(6)))
    assert total == pytest.approx(best, rel=1e-5)
