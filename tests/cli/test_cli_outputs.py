"""Unwritable outputs are refused in one line (exit 2) before any work, by every command, and a
failed command leaves nothing behind (issue #21)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from tiny_teacher import dw4_like_teacher

from boltzflow.cli import main
from boltzflow.flows.cnf import TeacherCNF
from boltzflow.io.samples import SampleWriter

ROOT = Path(__file__).resolve().parents[2]
ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0
TEACHER_CONFIG = ROOT / "workflows" / "configs" / "teacher_dw4.toml"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny DW4-shaped teacher, DW4 configurations, an empty array and a sample store."""
    tmp = tmp_path_factory.mktemp("inputs")
    dw4_like_teacher(tmp / "teacher", {"method": "rk4", "steps": 2})
    x = np.random.default_rng(0).normal(size=(6, 8))
    np.save(tmp / "x.npy", x)
    np.save(tmp / "empty.npy", np.zeros((0, 8)))
    with SampleWriter(tmp / "samples.h5", dim=8, provenance={"seed": 0}) as w:
        w.append(x, log_q=np.zeros(6))
    (tmp / "spec.toml").write_text('samples = "samples.h5"\nsystem = "dw4"\n')
    return {
        "teacher": tmp / "teacher",
        "x": tmp / "x.npy",
        "empty": tmp / "empty.npy",
        "samples": tmp / "samples.h5",
        "spec": tmp / "spec.toml",
    }


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any of the commands' real work fails the test."""

    def work(*args: object, **kwargs: object) -> None:
        raise AssertionError("work started before the output was checked")

    import boltzflow.analysis.estimate
    import boltzflow.analysis.reweight
    import boltzflow.cli.systems_cmd
    import boltzflow.data
    import boltzflow.distill.train_students
    import boltzflow.registry.loading
    import boltzflow.systems
    import boltzflow.train.teacher
    import boltzflow.workflow.pipeline

    monkeypatch.setattr(boltzflow.data, "generate", work)
    monkeypatch.setattr(boltzflow.data, "load_positions", work)
    monkeypatch.setattr(boltzflow.train.teacher, "train_teacher", work)
    monkeypatch.setattr(boltzflow.distill.train_students, "teacher_system", work)
    monkeypatch.setattr(boltzflow.registry.loading, "load_model", work)
    monkeypatch.setattr(boltzflow.analysis.reweight, "reweight_analysis", work)
    monkeypatch.setattr(boltzflow.analysis.estimate, "estimate_from_spec", work)
    monkeypatch.setattr(boltzflow.workflow.pipeline, "run_workflow", work)
    monkeypatch.setattr(TeacherCNF, "load", work)
    monkeypatch.setattr(boltzflow.cli.systems_cmd, "load_system", work)


def _file_commands(i: dict[str, Path]) -> dict[str, list[str]]:
    return {
        "energy": ["energy", "dw4", str(i["x"]), "-o"],
        "data generate": ["data", "generate", "dw4", "-n", "10", "-o"],
        "sample": ["sample", str(i["teacher"]), "-n", "4", "-o"],
        "nll --json": ["nll", str(i["teacher"]), "--data", str(i["x"]), "--json"],
    }


def _dir_commands(i: dict[str, Path]) -> dict[str, list[str]]:
    train = ["train", "teacher", "--system", "dw4", "--data", str(i["x"])]
    return {
        "train": [*train, "--config", str(TEACHER_CONFIG), "--profile", "smoke", "-o"],
        "distill": ["distill", str(i["teacher"]), "--method", "f2d2", "-o"],
        "distill nf": ["distill", str(i["teacher"]), "--method", "nf", "-o"],
        "train nf": ["train", "nf", "--system", "aldp", "--data", str(i["x"]), "-o"],
        "reweight": ["reweight", str(i["samples"]), "--system", "dw4", "-o"],
        "estimate": ["estimate", str(i["spec"]), "-o"],
        "run": ["run", str(ROOT / "workflows" / "quickstart.toml"), "-o"],
        "demo": ["demo", "--no-systems", "-o"],
    }


def _refused(argv: list[str], capsys: pytest.CaptureFixture, words: str) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("boltzflow ") and words in err, err


@pytest.fixture
def place(tmp_path: Path) -> Path:
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "dir").mkdir()
    return tmp_path


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("command", list(_file_commands({k: Path(k) for k in ("x", "teacher")})))
def test_file_output_is_a_folder_or_under_a_file(
    command: str, inputs: dict[str, Path], place: Path, capsys, no_work
) -> None:
    argv = _file_commands(inputs)[command]
    before = _listing(place)
    _refused([*argv, str(place / "dir")], capsys, "it is a folder")
    _refused([*argv, str(place / "file" / "out")], capsys, "file is not a folder")
    _refused([*argv, str(place / "file" / "sub" / "out")], capsys, "file is not a folder")
    assert _listing(place) == before


