"""Workflow TOML files: schema as dataclasses, strict validation before any work starts.

A workflow names one system and everything the pipeline does with it::

    name = "quickstart"            # default output folder runs/<name>
    system = "dw4"                 # a name from boltzflow.systems.available()
    system_options = {}            # parameter overrides for load_system (e.g. n_workers)
    output = "runs/quickstart"     # relative to the current directory (CLI -o overrides)
    seed = 0                       # data generation, sampling (seed + 1) and bootstrap
    threads = 1                    # torch CPU threads while running (0: leave as is)
    device = "cpu"                 # training/sampling device (overrides train.device)

    [data]                         # either generate ...
    generate = true
    method = "auto"                # boltzflow.data.generate method
    n_train = 4000
    n_reference = 2000             # held out: energy W2, reference ΔF, NLL
    settings = { burn_in = 500 }   # generator settings
    # ... or an existing file (relative to the workflow file): file = "x.npy", dataset,
    # reference_file (else the last n_reference rows of `file` are held out)

    [teacher]                      # a teacher config file (+ profile) and/or inline sections
    config = "configs/teacher_dw4.toml"
    profile = "smoke"
    [teacher.train]                # model, flow_matching, train, sample: override the file
    steps = 1000

    [students.f2d2]                # any number; method = f2d2 | falcon | nf (default: the name)
    config = "configs/student_f2d2_dw4.toml"
    [students.f2d2.train]          # student, loss, trajectories, train: override the file
    steps = 500
    [students.small]               # an nf student: inline model, train, loss tables,
    method = "nf"                  # n_pairs, pair_settings (boltzflow.distill.nf_train)

    [sample]
    n = 2000                       # samples per model and step count
    steps = [1, 2, 4]              # student steps
    teacher = true                 # also sample the teacher (adaptive ODE, exact log q)

    [estimates]
    log_z = true
    method = "delta"               # intervals: "delta", "bootstrap" or "both"
    [[estimates.observable]]       # features of boltzflow.sampling.features
    name = "mean energy"
    feature = "energy"
    [[estimates.free_energy]]      # ΔF = F_A - F_B, states as in `boltzflow estimate`
    name = "d01 < 4"
    a = [{ feature = "distance", atoms = [0, 1], max = 4.0 }]
    b = "complement"

    [report]
    proposal = "f2d2"              # whose samples become samples.h5 and get the full analysis
    proposal_steps = 4             # default: the student's default_steps
    n_bootstrap = 200
    level = 0.95

    [benchmark]                    # boltzflow benchmark (+ n, n_val, n_check, baselines)
    steps = [1, 2, 4, 8]

    [profiles.gpu]                 # --profile gpu: tables merged over the base ones
    device = "cuda"

Every key is checked: unknown keys, wrong types, unknown systems, missing files and invalid
teacher/student configurations raise ``ValueError``/``TypeError``/``FileNotFoundError``/``KeyError``
naming the workflow file and the offending key (and file), before anything is computed.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from boltzflow.io.tomlfile import apply_profile, read_toml_file
from boltzflow.workflow.checks import (
    REQUIRED,
    apply_overrides,
    check_type,
    existing_file,
    int_list,
    located,
    merge,
    parse_assignment,
    parse_feature,
    parse_state,
    read_table,
    require_positive,
)

__all__ = [
    "STUDENT_METHODS",
    "BenchmarkSpec",
    "DataSpec",
    "EstimatesSpec",
    "ReportSpec",
    "SampleSpec",
    "StudentSpec",
    "TeacherSpec",
    "Workflow",
    "load_workflow",
    "parse_assignment",
    "sample_label",
]

#: Student methods a workflow can train.
STUDENT_METHODS = ("f2d2", "falcon", "nf")
_TEACHER_SECTIONS = ("model", "flow_matching", "train", "sample")
_DISTILL_SECTIONS = ("student", "loss", "trajectories", "train")
_NF_SECTIONS = ("model", "train", "loss")


# -- schema ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataSpec:
    """Where training and reference configurations come from.

    Attributes:
        file: an existing ``.npy``/HDF5 file of configurations, or None to generate.
        dataset: HDF5 dataset name inside ``file`` (default ``positions``).
        reference_file: held-out reference configurations (else the tail of ``file``).
        method: generator method (:func:`boltzflow.data.generate`) when generating.
        n_train: training configurations (generated, or the first rows of ``file``).
        n_reference: held-out configurations for metrics (0: none).
        settings: generator settings (``burn_in``, ``n_chains``, ...).
    """

    file: Path | None
    dataset: str | None
    reference_file: Path | None
    method: str
    n_train: int
    n_reference: int
    settings: dict[str, Any]

    @property
    def generate(self) -> bool:
        return self.file is None

    def key(self) -> dict[str, Any]:
        """The JSON-able part that decides the data stage's output (file contents separately)."""
        out = dataclasses.asdict(self)
        for k in ("file", "reference_file"):
            out[k] = None if out[k] is None else str(out[k])
        return out


