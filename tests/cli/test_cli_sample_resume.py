"""`boltzflow sample --resume`: an interrupted draw is continued, not redrawn, and the result is
the file an uninterrupted run writes; a file of another draw is refused, not extended."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tiny_teacher import dw4_like_teacher

from boltzflow.cli import main
from boltzflow.flows.cnf import TeacherCNF
from boltzflow.io.samples import read_samples

N, BATCH = 40, 10


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return dw4_like_teacher(tmp_path_factory.mktemp("t") / "teacher")


def _sample(teacher: Path, out: Path, *extra: str, seed: int = 1) -> int:
    argv = ["sample", str(teacher), "-n", str(N), "-o", str(out), "--batch-size", str(BATCH)]
    return main([*argv, "--seed", str(seed), *extra])


def _interrupt_after(
    monkeypatch: pytest.MonkeyPatch, batches: int, *, sigterm: bool = False
) -> None:
    """Ctrl-C (or a real SIGTERM to this process) when the teacher is asked for batch number
    ``batches`` (0-based) of a draw."""
    original = TeacherCNF.iter_samples

    def iter_samples(self: Any, n: int, **kw: Any) -> Iterator[Any]:
        for i, out in enumerate(original(self, n, **kw)):
            if i == batches:
                if not sigterm:
                    raise KeyboardInterrupt
                os.kill(os.getpid(), signal.SIGTERM)  # the handler raises in this thread
            yield out

    monkeypatch.setattr(TeacherCNF, "iter_samples", iter_samples)


@pytest.fixture(scope="module")
def reference(teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("ref") / "full.h5"
    assert _sample(teacher, out) == 0
    return read_samples(out)


def test_resume_continues_an_interrupted_draw(
    teacher: Path, reference: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    out = tmp_path / "s.h5"
    with monkeypatch.context() as m:
        _interrupt_after(m, 2)
        assert _sample(teacher, out) == 130
    assert read_samples(out, allow_partial=True).n == 2 * BATCH
    capsys.readouterr()

    assert _sample(teacher, out, "--resume") == 0
    said = capsys.readouterr().out
    assert f"wrote {N} samples" in said and f"({2 * BATCH} already in the file" in said
    done = read_samples(out)  # complete now
    assert done.complete and done.n == N
    np.testing.assert_array_equal(done.x, reference.x)
    np.testing.assert_array_equal(done.log_q, reference.log_q)
    np.testing.assert_array_equal(done.log_w, reference.log_w)
    ess = np.exp(2 * np.logaddexp.reduce(done.log_w) - np.logaddexp.reduce(2 * done.log_w))
    assert f"ESS/N {ess / N:.4f} (N = {N})" in said  # of all rows, not only the new ones


def test_resume_of_a_complete_file_draws_nothing(
    teacher: Path, reference: Any, tmp_path: Path, capsys: Any
) -> None:
    out = tmp_path / "s.h5"
    assert _sample(teacher, out) == 0
    capsys.readouterr()
    assert _sample(teacher, out, "--resume") == 0
    assert f"({N} already in the file, 0 drawn now)" in capsys.readouterr().out
    np.testing.assert_array_equal(read_samples(out).x, reference.x)


def test_resume_refuses_another_draw_and_keeps_its_rows(
    teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    out = tmp_path / "s.h5"
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        assert _sample(teacher, out) == 130
    capsys.readouterr()
    assert _sample(teacher, out, "--resume", seed=2) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "seed: 1 -> 2" in err
    assert read_samples(out, allow_partial=True).n == BATCH  # untouched


def test_without_resume_the_file_is_replaced(
    teacher: Path, reference: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "s.h5"
    with monkeypatch.context() as m:
        _interrupt_after(m, 1)
        assert _sample(teacher, out) == 130
    assert _sample(teacher, out, seed=1) == 0
    np.testing.assert_array_equal(read_samples(out).x, reference.x)


def test_sigterm_stops_the_draw_like_ctrl_c_and_resume_finishes_it(
    teacher: Path, reference: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """``kill`` or a scheduler's preemption: exit 143, the finished batches kept in a closed
    store marked partial, and ``--resume`` completes the same draw."""
    out = tmp_path / "s.h5"
    with monkeypatch.context() as m:
        _interrupt_after(m, 3, sigterm=True)
        assert _sample(teacher, out) == 143
    err = capsys.readouterr().err
    assert "terminated (SIGTERM)" in err and f"kept {3 * BATCH} of {N} samples" in err
    kept = read_samples(out, allow_partial=True)
    assert kept.n == 3 * BATCH and not kept.complete
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again
    assert _sample(teacher, out, "--resume") == 0
    np.testing.assert_array_equal(read_samples(out).x, reference.x)
