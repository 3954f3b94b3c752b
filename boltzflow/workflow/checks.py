"""Workflow-specific checks: files, feature and state specs, command-line overrides.

Tables are read into dataclasses by the one validator,
:func:`boltzflow.io.tomlfile.dataclass_from_dict`. Every error names where it happened
(``wf.toml: data.n_train``) so that an invalid workflow is rejected before any work starts, with
the offending key and file in the message.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from boltzflow.io.tomlfile import check_keys, check_type, parse_toml
from boltzflow.io.tomlfile import merge_tables as merge

__all__ = [
    "apply_overrides",
    "existing_file",
    "located",
    "merge",
    "parse_assignment",
    "parse_feature",
    "parse_state",
]


# -- locations and files ---------------------------------------------------------------------------
def located(label: str, build: Any, *args: Any, **kwargs: Any) -> Any:
    """``build(*args, **kwargs)``; errors without a location get ``label`` in front."""
    try:
        return build(*args, **kwargs)
    except (ValueError, TypeError) as err:
        msg = str(err)
        if msg.startswith(label):
            raise
        raise type(err)(f"{label}: {msg}") from None


def existing_file(base: Path, value: str, where: str) -> Path:
    """``value`` as a path relative to ``base`` (unless absolute) that must be a file."""
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise FileNotFoundError(f"{where}: file not found: {path}")
    return path


# -- features and states ---------------------------------------------------------------------------
def parse_feature(spec: Any, where: str, info: Any, kind: str, extra: set[str]) -> dict:
    """A feature table (``feature``, ``index``/``atoms``, ``transform``) checked against the
    system; ``extra``: further keys allowed (``name``, ``min``, ``max``)."""
    from boltzflow.sampling.features import FEATURES, TRANSFORMS

    check_keys(spec, where, {"feature", "index", "atoms", "transform", *extra})
    feature = spec.get("feature")
    if feature not in FEATURES:
        raise ValueError(f"{where}.feature: {feature!r} is not one of {sorted(FEATURES)}")
    for key in FEATURES[feature]:
        if key not in spec:
            raise ValueError(f"{where}: feature {feature!r} needs key {key!r}")
    for key in ("index", "atoms"):
        if key in spec and key not in FEATURES[feature]:
            raise ValueError(f"{where}.{key}: not used by feature {feature!r}")
    if spec.get("transform", "identity") not in TRANSFORMS:
        raise ValueError(f"{where}.transform: {spec['transform']!r} is not one of {TRANSFORMS}")
    if "index" in spec:
        check_type(spec["index"], int, f"{where}.index")
        if not 0 <= spec["index"] < info.dim:
            raise ValueError(f"{where}.index: must lie in [0, {info.dim}), got {spec['index']}")
    if "atoms" in spec:
        count = 2 if feature == "distance" else 4
        atoms = spec["atoms"]
        n = info.n_particles
        if n is None:
            raise ValueError(f"{where}: feature {feature!r} needs a particle system")
        if not (
            isinstance(atoms, list)
            and len(atoms) == count
            and all(isinstance(a, int) and not isinstance(a, bool) and 0 <= a < n for a in atoms)
        ):
            raise ValueError(f"{where}.atoms: expected {count} particle indices in [0, {n})")
    if feature in ("phi", "psi") and kind != "openmm":
        raise ValueError(f"{where}: feature {feature!r} needs a molecular (ALDP) system")
    if feature == "dihedral" and info.spatial_dim != 3:
        raise ValueError(f"{where}: dihedrals need 3-D particles")
    for key in ("min", "max"):
        if key in spec:
            check_type(spec[key], float, f"{where}.{key}")
    return dict(spec)


def parse_state(raw: Any, where: str, info: Any, kind: str) -> list[dict[str, Any]]:
    """A state: one condition table or a list of them (features with ``min``/``max``)."""
    items = [raw] if isinstance(raw, dict) else raw
    if not isinstance(items, list) or not items:
        raise TypeError(f"{where}: expected a condition table or a non-empty list of them")
    out = []
    for i, cond in enumerate(items):
        w = f"{where}[{i}]" if isinstance(raw, list) else where
        c = parse_feature(cond, w, info, kind, {"min", "max"})
        if "min" not in c and "max" not in c:
            raise ValueError(f"{w}: a state condition needs `min` and/or `max`")
        out.append(c)
    return out


# -- command-line overrides ------------------------------------------------------------------------
def parse_assignment(text: str) -> tuple[list[str], Any]:
    """``"data.n_train=100"`` -> ``(["data", "n_train"], 100)``; the value is a TOML literal
    (a bare word that is not one is taken as a string).

    Raises:
        ValueError: no ``=`` or an empty key.
    """
    key, sep, value = text.partition("=")
    parts = [p.strip() for p in key.strip().split(".")]
    if not sep or not all(parts):
        raise ValueError(f"--set expects KEY.PATH=VALUE, got {text!r}")
    try:
        parsed = parse_toml(f"v = {value.strip()}")["v"]
    except ValueError:  # not a TOML literal
        parsed = value.strip()
    return parts, parsed


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """``data`` with dotted-key ``overrides`` (``{"data.n_train": 100}``) merged in."""
    if not overrides:
        return data
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = copy.deepcopy(value)  # never alias (and later mutate) the caller's
    return merge(data, nested)