@dataclass(frozen=True)
class TeacherSpec:
    """The teacher CNF run: a validated :class:`boltzflow.train.config.TeacherConfig`."""

    config: Any
    source: Path | None = None
    profile: str | None = None


@dataclass(frozen=True)
class StudentSpec:
    """One student: ``method`` f2d2/falcon (``config`` a StudentConfig) or nf (``config`` a dict
    of validated NF settings: ``model``, ``train``, ``loss`` dataclasses, ``n_pairs``,
    ``pair_settings``)."""

    name: str
    method: str
    config: Any
    source: Path | None = None

    def config_dict(self) -> dict[str, Any]:
        """JSON-able form of the configuration (for hashing and the run record)."""
        return dataclasses.asdict(self.config)

    @property
    def uses_steps(self) -> bool:
        """Whether the method samples in a chosen number of steps (the registry's word)."""
        from boltzflow.registry.methods import get_method

        return get_method(self.method).uses_steps

    @property
    def default_steps(self) -> int:
        """Steps the student samples with by default (1 for a one-pass method)."""
        return int(self.config.student.default_steps) if self.uses_steps else 1


@dataclass(frozen=True)
class SampleSpec:
    """Sampling sizes: ``n`` per model and step count; student ``steps``; the teacher too?"""

    n: int
    steps: tuple[int, ...]
    teacher: bool
    batch_size: int
    teacher_batch_size: int | None


@dataclass(frozen=True)
class EstimatesSpec:
    """What to estimate from every model's weighted samples (CIs by ``method``)."""

    log_z: bool
    observables: tuple[dict[str, Any], ...]
    free_energies: tuple[dict[str, Any], ...]
    method: str


@dataclass(frozen=True)
class ReportSpec:
    """The report: which model's samples are analysed in full and stored as ``samples.h5``."""

    proposal: str
    proposal_steps: int | None
    n_bootstrap: int
    level: float


@dataclass(frozen=True)
class BenchmarkSpec:
    """``boltzflow benchmark``: steps, samples per row, NLL points, log q check points, and
    whether to add the naive Euler baselines."""

    steps: tuple[int, ...]
    n: int
    n_val: int
    n_check: int
    baselines: bool


@dataclass(frozen=True)
class Workflow:
    """A validated workflow (see the module docstring)."""

    name: str
    description: str
    system: str
    system_options: dict[str, Any]
    output: Path
    seed: int
    threads: int
    device: str | None
    data: DataSpec
    teacher: TeacherSpec
    students: dict[str, StudentSpec]
    sample: SampleSpec
    estimates: EstimatesSpec
    report: ReportSpec
    benchmark: BenchmarkSpec
    path: Path | None = None
    profile: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def open_system(self) -> Any:
        """Build the target system (``load_system(system, **system_options)``); close it after
        use (``with wf.open_system() as system: ...``)."""
        from boltzflow.systems import load_system

        return load_system(self.system, **self.system_options)

    @property
    def proposal_label(self) -> str:
        """Sample label of the report's proposal (``teacher``, ``<student>-K<steps>``, or the
        name of a one-pass nf student)."""
        return sample_label(self.report.proposal, self.report.proposal_steps)


