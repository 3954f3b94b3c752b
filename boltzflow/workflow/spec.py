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
    holdout = "tail"               # or "segments" (md_seeded: whole MD segments held out)
    # ... or an existing file (relative to the workflow file): file = "x.npy", dataset,
    # reference_file (else the last n_reference rows of `file` are held out)

    [teacher]                      # a teacher config file (+ profile) and/or inline sections
    config = "configs/teacher_dw4.toml"
    profile = "smoke"
    [teacher.train]                # model, flow_matching, train, sample: override the file
    steps = 1000

    [students.f2d2]                # any number; method: a name of boltzflow.registry.METHODS
    config = "configs/student_f2d2_dw4.toml"   # (f2d2, falcon, nf, euler, ...; default: the
    [students.f2d2.train]          # student's name); the other keys are the fields of the
    steps = 500                    # method's config dataclass, over the config file's
    [students.small]               # an nf student: inline model, train, loss tables,
    method = "nf"                  # n_pairs, pair_settings (boltzflow.distill.nf_run.NFConfig)
    [students.old]                 # an already trained student, imported instead of trained:
    method = "falcon"              # `run` = its run folder (student.pt, else the EMA weights of
    run = "../runs/dw4_falcon"     # checkpoint.pt) or checkpoint file (see "Imported runs")

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
    reference_profile = "reference/aldp_umbrella_profile.json"   # molecules: F(φ), ΔF reference
    proposal_steps = 4             # default: the student's default_steps
    n_bootstrap = 200
    level = 0.95

    [benchmark]                    # boltzflow benchmark (+ n, n_val, n_check, baselines)
    steps = [1, 2, 4, 8]

    [smc]                          # latent SMC refinement of one student (optional stage)
    student = "f2d2"               # a student of [students]
    steps = 4                      # its steps K (default: its default_steps; not for one-pass)
    n = 10000                      # particles (default: sample.n)
    seed = 1                       # default: seed + 1, the sampling seed (same first draws)
    batch_size = 1024              # rows per differentiable pass through the student
    kernel = "mala"                # and adaptive_ess, n_temperatures, n_kernel_steps,
    adaptive_ess = 0.9             # step_size, n_leapfrog, resample_threshold
                                   # (boltzflow.sampling.latent.LatentSMCOptions)

    [profiles.gpu]                 # --profile gpu: tables merged over the base ones
    device = "cuda"

Imported runs: ``run = PATH`` in ``[teacher]`` or ``[students.<name>]`` (relative to the workflow
file, or absolute; also ``--set teacher.run=/abs/path``) names a trained run folder or checkpoint
file (a model file or a training checkpoint; in a folder ``teacher.pt``/``student.pt`` before
``checkpoint.pt``). That stage then copies the model into the output folder instead of training
it (a training checkpoint contributes its EMA weights), and its cache key is the file's content
fingerprint (:func:`boltzflow.workflow.cache.file_fingerprint`), not the training settings: a
changed file re-runs the import and, when the model changed, everything downstream; a model
copied bit for bit gives the downstream stages the keys they had in the run it came from.
:func:`load_workflow` checks that the path exists, holds a teacher (``teacher.run``) or a student
of the table's ``method`` (``students.X.run``), trained for the workflow's system. The config of
an imported model is still read: ``[teacher.sample]`` sets how the teacher is sampled and a
student's ``default_steps`` the report's default; its training settings are not used (an imported
student needs no teacher trajectories and does not wait for the teacher stage).

Every table is read into its dataclass below by the one validator
(:func:`boltzflow.io.tomlfile.dataclass_from_dict`): defaults are the dataclasses' field defaults,
value checks their ``__post_init__`` (with the words of :mod:`boltzflow.validate`). Unknown keys,
wrong types, unknown systems, missing files and invalid teacher/student configurations raise
``ValueError``/``TypeError``/``FileNotFoundError``/``KeyError`` naming the workflow file and the
offending key (and file), before anything is computed. :func:`check_data` also reads a data file
(shape, finite rows) for ``boltzflow run --check``.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from boltzflow.io.tomlfile import (
    apply_profile,
    check_keys,
    check_type,
    dataclass_from_dict,
    key_path,
    read_toml_file,
)
from boltzflow.validate import nonnegative_int, positive_int, probability
from boltzflow.workflow.checks import (
    apply_overrides,
    existing_file,
    located,
    merge,
    parse_assignment,
    parse_feature,
    parse_state,
)

