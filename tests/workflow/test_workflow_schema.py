"""The workflow schema: defaults and value checks live on the spec dataclasses (one source, the
shared words of boltzflow.validate), students of any registered method parse from their config
dataclass, and ``run --check`` reads the data files."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from boltzflow.cli import main
from boltzflow.distill.baselines import EulerConfig
from boltzflow.io.tomlfile import dataclass_from_dict
from boltzflow.models.method import Method
from boltzflow.registry.methods import METHODS
from boltzflow.train.config import TrainConfig, load_teacher_config
from boltzflow.validate import positive_int
from boltzflow.workflow.spec import (
    BenchmarkSpec,
    DataSpec,
    EstimatesSpec,
    ReportSpec,
    SampleSpec,
    StudentSpec,
    load_workflow,
)

BASE = """
name = "t"
system = "dw4"
[data]
generate = true
n_train = 10
[teacher.train]
steps = 1
"""


def _write(tmp_path: Path, text: str, name: str = "wf.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- defaults: one source ------------------------------------------------------------------------
def _defaults(cls: type) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def test_defaults_come_from_the_dataclasses(tmp_path):
    wf = load_workflow(_write(tmp_path, BASE))
    assert dataclasses.asdict(wf.sample) == _defaults(SampleSpec)
    assert dataclasses.asdict(wf.estimates) == _defaults(EstimatesSpec)
    bench = {**_defaults(BenchmarkSpec), "n": wf.sample.n}  # n: None means sample.n
    assert dataclasses.asdict(wf.benchmark) == bench
    report = _defaults(ReportSpec)
    assert (wf.report.n_bootstrap, wf.report.level) == (report["n_bootstrap"], report["level"])
    data = {**_defaults(DataSpec), "n_train": 10}
    assert dataclasses.asdict(wf.data) == data
    assert wf.seed == 0 and wf.threads == 1 and wf.device is None and wf.students == {}
    # the values the quickstart depends on (changing one changes its results)
    assert (wf.sample.n, wf.sample.steps, wf.sample.batch_size) == (2000, (1, 2, 4), 256)
    assert wf.benchmark.steps == (1, 2, 4, 8) and (wf.benchmark.n_val, wf.benchmark.n_check) == (
        1000,
        256,
    )


def test_nf_student_train_defaults_come_from_its_config(tmp_path):
    """A partial ``train`` table updates the method's own default (NF: 4,000 steps of 512), not
    TrainConfig's."""
    from boltzflow.distill.nf_run import NFConfig

    text = (
        BASE + "[students.small]\nmethod = 'nf'\nn_pairs = 64\n[students.small.train]\nlr = 2e-3\n"
    )
    st = load_workflow(_write(tmp_path, text)).students["small"]
    default = NFConfig().train
    assert isinstance(st.config, NFConfig) and st.config.n_pairs == 64
    assert st.config.train == dataclasses.replace(default, lr=2e-3)
    assert not st.uses_steps and st.default_steps == 1


# -- shared words for numeric fields ---------------------------------------------------------------
INTEGERS = [
    "sample.n",
    "sample.batch_size",
    "report.n_bootstrap",
    "benchmark.n",
    "benchmark.n_val",
    "benchmark.n_check",
    "data.n_train",
    "teacher.train.steps",
    "teacher.train.batch_size",
]


def _named(key: str) -> str:
    """How a message names ``key``: teacher config fields under the label ``teacher:``."""
    return key.replace("teacher.", "teacher: ", 1)


@pytest.mark.parametrize("key", INTEGERS)
@pytest.mark.parametrize("value", [0, -1])
def test_integer_fields_reject_zero_and_negative(tmp_path, key, value):
    with pytest.raises(
        ValueError, match=rf"wf.toml: {_named(key)} must be a positive integer, got {value}"
    ):
        load_workflow(_write(tmp_path, BASE), overrides={key: value})


