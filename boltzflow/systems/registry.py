"""Registry of named systems, each declared by a data file ``systems/<name>.toml``.

A definition names a ``kind`` (which builder constructs it), static facts (particles, spatial
dimension, temperature, force field, reference) and a ``[parameters]`` table. Builders are looked
up lazily so that importing boltzflow does not import OpenMM.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from boltzflow.io.tomlfile import read_toml_file
from boltzflow.systems.base import System, SystemInfo

__all__ = [
    "SYSTEMS_DIR_ENV",
    "available",
    "definition",
    "load_system",
    "system_info",
    "systems_dir",
]

#: Environment variable that points at another folder of system definitions.
SYSTEMS_DIR_ENV = "BOLTZFLOW_SYSTEMS_DIR"

# kind -> "module:function"; each builder takes (definition dict, parameters dict, source folder)
# and returns a System.
_BUILDERS: dict[str, str] = {
    "double_well": "boltzflow.systems.double_well:build",
    "lennard_jones": "boltzflow.systems.lennard_jones:build",
    "many_well": "boltzflow.systems.many_well:build",
    "gmm": "boltzflow.systems.gmm:build",
    "openmm": "boltzflow.systems.molecular:build",
}

_TOP_LEVEL_KEYS = {
    "name",
    "kind",
    "description",
    "reference",
    "n_particles",
    "spatial_dim",
    "dim",
    "temperature",
    "force_field",
    "mean_free",
    "reference_data",
    "parameters",
}


def systems_dir() -> Path:
    """Folder holding the ``<name>.toml`` definitions.

    ``$BOLTZFLOW_SYSTEMS_DIR`` if set, else the ``systems/`` folder beside the package (a source
    checkout or editable install).
    """
    env = os.environ.get(SYSTEMS_DIR_ENV)
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "systems"
    if not path.is_dir():
        raise FileNotFoundError(
            f"system definitions folder not found: {path} (set ${SYSTEMS_DIR_ENV} to a folder "
            "of <name>.toml files)"
        )
    return path


def available() -> list[str]:
    """Names of all defined systems, sorted."""
    return sorted(p.stem for p in systems_dir().glob("*.toml"))


def definition(name: str) -> dict[str, Any]:
    """The parsed TOML definition of system ``name``.

    Raises:
        KeyError: unknown name (the message lists the known ones).
        ValueError: a malformed definition file.
    """
    path = systems_dir() / f"{name}.toml"
    if not path.is_file():
        raise KeyError(f"unknown system {name!r}; known systems: {', '.join(available())}")
    spec = read_toml_file(path, "system definition")
    unknown = set(spec) - _TOP_LEVEL_KEYS
    if unknown:
        allowed = sorted(_TOP_LEVEL_KEYS)
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: {allowed}")
    if spec.get("name", name) != name:
        raise ValueError(f"{path}: name {spec['name']!r} does not match the file name {name!r}")
    if spec.get("kind") not in _BUILDERS:
        raise ValueError(f"{path}: kind {spec.get('kind')!r} is not one of {sorted(_BUILDERS)}")
    spec["name"] = name
    spec.setdefault("parameters", {})
    return spec


def system_info(name: str) -> SystemInfo:
    """The static facts of system ``name`` (``dim``, ``n_particles``, ``spatial_dim``,
    ``mean_free``, ...) from its definition file, without building the system.

    A value the builder computes (e.g. an exact ``log_z``) is not included.

    Raises:
        KeyError, ValueError: as :func:`definition`.

    Example:
        >>> from boltzflow.systems import system_info
        >>> system_info("dw4").dim
        8
    """
    spec = definition(name)
    return SystemInfo.from_spec(spec, spec["parameters"])


def _builder(kind: str) -> Callable[[dict[str, Any], dict[str, Any], Path], System]:
    module, func = _BUILDERS[kind].split(":")
    return getattr(importlib.import_module(module), func)


def load_system(name: str, **overrides: Any) -> System:
    """Build the named system.

    Args:
        name: one of :func:`available`.
        **overrides: replace entries of the definition's ``[parameters]`` table, or the top-level
            ``temperature``. Unknown keys raise ``TypeError`` listing the valid ones.

    Example:
        >>> from boltzflow.systems import load_system
        >>> dw4 = load_system("dw4")
        >>> dw4.dim
        8
    """
    if not isinstance(name, str):
        raise TypeError(f"system name must be a string, got {type(name).__name__}")
    spec = definition(name)
    params = dict(spec["parameters"])
    for key, value in overrides.items():
        if key == "temperature":
            spec["temperature"] = value
        elif key in params:
            params[key] = value
        else:
            valid = sorted([*params, "temperature"])
            raise TypeError(f"system {name!r} has no parameter {key!r}; valid overrides: {valid}")
    return _builder(spec["kind"])(spec, params, systems_dir())