if TYPE_CHECKING:
    from boltzflow.train.config import TeacherConfig

__all__ = [
    "BenchmarkSpec",
    "DataSpec",
    "EstimatesSpec",
    "MethodConfig",
    "ReportSpec",
    "SMCSpec",
    "SampleSpec",
    "StudentSpec",
    "TeacherSpec",
    "Workflow",
    "check_data",
    "imported_run",
    "load_workflow",
    "parse_assignment",
    "sample_label",
    "smc_label",
]

_TEACHER_SECTIONS = ("model", "flow_matching", "train", "sample")
#: ways to hold out generated reference data (:class:`DataSpec`)
HOLDOUTS = ("tail", "segments")
#: keys of a teacher or student table besides its config's fields
_SOURCE_KEYS = ("config", "profile", "run")
#: steps a student samples with when its config does not say (the Student default)
_DEFAULT_STEPS = 4


def _check_steps(steps: Any, where: str) -> None:
    if not steps:
        raise ValueError(f"{where} must be a non-empty list of positive integers, got []")
    for i, k in enumerate(steps):
        positive_int(k, f"{where}[{i}]")


# -- schema ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataSpec:
    """Where training and reference configurations come from.

    Attributes:
        file: an existing ``.npy``/HDF5 file of configurations, or None to generate.
        dataset: HDF5 dataset name inside ``file`` (default ``positions``).
        reference_file: held-out reference configurations (else the tail of ``file``).
        method: generator method (:func:`boltzflow.data.generate`) when generating.
        n_train: training configurations: how many to generate (required then), or the first
            rows of ``file`` (0: all but the reference rows).
        n_reference: held-out configurations for metrics (0: none).
        settings: generator settings (``burn_in``, ``n_chains``, ...).
        holdout: how generated data are split: ``"tail"`` (the last ``n_reference`` records:
            the ends of the MCMC chains) or ``"segments"`` (``method = "md_seeded"`` only:
            whole MD segments, spread over the basins the segments started in,
            round(n_seeds · n_reference / (n_train + n_reference)) of them, so about
            ``n_reference`` frames; frames within a segment are correlated, so a random or
            partial split would leak neighbours of held-out frames into training).
    """

    file: Path | None = None
    dataset: str | None = None
    reference_file: Path | None = None
    method: str = "auto"
    n_train: int = 0
    n_reference: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    holdout: str = "tail"

    def __post_init__(self) -> None:
        from boltzflow.data.generate import METHODS

        if self.method not in METHODS:
            raise ValueError(f"data.method: {self.method!r} is not one of {list(METHODS)}")
        nonnegative_int(self.n_reference, "data.n_reference")
        if self.holdout not in HOLDOUTS:
            raise ValueError(f"data.holdout: {self.holdout!r} is not one of {list(HOLDOUTS)}")
        if self.holdout == "segments" and self.method != "md_seeded":
            raise ValueError(
                "data.holdout = 'segments' holds out whole MD segments: it needs generated data "
                f"with method = 'md_seeded', not {'a file' if not self.generate else self.method!r}"
            )
        if self.generate:
            positive_int(self.n_train, "data.n_train")
            for key in ("dataset", "reference_file"):
                if getattr(self, key) is not None:
                    raise ValueError(f"data.{key}: only meaningful with `file`")
        else:
            nonnegative_int(self.n_train, "data.n_train")
            if self.settings or self.method != "auto":
                raise ValueError("data: `method`/`settings` are for generated data, not `file`")

    @property
    def generate(self) -> bool:
        return self.file is None

    def key(self) -> dict[str, Any]:
        """The JSON-able part that decides the data stage's output (file contents separately)."""
        out = dataclasses.asdict(self)
        for k in ("file", "reference_file"):
            out[k] = None if out[k] is None else str(out[k])
        if out["holdout"] == "tail":  # the default keeps the keys of runs made before it existed
            del out["holdout"]
        return out


@dataclass(frozen=True)
class TeacherSpec:
    """The teacher CNF run: a validated :class:`boltzflow.train.config.TeacherConfig`; ``run``
    the checkpoint file of an imported teacher (trained elsewhere, not trained here)."""

    config: TeacherConfig
    source: Path | None = None
    profile: str | None = None
    run: Path | None = None


