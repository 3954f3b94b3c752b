"""Backbones: EGNN equivariance, transformer/MLP contracts, time embeddings, torch.func use."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from boltzflow.flows.cnf import TeacherCNF
from boltzflow.flows.flow_matching import random_rotations, rotate
from boltzflow.flows.ode import exact_divergence
from boltzflow.nn import EGNN, MLP, ParticleTransformer, TimeEmbedding, build_backbone
from boltzflow.nn.egnn import neighbour_index
from boltzflow.nn.embeddings import broadcast_time
from boltzflow.systems.particles import remove_mean

F64 = torch.float64


def _perturbed_egnn(n: int, d: int, std: float = 0.1, **kw) -> EGNN:
    torch.manual_seed(0)
    net = EGNN(n, d, hidden=16, layers=2, **kw).double()
    for layer in net.layers:  # away from the near-identity initialisation
        nn.init.normal_(layer.coord_mlp[-1].weight, std=std)
    return net


def _permute(x: torch.Tensor, perm: torch.Tensor, n: int, d: int) -> torch.Tensor:
    return x.reshape(len(x), n, d)[:, perm].reshape(x.shape)


@pytest.mark.parametrize(("n", "d"), [(4, 2), (5, 3)])
def test_egnn_commutes_with_rotations_and_permutations(n, d):
    net = _perturbed_egnn(n, d)
    gen = torch.Generator().manual_seed(1)
    x = remove_mean(torch.randn(6, n * d, generator=gen, dtype=F64), n, d)
    t = torch.rand(6, generator=gen, dtype=F64)
    rot = random_rotations(6, d, generator=gen, dtype=F64)
    perm = torch.randperm(n, generator=gen)
    v = net(t, x)
    assert v.abs().max() > 1e-2  # not trivially zero
    gx = _permute(rotate(x, rot, n, d), perm, n, d)
    err = (net(t, gx) - _permute(rotate(v, rot, n, d), perm, n, d)).abs().max()
    assert err < 1e-5, f"EGNN equivariance error {err:.2e}"


def test_egnn_is_translation_invariant_and_mean_free():
    net = _perturbed_egnn(4, 2)
    x = torch.randn(5, 8, dtype=F64)
    shift = torch.tensor([3.0, -1.0], dtype=F64).repeat(4)
    v = net(0.5, x)
    assert (net(0.5, x + shift) - v).abs().max() < 1e-10
    assert v.reshape(5, 4, 2).sum(1).abs().max() < 1e-12


def test_egnn_with_distinct_particles_is_rotation_but_not_permutation_equivariant():
    net = _perturbed_egnn(4, 3, distinct_particles=True)
    nn.init.normal_(net.particle_embedding.weight, std=1.0)
    x = remove_mean(torch.randn(3, 12, dtype=F64), 4, 3)
    rot = random_rotations(3, 3, dtype=F64)
    assert (net(0.2, rotate(x, rot, 4, 3)) - rotate(net(0.2, x), rot, 4, 3)).abs().max() < 1e-5
    perm = torch.tensor([1, 0, 2, 3])
    diff = net(0.2, _permute(x, perm, 4, 3)) - _permute(net(0.2, x), perm, 4, 3)
    assert diff.abs().max() > 1e-4


def test_neighbour_index_lists_every_other_particle():
    idx = neighbour_index(4)
    assert idx.tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]
    with pytest.raises(ValueError):
        neighbour_index(1)


def test_transformer_permutation_equivariant_translation_invariant_mean_free():
    torch.manual_seed(0)
    net = ParticleTransformer(5, 3, hidden=16, layers=2, heads=2, distinct_particles=False).double()
    nn.init.normal_(net.out.weight, std=0.3)
    x = torch.randn(4, 15, dtype=F64)
    v = net(0.7, x)
    perm = torch.tensor([4, 2, 0, 1, 3])
    assert (net(0.7, _permute(x, perm, 5, 3)) - _permute(v, perm, 5, 3)).abs().max() < 1e-10
    assert (
        net(0.7, x + torch.tensor([1.0, 2.0, 3.0], dtype=F64).repeat(5)) - v
    ).abs().max() < 1e-10
    assert v.reshape(4, 5, 3).sum(1).abs().max() < 1e-12
    assert not ParticleTransformer.equivariant  # trained with rotation augmentation instead


def test_mlp_and_two_time_embedding():
    net = MLP(3, hidden=8, layers=2, n_times=2)
    x = torch.randn(4, 3)
    assert net(torch.rand(4), x, s=torch.rand(4)).shape == (4, 3)
    with pytest.raises(ValueError, match="two times"):
        net(torch.rand(4), x)
    emb = TimeEmbedding(8, n_times=1)
    with pytest.raises(ValueError, match="one time"):
        emb(torch.rand(2), torch.rand(2))
    with pytest.raises(ValueError, match="n_times"):
        TimeEmbedding(8, n_times=3)


def test_two_time_embedding_depends_on_both_times():
    torch.manual_seed(0)
    emb = TimeEmbedding(8, n_times=2)
    t = torch.full((3,), 0.7)
    assert (emb(t, torch.full((3,), 0.1)) - emb(t, torch.full((3,), 0.4))).abs().max() > 1e-4


def test_broadcast_time_shapes():
    like = torch.zeros(3, 2, dtype=F64)
    assert broadcast_time(0.5, 3, like).shape == (3,)
    assert broadcast_time(torch.ones(3, 1), 3, like).shape == (3,)
    with pytest.raises(ValueError, match="shape"):
        broadcast_time(torch.ones(4), 3, like)


def test_build_backbone_errors_name_choices():
    with pytest.raises(ValueError, match="egnn"):
        build_backbone("gnn", dim=8, n_particles=4, spatial_dim=2)
    with pytest.raises(ValueError, match="particle"):
        build_backbone("egnn", dim=8)
    with pytest.raises(TypeError):
        build_backbone("egnn", dim=8, n_particles=4, spatial_dim=2, heads=2)


@pytest.mark.parametrize("name", ["egnn", "transformer", "mlp"])
def test_every_backbone_supports_the_vectorised_exact_trace(name):
    torch.manual_seed(0)
    opts = {"hidden": 8, "layers": 1} | ({"heads": 2} if name == "transformer" else {})
    net = build_backbone(name, dim=6, n_particles=3, spatial_dim=2, **opts).double()
    x = remove_mean(torch.randn(3, 6, dtype=F64), 3, 2)
    t = torch.tensor(0.4, dtype=F64)
    for mode in ("vjp", "jvp", "loop"):
        _, div = exact_divergence(net, t, x, mode=mode)
        for i in range(3):
            jac = torch.autograd.functional.jacobian(lambda y: net(t, y[None])[0], x[i])
            assert float(div[i]) == pytest.approx(float(torch.trace(jac.detach())), abs=1e-9)


def test_teacher_log_q_is_invariant_under_rotations_and_permutations():
    # dopri5's error norm (RMS over the batch) is itself invariant, so both solves take the same
    # steps and agree to round-off, far below the ODE tolerance.
    net = _perturbed_egnn(4, 2, std=0.03)
    teacher = TeacherCNF.build(
        "egnn",
        dim=8,
        n_particles=4,
        spatial_dim=2,
        mean_free=True,
        backbone_options={"hidden": 16, "layers": 2},
    ).double()
    teacher.net.load_state_dict(net.state_dict())
    x = remove_mean(torch.randn(4, 8, dtype=F64, generator=torch.Generator().manual_seed(4)), 4, 2)
    rot = random_rotations(4, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    perm = torch.tensor([2, 0, 3, 1])
    opts = {"atol": 1e-6, "rtol": 1e-6}
    lq = teacher.log_prob(x, **opts)
    lq_g = teacher.log_prob(_permute(rotate(x, rot, 4, 2), perm, 4, 2), **opts)
    assert (lq - lq_g).abs().max() < 1e-5
    # a density that is not just the prior's
    assert (lq - teacher.prior.log_prob(x)).abs().max() > 1e-3