def sample_label(model: str, steps: int | None) -> str:
    """File stem of a model's samples: ``<name>`` (teacher, nf) or ``<name>-K<steps>``."""
    return model if steps is None else f"{model}-K{steps}"


# -- parsing --------------------------------------------------------------------------------------
_TOP = {
    "name": (str, REQUIRED),
    "description": (str, ""),
    "system": (str, REQUIRED),
    "system_options": (dict, {}),
    "output": (str, None),
    "seed": (int, 0),
    "threads": (int, 1),
    "device": (str, None),
    "data": (dict, REQUIRED),
    "teacher": (dict, REQUIRED),
    "students": (dict, {}),
    "sample": (dict, {}),
    "estimates": (dict, {}),
    "report": (dict, {}),
    "benchmark": (dict, {}),
}


def _system_info(name: str, where: str) -> Any:
    from boltzflow.systems.registry import definition, system_info

    try:
        kind = definition(name)["kind"]
    except KeyError as err:
        raise KeyError(f"{where}: {err.args[0]}") from None
    return system_info(name), kind


def _parse_data(raw: Any, base: Path, where: str) -> DataSpec:
    from boltzflow.data.generate import METHODS

    t = read_table(
        raw,
        where,
        {
            "generate": (bool, None),
            "file": (str, None),
            "dataset": (str, None),
            "reference_file": (str, None),
            "method": (str, "auto"),
            "n_train": (int, None),
            "n_reference": (int, 0),
            "settings": (dict, {}),
        },
    )
    has_file = t["file"] is not None
    if t["generate"] is None:
        t["generate"] = not has_file
    if t["generate"] == has_file:
        raise ValueError(
            f"{where}: give either `file = PATH` (existing data) or `generate = true`, not "
            f"{'both' if has_file else 'neither'}"
        )
    if t["method"] not in METHODS:
        raise ValueError(f"{where}.method: {t['method']!r} is not one of {list(METHODS)}")
    if not has_file:
        for key in ("dataset", "reference_file"):
            if t[key] is not None:
                raise ValueError(f"{where}.{key}: only meaningful with `file`")
        if t["n_train"] is None:
            raise ValueError(f"{where}: missing required key 'n_train' (how much to generate)")
    elif t["settings"] or t["method"] != "auto":
        raise ValueError(f"{where}: `method`/`settings` are for generated data, not `file`")
    if t["n_train"] is not None:
        require_positive(t["n_train"], f"{where}.n_train")
    require_positive(t["n_reference"], f"{where}.n_reference", allow_zero=True)
    file = existing_file(base, t["file"], f"{where}.file") if has_file else None
    ref = (
        existing_file(base, t["reference_file"], f"{where}.reference_file")
        if t["reference_file"]
        else None
    )
    return DataSpec(
        file=file,
        dataset=t["dataset"],
        reference_file=ref,
        method=t["method"],
        n_train=t["n_train"] or 0,
        n_reference=t["n_reference"],
        settings=dict(t["settings"]),
    )


def _config_source(t: dict[str, Any], base: Path, where: str) -> tuple[dict[str, Any], Path | None]:
    from boltzflow.train.config import read_toml

    if t.get("config") is None:
        if t.get("profile") is not None:
            raise ValueError(f"{where}.profile: needs `config` (a profile of which file?)")
        return {}, None
    path = existing_file(base, t["config"], f"{where}.config")
    try:
        return read_toml(path, t.get("profile")), path
    except ValueError as err:
        raise ValueError(f"{where}.config: {err}") from None


def _merged_config(
    t: dict[str, Any],
    data: dict[str, Any],
    source: Path | None,
    where: str,
    *,
    what: str,
    sections: tuple[str, ...],
    system: str,
    device: str | None,
) -> tuple[dict[str, Any], str]:
    """A run config: the config file's tables (``data``, from ``source``) with the workflow
    table ``t``'s inline sections and description, the device and the system over them; and the
    label that locates its errors.

    Raises:
        ValueError: the config file names another system than the workflow's.
    """
    file_system = data.pop("system", None)
    if file_system is not None and file_system != system:
        raise ValueError(
            f"{where}.config: {source} is a {what} config for system {file_system!r}, but the "
            f"workflow's system is {system!r}"
        )
    inline = {s: t[s] for s in sections if t[s] is not None}
    if t["description"] is not None:
        inline["description"] = t["description"]
    merged = merge(data, inline)
    if device is not None:
        merged = merge(merged, {"train": {"device": device}})
    merged["system"] = system
    return merged, f"{where} (config {source})" if source else where