class MethodConfig(Protocol):
    """A method's config: an instance of the dataclass its registry entry names
    (:attr:`boltzflow.models.method.Method.config`)."""

    __dataclass_fields__: ClassVar[dict[str, Any]]


@dataclass(frozen=True)
class StudentSpec:
    """One student: a method of :data:`boltzflow.registry.METHODS` and an instance of that
    method's config dataclass (``StudentConfig`` for f2d2/falcon, ``NFConfig`` for nf,
    ``EulerConfig`` for the Euler baselines, ...); ``run`` the checkpoint file of an imported
    student (trained elsewhere, not trained here)."""

    name: str
    method: str
    config: MethodConfig
    source: Path | None = None
    run: Path | None = None

    def __post_init__(self) -> None:
        from boltzflow.registry.methods import get_method

        cls = get_method(self.method).config
        if not isinstance(self.config, cls):
            raise TypeError(
                f"students.{self.name}: a {self.method!r} student needs a {cls.__name__}, got "
                f"{type(self.config).__name__}"
            )

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
        """Steps the student samples with by default (1 for a one-pass method): the config's
        ``student.default_steps`` or ``default_steps``, else the student models' default."""
        if not self.uses_steps:
            return 1
        options = getattr(self.config, "student", self.config)
        return int(getattr(options, "default_steps", _DEFAULT_STEPS))


@dataclass(frozen=True)
class SampleSpec:
    """Sampling sizes: ``n`` per model and step count; student ``steps``; the teacher too?"""

    n: int = 2000
    steps: tuple[int, ...] = (1, 2, 4)
    teacher: bool = True
    batch_size: int = 256  # student rows per batch (Student.batch_size: fastest on a CPU)
    teacher_batch_size: int | None = None

    def __post_init__(self) -> None:
        positive_int(self.n, "sample.n")
        _check_steps(self.steps, "sample.steps")
        positive_int(self.batch_size, "sample.batch_size")
        if self.teacher_batch_size is not None:
            positive_int(self.teacher_batch_size, "sample.teacher_batch_size")


@dataclass(frozen=True)
class EstimatesSpec:
    """What to estimate from every model's weighted samples (CIs by ``method``)."""

    log_z: bool = True
    observables: tuple[dict[str, Any], ...] = ()
    free_energies: tuple[dict[str, Any], ...] = ()
    method: str = "delta"

    def __post_init__(self) -> None:
        if self.method not in ("delta", "bootstrap", "both"):
            raise ValueError(
                f"estimates.method: {self.method!r} is not 'delta', 'bootstrap' or 'both'"
            )


@dataclass(frozen=True)
class ReportSpec:
    """The report: which model's samples are analysed in full and stored as ``samples.h5``.

    ``proposal`` None: the first student, else the teacher; ``proposal_steps`` None: that
    student's default steps (both resolved by :func:`load_workflow`). ``reference_profile``: a
    reference F(φ) with its ΔF for molecules (the JSON of ``workflows/aldp_umbrella.py``, read
    by :func:`boltzflow.analysis.free_energy.load_reference_profile`; in the file a path
    relative to the workflow file), drawn and compared with every model's reweighted samples.
    """

    proposal: str | None = None
    proposal_steps: int | None = None
    n_bootstrap: int = 200
    level: float = 0.95
    reference_profile: Path | None = None

    def __post_init__(self) -> None:
        if self.proposal_steps is not None:
            positive_int(self.proposal_steps, "report.proposal_steps")
        positive_int(self.n_bootstrap, "report.n_bootstrap")
        if probability(self.level, "report.level") == 1:
            raise ValueError(f"report.level must be a number in (0, 1), got {self.level!r}")


@dataclass(frozen=True)
class BenchmarkSpec:
    """``boltzflow benchmark``: steps, samples per row (None: ``sample.n``, resolved by
    :func:`load_workflow`), NLL points, log q check points, and whether to add the naive Euler
    baselines."""

    steps: tuple[int, ...] = (1, 2, 4, 8)
    n: int | None = None
    n_val: int = 1000
    n_check: int = 256
    baselines: bool = True

    def __post_init__(self) -> None:
        _check_steps(self.steps, "benchmark.steps")
        if self.n is not None:
            positive_int(self.n, "benchmark.n")
        positive_int(self.n_val, "benchmark.n_val")
        positive_int(self.n_check, "benchmark.n_check")