@pytest.mark.parametrize(
    "command", list(_dir_commands({k: Path(k) for k in ("x", "teacher", "samples", "spec")}))
)
def test_folder_output_is_a_file_or_under_a_file(
    command: str, inputs: dict[str, Path], place: Path, capsys, no_work
) -> None:
    argv = _dir_commands(inputs)[command]
    before = _listing(place)
    _refused([*argv, str(place / "file")], capsys, "it is a file, not a folder")
    _refused([*argv, str(place / "file" / "run")], capsys, "file is not a folder")
    assert _listing(place) == before


@pytest.mark.skipif(ROOT_USER, reason="root writes into read-only folders")
def test_read_only_folder(inputs: dict[str, Path], place: Path, capsys, no_work) -> None:
    ro = place / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for argv in [*_file_commands(inputs).values(), *_dir_commands(inputs).values()]:
            _refused([*argv, str(ro / "out")], capsys, "is not writable")
        assert not any(ro.iterdir())
    finally:
        ro.chmod(0o755)


def test_os_errors_are_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import boltzflow.cli.systems_cmd as systems_cmd

    def full(args: object) -> int:
        raise OSError(28, "No space left on device", "/data/out.h5")

    monkeypatch.setattr(systems_cmd, "_cmd_systems", full)
    _refused(["systems"], capsys, "/data/out.h5: No space left on device")


def test_failed_train_removes_its_new_run_folder(
    inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import boltzflow.train.teacher

    def fails(cfg, data, out_dir, shape, *, checkpoint: bool = False, **kwargs):
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "run.json").write_text("{}")
        if checkpoint:
            (Path(out_dir) / "checkpoint.pt").write_text("x")
        raise ValueError("diverged")

    monkeypatch.setattr(boltzflow.train.teacher, "train_teacher", fails)
    argv = ["train", "teacher", "--data", str(inputs["x"]), "--system", "dw4"]
    argv += ["--config", str(TEACHER_CONFIG), "--profile", "smoke", "-o"]
    _refused([*argv, str(tmp_path / "new" / "run")], capsys, "diverged")
    assert not (tmp_path / "new").exists()  # with the parent it made
    (tmp_path / "old").mkdir()
    _refused([*argv, str(tmp_path / "old")], capsys, "diverged")
    assert (tmp_path / "old" / "run.json").is_file()  # a folder from before stays
    monkeypatch.setattr(
        boltzflow.train.teacher, "train_teacher", lambda *a, **k: fails(*a, checkpoint=True, **k)
    )
    _refused([*argv, str(tmp_path / "resumable")], capsys, "diverged")
    assert (tmp_path / "resumable" / "checkpoint.pt").is_file()  # resumable: kept


def test_failed_sample_leaves_no_file(
    inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import boltzflow.sampling.draw

    def draws(*args, **kwargs):
        raise ValueError("solver failed")
        yield

    monkeypatch.setattr(boltzflow.sampling.draw, "iter_draws", draws)
    out = tmp_path / "sub" / "s.h5"
    _refused(["sample", str(inputs["teacher"]), "-n", "4", "-o", str(out)], capsys, "solver")
    assert not (tmp_path / "sub").exists()


def test_empty_inputs_are_refused_before_any_folder(
    inputs: dict[str, Path], tmp_path: Path, capsys
) -> None:
    run = tmp_path / "run"
    train = ["train", "teacher", "--data", str(inputs["empty"]), "--system", "dw4"]
    train += ["--config", str(TEACHER_CONFIG), "--profile", "smoke", "-o", str(run)]
    _refused(train, capsys, "no training configurations (0 rows)")
    nll = ["nll", str(inputs["teacher"]), "--data", str(inputs["empty"])]
    _refused(nll, capsys, "no configurations to score (0 rows)")
    reweight = ["reweight", str(inputs["samples"]), "--system", "dw4", "-o", str(run)]
    _refused([*reweight, "--reference", str(inputs["empty"])], capsys, "holds no samples")
    distill = ["distill", str(inputs["teacher"]), "--method", "falcon", "-o", str(run)]
    _refused([*distill, "--data", str(inputs["empty"])], capsys, "0 rows")
    assert not run.exists()


def test_commands_still_write_where_asked(inputs: dict[str, Path], tmp_path: Path) -> None:
    """The checks let ordinary outputs through: new parent folders, a replaced file."""
    out = tmp_path / "a" / "b" / "u.npy"
    assert main(["energy", "dw4", str(inputs["x"]), "-o", str(out)]) == 0
    assert main(["energy", "dw4", str(inputs["x"]), "-o", str(out)]) == 0
    assert np.load(out).shape == (6,)
    s = tmp_path / "c" / "s.h5"
    assert main(["sample", str(inputs["teacher"]), "-n", "4", "-o", str(s), "--no-energy"]) == 0
    assert s.is_file()
