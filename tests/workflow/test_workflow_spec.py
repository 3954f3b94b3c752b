"""Workflow files: the shipped ones validate (every profile); invalid ones fail before any work,
naming the file, the key and the missing file."""

from __future__ import annotations

from pathlib import Path

import pytest

from boltzflow.cli import main
from boltzflow.workflow.spec import load_workflow, parse_assignment

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = ROOT / "workflows"
SHIPPED = {
    "quickstart.toml": [None],
    "many_well_32.toml": [None, "smoke", "gpu"],
    "lj13.toml": [None, "smoke", "gpu"],
    "aldp.toml": [None, "smoke", "gpu"],
}


@pytest.mark.parametrize(
    ("name", "profile"), [(n, p) for n, ps in SHIPPED.items() for p in ps], ids=str
)
def test_shipped_workflows_validate(name, profile):
    wf = load_workflow(WORKFLOWS / name, profile=profile)
    assert wf.name == name.removesuffix(".toml")
    assert wf.teacher.config.system == wf.system
    assert set(wf.students) == {"f2d2", "falcon"}
    for st in wf.students.values():
        assert st.config.system == wf.system
    if profile == "gpu":
        assert wf.device == "cuda" and wf.teacher.config.train.device == "cuda"
        assert all(st.config.train.device == "cuda" for st in wf.students.values())
    assert wf.output == Path(f"runs/{wf.name}")


def test_quickstart_contents():
    wf = load_workflow(WORKFLOWS / "quickstart.toml")
    assert wf.system == "dw4" and wf.data.generate and wf.data.n_reference > 0
    assert wf.teacher.config.model.backbone == "egnn"
    assert wf.students["falcon"].config.student.signed is False
    assert wf.proposal_label == "f2d2-K4"
    (fe,) = wf.estimates.free_energies
    assert fe["a"] == [{"feature": "distance", "atoms": [0, 1], "max": 4.0}]
    assert fe["b"] == "complement"


