"""Per-step generators and minibatches built ahead by background processes."""

from __future__ import annotations

import pickle

import pytest
import torch

from boltzflow.train.prefetch import step_batches, step_generator


def _draw(step: int) -> torch.Tensor:
    return torch.randn(64, generator=step_generator(3, step))


def test_step_generator_is_a_pure_function_of_seed_and_step():
    assert torch.equal(_draw(5), _draw(5))
    other_seed = torch.randn(64, generator=step_generator(4, 5))
    draws = torch.stack([_draw(s) for s in range(50)] + [other_seed])
    # independent N(0, 1) streams: no two rows coincide and no pair is strongly correlated
    # (|r| of two independent 64-vectors has sd 1/8; 6 sd bounds all 1,275 pairs)
    corr = torch.corrcoef(draws)
    off = corr[~torch.eye(len(draws), dtype=torch.bool)]
    assert float(off.abs().max()) < 6 / 8
    assert len({tuple(r.tolist()) for r in draws}) == len(draws)
    with pytest.raises(ValueError, match="step must be >= 0"):
        step_generator(3, -1)


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_batches_arrive_in_step_order_for_any_worker_count(workers):
    with step_batches(_draw, 7, 30, workers) as batches:
        got = list(batches)
    assert len(got) == 23
    for step, batch in zip(range(7, 30), got):
        assert torch.equal(batch, _draw(step))


def test_empty_range_and_bad_worker_count():
    with step_batches(_draw, 5, 5, 2) as batches:
        assert list(batches) == []
    with (
        pytest.raises(ValueError, match="workers must be >= 0, got -2"),
        step_batches(_draw, 0, 3, -2),
    ):
        pass


def test_teacher_loss_is_picklable_for_spawned_workers():
    from boltzflow.train.config import TeacherConfig
    from boltzflow.train.teacher import SystemShape, TeacherLoss, build_teacher

    shape = SystemShape(dim=8, n_particles=4, spatial_dim=2, mean_free=True)
    cfg = TeacherConfig.from_dict({"model": {"backbone": "egnn", "hidden": 8, "layers": 1}})
    data = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    loss = TeacherLoss(build_teacher(cfg, shape), data, cfg, shape)
    copy = pickle.loads(pickle.dumps(loss))
    for a, b in zip(loss.make_batch(11), copy.make_batch(11)):
        assert (a is None and b is None) or torch.equal(a, b)