@dataclass(frozen=True)
class SMCSpec:
    """``[smc]``: SMC refinement of one student's samples in its latent space
    (:func:`boltzflow.sampling.latent.refine_latent`), stored as
    ``samples/<student>-K<steps>-smc.h5`` (:func:`smc_label`) and shown as a row of the report
    beside the plain samples.

    ``steps``, ``n`` and ``seed`` None are resolved by :func:`load_workflow` (the student's
    default steps, ``sample.n``, the sampling seed ``seed + 1``: with the same ``n`` the first
    particles are then the student's own samples of that step count). The other fields are
    those of :class:`~boltzflow.sampling.latent.LatentSMCOptions`, with its defaults.
    """

    student: str
    steps: int | None = None
    n: int | None = None
    seed: int | None = None
    batch_size: int = 1024
    kernel: str = "mala"
    adaptive_ess: float = 0.9
    n_temperatures: int = 0
    n_kernel_steps: int = 5
    step_size: float = 0.05
    n_leapfrog: int = 5
    resample_threshold: float = 0.8

    def __post_init__(self) -> None:
        from boltzflow.sampling.latent import check_latent_smc_options

        for key in ("steps", "n"):
            if getattr(self, key) is not None:
                positive_int(getattr(self, key), f"smc.{key}")
        if self.seed is not None:
            nonnegative_int(self.seed, "smc.seed")
        positive_int(self.batch_size, "smc.batch_size")
        check_latent_smc_options(self.options_dict(), "smc.")

    def options_dict(self) -> dict[str, Any]:
        """The :class:`~boltzflow.sampling.latent.LatentSMCOptions` fields."""
        from boltzflow.sampling.latent import LatentSMCOptions

        names = [f.name for f in dataclasses.fields(LatentSMCOptions)]
        return {k: getattr(self, k) for k in names}


@dataclass(frozen=True)
class Workflow:
    """A validated workflow (see the module docstring). ``output`` None: ``runs/<name>``."""

    name: str
    system: str
    data: DataSpec
    teacher: TeacherSpec
    description: str = ""
    system_options: dict[str, Any] = field(default_factory=dict)
    output: Path | None = None
    seed: int = 0
    threads: int = 1
    device: str | None = None
    students: dict[str, StudentSpec] = field(default_factory=dict)
    sample: SampleSpec = field(default_factory=SampleSpec)
    estimates: EstimatesSpec = field(default_factory=EstimatesSpec)
    report: ReportSpec = field(default_factory=ReportSpec)
    benchmark: BenchmarkSpec = field(default_factory=BenchmarkSpec)
    smc: SMCSpec | None = None
    path: Path | None = None
    profile: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        nonnegative_int(self.seed, "seed")
        nonnegative_int(self.threads, "threads")
        if self.device is not None and self.device.split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"device: expected 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.output is None:
            object.__setattr__(self, "output", Path("runs") / self.name)

    def open_system(self) -> Any:
        """Build the target system (``load_system(system, **system_options)``); close it after
        use (``with wf.open_system() as system: ...``)."""
        from boltzflow.systems import load_system

        return load_system(self.system, **self.system_options)

    @property
    def proposal_label(self) -> str:
        """Sample label of the report's proposal (``teacher``, ``<student>-K<steps>``, or the
        name of a one-pass nf student)."""
        return sample_label(str(self.report.proposal), self.report.proposal_steps)


def sample_label(model: str, steps: int | None) -> str:
    """File stem of a model's samples: ``<name>`` (teacher, nf) or ``<name>-K<steps>``."""
    return model if steps is None else f"{model}-K{steps}"


def smc_label(smc: SMCSpec) -> str:
    """File stem of the SMC samples: the student's :func:`sample_label` + ``-smc``."""
    return f"{sample_label(smc.student, smc.steps)}-smc"


# -- parsing --------------------------------------------------------------------------------------
#: keys of the workflow file itself: the TOML-facing fields of :class:`Workflow`
_TOP_KEYS = tuple(
    f.name for f in dataclasses.fields(Workflow) if f.name not in ("path", "profile", "raw")
)
#: top-level keys read as tables by their own parsers
_TABLES = ("data", "teacher", "students", "sample", "estimates", "report", "benchmark", "smc")


