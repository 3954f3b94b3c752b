"""Imported runs (``run = PATH`` in ``[teacher]`` / ``[students.X]``): a workflow evaluates
models trained elsewhere without training them, keyed by the imported file's content, and a
wrong path or model fails before any work, naming the key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from quickstart_tiny import TINY, set_args

from boltzflow.cli import main
from boltzflow.io.samples import read_samples
from boltzflow.workflow import load_workflow, run_workflow
from boltzflow.workflow.cache import MANIFEST_FILE
from boltzflow.workflow.stages import build_stages

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "workflows" / "quickstart.toml"


def _run(out: Path, **overrides):
    wf = load_workflow(QUICKSTART, overrides={**TINY, **overrides}, output=out)
    return run_workflow(wf, progress=False, log=lambda msg: None)


def _keys(out: Path) -> dict[str, str]:
    stages = json.loads((out / MANIFEST_FILE).read_text())["stages"]
    return {name: rec["key"] for name, rec in stages.items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny quickstart, trained and reported once (the runs the tests import)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    _run(out)
    return out


def test_imported_models_leave_every_downstream_key_unchanged(trained, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(trained, out)
    overrides = {
        "teacher.run": str(trained / "teacher"),  # a run folder: its teacher.pt
        "students.f2d2.run": str(trained / "students/f2d2/student.pt"),  # a model file
    }
    run = _run(out, **overrides)
    # only the two import stages run: they copy the same bytes, so every stage that reads them
    # (trajectories, falcon, samples, report) has the key it had where they were trained
    assert run.ran == ["teacher", "student-f2d2"]
    before, after = _keys(trained), _keys(out)
    assert set(before) == set(after)
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {"teacher", "student-f2d2"}
    for rel in ("teacher/teacher.pt", "students/f2d2/student.pt"):
        assert (out / rel).read_bytes() == (trained / rel).read_bytes(), rel
    summary = {r.name: r.summary for r in run.results}
    assert summary["teacher"]["imported"] == str(trained / "teacher/teacher.pt")
    assert summary["teacher"]["steps"] == 6  # from the run folder's training log
    assert summary["student-f2d2"]["method"] == "f2d2"
    assert "imported from" in summary["student-f2d2"]["note"]
    # an imported student waits for no teacher and needs no trajectories
    wf = load_workflow(QUICKSTART, overrides={**TINY, **overrides}, output=out)
    deps = {s.name: s.deps for s in build_stages(wf)}
    assert deps["teacher"] == () and deps["student-f2d2"] == ()
    assert any(d.startswith("trajectories") for d in deps["student-falcon"])


def test_a_changed_import_reruns_what_depends_on_it(trained, tmp_path, capsys):
    """A training checkpoint is imported by its EMA weights: another file (so the teacher's
    dependents run again) holding the same weights (so they reproduce the same students)."""
    out = tmp_path / "copy"
    shutil.copytree(trained, out)
    args = ["run", str(QUICKSTART), "-o", str(out), "--no-progress", *set_args(TINY)]
    args += ["--set", f"teacher.run={trained / 'teacher/checkpoint.pt'}"]  # a bare path
    assert main(args) == 0
    capsys.readouterr()
    manifest = json.loads((out / MANIFEST_FILE).read_text())["stages"]
    teacher = manifest["teacher"]["summary"]
    assert teacher["imported_kind"] == "training" and teacher["steps"] == 6
    assert "unfinished" not in teacher
    ran = {name for name in manifest if _keys(out)[name] != _keys(trained)[name]}
    assert {"teacher", "student-f2d2", "student-falcon", "sample-teacher"} <= ran
    for label in ("teacher", "f2d2-K1", "falcon-K2"):
        a = read_samples(trained / f"samples/{label}.h5")
        b = read_samples(out / f"samples/{label}.h5")
        np.testing.assert_array_equal(a.x, b.x, err_msg=label)
        np.testing.assert_array_equal(a.log_q, b.log_q, err_msg=label)


def _workflow(tmp_path: Path, table: str) -> Path:
    """A minimal workflow file with ``table`` (a teacher table replaces the default one)."""
    teacher = "" if table.startswith("[teacher]") else "[teacher.train]\nsteps = 1\n"
    path = tmp_path / "wf.toml"
    path.write_text(
        f'name = "t"\nsystem = "dw4"\n[data]\ngenerate = true\nn_train = 10\n{teacher}{table}\n'
    )
    return path


def test_run_paths_are_relative_to_the_workflow_file(trained, tmp_path):
    shutil.copytree(trained / "teacher", tmp_path / "runs/teacher")
    wf = load_workflow(_workflow(tmp_path, '[teacher]\nrun = "runs/teacher"'))
    assert wf.teacher.run == tmp_path / "runs/teacher/teacher.pt"


@pytest.mark.parametrize(
    ("table", "error", "message"),
    [
        (
            '[teacher]\nrun = "nowhere"',
            FileNotFoundError,
            r"wf.toml: teacher.run: no such run folder or checkpoint: .*nowhere",
        ),
        (
            '[teacher]\nrun = "{trained}/data"',
            FileNotFoundError,
            r"wf.toml: teacher.run: .*/data: no teacher.pt or checkpoint.pt in the folder",
        ),
        (
            '[teacher]\nrun = "{trained}/students/f2d2/student.pt"',
            ValueError,
            r"wf.toml: teacher.run: .*student.pt: checkpoint kind 'student'",
        ),
        (
            '[teacher]\nrun = "{trained}/students/f2d2"',
            ValueError,
            r"wf.toml: teacher.run: .*checkpoint.pt: training checkpoint of a 'student' model, "
            "not a teacher",
        ),
        (
            '[students.falcon]\nrun = "{trained}/students/f2d2"',
            ValueError,
            r"wf.toml: students.falcon.run: .*student.pt holds a 'f2d2' student, but the "
            r"table's method 'falcon' needs a 'falcon' one",
        ),
        (
            '[students.f2d2]\nrun = "{trained}/students/gone"',
            FileNotFoundError,
            r"wf.toml: students.f2d2.run: no such run folder or checkpoint: .*students/gone",
        ),
    ],
    ids=[
        "missing",
        "empty folder",
        "not a teacher",
        "not a teacher run",
        "other method",
        "missing student",
    ],
)
def test_a_bad_run_fails_at_load_time_naming_the_key(trained, tmp_path, table, error, message):
    with pytest.raises(error, match=message):
        load_workflow(_workflow(tmp_path, table.format(trained=trained)))


def test_a_run_of_another_system_is_refused(trained, tmp_path):
    path = _workflow(tmp_path, f'[teacher]\nrun = "{trained}/teacher"')
    path.write_text(path.read_text().replace('"dw4"', '"lj13"'))
    with pytest.raises(ValueError, match=r"teacher.run: .* trained for system 'dw4', not .*'lj13'"):
        load_workflow(path)