def _write(tmp_path: Path, text: str, name: str = "wf.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


BASE = """
name = "t"
system = "dw4"
[data]
generate = true
n_train = 10
[teacher.train]
steps = 1
"""


def test_minimal_workflow_defaults(tmp_path):
    wf = load_workflow(_write(tmp_path, BASE))
    assert wf.report.proposal == "teacher" and wf.proposal_label == "teacher"
    assert wf.sample.n == 2000 and wf.sample.steps == (1, 2, 4)
    assert wf.teacher.config.train.steps == 1
    assert wf.output == Path("runs/t")
    wf = load_workflow(_write(tmp_path, BASE), output=tmp_path / "o", overrides={"seed": 7})
    assert wf.output == tmp_path / "o" and wf.seed == 7


@pytest.mark.parametrize(
    ("extra", "error", "pattern"),
    [
        ("bogus = 1", ValueError, r"wf.toml: unknown key 'bogus'"),
        ("[sample]\nn = 'many'", TypeError, r"wf.toml: sample.n: expected integer, got 'many'"),
        (
            "[sample]\nsteps = [1, 0]",
            ValueError,
            r"wf.toml: sample.steps\[1\] must be a positive integer, got 0",
        ),
        ("[sample]\nteacher = 1", TypeError, r"sample.teacher: expected boolean"),
        ("[teacher.model]\nhidden = 'wide'", TypeError, r"wf.toml: teacher.model.hidden"),
        (
            "[students.f2d2.train]\nstepz = 3",
            ValueError,
            r"students.f2d2.train: unknown key 'stepz'",
        ),
        ("[students.mine]\nx = 1", ValueError, r"students.mine.method: None is not one of"),
        ("[students.f2d2]\nbogus = 1", ValueError, r"students.f2d2: unknown key 'bogus'"),
        ("[report]\nproposal = 'nobody'", ValueError, r"report.proposal: 'nobody' is neither"),
        (
            "[students.f2d2]\n[report]\nproposal = 'f2d2'\nproposal_steps = 16",
            ValueError,
            r"report.proposal_steps: 16 is not one of sample.steps \[1, 2, 4\]",
        ),
        (
            "[[estimates.free_energy]]\na = {feature = 'distance', atoms = [0, 9], max = 1}\n"
            "b = 'complement'",
            ValueError,
            r"estimates.free_energy\[0\].a.atoms: expected 2 particle indices in \[0, 4\)",
        ),
        (
            "[[estimates.free_energy]]\na = {feature = 'phi', max = 1}\nb = 'complement'",
            ValueError,
            r"feature 'phi' needs a molecular",
        ),
        (
            "[[estimates.free_energy]]\na = {feature = 'energy'}\nb = 'complement'",
            ValueError,
            r"free_energy\[0\].a: a state condition needs `min` and/or `max`",
        ),
        ("[[estimates.observable]]\nfeature = 'volume'", ValueError, r"'volume' is not one of"),
        ("system_options = { radius = 2 }", ValueError, r"system_options: 'dw4' has no parameter"),
        ("device = 'tpu'", ValueError, r"wf.toml: device: expected 'cpu' or 'cuda"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 30 else None,
)
def test_invalid_keys_and_types_name_the_key(tmp_path, extra, error, pattern):
    # top-level keys go before the first table, tables after the base
    text = BASE + extra if extra.startswith("[") else extra + "\n" + BASE
    with pytest.raises(error, match=pattern):
        load_workflow(_write(tmp_path, text))


def test_missing_files_are_named(tmp_path):
    text = BASE.replace("generate = true\nn_train = 10", "file = 'nowhere.npy'")
    with pytest.raises(FileNotFoundError, match=r"data.file: file not found: .*nowhere.npy"):
        load_workflow(_write(tmp_path, text))
    text = BASE.replace("[teacher.train]", "[teacher]\nconfig = 't.toml'\n[teacher.train]")
    with pytest.raises(FileNotFoundError, match=r"teacher.config: file not found: .*t.toml"):
        load_workflow(_write(tmp_path, text))
    with pytest.raises(FileNotFoundError, match="workflow file not found"):
        load_workflow(tmp_path / "absent.toml")


def test_config_files_are_checked_against_the_system(tmp_path):
    text = BASE.replace(
        "[teacher.train]",
        f"[teacher]\nconfig = '{WORKFLOWS}/configs/teacher_lj13.toml'\n[teacher.train]",
    )
    with pytest.raises(ValueError, match=r"teacher config for system 'lj13'.*system is 'dw4'"):
        load_workflow(_write(tmp_path, text))
    text = BASE + f"[students.f2d2]\nconfig = '{WORKFLOWS}/configs/student_falcon_dw4.toml'\n"
    with pytest.raises(ValueError, match=r"is a 'falcon' config, not 'f2d2'"):
        load_workflow(_write(tmp_path, text))
    text = BASE.replace(
        "[teacher.train]",
        f"[teacher]\nconfig = '{WORKFLOWS}/configs/teacher_dw4.toml'\n"
        "profile = 'nope'\n[teacher.train]",
    )
    with pytest.raises(ValueError, match=r"teacher.config: .*no profile 'nope'"):
        load_workflow(_write(tmp_path, text))


def test_unknown_system_and_profile(tmp_path):
    with pytest.raises(
        KeyError, match=r"wf.toml: system: unknown system 'dw5'; known systems: .*dw4"
    ):
        load_workflow(_write(tmp_path, BASE.replace('"dw4"', '"dw5"')))
    with pytest.raises(ValueError, match=r"no profile 'gpu'; defined: \[\]"):
        load_workflow(_write(tmp_path, BASE), profile="gpu")


def test_data_source_rules(tmp_path):
    both = BASE.replace("generate = true", "generate = true\nfile = 'x.npy'")
    with pytest.raises(ValueError, match="not both"):
        load_workflow(_write(tmp_path, both))
    neither = BASE.replace("generate = true\nn_train = 10", "n_train = 10\ngenerate = false")
    with pytest.raises(ValueError, match="not neither"):
        load_workflow(_write(tmp_path, neither))
    (tmp_path / "x.npy").write_bytes(b"")
    with pytest.raises(ValueError, match="method`/`settings` are for generated data"):
        load_workflow(
            _write(
                tmp_path,
                BASE.replace("generate = true\nn_train = 10", "file = 'x.npy'\nmethod = 'md'"),
            )
        )
    with pytest.raises(ValueError, match=r"data.method: 'magic' is not one of"):
        load_workflow(
            _write(tmp_path, BASE.replace("generate = true", "generate = true\nmethod = 'magic'"))
        )


def test_parse_assignment():
    assert parse_assignment("data.n_train=100") == (["data", "n_train"], 100)
    assert parse_assignment("sample.steps=[1, 2]") == (["sample", "steps"], [1, 2])
    assert parse_assignment("device=cuda") == (["device"], "cuda")
    assert parse_assignment("report.level = 0.9") == (["report", "level"], 0.9)
    with pytest.raises(ValueError, match=r"KEY\.PATH=VALUE"):
        parse_assignment("novalue")


def test_cli_rejects_invalid_workflows_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    bad = _write(tmp_path, BASE + "[teacher.flow_matching]\ncoupling = 'magic'\n")
    assert main(["run", str(bad), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "coupling 'magic'" in err and "wf.toml" in err
    assert not out.exists()  # nothing was started
    assert main(["benchmark", "--workflow", str(bad), "-o", str(out)]) == 2
    assert (
        main(["run", str(WORKFLOWS / "quickstart.toml"), "--set", "sample.n=0", "-o", str(out)])
        == 2
    )
    assert "sample.n must be a positive integer, got 0" in capsys.readouterr().err
    assert not out.exists()
    assert main(["run", str(WORKFLOWS / "quickstart.toml"), "--check"]) == 0
    assert "valid workflow 'quickstart'" in capsys.readouterr().out


def test_overrides_are_not_aliased(tmp_path):
    train = {"steps": 3}
    overrides = {"teacher.train": train, "teacher.train.lr": 1e-3}
    wf = load_workflow(_write(tmp_path, BASE), overrides=overrides)
    assert wf.teacher.config.train.steps == 3 and wf.teacher.config.train.lr == 1e-3
    assert train == {"steps": 3}  # the caller's dict is untouched
