"""Tail trajectories: teacher trajectories started from a widened prior, appended to the cache
so that a student's log q is supervised where the prior is thin."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_teacher import dw4_like_teacher

from boltzflow.distill.train_students import TrajectoryConfig
from boltzflow.distill.trajectories import Trajectories, tail_partial_file, teacher_trajectories
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


class _Interrupt(Exception):
    pass


def _interrupt_after(monkeypatch: pytest.MonkeyPatch, solves: int) -> list[int]:
    """Make the teacher's batch solve raise after ``solves`` calls; returns the call log."""
    calls: list[int] = []
    real = TeacherCNF._solve

    def solve(self, xb, *args, **kwargs):
        if len(calls) == solves:
            raise _Interrupt
        calls.append(len(xb))
        return real(self, xb, *args, **kwargs)

    monkeypatch.setattr(TeacherCNF, "_solve", solve)
    return calls


def test_interrupted_trajectories_resume_to_the_same_cache(
    teacher: TeacherCNF, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after two of four batches (tail part included), a rerun integrates only the
    remaining batches and returns exactly what an uninterrupted run does."""
    whole = _make(teacher, batch_size=10, tail_fraction=0.25)
    partial = tmp_path / "t.partial.pt"
    calls = _interrupt_after(monkeypatch, 2)
    with pytest.raises(_Interrupt):
        _make(teacher, batch_size=10, tail_fraction=0.25, partial=partial)
    assert len(Trajectories.load(partial)[0]) == 20
    monkeypatch.undo()
    calls = _interrupt_after(monkeypatch, 100)
    resumed = _make(teacher, batch_size=10, tail_fraction=0.25, partial=partial)
    assert calls == [10, 10, 10]  # batches 3 and 4, then the 10 tail trajectories
    assert len(resumed) == 50 and resumed.n_prior == 40
    for name in ("x", "logp", "v", "div"):
        assert torch.equal(getattr(resumed, name), getattr(whole, name))
    assert len(Trajectories.load(tail_partial_file(partial))[0]) == 10


def test_a_partial_file_of_other_settings_is_not_resumed(
    teacher: TeacherCNF, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    partial = tmp_path / "t.partial.pt"
    _make(teacher, batch_size=20, partial=partial)  # complete, but for batch size 20
    calls = _interrupt_after(monkeypatch, 100)
    again = _make(teacher, batch_size=10, partial=partial)
    assert calls == [10, 10, 10, 10]
    assert len(again) == 40 and len(Trajectories.load(partial)[0]) == 40


def test_push_prior_skip_integrates_the_same_later_points(teacher: TeacherCNF) -> None:
    full = [x0 for x0, _ in teacher.push_prior(6, seed=2, batch_size=2, divergence="none")]
    later = [x0 for x0, _ in teacher.push_prior(6, seed=2, batch_size=2, skip=2, divergence="none")]
    assert len(later) == 2 and all(torch.equal(a, b) for a, b in zip(full[1:], later, strict=True))
    with pytest.raises(ValueError, match="skip"):
        next(teacher.push_prior(6, skip=7))


def test_trajectories_take_the_teachers_trace_mode(
    teacher: TeacherCNF, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A teacher that traces by reverse passes in a loop (large networks on CPU) keeps doing so
    for its trajectories; the result equals the stacked products' up to rounding."""
    import boltzflow.distill.trajectories as module
    import boltzflow.flows.ode as ode

    stacked = _make(teacher)
    modes: list[str] = []
    real = ode.exact_divergence

    def spy(*args, mode: str = "vjp", **kwargs):
        modes.append(mode)
        return real(*args, mode=mode, **kwargs)

    monkeypatch.setattr(ode, "exact_divergence", spy)
    monkeypatch.setattr(module, "exact_divergence", spy)
    monkeypatch.setitem(teacher.sampling, "trace_mode", "loop")
    looped = _make(teacher)
    assert modes and set(modes) == {"loop"}
    for name in ("x", "logp", "v", "div"):
        torch.testing.assert_close(getattr(looped, name), getattr(stacked, name))


def test_quadrature_trajectories_converge_to_the_exactly_tracked_ones(teacher: TeacherCNF) -> None:
    """Positions, velocities and divergences on the grid agree up to the solver tolerance
    (the exact run's step control also sees log p); log p by Gauss-Legendre nodes per interval
    converges to the trace tracked at every stage as the nodes increase (tight tolerances, so
    that the quadrature error is what is seen)."""

    def make(**kw) -> Trajectories:
        return teacher_trajectories(teacher, 40, grid=4, seed=3, atol=1e-9, rtol=1e-9, **kw)

    exact = _make(teacher, tail_fraction=0.1)
    quad = _make(teacher, tail_fraction=0.1, divergence="quadrature", quadrature_points=3)
    assert len(quad) == 44 and quad.n_prior == 40 and torch.equal(quad.logp[:, 0], torch.zeros(44))
    for name in ("x", "v", "div"):
        torch.testing.assert_close(getattr(quad, name), getattr(exact, name), atol=1e-4, rtol=0)
    tracked = make()
    err = {
        q: float(
            (make(divergence="quadrature", quadrature_points=q).logp - tracked.logp).abs().max()
        )
        for q in (1, 6)
    }
    assert err[6] < 1e-6 and err[1] > 100 * err[6], err


def test_quadrature_settings_are_checked_and_keep_old_caches_valid() -> None:
    assert "divergence" not in TrajectoryConfig().options()
    opts = TrajectoryConfig(divergence="quadrature", quadrature_points=2).options()
    assert opts["divergence"] == "quadrature" and opts["quadrature_points"] == 2
    with pytest.raises(ValueError, match=r"trajectories\.divergence"):
        TrajectoryConfig(divergence="hutchinson")
    with pytest.raises(ValueError, match="quadrature_points"):
        TrajectoryConfig(divergence="quadrature", quadrature_points=0)


def test_trajectory_progress_counts_finished_batches(
    teacher: TeacherCNF, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    partial = tmp_path / "t.partial.pt"
    _make(teacher, batch_size=20, partial=partial, progress=True)
    err = capsys.readouterr().err
    assert "teacher trajectories" in err and "40/40" in err
    _make(teacher, batch_size=20, partial=partial, progress=True)  # all done: nothing to redo
    assert "40/40" in capsys.readouterr().err
