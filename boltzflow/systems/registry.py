"""Registry of named systems, each declared by a data file ``<name>.toml``.

The built-in definitions ship inside the package, in ``boltzflow/systems/definitions/`` (data
only: one TOML per system, plus structure files such as ``aldp/alanine-dipeptide.pdb``).
``$BOLTZFLOW_SYSTEMS_DIR`` adds a user's own folder of definitions (several folders separated by
``os.pathsep``, ``:`` on Linux and macOS). Every definition's relative file paths (structure,
prmtop, force-field XML) are resolved against the folder that holds that definition.

A name must be defined once: a user file with the name of a built-in system (or one defined in two
user folders) is an error, raised by :func:`available`, :func:`definition` and
:func:`load_system`. A system name identifies an energy in datasets, checkpoints and workflow
files, so it must not silently change meaning; give a modified system a new name.

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
    "BUILTIN_DIR",
    "SYSTEMS_DIR_ENV",
    "available",
    "definition",
    "definition_file",
    "load_system",
    "search_path",
    "system_info",
    "valid_overrides",
]

#: Environment variable naming more folders of system definitions (``os.pathsep``-separated).
SYSTEMS_DIR_ENV = "BOLTZFLOW_SYSTEMS_DIR"

#: The built-in definitions, installed with the package.
BUILTIN_DIR = Path(__file__).resolve().parent / "definitions"

# kind -> "module:function"; each builder takes (definition dict, parameters dict, source folder)
# and returns a System.
_BUILDERS: dict[str, str] = {
    "double_well": "boltzflow.systems.double_well:build",
    "lennard_jones": "boltzflow.systems.lennard_jones:build",
    "many_well": "boltzflow.systems.many_well:build",
    "gmm": "boltzflow.systems.gmm:build",
    "openmm": "boltzflow.systems.molecular:build",
}

# Parameters that a kind's builder defaults (documented in its module): load_system and a
# workflow's system_options accept them as overrides even where a definition does not list them,
# so that e.g. backend="openmm" is one option away for every molecule.
_DEFAULTED_PARAMETERS: dict[str, tuple[str, ...]] = {
    "openmm": (
        "backend",
        "dtype",
        "device",
        "chunk_size",
        "compiled",
        "platform",
        "n_workers",
        "threads",
        "energy_cap",
    ),
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


def search_path() -> list[Path]:
    """Folders searched for ``<name>.toml``: the built-in one, then ``$BOLTZFLOW_SYSTEMS_DIR``'s.

    Raises:
        FileNotFoundError: the built-in folder is missing (a broken install) or a folder named by
            ``$BOLTZFLOW_SYSTEMS_DIR`` does not exist.
    """
    if not BUILTIN_DIR.is_dir():
        raise FileNotFoundError(
            f"built-in system definitions not found at {BUILTIN_DIR}; reinstall boltzflow"
        )
    folders = [BUILTIN_DIR]
    for entry in os.environ.get(SYSTEMS_DIR_ENV, "").split(os.pathsep):
        if not entry:
            continue
        path = Path(entry).expanduser().resolve()
        if not path.is_dir():
            raise FileNotFoundError(
                f"${SYSTEMS_DIR_ENV} names {entry!r}, which is not a folder (it should hold "
                "<name>.toml system definitions)"
            )
        if path not in folders:
            folders.append(path)
    return folders


def _index() -> dict[str, Path]:
    """Name -> definition file over :func:`search_path`; a name defined twice is an error."""
    files: dict[str, Path] = {}
    for folder in search_path():
        for path in sorted(folder.glob("*.toml")):
            if path.stem in files:
                raise ValueError(
                    f"system {path.stem!r} is defined twice: {files[path.stem]} and {path}. "
                    f"Folders in ${SYSTEMS_DIR_ENV} may add systems but not redefine one; give "
                    f"yours another name (file name and its 'name' key), e.g. {path.stem}_custom"
                )
            files[path.stem] = path
    return files


def available() -> list[str]:
    """Names of all defined systems (built-in and ``$BOLTZFLOW_SYSTEMS_DIR``), sorted."""
    return sorted(_index())


def definition_file(name: str) -> Path:
    """Path of the TOML file that defines system ``name``.

    Raises:
        KeyError: unknown name (the message lists the known ones).
    """
    files = _index()
    if name not in files:
        raise KeyError(f"unknown system {name!r}; known systems: {', '.join(sorted(files))}")
    return files[name]


def definition(name: str) -> dict[str, Any]:
    """The parsed TOML definition of system ``name``.

    Raises:
        KeyError: unknown name (the message lists the known ones).
        ValueError: a malformed definition file, or a name defined twice.
    """
    path = definition_file(name)
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


def valid_overrides(name: str) -> list[str]:
    """Keys :func:`load_system` accepts as overrides for system ``name``, sorted: the
    definition's ``[parameters]``, those its kind defaults (molecules: ``backend``, ``dtype``,
    ``device``, ...) and ``temperature``.

    Raises:
        KeyError, ValueError: as :func:`definition`.
    """
    spec = definition(name)
    return sorted(
        {*spec["parameters"], *_DEFAULTED_PARAMETERS.get(spec["kind"], ()), "temperature"}
    )


def _builder(kind: str) -> Callable[[dict[str, Any], dict[str, Any], Path], System]:
    module, func = _BUILDERS[kind].split(":")
    return getattr(importlib.import_module(module), func)


def load_system(name: str, **overrides: Any) -> System:
    """Build the named system.

    Args:
        name: one of :func:`available`.
        **overrides: replace entries of the definition's ``[parameters]`` table (or set a
            parameter its kind defaults, see :func:`valid_overrides`), or the top-level
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
    valid = {*params, *_DEFAULTED_PARAMETERS.get(spec["kind"], ()), "temperature"}
    for key, value in overrides.items():
        if key not in valid:
            raise TypeError(
                f"system {name!r} has no parameter {key!r}; valid overrides: {sorted(valid)}"
            )
        if key == "temperature":
            spec["temperature"] = value
        else:
            params[key] = value
    return _builder(spec["kind"])(spec, params, definition_file(name).parent)