def _read_top(raw: dict[str, Any], wf: str) -> dict[str, Any]:
    """The workflow file's top-level keys, type-checked by :class:`Workflow`'s annotations;
    tables are checked to be tables (their parsers read them), absent keys left out."""
    check_keys(raw, wf, _TOP_KEYS)
    hints = typing.get_type_hints(Workflow)
    fields = {f.name: f for f in dataclasses.fields(Workflow)}
    out = {}
    for key in _TOP_KEYS:
        f = fields[key]
        if key not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{wf}: missing required key {key!r}")
            continue
        out[key] = check_type(raw[key], dict if key in _TABLES else hints[key], key_path(wf, key))
    return out


def _system_info(name: str, where: str) -> Any:
    from boltzflow.systems.registry import definition, system_info

    try:
        kind = definition(name)["kind"]
    except KeyError as err:
        raise KeyError(f"{where}: {err.args[0]}") from None
    return system_info(name), kind


def _parse_data(raw: Any, base: Path, wf: str) -> DataSpec:
    where = f"{wf}: data"
    keys = {f.name for f in dataclasses.fields(DataSpec)}
    check_keys(raw, where, {"generate", *keys})
    t = dict(raw)
    generate = check_type(t.pop("generate", None), bool | None, f"{where}.generate")
    has_file = "file" in t
    if generate is None:
        generate = not has_file
    if generate == has_file:
        raise ValueError(
            f"{where}: give either `file = PATH` (existing data) or `generate = true`, not "
            f"{'both' if has_file else 'neither'}"
        )
    if generate and "n_train" not in t:
        raise ValueError(f"{where}: missing required key 'n_train' (how much to generate)")
    for key in ("file", "reference_file"):
        if key in t and has_file:
            value = check_type(t[key], str, f"{where}.{key}")
            t[key] = existing_file(base, value, f"{where}.{key}")
    return located(wf, dataclass_from_dict, DataSpec, t, where)


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
    cls: type,
    system: str,
    device: str | None,
) -> tuple[dict[str, Any], str]:
    """A run config for dataclass ``cls``: the config file's tables (``data``, from ``source``)
    with the workflow table ``t``'s other keys, the device (``train.device``) and the system
    (where ``cls`` has those fields) over them; and the label that locates its errors.

    Raises:
        ValueError: the config file names another system than the workflow's.
    """
    file_system = data.pop("system", None)
    if file_system is not None and file_system != system:
        raise ValueError(
            f"{where}.config: {source} is a {what} config for system {file_system!r}, but the "
            f"workflow's system is {system!r}"
        )
    names = {f.name for f in dataclasses.fields(cls)}
    inline = {k: v for k, v in t.items() if k not in (*_SOURCE_KEYS, "method")}
    merged = merge(data, inline)
    if device is not None and "train" in names:
        merged = merge(merged, {"train": {"device": device}})
    if "system" in names:
        merged["system"] = system
    return merged, f"{where} (config {source})" if source else where


def _source_table(raw: Any, where: str, cls: type, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """A teacher/student table: ``config``, ``profile`` (strings) and ``extra`` keys, then the
    fields of ``cls`` but ``system`` (inline, checked when ``cls`` is built)."""
    names = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("system", *extra)]
    check_keys(raw, where, [*_SOURCE_KEYS, *extra, *names])
    for key in (*_SOURCE_KEYS, *extra):
        if key in raw:
            check_type(raw[key], str, f"{where}.{key}")
    return dict(raw)


def _parse_teacher(
    raw: Any, base: Path, where: str, system: str, device: str | None
) -> TeacherSpec:
    from boltzflow.train.config import TeacherConfig

    t = _source_table(raw, where, TeacherConfig)
    data, source = _config_source(t, base, where)
    merged, label = _merged_config(
        t, data, source, where, what="teacher", cls=TeacherConfig, system=system, device=device
    )
    cfg = located(label, TeacherConfig.from_dict, merged, where=label)
    run = None
    if "run" in t:
        run = imported_run(base, t["run"], f"{where}.run", system=system)
    return TeacherSpec(config=cfg, source=source, profile=t.get("profile"), run=run)