@pytest.mark.parametrize("key", INTEGERS)
def test_integer_fields_reject_nan(tmp_path, key):
    with pytest.raises(TypeError, match=rf"wf.toml: {key}: expected integer, got nan"):
        load_workflow(_write(tmp_path, BASE), overrides={key: float("nan")})


@pytest.mark.parametrize(
    ("key", "words"),
    [
        ("teacher.train.lr", "a positive number"),
        ("teacher.model.scale", "a positive number"),
        ("teacher.train.ema_decay", r"a number in \[0, 1\)"),
        ("report.level", r"a number in \(0, 1\]"),
    ],
)
@pytest.mark.parametrize("value", [-1.0, float("nan")])
def test_float_fields_reject_negative_and_nan(tmp_path, key, words, value):
    with pytest.raises(ValueError, match=rf"wf.toml: {_named(key)} must be {words}, got {value}"):
        load_workflow(_write(tmp_path, BASE), overrides={key: value})


def test_zero_and_one_bounds(tmp_path):
    wf = _write(tmp_path, BASE)
    with pytest.raises(ValueError, match=r"teacher: train.lr must be a positive number, got 0.0"):
        load_workflow(wf, overrides={"teacher.train.lr": 0.0})
    with pytest.raises(ValueError, match=r"wf.toml: report.level must be a number in \(0, 1\)"):
        load_workflow(wf, overrides={"report.level": 1.0})
    with pytest.raises(ValueError, match=r"wf.toml: threads must be an integer >= 0, got -1"):
        load_workflow(wf, overrides={"threads": -1})
    assert load_workflow(wf, overrides={"threads": 0, "data.n_reference": 0}).threads == 0


def test_one_validator_for_configs_and_workflows(tmp_path):
    """A teacher config file and a workflow table give the same words for the same mistake."""
    config = _write(tmp_path, "[train]\nsteps = 'many'\n", "teacher.toml")
    with pytest.raises(TypeError, match=r"teacher.toml: train.steps: expected integer, got 'many'"):
        load_teacher_config(config)
    with pytest.raises(TypeError, match=r"wf.toml: teacher.train.steps: expected integer"):
        load_workflow(_write(tmp_path, BASE), overrides={"teacher.train.steps": "many"})
    with pytest.raises(ValueError, match=r"train: missing required key 'x'|unknown key 'x'"):
        dataclass_from_dict(TrainConfig, {"x": 1}, "train")


# -- students of any registered method -------------------------------------------------------------
def test_euler_baseline_students_parse_from_the_registry(tmp_path):
    text = BASE + (
        "[students.euler]\n[students.base]\nmethod = 'euler-exact'\n"
        "[report]\nproposal = 'base'\nproposal_steps = 2\n"
    )
    wf = load_workflow(_write(tmp_path, text))
    assert wf.students["euler"].config == EulerConfig(logdet="euler")  # the method's defaults
    assert wf.students["base"].config == EulerConfig(logdet="exact")
    assert wf.students["base"].uses_steps and wf.students["euler"].default_steps == 4
    assert wf.proposal_label == "base-K2"
    bad = BASE + "[students.euler]\nlogdet = 'magic'\n"
    with pytest.raises(ValueError, match=r"wf.toml: students.euler: unknown logdet 'magic'"):
        load_workflow(_write(tmp_path, bad))
    bad = BASE + "[students.euler]\n[students.euler.train]\nsteps = 3\n"
    with pytest.raises(ValueError, match=r"students.euler: unknown key 'train'"):
        load_workflow(_write(tmp_path, bad))


@dataclass
class ToyConfig:
    """A config dataclass of a method the spec has never heard of."""

    width: int = 3
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=7))

    def __post_init__(self) -> None:
        positive_int(self.width, "toy.width")


