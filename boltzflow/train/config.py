"""TOML run configurations as dataclasses; unknown keys raise and name the key.

A config file has sections that map onto dataclasses (``[model]``, ``[flow_matching]``,
``[train]``, ``[sample]`` for a teacher) and optional profiles that override them, e.g.
``[profiles.smoke.train]`` for a tiny CPU run and ``[profiles.gpu.train]`` for the full one:

    cfg = load_teacher_config("workflows/configs/teacher_dw4.toml", profile="smoke")

:class:`TrainConfig` and :func:`dataclass_from_dict` are shared with the student trainers.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from boltzflow.flows.cnf import REPRESENTATIONS
from boltzflow.flows.flow_matching import COUPLINGS
from boltzflow.flows.ode import ADAPTIVE_METHODS, DIVERGENCES, FIXED_METHODS, TRACE_MODES
from boltzflow.io.tomlfile import apply_profile, check_keys, read_toml_file
from boltzflow.nn import BACKBONES

__all__ = [
    "FlowMatchingConfig",
    "ModelConfig",
    "SampleConfig",
    "TeacherConfig",
    "TrainConfig",
    "dataclass_from_dict",
    "load_teacher_config",
    "read_toml",
]

T = TypeVar("T")


@dataclass
class TrainConfig:
    """Optimisation loop settings shared by teachers and students.

    AdamW (Loshchilov & Hutter 2019) with linear warm-up over ``warmup_steps`` then cosine decay
    to ``lr * min_lr_ratio`` at ``steps``; gradients clipped to norm ``grad_clip`` (0 disables);
    EMA of the weights with decay ``ema_decay``. ``data_workers``: background processes that
    build minibatches ahead (losses whose batches depend on the step alone, e.g. the teacher's
    OT couplings); it changes the speed, never the result. ``compile``: run the loss of such
    batches through ``torch.compile`` (inductor; needs a C++ compiler on CPU): about 1.4x faster
    forward and backward passes for the small DW4 EGNN on one CPU thread, at the price of a
    compilation of tens of seconds (up to a minute with a cold cache) and float rounding that
    differs from the eager run.
    """

    steps: int = 10_000
    batch_size: int = 256
    lr: float = 5e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 200
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 100
    checkpoint_every: int = 1000
    device: str = "cpu"
    data_workers: int = 0
    compile: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.data_workers < 0:
            raise ValueError(f"train.data_workers must be >= 0, got {self.data_workers}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be positive, got {self.lr}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("train.warmup_steps/grad_clip must be >= 0, min_lr_ratio in [0, 1]")
        if len(self.betas) != 2:
            raise ValueError(f"train.betas must have two entries, got {self.betas}")

    def set_given(self, **values: Any) -> None:
        """Set the fields given a value, skipping ``None`` (command-line options left unset).

        Raises:
            TypeError: a name that is not a field.
            ValueError: a value the configuration refuses (checked as in the constructor).
        """
        names = {f.name for f in dataclasses.fields(self)}
        for name, value in values.items():
            if name not in names:
                raise TypeError(f"TrainConfig has no field {name!r}")
            if value is not None:
                setattr(self, name, value)
        self.__post_init__()  # the same checks as a config file: steps = 0 never trains


_BACKBONE_KEYS = {
    "egnn": {"hidden", "layers", "distinct_particles", "attention", "coords_range"},
    "transformer": {"hidden", "layers", "heads", "distinct_particles"},
    "mlp": {"hidden", "layers"},
}


@dataclass
class ModelConfig:
    """Velocity backbone. ``heads`` is for the transformer; ``attention``/``coords_range`` for
    the EGNN; ``distinct_particles`` (per-atom embedding) for both particle backbones. ``scale``:
    the flow works on ``x / scale`` (see :class:`boltzflow.flows.cnf.TeacherCNF`).

    ``representation``: ``"cartesian"`` (default) or ``"internal"``: the flow lives on the
    internal coordinates of a molecule (bonds, angles, periodic dihedrals; dim 3n - 6) with an
    :class:`~boltzflow.systems.internal_coords.InternalCoordinates` transform fitted to the
    training data, a normal x uniform-angle prior and a periodic MLP (``backbone = "mlp"``,
    ``scale = 1``); samples and log q are still Cartesian (DESIGN.md density convention)."""

    backbone: str = "egnn"
    scale: float = 1.0
    representation: str = "cartesian"
    hidden: int = 64
    layers: int = 3
    heads: int = 4
    distinct_particles: bool = False
    attention: bool = True
    coords_range: float = 15.0

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"model.backbone {self.backbone!r} is not one of {sorted(BACKBONES)}")
        if not self.scale > 0:
            raise ValueError(f"model.scale must be positive, got {self.scale}")
        if self.representation not in REPRESENTATIONS:
            raise ValueError(
                f"model.representation {self.representation!r} is not one of {REPRESENTATIONS}"
            )
        if self.representation == "internal" and (self.backbone != "mlp" or self.scale != 1.0):
            raise ValueError(
                "model.representation 'internal' needs backbone = 'mlp' and scale = 1 "
                f"(got {self.backbone!r}, {self.scale})"
            )

    def backbone_options(self) -> dict[str, Any]:
        """The constructor keywords this backbone takes."""
        return {k: getattr(self, k) for k in sorted(_BACKBONE_KEYS[self.backbone])}


@dataclass
class FlowMatchingConfig:
    """Flow-matching objective: coupling (``independent``, ``ot``, ``equivariant_ot``), noise
    ``sigma``, whether alignment uses particle ``permutations`` (False for molecules) and
    ``reflections``, and random-rotation augmentation (None: on iff the backbone is not
    equivariant and the system has particles)."""

    coupling: str = "equivariant_ot"
    sigma: float = 0.0
    permutations: bool = True
    reflections: bool = False
    augment_rotations: bool | None = None

    def __post_init__(self) -> None:
        if self.coupling not in COUPLINGS:
            raise ValueError(f"flow_matching.coupling {self.coupling!r} is not one of {COUPLINGS}")
        if self.sigma < 0:
            raise ValueError(f"flow_matching.sigma must be >= 0, got {self.sigma}")


@dataclass
class SampleConfig:
    """ODE settings for sampling and likelihoods (see :func:`boltzflow.flows.ode.integrate`)."""

    method: str = "dopri5"
    atol: float = 1e-5
    rtol: float = 1e-5
    steps: int | None = None
    divergence: str = "exact"
    trace_mode: str = "vjp"
    quadrature_points: int = 12
    batch_size: int = 1000

    def __post_init__(self) -> None:
        methods = ADAPTIVE_METHODS + FIXED_METHODS
        if self.method not in methods:
            raise ValueError(f"sample.method {self.method!r} is not one of {list(methods)}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"sample.divergence {self.divergence!r} is not one of {DIVERGENCES}")
        if self.trace_mode not in TRACE_MODES:
            raise ValueError(f"sample.trace_mode {self.trace_mode!r} is not one of {TRACE_MODES}")
        if self.method in FIXED_METHODS and self.steps is None:
            raise ValueError(f"sample.method {self.method!r} needs sample.steps")
        if self.method in ADAPTIVE_METHODS and self.steps is not None:
            raise ValueError(f"sample.steps is for fixed-step methods, not {self.method!r}")


@dataclass
class TeacherConfig:
    """A teacher run: system name, model, objective, training loop and sampler."""

    system: str | None = None
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    flow_matching: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        if self.model.representation == "internal" and (
            self.flow_matching.coupling == "equivariant_ot" or self.flow_matching.augment_rotations
        ):
            raise ValueError(
                "model.representation 'internal' takes flow_matching.coupling 'independent' or "
                "'ot' and no augment_rotations (internal coordinates are rotation invariant)"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON-able, None values kept; model keys the backbone uses)."""
        out = dataclasses.asdict(self)
        used = _BACKBONE_KEYS[self.model.backbone] | {"backbone", "scale"}
        if self.model.representation != "cartesian":  # Cartesian runs record what they did
            used = used | {"representation"}
        out["model"] = {k: v for k, v in out["model"].items() if k in used}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> TeacherConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        cfg = dataclass_from_dict(cls, data, where)
        model_raw = data.get("model", {})
        common = {"backbone", "scale", "representation"}
        unused = set(model_raw) - _BACKBONE_KEYS[cfg.model.backbone] - common
        if unused:
            raise ValueError(
                f"{where}: model key(s) {sorted(unused)} are not used by backbone "
                f"{cfg.model.backbone!r} (it takes {sorted(_BACKBONE_KEYS[cfg.model.backbone])})"
            )
        return cfg