def _parse_student(
    name: str, raw: Any, base: Path, where: str, system: str, device: str | None
) -> StudentSpec:
    """A student of any registered method: its table is the method's config dataclass (the
    registry's :attr:`~boltzflow.models.method.Method.config`), over an optional config file
    and the method's :attr:`~boltzflow.models.method.Method.defaults`."""
    from boltzflow.registry.methods import METHODS

    if not isinstance(raw, dict):
        raise TypeError(f"{where}: expected a table, got {raw!r}")
    method = raw.get("method", name if name in METHODS else None)
    if method not in METHODS:
        raise ValueError(
            f"{where}.method: {method!r} is not one of {list(METHODS)} (give `method` "
            "when the student's name is not a method)"
        )
    entry = METHODS[method]
    t = _source_table(raw, where, entry.config, extra=("method",))
    data, source = _config_source(t, base, where)
    file_method = data.pop("method", method)
    if file_method != method:
        raise ValueError(f"{where}.config: {source} is a {file_method!r} config, not {method!r}")
    merged, label = _merged_config(
        t, data, source, where, what="student", cls=entry.config, system=system, device=device
    )
    merged = {**entry.defaults, **merged}
    if "method" in {f.name for f in dataclasses.fields(entry.config)}:
        merged["method"] = method
    cfg = located(label, dataclass_from_dict, entry.config, merged, label)
    run = None
    if "run" in t:
        run = imported_run(base, t["run"], f"{where}.run", system=system, method=method)
    return StudentSpec(name=name, method=method, config=cfg, source=source, run=run)


def imported_run(
    base: Path, value: str, where: str, *, system: str, method: str | None = None
) -> Path:
    """The checkpoint file of an imported run (module docstring, "Imported runs"), checked.

    Args:
        base: the workflow file's folder (``value`` relative to it unless absolute).
        value: a run folder or checkpoint file.
        where: the key, for errors (``"wf.toml: teacher.run"``).
        system: the workflow's system; the run must have been trained for it.
        method: a student's method (its model kind must match); None for the teacher.

    Returns:
        the model file or training checkpoint that the stage will import.

    Raises:
        FileNotFoundError: no such path, or a folder without a model or training checkpoint.
        ValueError: not a checkpoint, a checkpoint of another model or method, or a model
            trained for another system.
    """
    from boltzflow.io.checkpoint import load_model_checkpoint

    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.exists():
        raise FileNotFoundError(f"{where}: no such run folder or checkpoint: {path}")
    from boltzflow.train.trainer import CHECKPOINT_FILE

    if method is None:
        from boltzflow.flows.cnf import MODEL_FILE

        kind, files, label = "teacher_cnf", (MODEL_FILE, CHECKPOINT_FILE), "teacher"
    else:
        from boltzflow.distill.base import STUDENT_FILE

        kind, files, label = "student", (STUDENT_FILE, CHECKPOINT_FILE), f"{method} student"
    try:
        file, payload, _ = load_model_checkpoint(path, kind=kind, files=files, label=label)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{where}: {err}") from None
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if method is not None:
        from boltzflow.registry.methods import get_method

        wanted, found = get_method(method).model.student_kind, payload.get("student_kind")
        if found != wanted:
            raise ValueError(
                f"{where}: {file} holds a {found!r} student, but the table's method {method!r} "
                f"needs a {wanted!r} one"
            )
    run = payload.get("run_config") or payload.get("extra", {}).get("run") or {}
    trained_for = payload.get("system") or run.get("system")
    if trained_for is not None and trained_for != system:
        raise ValueError(
            f"{where}: {file} was trained for system {trained_for!r}, not the workflow's {system!r}"
        )
    return file