def _parse_teacher(
    raw: Any, base: Path, where: str, system: str, device: str | None
) -> TeacherSpec:
    from boltzflow.train.config import TeacherConfig

    fields = {"config": (str, None), "profile": (str, None), "description": (str, None)}
    fields.update({s: (dict, None) for s in _TEACHER_SECTIONS})
    t = read_table(raw, where, fields)
    data, source = _config_source(t, base, where)
    merged, label = _merged_config(
        t,
        data,
        source,
        where,
        what="teacher",
        sections=_TEACHER_SECTIONS,
        system=system,
        device=device,
    )
    cfg = located(label, TeacherConfig.from_dict, merged, where=label)
    return TeacherSpec(config=cfg, source=source, profile=t["profile"])


def _parse_student(
    name: str, raw: Any, base: Path, where: str, system: str, device: str | None
) -> StudentSpec:
    if not isinstance(raw, dict):
        raise TypeError(f"{where}: expected a table, got {raw!r}")
    method = raw.get("method", name if name in STUDENT_METHODS else None)
    if method not in STUDENT_METHODS:
        raise ValueError(
            f"{where}.method: {method!r} is not one of {list(STUDENT_METHODS)} (give `method` "
            "when the student's name is not a method)"
        )
    sections = _NF_SECTIONS if method == "nf" else _DISTILL_SECTIONS
    fields: dict[str, tuple[Any, Any]] = {
        "method": (str, None),
        "config": (str, None),
        "profile": (str, None),
        "description": (str, None),
    }
    fields.update({s: (dict, None) for s in sections})
    if method == "nf":
        fields.update({"n_pairs": (int, 10_000), "pair_settings": (dict, {})})
    t = read_table(raw, where, fields)
    if method == "nf":
        return _parse_nf(name, t, where, device)
    from boltzflow.distill.train_students import StudentConfig
    from boltzflow.train.config import dataclass_from_dict

    data, source = _config_source(t, base, where)
    file_method = data.pop("method", method)
    if file_method != method:
        raise ValueError(f"{where}.config: {source} is a {file_method!r} config, not {method!r}")
    merged, label = _merged_config(
        t, data, source, where, what="student", sections=sections, system=system, device=device
    )
    merged["method"] = method
    cfg = located(label, dataclass_from_dict, StudentConfig, merged, where=label)
    return StudentSpec(name=name, method=method, config=cfg, source=source)


def _parse_nf(name: str, t: dict[str, Any], where: str, device: str | None) -> StudentSpec:
    from boltzflow.distill.nf import NFModelConfig
    from boltzflow.distill.nf_losses import NFLossConfig
    from boltzflow.distill.nf_run import NFConfig
    from boltzflow.distill.nf_train import default_train_config
    from boltzflow.train.config import TrainConfig, dataclass_from_dict

    if t["config"] is not None or t["profile"] is not None:
        raise ValueError(f"{where}: the nf student is configured inline (model, train, loss)")
    train = dataclasses.asdict(default_train_config())
    train.update(t["train"] or {})
    if device is not None:
        train["device"] = device
    require_positive(t["n_pairs"], f"{where}.n_pairs")
    config = NFConfig(
        model=located(
            where, dataclass_from_dict, NFModelConfig, t["model"] or {}, f"{where}.model"
        ),
        train=located(where, dataclass_from_dict, TrainConfig, train, f"{where}.train"),
        loss=None
        if t["loss"] is None
        else located(where, dataclass_from_dict, NFLossConfig, t["loss"], f"{where}.loss"),
        n_pairs=t["n_pairs"],
        pair_settings=dict(t["pair_settings"]),
    )
    return StudentSpec(name=name, method="nf", config=config)