def _toy_method(**extra: object) -> Method:
    """A registry entry for :class:`ToyConfig` whose build and train must never be called."""

    def unused(*args, **kwargs):
        raise AssertionError("parsing or building the graph must not build or train")

    return Method(
        name="toy",
        model=object,
        config=ToyConfig,
        build=unused,
        train=unused,
        log_q_kind="exact",
        uses_steps=False,
        description="a test method",
        **extra,
    )


def test_a_newly_registered_method_is_parsed_without_a_spec_edit(tmp_path, monkeypatch):
    toy = _toy_method()
    monkeypatch.setitem(METHODS, "toy", toy)
    text = (
        "device = 'cuda'\n" + BASE + "[students.t]\nmethod = 'toy'\nwidth = 5\n"
        "[students.t.train]\nlr = 1e-3\n[report]\nproposal = 't'\n"
    )
    wf = load_workflow(_write(tmp_path, text))
    st = wf.students["t"]
    assert isinstance(st, StudentSpec) and isinstance(st.config, ToyConfig)
    assert st.config.width == 5
    assert st.config.train == TrainConfig(steps=7, lr=1e-3, device="cuda")
    assert wf.proposal_label == "t"  # one pass: no step count
    with pytest.raises(ValueError, match=r"wf.toml: students.t: toy.width must be a positive"):
        load_workflow(_write(tmp_path, text.replace("width = 5", "width = 0")))
    with pytest.raises(ValueError, match=r"students.t: unknown key 'height'"):
        load_workflow(_write(tmp_path, text.replace("width = 5", "height = 5")))
    monkeypatch.delitem(METHODS, "toy")
    with pytest.raises(ValueError, match=r"students.t.method: 'toy' is not one of"):
        load_workflow(_write(tmp_path, text))


def test_a_method_without_a_teacher_trains_on_the_data_alone(tmp_path, monkeypatch):
    """``uses_teacher = False`` / ``reads_data``: the student stage waits for the data, not the
    teacher; the shipped such method is nf_internal, whose table is an ICNFRunConfig."""
    from boltzflow.distill.nf_internal_train import ICNFRunConfig
    from boltzflow.workflow.stages import build_stages

    toy = _toy_method(uses_teacher=False, reads_data=lambda cfg: cfg.width > 4)
    monkeypatch.setitem(METHODS, "toy", toy)
    text = BASE + "[students.t]\nmethod = 'toy'\nwidth = 5\n"
    deps = {s.name: s.deps for s in build_stages(load_workflow(_write(tmp_path, text)))}
    assert deps["student-t"] == ("data",)
    text = text.replace("width = 5", "width = 3")
    deps = {s.name: s.deps for s in build_stages(load_workflow(_write(tmp_path, text)))}
    assert deps["student-t"] == ()
    nf = METHODS["nf_internal"]
    assert not nf.uses_teacher and nf.reads_data(nf.new_config())
    text = BASE.replace('"dw4"', '"aldp"') + (
        "[students.nf]\nmethod = 'nf_internal'\n[students.nf.train]\nsteps = 3\n"
        "[students.nf.validation]\npatience = 1\n"
    )
    wf = load_workflow(_write(tmp_path, text))
    st = wf.students["nf"]
    assert isinstance(st.config, ICNFRunConfig) and st.config.system == "aldp"
    assert st.config.train.steps == 3 and st.config.validation.patience == 1
    assert not st.uses_steps and wf.proposal_label == "nf"
    deps = {s.name: s.deps for s in build_stages(wf)}
    assert deps["student-nf"] == ("data",) and "teacher" not in deps["sample-nf"]


def test_distill_does_not_offer_a_method_that_needs_no_teacher(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["distill", str(tmp_path), "--method", "nf_internal", "-o", str(tmp_path / "s")])
    assert err.value.code == 2
    assert "invalid choice: 'nf_internal'" in capsys.readouterr().err