def _check_type(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(value, arg, where)
            except TypeError as err:
                errors.append(str(err))
        raise TypeError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise TypeError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if isinstance(value, bool) != (tp is bool) or not isinstance(value, tp):
            raise TypeError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    return value


def dataclass_from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build dataclass ``cls`` from a (TOML) dict, recursing into dataclass-typed fields.

    A class whose field types depend on the data (a method's own loss section) says so with a
    classmethod ``field_types(data) -> {name: type}`` that overrides the annotations.

    Raises:
        ValueError: an unknown key (the message names it, with its section, and lists the valid
            keys).
        TypeError: a value of the wrong type (names the key).
    """
    check_keys(data, where, {f.name for f in dataclasses.fields(cls)})
    hints = typing.get_type_hints(cls)
    if hasattr(cls, "field_types"):
        hints.update(cls.field_types(data))
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = dataclass_from_dict(tp, value, f"{where}.{key}")
        else:
            kwargs[key] = _check_type(value, tp, f"{where}.{key}")
    return cls(**kwargs)


def read_toml(path: str | os.PathLike[str], profile: str | None = None) -> dict[str, Any]:
    """Parse a TOML config and apply ``[profiles.<profile>]`` over its base sections.

    Raises:
        FileNotFoundError: missing file.
        ValueError: invalid TOML or unknown profile (lists the defined ones).
        TypeError: ``profiles`` is not a table.
    """
    path = Path(path)
    return apply_profile(read_toml_file(path, "config"), profile, str(path))


def load_teacher_config(path: str | os.PathLike[str], profile: str | None = None) -> TeacherConfig:
    """Read a teacher config (see module docstring); errors name the file and the key."""
    return TeacherConfig.from_dict(read_toml(path, profile), where=str(path))
