"""Progress without a terminal: periodic one-line reports on stderr, a final line, ``--quiet``."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_teacher import tiny_data

from boltzflow.cli import main as cli
from boltzflow.progress import Progress, format_duration, is_quiet, set_quiet, track

ROOT = Path(__file__).resolve().parents[1]

LINE = re.compile(r"^train: step (\d+)/100 \((\d+)%\) loss 0\.25  [\d.]+ step/s  ETA \S+$")


class FakeClock:
    """A monotonic clock that the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def _loud(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with progress on and leaves the switch as it found it."""
    monkeypatch.delenv("BOLTZFLOW_QUIET", raising=False)
    before = set_quiet(False)
    yield
    set_quiet(before)


def test_lines_carry_step_total_rate_and_eta(capsys: pytest.CaptureFixture[str]) -> None:
    clock = FakeClock()
    with Progress(100, desc="train", unit="step", interval=0, clock=clock) as bar:
        for _ in range(4):
            clock.now += 2.0
            bar.update(10, loss=0.25)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 5, lines  # one per update (interval 0) and the final one
    assert all(LINE.match(ln) for ln in lines[:4]), lines
    # 40 of 100 steps in 8 s: 5 step/s, 60 steps left
    assert lines[3] == "train: step 40/100 (40%) loss 0.25  5.0 step/s  ETA 12s"
    assert lines[4] == "train: step 40/100 (40%) loss 0.25  5.0 step/s  done in 8s"


def test_unknown_total_has_no_percent_or_eta() -> None:
    clock, out = FakeClock(), io.StringIO()
    with Progress(desc="pairs", unit="sample", interval=0, stream=out, clock=clock) as bar:
        clock.now += 4.0
        bar.update(200)
    first, last = out.getvalue().splitlines()
    assert first == "pairs: sample 200  50.0 sample/s"
    assert last == "pairs: sample 200  50.0 sample/s  done in 4s"


def test_lines_come_at_most_every_interval() -> None:
    clock, out = FakeClock(), io.StringIO()
    times = []
    with Progress(10_000, desc="train", interval=30, stream=out, clock=clock) as bar:
        for _ in range(1000):  # one update every 0.7 s for 700 s
            clock.now += 0.7
            before = out.getvalue().count("\n")
            bar.update(1)
            if out.getvalue().count("\n") > before:
                times.append(clock.now - 1000.0)
    gaps = np.diff(times)
    assert times[0] <= 30.0  # the first line comes soon
    assert len(times) >= 700 // 30 - 1
    assert (gaps >= 30.0 - 1e-9).all() and (gaps <= 31.0).all(), gaps
    assert out.getvalue().splitlines()[-1].endswith("done in 11m40s")


def test_failure_and_resume() -> None:
    clock, out = FakeClock(), io.StringIO()
    with pytest.raises(RuntimeError):
        with Progress(50, desc="x", initial=20, interval=60, stream=out, clock=clock) as bar:
            clock.now += 10.0
            bar.update(10)
            raise RuntimeError("boom")
    # the rate counts only the 10 new units; the resumed 20 count towards the total
    assert out.getvalue().splitlines()[-1] == "x: it 30/50 (60%)  1.0 it/s  stopped after 10s"


def test_quiet_and_disabled_print_nothing(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    set_quiet(True)
    assert is_quiet()
    with Progress(10, interval=0) as bar:
        bar.update(10)
    assert list(track(range(3), interval=0)) == [0, 1, 2]
    set_quiet(False)
    monkeypatch.setenv("BOLTZFLOW_QUIET", "1")
    with Progress(10, interval=0) as bar:
        bar.update(10)
    monkeypatch.setenv("BOLTZFLOW_QUIET", "0")
    assert not is_quiet()
    with Progress(10, interval=0, enabled=False) as bar:
        bar.update(10)
    assert capsys.readouterr().err == ""


def test_track_counts_items(capsys: pytest.CaptureFixture[str]) -> None:
    assert list(track(["a", "b"], desc="jobs", unit="model", interval=0)) == ["a", "b"]
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("jobs: model 2/2 (100%)") and "done in" in lines[-1]


@pytest.mark.parametrize(("s", "text"), [(0.4, "0s"), (42, "42s"), (100, "1m40s"), (7500, "2h05m")])
def test_format_duration(s: float, text: str) -> None:
    assert format_duration(s) == text


# -- the CLI ------------------------------------------------------------------------------------
TINY_TOML = """system = "dw4"
[model]
backbone = "egnn"
hidden = 8
layers = 1
[train]
steps = 8
batch_size = 16
warmup_steps = 2
log_every = 2
checkpoint_every = 4
seed = 7
[sample]
method = "rk4"
steps = 4
batch_size = 16
"""


@pytest.fixture
def train_args(tmp_path: Path) -> list[str]:
    (tmp_path / "c.toml").write_text(TINY_TOML)
    np.save(tmp_path / "d.npy", tiny_data().numpy())
    data, config = str(tmp_path / "d.npy"), str(tmp_path / "c.toml")
    return ["train", "teacher", "--data", data, "--config", config, "-o", str(tmp_path / "r")]


def test_cli_train_with_piped_stderr_prints_progress(train_args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("BOLTZFLOW_QUIET", None)
    run = subprocess.run(
        [sys.executable, "-m", "boltzflow", *train_args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert re.search(r"^teacher_cnf: step 8/8 \(100%\) loss \S+  .*done in", run.stderr, re.M), (
        run.stderr
    )


@pytest.mark.parametrize("where", ["before", "after"])
def test_cli_quiet_prints_no_progress(
    train_args: list[str], where: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--quiet", *train_args] if where == "before" else [*train_args, "-q"]
    assert cli(args) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and "trained teacher" in captured.out
    assert not is_quiet()  # --quiet holds for that call only