def _parse_estimates(raw: Any, where: str, info: Any, kind: str) -> EstimatesSpec:
    t = read_table(
        raw,
        where,
        {
            "log_z": (bool, True),
            "observable": (list, []),
            "free_energy": (list, []),
            "method": (str, "delta"),
        },
    )
    if t["method"] not in ("delta", "bootstrap", "both"):
        raise ValueError(f"{where}.method: {t['method']!r} is not 'delta', 'bootstrap' or 'both'")
    observables, names = [], set()
    for i, obs in enumerate(t["observable"]):
        w = f"{where}.observable[{i}]"
        o = parse_feature(obs, w, info, kind, {"name"})
        o["name"] = check_type(o.get("name", f"observable {i}"), str, f"{w}.name")
        if o["name"] in names:
            raise ValueError(f"{w}.name: duplicate name {o['name']!r}")
        names.add(o["name"])
        observables.append(o)
    free, names = [], set()
    for i, fe in enumerate(t["free_energy"]):
        w = f"{where}.free_energy[{i}]"
        if not isinstance(fe, dict):
            raise TypeError(f"{w}: expected a table, got {fe!r}")
        f = read_table(
            fe,
            w,
            {
                "name": (str, f"free energy {i}"),
                "a": ((dict, list), REQUIRED),
                "b": ((dict, list, str), REQUIRED),
            },
        )
        if f["name"] in names:
            raise ValueError(f"{w}.name: duplicate name {f['name']!r}")
        names.add(f["name"])
        f["a"] = parse_state(f["a"], f"{w}.a", info, kind)
        if isinstance(f["b"], str):
            if f["b"] != "complement":
                raise ValueError(f"{w}.b: a state or the string 'complement', got {f['b']!r}")
        else:
            f["b"] = parse_state(f["b"], f"{w}.b", info, kind)
        free.append(f)
    return EstimatesSpec(
        log_z=t["log_z"],
        observables=tuple(observables),
        free_energies=tuple(free),
        method=t["method"],
    )


