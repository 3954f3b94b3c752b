"""Tail trajectories: teacher trajectories started from a widened prior, appended to the cache
so that a student's log q is supervised where the prior is thin."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_teacher import dw4_like_teacher

from boltzflow.distill.train_students import TrajectoryConfig
from boltzflow.distill.trajectories import Trajectories, teacher_trajectories
from boltzflow.flows.cnf import TeacherCNF
from boltzflow.flows.ode import integrate


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> TeacherCNF:
    folder = dw4_like_teacher(tmp_path_factory.mktemp("tail") / "teacher")
    return TeacherCNF.load(folder / "teacher.pt").double()


def _make(teacher: TeacherCNF, **kw) -> Trajectories:
    return teacher_trajectories(teacher, 40, grid=4, seed=3, atol=1e-6, rtol=1e-6, **kw)


def test_tail_trajectories_follow_the_plain_ones_unchanged(teacher: TeacherCNF) -> None:
    plain = _make(teacher)
    both = _make(teacher, tail_fraction=0.25, tail_scale=2.0)
    assert len(plain) == 40 and plain.n_prior is None
    assert len(both) == 50 and both.n_prior == 40
    for name in ("x", "logp", "v", "div"):
        assert torch.equal(getattr(both, name)[:40], getattr(plain, name))
    # the tail starts are the prior draws of seed + 1, scaled
    gen = torch.Generator().manual_seed(4)
    z = teacher.prior.sample(10, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(both.x[40:, 0].double(), (2.0 * z).float().double())
    # the teacher's samples are the ends of the prior trajectories only
    assert torch.equal(both.ends(), plain.ends())


def test_tail_trajectories_are_exact_teacher_supervision(teacher: TeacherCNF) -> None:
    """A tail trajectory is the teacher's own solution from its start: its end and log-density
    change equal a direct solve of the same point."""
    tail = _make(teacher, tail_fraction=0.1, tail_scale=1.5)  # 4 tail trajectories
    start = tail.x[40:, 0].double()
    direct = integrate(teacher.net, start, method="dopri5", atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(tail.x[40:, -1].double(), direct.x, atol=1e-4, rtol=0)
    torch.testing.assert_close(tail.logp[40:, -1].double(), direct.delta_logp, atol=1e-4, rtol=0)


def test_tail_trajectories_survive_a_file_round_trip(teacher: TeacherCNF, tmp_path: Path) -> None:
    both = _make(teacher, tail_fraction=0.25)
    back, _ = Trajectories.load(both.save(tmp_path / "t.pt"))
    assert back.n_prior == 40 and torch.equal(back.x, both.x)


def test_trajectory_config_tail_options() -> None:
    assert "tail_fraction" not in TrajectoryConfig().options()  # old caches stay valid
    opts = TrajectoryConfig(tail_fraction=0.25, tail_scale=1.5).options()
    assert opts["tail_fraction"] == 0.25 and opts["tail_scale"] == 1.5
    with pytest.raises(ValueError, match="tail_fraction"):
        TrajectoryConfig(tail_fraction=1.5)
    with pytest.raises(ValueError, match="tail_scale"):
        TrajectoryConfig(tail_scale=0.5)


def test_prior_scale_must_be_positive(teacher: TeacherCNF) -> None:
    with pytest.raises(ValueError, match="prior_scale"):
        next(teacher.push_prior(4, prior_scale=0.0))
