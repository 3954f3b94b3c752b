"""TOML configuration files: reading with clear errors, profiles, merging and key checks.

One implementation for every TOML the product reads: run configs
(:mod:`boltzflow.train.config`), workflows (:mod:`boltzflow.workflow.spec`), system definitions
(:mod:`boltzflow.systems.registry`) and estimate specs (:mod:`boltzflow.analysis.estimate`).
Errors name the file or the table (``where``) and the offending key.
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from boltzflow.errors import InvalidFileError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["apply_profile", "check_keys", "merge_tables", "parse_toml", "read_toml_file"]


def parse_toml(text: str) -> dict[str, Any]:
    """Parse TOML text.

    Raises:
        ValueError: invalid TOML (``tomllib.TOMLDecodeError`` is a ValueError).
    """
    return tomllib.loads(text)


def read_toml_file(path: str | os.PathLike[str], what: str = "TOML") -> dict[str, Any]:
    """Parse the TOML file ``path``.

    Args:
        path: the file.
        what: what the file is, for the missing-file error (``"config"``, ``"workflow"``).

    Raises:
        FileNotFoundError: ``"<what> file not found: <path>"``.
        InvalidFileError: (a ValueError) ``"<path>: invalid TOML: <reason>"`` (bad syntax or
            not UTF-8).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise InvalidFileError(f"{path}: invalid TOML: {err}") from err
    except UnicodeDecodeError as err:
        raise InvalidFileError(f"{path}: invalid TOML: not UTF-8 text ({err})") from err


def merge_tables(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Deep copy of ``base`` with ``override`` merged in (tables recursively, values replaced)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge_tables(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_profile(data: dict[str, Any], profile: str | None, where: str) -> dict[str, Any]:
    """Remove the ``[profiles]`` table from ``data`` and merge ``profiles.<profile>`` over it.

    Args:
        data: a parsed file (its ``profiles`` entry is popped).
        profile: the profile to apply; None applies none.
        where: the file, for errors.

    Raises:
        TypeError: ``profiles`` is not a table.
        ValueError: no such profile (the message lists the defined ones).
    """
    profiles = data.pop("profiles", {})
    if not isinstance(profiles, dict):
        raise TypeError(f"{where}: profiles: expected a table of profiles")
    if profile is None:
        return data
    if profile not in profiles:
        raise ValueError(f"{where}: no profile {profile!r}; defined: {sorted(profiles)}")
    return merge_tables(data, profiles[profile])


def check_keys(raw: Any, where: str, valid: Collection[str]) -> None:
    """Check that ``raw`` is a table whose keys all lie in ``valid``.

    Raises:
        TypeError: ``raw`` is not a table.
        ValueError: an unknown key (the message names it, then any others, and lists the valid
            keys).
    """
    if not isinstance(raw, dict):
        raise TypeError(f"{where}: expected a table, got {raw!r}")
    unknown = [k for k in raw if k not in valid]
    if unknown:
        raise ValueError(
            f"{where}: unknown key {unknown[0]!r}"
            + (f" (and {unknown[1:]})" if unknown[1:] else "")
            + f"; valid keys: {sorted(valid)}"
        )