def load_workflow(
    path: str | os.PathLike[str],
    *,
    profile: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    output: str | os.PathLike[str] | None = None,
) -> Workflow:
    """Read and fully validate a workflow file.

    Args:
        path: the workflow TOML.
        profile: apply ``[profiles.<profile>]`` over the base tables.
        overrides: dotted keys (``{"data.n_train": 100}``) applied after the profile.
        output: output folder (overrides the file's ``output``).

    Returns:
        the :class:`Workflow`; nothing has been computed or written.

    Raises:
        FileNotFoundError: the workflow file, or a file it names (data, configs), is missing.
        ValueError / TypeError: unknown keys, wrong types or values (the message names the file
            and the key, e.g. ``quickstart.toml: teacher.train: unknown key 'stepz'``).
        KeyError: an unknown system (the message lists the known ones).
    """
    path = Path(path)
    wf = path.name
    raw = apply_profile(read_toml_file(path, "workflow"), profile, wf)
    raw = apply_overrides(raw, overrides)
    top = read_table(raw, wf, _TOP)
    info, kind = _system_info(top["system"], f"{wf}: system")
    system = top["system"]
    valid = {*info.parameters, "temperature"}
    for key in top["system_options"]:
        if key not in valid:
            raise ValueError(
                f"{wf}: system_options: {system!r} has no parameter {key!r}; valid: {sorted(valid)}"
            )
    base = path.resolve().parent
    require_positive(top["threads"], f"{wf}: threads", allow_zero=True)
    device = top["device"]
    if device is not None and device.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"{wf}: device: expected 'cpu' or 'cuda[:N]', got {device!r}")
    data = _parse_data(top["data"], base, f"{wf}: data")
    teacher = _parse_teacher(top["teacher"], base, f"{wf}: teacher", system, device)
    students = {}
    for name, s in top["students"].items():
        if not name.replace("_", "").replace("-", "").isalnum() or name == "teacher":
            raise ValueError(f"{wf}: students.{name}: use letters, digits, - and _ (not 'teacher')")
        students[name] = _parse_student(name, s, base, f"{wf}: students.{name}", system, device)
    st = read_table(
        top["sample"],
        f"{wf}: sample",
        {
            "n": (int, 2000),
            "steps": (list, [1, 2, 4]),
            "teacher": (bool, True),
            "batch_size": (int, 4096),
            "teacher_batch_size": (int, None),
        },
    )
    require_positive(st["n"], f"{wf}: sample.n")
    require_positive(st["batch_size"], f"{wf}: sample.batch_size")
    if st["teacher_batch_size"] is not None:
        require_positive(st["teacher_batch_size"], f"{wf}: sample.teacher_batch_size")
    sample = SampleSpec(
        n=st["n"],
        steps=tuple(int_list(st["steps"], f"{wf}: sample.steps")),
        teacher=st["teacher"],
        batch_size=st["batch_size"],
        teacher_batch_size=st["teacher_batch_size"],
    )
    estimates = _parse_estimates(top["estimates"], f"{wf}: estimates", info, kind)
    rp = read_table(
        top["report"],
        f"{wf}: report",
        {
            "proposal": (str, None),
            "proposal_steps": (int, None),
            "n_bootstrap": (int, 200),
            "level": (float, 0.95),
        },
    )
    report = _parse_report(rp, f"{wf}: report", students, sample)
    bm = read_table(
        top["benchmark"],
        f"{wf}: benchmark",
        {
            "steps": (list, [1, 2, 4, 8]),
            "n": (int, sample.n),
            "n_val": (int, 1000),
            "n_check": (int, 256),
            "baselines": (bool, True),
        },
    )
    for key in ("n", "n_val", "n_check"):
        require_positive(bm[key], f"{wf}: benchmark.{key}")
    benchmark = BenchmarkSpec(
        steps=tuple(int_list(bm["steps"], f"{wf}: benchmark.steps")),
        n=bm["n"],
        n_val=bm["n_val"],
        n_check=bm["n_check"],
        baselines=bm["baselines"],
    )
    out = Path(output) if output is not None else Path(top["output"] or f"runs/{top['name']}")
    return Workflow(
        name=top["name"],
        description=top["description"],
        system=system,
        system_options=dict(top["system_options"]),
        output=out,
        seed=top["seed"],
        threads=top["threads"],
        device=device,
        data=data,
        teacher=teacher,
        students=students,
        sample=sample,
        estimates=estimates,
        report=report,
        benchmark=benchmark,
        path=path,
        profile=profile,
        raw=raw,
    )


def _parse_report(
    rp: dict[str, Any], where: str, students: dict[str, StudentSpec], sample: SampleSpec
) -> ReportSpec:
    proposal = rp["proposal"]
    if proposal is None:
        proposal = next(iter(students), "teacher")
    if proposal == "teacher":
        if not sample.teacher:
            raise ValueError(f"{where}.proposal: 'teacher' needs sample.teacher = true")
        if rp["proposal_steps"] is not None:
            raise ValueError(f"{where}.proposal_steps: not used for the teacher")
        steps = None
    else:
        if proposal not in students:
            raise ValueError(
                f"{where}.proposal: {proposal!r} is neither 'teacher' nor a student "
                f"({sorted(students) or 'none defined'})"
            )
        st = students[proposal]
        if not st.uses_steps:  # one pass: no step count
            if rp["proposal_steps"] is not None:
                raise ValueError(f"{where}.proposal_steps: not used for an nf student")
            steps = None
        else:
            steps = rp["proposal_steps"] or st.default_steps
            if steps not in sample.steps:
                raise ValueError(
                    f"{where}.proposal_steps: {steps} is not one of sample.steps "
                    f"{list(sample.steps)}"
                )
    require_positive(rp["n_bootstrap"], f"{where}.n_bootstrap")
    if not 0 < rp["level"] < 1:
        raise ValueError(f"{where}.level: must lie in (0, 1), got {rp['level']}")
    return ReportSpec(
        proposal=proposal, proposal_steps=steps, n_bootstrap=rp["n_bootstrap"], level=rp["level"]
    )
