"""TOML configuration files: reading with clear errors, profiles, merging and key checks.

One implementation for every TOML the product reads: run configs
(:mod:`boltzflow.train.config`), workflows (:mod:`boltzflow.workflow.spec`), system definitions
(:mod:`boltzflow.systems.registry`) and estimate specs (:mod:`boltzflow.analysis.estimate`).
Errors name the file or the table (``where``) and the offending key.

Tables become dataclasses with :func:`dataclass_from_dict`, the one validator: keys from the
dataclass's fields, types from its annotations (:func:`check_type`), defaults from its field
defaults, value checks from its ``__post_init__``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
import types
import typing
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, TypeVar

from boltzflow.errors import InvalidFileError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "apply_profile",
    "check_keys",
    "check_type",
    "dataclass_from_dict",
    "key_path",
    "merge_tables",
    "parse_toml",
    "read_toml_file",
]

T = TypeVar("T")


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


def key_path(where: str, key: str) -> str:
    """Location of ``key`` inside ``where``: ``wf.toml: seed`` (``where`` a file) or
    ``wf.toml: data.n_train`` (``where`` a table)."""
    return f"{where}: {key}" if where.endswith(".toml") else f"{where}.{key}"


_TYPE_NAMES = {
    int: "integer",
    float: "number",
    str: "string",
    bool: "boolean",
    dict: "table",
    list: "list",
    tuple: "list",
    Path: "path (string)",
}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin in (list, tuple):
        (item, *_) = typing.get_args(tp) or (Any,)
        return "list" if item is Any else f"list of {_type_name(item)}s"
    if dataclasses.is_dataclass(tp):
        return "table"
    return _TYPE_NAMES.get(origin or tp, getattr(tp, "__name__", str(tp)))


def check_type(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against the annotation ``tp`` and converted where that is lossless.

    Understands ``int``, ``float`` (integers become floats; booleans are never numbers), ``str``,
    ``bool``, ``Path`` (from a string), ``X | None``, unions, ``list[X]``, ``tuple[X, ...]``
    (from a list), ``dict[...]`` (a table), ``Any`` and dataclasses (a table, read with
    :func:`dataclass_from_dict`).

    Raises:
        TypeError: ``"<where>: expected <type>, got <value>"``.
    """
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return check_type(value, arg, where)
            except TypeError:
                continue
        raise TypeError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise TypeError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        items = [check_type(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is dict or origin is dict or origin is Mapping:
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected a table, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise TypeError(f"{where}: expected a table, got {value!r}")
        return dataclass_from_dict(tp, value, where)
    if tp is Path:
        if isinstance(value, Path):
            return value
        if not isinstance(value, str):
            raise TypeError(f"{where}: expected a path (string), got {value!r}")
        return Path(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if isinstance(value, bool) != (tp is bool) or not isinstance(value, tp):
            raise TypeError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return value
    return value


def _default_table(f: dataclasses.Field[Any], tp: Any) -> dict[str, Any] | None:
    """The field's default as a table, when it is a dataclass of type ``tp`` made by a default
    factory."""
    if f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
        return None
    default = f.default_factory()  # type: ignore[misc]
    if not dataclasses.is_dataclass(default) or isinstance(default, type):
        return None
    if isinstance(tp, type) and not isinstance(default, tp):
        return None  # the field's type depends on the data (``field_types``)
    return {g.name: getattr(default, g.name) for g in dataclasses.fields(default) if g.init}


def dataclass_from_dict(cls: type[T], data: Any, where: str = "config") -> T:
    """Build dataclass ``cls`` from a (TOML) table: the one validator for tables.

    Keys are ``cls``'s init fields, types its annotations (:func:`check_type`, recursing into
    dataclass-typed fields; a class whose field types depend on the data says so with a
    classmethod ``field_types(data) -> {name: type}``), missing keys take the field defaults (a
    partial table for a dataclass field updates that field's default), and
    ``cls.__post_init__`` checks values.

    Raises:
        ValueError: an unknown key (the message names it, with its table, and lists the valid
            keys) or a missing required key; value errors of ``__post_init__``.
        TypeError: a value of the wrong type (the message names the key).
    """
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    check_keys(data, where, fields)
    hints = typing.get_type_hints(cls)
    if hasattr(cls, "field_types"):  # types that depend on the data (a method's own loss table)
        hints.update(cls.field_types(data))
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"{where}: missing required key {name!r}")
            continue
        value = data[name]
        base = _default_table(f, hints[name]) if isinstance(value, dict) else None
        if base is not None:
            value = merge_tables(base, value)
        kwargs[name] = check_type(value, hints[name], key_path(where, name))
    return cls(**kwargs)
