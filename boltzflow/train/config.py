"""TOML run configurations as dataclasses; unknown keys raise and name the key.

A config file has sections that map onto dataclasses (``[model]``, ``[flow_matching]``,
``[train]``, ``[sample]`` for a teacher) and optional profiles that override them, e.g.
``[profiles.smoke.train]`` for a tiny CPU run and ``[profiles.gpu.train]`` for the full one:

    cfg = load_teacher_config("workflows/configs/teacher_dw4.toml", profile="smoke")

:class:`TrainConfig` is shared with the student trainers; :func:`dataclass_from_dict` (from
:mod:`boltzflow.io.tomlfile`, the one table validator) reads every config section.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from boltzflow.flows.cnf import REPRESENTATIONS
from boltzflow.flows.flow_matching import COUPLINGS, PATHS
from boltzflow.flows.ode import ADAPTIVE_METHODS, DIVERGENCES, FIXED_METHODS, TRACE_MODES
from boltzflow.io.tomlfile import apply_profile, dataclass_from_dict, read_toml_file
from boltzflow.nn import BACKBONES
from boltzflow.validate import (
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    unit_interval,
)

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
            positive_int(getattr(self, name), f"train.{name}")
        for name in ("data_workers", "warmup_steps"):
            nonnegative_int(getattr(self, name), f"train.{name}")
        positive_float(self.lr, "train.lr")
        nonnegative_float(self.weight_decay, "train.weight_decay")
        nonnegative_float(self.grad_clip, "train.grad_clip")
        unit_interval(self.ema_decay, "train.ema_decay")
        if not 0 <= nonnegative_float(self.min_lr_ratio, "train.min_lr_ratio") <= 1:
            raise ValueError(
                f"train.min_lr_ratio must be a number in [0, 1], got {self.min_lr_ratio!r}"
            )
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
    ``scale = 1``); samples and log q are still Cartesian (DESIGN.md density convention).
    ``standardize_dihedrals`` (internal only, rad): dihedrals whose circular spread in the data
    is below it are standardised and leave the torus (``InternalCoordinates.fit``); 0: none.
    ``base_nf`` (internal only): path of a trained ``nf_internal`` model (file or run folder)
    whose flow becomes the teacher's frozen base: the CNF is trained on the NF latents of the
    data and the NF's transform is used (so ``standardize_dihedrals`` is the NF's); None: no
    base (:class:`~boltzflow.flows.cnf.TeacherCNF`, "NF base"). ``init_from``: a finished
    teacher (model file or run folder) of the same architecture whose weights start this run, to
    continue training with another schedule (path relative to the working directory); None:
    fresh weights."""

    backbone: str = "egnn"
    scale: float = 1.0
    representation: str = "cartesian"
    standardize_dihedrals: float = 0.0
    hidden: int = 64
    layers: int = 3
    heads: int = 4
    distinct_particles: bool = False
    attention: bool = True
    coords_range: float = 15.0
    base_nf: str | None = None
    init_from: str | None = None

    def __post_init__(self) -> None:
        if self.init_from is not None and not isinstance(self.init_from, str):
            raise ValueError(f"model.init_from must be a path (string), got {self.init_from!r}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"model.backbone {self.backbone!r} is not one of {sorted(BACKBONES)}")
        positive_float(self.scale, "model.scale")
        for name in ("hidden", "layers", "heads"):
            positive_int(getattr(self, name), f"model.{name}")
        positive_float(self.coords_range, "model.coords_range")
        if self.representation not in REPRESENTATIONS:
            raise ValueError(
                f"model.representation {self.representation!r} is not one of {REPRESENTATIONS}"
            )
        if self.representation == "internal" and (self.backbone != "mlp" or self.scale != 1.0):
            raise ValueError(
                "model.representation 'internal' needs backbone = 'mlp' and scale = 1 "
                f"(got {self.backbone!r}, {self.scale})"
            )
        nonnegative_float(self.standardize_dihedrals, "model.standardize_dihedrals")
        if self.standardize_dihedrals and self.representation != "internal":
            raise ValueError("model.standardize_dihedrals needs representation = 'internal'")
        if self.base_nf is not None and self.representation != "internal":
            raise ValueError("model.base_nf needs representation = 'internal'")
        if self.base_nf is not None and not isinstance(self.base_nf, str):
            raise ValueError(f"model.base_nf must be a path (string), got {self.base_nf!r}")

    def backbone_options(self) -> dict[str, Any]:
        """The constructor keywords this backbone takes."""
        return {k: getattr(self, k) for k in sorted(_BACKBONE_KEYS[self.backbone])}


@dataclass
class FlowMatchingConfig:
    """Flow-matching objective: coupling (``independent``, ``ot``, ``equivariant_ot``), noise
    ``sigma``, whether alignment uses particle ``permutations`` (False for molecules) and
    ``reflections``, random-rotation augmentation (None: on iff the backbone is not
    equivariant and the system has particles), and the interpolant ``path`` of the flat
    columns: ``linear`` (default) or ``trig``, the variance-preserving path whose marginal
    velocity vanishes when data and prior agree (the teacher's NF base;
    :mod:`boltzflow.flows.flow_matching`)."""

    coupling: str = "equivariant_ot"
    sigma: float = 0.0
    permutations: bool = True
    reflections: bool = False
    augment_rotations: bool | None = None
    path: str = "linear"

    def __post_init__(self) -> None:
        if self.coupling not in COUPLINGS:
            raise ValueError(f"flow_matching.coupling {self.coupling!r} is not one of {COUPLINGS}")
        if self.path not in PATHS:
            raise ValueError(f"flow_matching.path {self.path!r} is not one of {PATHS}")
        nonnegative_float(self.sigma, "flow_matching.sigma")


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
        positive_float(self.atol, "sample.atol")
        positive_float(self.rtol, "sample.rtol")
        if self.steps is not None:
            positive_int(self.steps, "sample.steps")
        positive_int(self.quadrature_points, "sample.quadrature_points")
        positive_int(self.batch_size, "sample.batch_size")
        if self.method in FIXED_METHODS and self.steps is None:
            raise ValueError(f"sample.method {self.method!r} needs sample.steps")
        if self.method in ADAPTIVE_METHODS and self.steps is not None:
            raise ValueError(f"sample.steps is for fixed-step methods, not {self.method!r}")


@dataclass
class DataConfig:
    """How training frames are drawn. ``basin_free_energy`` (kT, None: uniformly): ΔF of the
    positive-φ basin (0 < φ < 2 rad, :data:`~boltzflow.data.seeded_md.POSITIVE_PHI_BASIN`)
    against the rest of a molecule with backbone dihedrals; frames are then drawn so that the
    basin carries the Boltzmann share 1 / (1 + e^ΔF) of each minibatch, uniformly within each
    side. Seeded MD data are Boltzmann within the basins but not across them (their basin share
    is set by the seeding), so a model fitted to them gets the cross-basin weight wrong; ΔF comes
    from an importance-sampling estimate of a model trained without it (no reference needed)."""

    basin_free_energy: float | None = None

    def __post_init__(self) -> None:
        if self.basin_free_energy is not None and not math.isfinite(self.basin_free_energy):
            raise ValueError(f"data.basin_free_energy must be finite, got {self.basin_free_energy}")


@dataclass
class TeacherConfig:
    """A teacher run: system name, model, objective, training loop, sampler, data weighting."""

    system: str | None = None
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    flow_matching: FlowMatchingConfig = field(default_factory=FlowMatchingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    data: DataConfig = field(default_factory=DataConfig)

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
            used = used | {"representation", "standardize_dihedrals"}
        if self.model.base_nf is not None:
            used = used | {"base_nf"}
        if self.model.init_from is not None:
            used = used | {"init_from"}
        out["model"] = {k: v for k, v in out["model"].items() if k in used}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> TeacherConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        cfg = dataclass_from_dict(cls, data, where)
        model_raw = data.get("model", {})
        common = {
            "backbone",
            "scale",
            "representation",
            "standardize_dihedrals",
            "base_nf",
            "init_from",
        }
        unused = set(model_raw) - _BACKBONE_KEYS[cfg.model.backbone] - common
        if unused:
            raise ValueError(
                f"{where}: model key(s) {sorted(unused)} are not used by backbone "
                f"{cfg.model.backbone!r} (it takes {sorted(_BACKBONE_KEYS[cfg.model.backbone])})"
            )
        return cfg


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
