"""TeacherCNF contract: shapes, seeds, batching, scale, save/load, input checks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from boltzflow.flows.cnf import TeacherCNF
from boltzflow.systems.particles import remove_mean

F64 = torch.float64
FAST = {"method": "rk4", "steps": 8}


@pytest.fixture
def teacher() -> TeacherCNF:
    torch.manual_seed(0)
    model = TeacherCNF.build(
        "egnn",
        dim=8,
        n_particles=4,
        spatial_dim=2,
        mean_free=True,
        backbone_options={"hidden": 8, "layers": 1},
    )
    for layer in model.net.layers:
        nn.init.normal_(layer.coord_mlp[-1].weight, std=0.05)
    return model


def test_sample_shapes_seeds_and_mean_free(teacher):
    x, log_q = teacher.sample(10, seed=3, **FAST)
    assert x.shape == (10, 8) and log_q.shape == (10,)
    assert bool(torch.isfinite(log_q).all())
    assert x.reshape(10, 4, 2).sum(1).abs().max() < 1e-5
    x2, log_q2 = teacher.sample(10, seed=3, **FAST)
    assert torch.equal(x, x2) and torch.equal(log_q, log_q2)
    x3, _ = teacher.sample(10, seed=4, **FAST)
    assert not torch.equal(x, x3)


def test_batching_does_not_change_results(teacher):
    whole = teacher.sample_with_stats(12, seed=0, batch_size=12, **FAST)
    parts = teacher.sample_with_stats(12, seed=0, batch_size=5, **FAST)
    assert torch.allclose(whole.x, parts.x, atol=1e-6)
    assert torch.allclose(whole.log_q, parts.log_q, atol=1e-5)
    assert parts.nfe == 3 * 32 and parts.nfe_per_batch == 32
    batches = list(teacher.iter_samples(12, seed=0, batch_size=5, **FAST))
    assert [len(b.x) for b in batches] == [5, 5, 2]


def test_log_prob_inverts_sample(teacher):
    out = teacher.sample_with_stats(6, seed=1, atol=1e-7, rtol=1e-7)
    back = teacher.log_prob_with_stats(out.x, atol=1e-7, rtol=1e-7)
    assert (back.log_q - out.log_q).abs().max() < 1e-3  # float32 model
    assert back.nfe > 0 and back.seconds > 0


def test_scale_changes_units_and_log_q_by_the_jacobian():
    torch.manual_seed(0)
    kw = {
        "dim": 6,
        "n_particles": 3,
        "spatial_dim": 2,
        "mean_free": True,
        "backbone_options": {"hidden": 8, "layers": 1},
    }
    base = TeacherCNF.build("egnn", **kw)
    scaled = TeacherCNF.build("egnn", scale=0.1, **kw)
    scaled.load_state_dict(base.state_dict())
    x, lq = base.sample(5, seed=0, **FAST)
    xs, lqs = scaled.sample(5, seed=0, **FAST)
    assert torch.allclose(xs, 0.1 * x, atol=1e-7)
    assert torch.allclose(lqs, lq - 4 * math.log(0.1), atol=1e-4)  # event_dim 4
    assert torch.allclose(scaled.log_prob(xs, **FAST), lqs, atol=1e-3)


def test_save_load_round_trip(teacher, tmp_path):
    path = teacher.save(tmp_path / "teacher.pt")
    loaded = TeacherCNF.load(tmp_path)  # a folder holding teacher.pt
    assert loaded.model_config == teacher.model_config
    assert loaded.sampling == teacher.sampling
    x, lq = teacher.sample(4, seed=2, **FAST)
    x2, lq2 = loaded.sample(4, seed=2, **FAST)
    assert torch.equal(x, x2) and torch.equal(lq, lq2)
    assert path.stat().st_size < 200_000


def test_input_checks(teacher):
    with pytest.raises(ValueError, match="mean-free"):
        teacher.log_prob(torch.ones(3, 8))
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        teacher.log_prob(torch.zeros(3, 6))
    with pytest.raises(TypeError, match="atol"):
        teacher.sample(3, seed=0, tolerance=1e-3)
    with pytest.raises(ValueError, match="n must be"):
        teacher.sample(0)
    with pytest.raises(FileNotFoundError):
        TeacherCNF.load("/nonexistent/folder")
    # rounding-level centre-of-mass offsets are accepted (and projected away)
    x = remove_mean(torch.randn(3, 8), 4, 2) + 1e-7
    assert teacher.log_prob(x, **FAST).shape == (3,)


def test_hutchinson_and_quadrature_options_run(teacher):
    exact = teacher.sample_with_stats(8, seed=0, atol=1e-6, rtol=1e-6)
    quad = teacher.sample_with_stats(8, seed=0, atol=1e-6, rtol=1e-6, divergence="quadrature")
    hutch = teacher.sample_with_stats(8, seed=0, atol=1e-6, rtol=1e-6, divergence="hutchinson")
    assert quad.trace_evals == 12
    assert (quad.log_q - exact.log_q).abs().max() < 1e-3
    assert bool(torch.isfinite(hutch.log_q).all())


def test_push_prior_draws_seeded_prior_points_and_records_a_path(teacher):
    times = torch.linspace(0.0, 1.0, 5)
    batches = list(teacher.push_prior(7, seed=2, times=times, batch_size=3, **FAST))
    assert [len(x0) for x0, _ in batches] == [3, 3, 1]
    expected = teacher.prior.sample(7, generator=torch.Generator().manual_seed(2))
    assert torch.equal(torch.cat([x0 for x0, _ in batches]), expected)
    x0, res = batches[0]
    assert res.path.shape == (5, 3, 8) and res.delta_logp_path.shape == (5, 3)
    assert torch.equal(res.path[0], x0) and torch.equal(res.path[-1], res.x)
    assert torch.equal(res.delta_logp_path[-1], res.delta_logp)
    assert bool((res.delta_logp_path[0] == 0).all())
    # the samples are the pushed points, projected and in data units
    samples = teacher.sample_with_stats(7, seed=2, batch_size=3, **FAST)
    ends = torch.cat([remove_mean(r.x, 4, 2) for _, r in batches]) * teacher.scale
    assert torch.equal(samples.x, ends)