def test_segment_holdout_needs_seeded_md(tmp_path):
    base = BASE.replace('"dw4"', '"aldp"')
    text = base.replace("n_train = 10", "n_train = 10\nmethod = 'md_seeded'\nholdout = 'segments'")
    assert load_workflow(_write(tmp_path, text)).data.holdout == "segments"
    with pytest.raises(ValueError, match=r"data.holdout = 'segments'.*not 'md'"):
        load_workflow(_write(tmp_path, text.replace("'md_seeded'", "'md'")))
    with pytest.raises(ValueError, match=r"data.holdout: 'middle' is not one of"):
        load_workflow(_write(tmp_path, text.replace("'segments'", "'middle'")))
    # the default split leaves the data stage's key as it was before the option existed
    assert "holdout" not in load_workflow(_write(tmp_path, base)).data.key()


def test_report_reference_profile_is_a_checked_file_beside_the_workflow(tmp_path):
    shipped = Path(__file__).resolve().parents[2] / "workflows/reference/aldp_umbrella_profile.json"
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "p.json").write_text(shipped.read_text())
    base = BASE.replace('"dw4"', '"aldp"') + "[report]\nreference_profile = 'ref/p.json'\n"
    wf = load_workflow(_write(tmp_path, base))
    assert wf.report.reference_profile == tmp_path / "ref" / "p.json"
    with pytest.raises(FileNotFoundError, match=r"report.reference_profile: file not found"):
        load_workflow(_write(tmp_path, base.replace("p.json", "q.json")))
    (tmp_path / "ref" / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match=r"report.reference_profile: .*bad.json: not a reference"):
        load_workflow(_write(tmp_path, base.replace("p.json", "bad.json")))
    with pytest.raises(ValueError, match=r"reference_profile: a profile along φ needs a molec"):
        load_workflow(_write(tmp_path, base.replace('"aldp"', '"dw4"')))


def test_student_config_must_be_the_methods_dataclass():
    with pytest.raises(TypeError, match=r"students.x: a 'f2d2' student needs a StudentConfig"):
        StudentSpec(name="x", method="f2d2", config=EulerConfig())


# -- run --check reads the data --------------------------------------------------------------------
def _file_workflow(tmp_path: Path, x: np.ndarray | None = None) -> Path:
    if x is not None:
        np.save(tmp_path / "x.npy", x)
    text = BASE.replace("generate = true\nn_train = 10", "file = 'x.npy'\nn_reference = 4")
    return _write(tmp_path, text)


def test_check_accepts_good_data(tmp_path, capsys):
    rng = np.random.default_rng(0)
    wf = _file_workflow(tmp_path, rng.normal(size=(20, 8)))
    assert main(["run", str(wf), "--check"]) == 0
    assert "valid workflow 't'" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        ("shape", r"wf.toml: data.file: .*x.npy.*8"),
        ("nan", r"wf.toml: data.file: .*x.npy: 2 of 20 rows contain NaN or inf"),
        ("truncated", r"wf.toml: data.file: .*x.npy"),
        ("too few rows", r"wf.toml: data.n_reference = 4 leaves no training rows in .*x.npy"),
    ],
)
@pytest.mark.parametrize("command", ["run", "benchmark"])
def test_check_rejects_bad_data(tmp_path, capsys, case, pattern, command):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 8))
    if case == "shape":
        x = x[:, :6]
    elif case == "nan":
        x[3, 1], x[7, 0] = np.nan, np.inf
    elif case == "too few rows":
        x = x[:4]
    wf = _file_workflow(tmp_path, x)
    if case == "truncated":
        path = tmp_path / "x.npy"
        path.write_bytes(path.read_bytes()[:-100])
    args = [command, str(wf)] if command == "run" else [command, "--workflow", str(wf)]
    assert main([*args, "--check"]) == 2
    captured = capsys.readouterr()
    assert "valid workflow" not in captured.out
    err = captured.err.strip()
    assert err.count("\n") == 0, err
    assert re.search(pattern, err), err