def _parse_estimates(raw: Any, wf: str, info: Any, kind: str) -> EstimatesSpec:
    where = f"{wf}: estimates"
    check_keys(raw, where, ("log_z", "observable", "free_energy", "method"))
    observables, names = [], set()
    for i, obs in enumerate(check_type(raw.get("observable", []), list, f"{where}.observable")):
        w = f"{where}.observable[{i}]"
        o = parse_feature(obs, w, info, kind, {"name"})
        o["name"] = check_type(o.get("name", f"observable {i}"), str, f"{w}.name")
        if o["name"] in names:
            raise ValueError(f"{w}.name: duplicate name {o['name']!r}")
        names.add(o["name"])
        observables.append(o)
    free, names = [], set()
    for i, fe in enumerate(check_type(raw.get("free_energy", []), list, f"{where}.free_energy")):
        w = f"{where}.free_energy[{i}]"
        check_keys(fe, w, ("name", "a", "b"))
        for key in ("a", "b"):
            if key not in fe:
                raise ValueError(f"{w}: missing required key {key!r}")
        f = {
            "name": check_type(fe.get("name", f"free energy {i}"), str, f"{w}.name"),
            "a": parse_state(fe["a"], f"{w}.a", info, kind),
        }
        if f["name"] in names:
            raise ValueError(f"{w}.name: duplicate name {f['name']!r}")
        names.add(f["name"])
        if isinstance(fe["b"], str):
            if fe["b"] != "complement":
                raise ValueError(f"{w}.b: a state or the string 'complement', got {fe['b']!r}")
            f["b"] = fe["b"]
        else:
            f["b"] = parse_state(fe["b"], f"{w}.b", info, kind)
        free.append(f)
    given = {k: raw[k] for k in ("log_z", "method") if k in raw}
    given.update(observables=tuple(observables), free_energies=tuple(free))
    return located(wf, dataclass_from_dict, EstimatesSpec, given, where)


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
        the :class:`Workflow`; nothing has been computed or written (data files are read by
        :func:`check_data`).

    Raises:
        FileNotFoundError: the workflow file, or a file it names (data, configs), is missing.
        ValueError / TypeError: unknown keys, wrong types or values (the message names the file
            and the key, e.g. ``quickstart.toml: teacher.train: unknown key 'stepz'``).
        KeyError: an unknown system (the message lists the known ones).
    """
    from boltzflow.systems.registry import valid_overrides

    path = Path(path)
    wf = path.name
    raw = apply_profile(read_toml_file(path, "workflow"), profile, wf)
    raw = apply_overrides(raw, overrides)
    top = _read_top(raw, wf)
    info, kind = _system_info(top["system"], f"{wf}: system")
    system = top["system"]
    valid = set(valid_overrides(system))
    for key in top.get("system_options", {}):
        if key not in valid:
            raise ValueError(
                f"{wf}: system_options: {system!r} has no parameter {key!r}; valid: {sorted(valid)}"
            )
    if output is not None:
        top["output"] = Path(output)
    scalars = {k: v for k, v in top.items() if k not in _TABLES}
    base = path.resolve().parent
    device = top.get("device")
    data = _parse_data(top["data"], base, wf)
    teacher = _parse_teacher(top["teacher"], base, f"{wf}: teacher", system, device)
    students = {}
    for name, s in top.get("students", {}).items():
        if not name.replace("_", "").replace("-", "").isalnum() or name == "teacher":
            raise ValueError(f"{wf}: students.{name}: use letters, digits, - and _ (not 'teacher')")
        students[name] = _parse_student(name, s, base, f"{wf}: students.{name}", system, device)
    sample = located(wf, dataclass_from_dict, SampleSpec, top.get("sample", {}), f"{wf}: sample")
    estimates = _parse_estimates(top.get("estimates", {}), wf, info, kind)
    report = _parse_report(top.get("report", {}), base, wf, kind)
    report = _resolve_report(report, f"{wf}: report", students, sample)
    benchmark = located(
        wf, dataclass_from_dict, BenchmarkSpec, top.get("benchmark", {}), f"{wf}: benchmark"
    )
    if benchmark.n is None:
        benchmark = dataclasses.replace(benchmark, n=sample.n)
    smc = None
    if "smc" in top:
        smc = located(wf, dataclass_from_dict, SMCSpec, top["smc"], f"{wf}: smc")
        smc = _resolve_smc(smc, f"{wf}: smc", students, sample, top.get("seed", 0))
    return located(
        wf,
        Workflow,
        data=data,
        teacher=teacher,
        students=students,
        sample=sample,
        estimates=estimates,
        report=report,
        benchmark=benchmark,
        smc=smc,
        path=path,
        profile=profile,
        raw=raw,
        **scalars,
    )


def _parse_report(raw: Any, base: Path, wf: str, kind: str) -> ReportSpec:
    """``[report]``; ``reference_profile`` must name a readable reference profile file, and
    only for a molecular system."""
    where = f"{wf}: report"
    t = dict(check_type(raw, dict, where))
    if "reference_profile" in t:
        key = f"{where}.reference_profile"
        path = existing_file(base, check_type(t["reference_profile"], str, key), key)
        if kind != "openmm":
            raise ValueError(f"{key}: a profile along φ needs a molecular system")
        from boltzflow.analysis.free_energy import load_reference_profile

        located(key, load_reference_profile, path)
        t["reference_profile"] = path
    return located(wf, dataclass_from_dict, ReportSpec, t, where)


def _resolve_report(
    rp: ReportSpec, where: str, students: dict[str, StudentSpec], sample: SampleSpec
) -> ReportSpec:
    """``rp`` with its proposal and steps resolved and checked against the students and the
    sampled step counts."""
    proposal = rp.proposal
    if proposal is None:
        proposal = next(iter(students), "teacher")
    if proposal == "teacher":
        if not sample.teacher:
            raise ValueError(f"{where}.proposal: 'teacher' needs sample.teacher = true")
        if rp.proposal_steps is not None:
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
            if rp.proposal_steps is not None:
                raise ValueError(
                    f"{where}.proposal_steps: not used for a one-pass {st.method!r} student"
                )
            steps = None
        else:
            steps = rp.proposal_steps or st.default_steps
            if steps not in sample.steps:
                raise ValueError(
                    f"{where}.proposal_steps: {steps} is not one of sample.steps "
                    f"{list(sample.steps)}"
                )
    return dataclasses.replace(rp, proposal=proposal, proposal_steps=steps)


def _resolve_smc(
    smc: SMCSpec, where: str, students: dict[str, StudentSpec], sample: SampleSpec, seed: int
) -> SMCSpec:
    """``smc`` with its steps, N and seed resolved (:class:`SMCSpec`) and its student and
    label checked against the students and their sample files."""
    if smc.student not in students:
        raise ValueError(
            f"{where}.student: {smc.student!r} is not a student of the workflow "
            f"({sorted(students) or 'none defined'})"
        )
    st = students[smc.student]
    if not st.uses_steps:
        if smc.steps is not None:
            raise ValueError(f"{where}.steps: not used for a one-pass {st.method!r} student")
        steps = None
    else:
        steps = smc.steps or st.default_steps
    smc = dataclasses.replace(
        smc,
        steps=steps,
        n=smc.n or sample.n,
        seed=seed + 1 if smc.seed is None else smc.seed,
    )
    label = smc_label(smc)
    for name, other in students.items():
        ks: list[int | None] = list(sample.steps) if other.uses_steps else [None]
        if label in {sample_label(name, k) for k in ks}:
            raise ValueError(
                f"{where}: its samples' name {label!r} is that of student {name!r}'s samples"
            )
    return smc


def check_data(wf: Workflow) -> dict[str, int]:
    """Read the workflow's data files as the data stage will (``boltzflow run --check``): the
    right number of columns for the system, finite rows, a complete file, and enough rows for
    ``data.n_reference``. Generated data has nothing to read.

    Returns:
        rows per file part (``{"file": N, "reference_file": M}``; empty when generating).

    Raises:
        ValueError (:class:`boltzflow.errors.InvalidFileError` for a damaged file): the message
            names the workflow file, the key and the data file.
    """
    from boltzflow.data import load_positions
    from boltzflow.errors import InvalidFileError

    spec, label = wf.data, (wf.path.name if wf.path is not None else "workflow")
    rows: dict[str, int] = {}
    for key, dataset in (("file", spec.dataset), ("reference_file", None)):
        file = getattr(spec, key)
        if file is None:
            continue
        try:
            rows[key] = len(load_positions(file, dataset, system=wf.system))
        except (ValueError, OSError) as err:  # OSError: what HDF5 says of a damaged file
            kind = (
                type(err) if isinstance(err, ValueError | FileNotFoundError) else InvalidFileError
            )
            msg = str(err) if str(file) in str(err) else f"{file}: {err}"
            raise kind(f"{label}: data.{key}: {msg}") from err
    if "file" in rows and spec.reference_file is None and spec.n_reference >= rows["file"]:
        raise ValueError(
            f"{label}: data.n_reference = {spec.n_reference} leaves no training rows in "
            f"{spec.file} ({rows['file']} rows)"
        )
    return rows
