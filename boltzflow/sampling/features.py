"""Named features of samples (energies, coordinates, distances, dihedrals) and state predicates.

Used by ``boltzflow estimate`` to turn a TOML spec into observables and states. A feature is a
table such as ``{feature = "phi"}``, ``{feature = "dihedral", atoms = [4, 6, 8, 14]}``,
``{feature = "distance", atoms = [0, 1]}``, ``{feature = "coordinate", index = 0}`` or
``{feature = "energy"}``, optionally with ``transform = "cos" | "sin" | "deg"``. A state is one
condition or a list of conditions (all must hold), each a feature table with ``min`` and/or ``max``
(``min <= value < max``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from boltzflow.systems.base import System

__all__ = ["FEATURES", "TRANSFORMS", "compute_feature", "state_mask"]

#: Feature names and the keys each needs.
FEATURES: dict[str, tuple[str, ...]] = {
    "energy": (),
    "coordinate": ("index",),
    "distance": ("atoms",),
    "dihedral": ("atoms",),
    "phi": (),
    "psi": (),
}
TRANSFORMS = ("identity", "cos", "sin", "deg")
_CONDITION_KEYS = {"min", "max"}


def _particles(system: System, name: str) -> tuple[int, int]:
    n, d = system.n_particles, system.spatial_dim
    if n is None or d is None:
        raise ValueError(f"feature {name!r} needs a particle system; {system.name!r} is not one")
    return n, d


def _atoms(spec: Mapping[str, Any], count: int, n_particles: int) -> list[int]:
    atoms = spec["atoms"]
    if (
        not isinstance(atoms, Sequence)
        or len(atoms) != count
        or not all(isinstance(a, int) and 0 <= a < n_particles for a in atoms)
    ):
        raise ValueError(
            f"feature {spec['feature']!r}: atoms must be {count} indices in [0, {n_particles}), "
            f"got {atoms!r}"
        )
    return list(atoms)


def compute_feature(
    spec: Mapping[str, Any], x: Tensor, u: Tensor | None, system: System
) -> np.ndarray:
    """Evaluate one feature table on a batch.

    Args:
        spec: the feature table (see the module docstring); keys ``min``/``max``/``name`` are
            ignored here.
        x: ``(N, dim)`` positions.
        u: ``(N,)`` reduced energies (needed for ``energy``).
        system: the system (particle layout, backbone atoms).

    Returns:
        ``(N,)`` float64 values (angles in radians unless ``transform = "deg"``).

    Raises:
        ValueError: unknown feature or transform, missing or invalid keys.
    """
    name = spec.get("feature")
    if name not in FEATURES:
        raise ValueError(f"unknown feature {name!r}; choose from {sorted(FEATURES)}")
    missing = [k for k in FEATURES[name] if k not in spec]
    if missing:
        raise ValueError(f"feature {name!r} needs key(s) {missing}")
    x = torch.as_tensor(x)
    if name == "energy":
        if u is None:
            raise ValueError("feature 'energy' needs the energies u")
        values = torch.as_tensor(u)
    elif name == "coordinate":
        idx = spec["index"]
        if not isinstance(idx, int) or not 0 <= idx < system.dim:
            raise ValueError(f"coordinate index must be an int in [0, {system.dim}), got {idx!r}")
        values = x[:, idx]
    elif name == "distance":
        n, d = _particles(system, name)
        i, j = _atoms(spec, 2, n)
        p = x.reshape(-1, n, d)
        values = (p[:, i] - p[:, j]).pow(2).sum(-1).sqrt()
    else:
        from boltzflow.systems import geometry

        if name == "dihedral":
            n, d = _particles(system, name)
            if d != 3:
                raise ValueError("dihedrals need 3-D particles")
            values = geometry.dihedral(x, _atoms(spec, 4, n))
        else:
            if hasattr(system, "backbone_dihedrals"):
                phi, psi = system.backbone_dihedrals(x)
            else:
                phi, psi = geometry.backbone_dihedrals(x)
            values = phi if name == "phi" else psi
    out = values.detach().cpu().numpy().astype(np.float64)
    transform = spec.get("transform", "identity")
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; choose from {list(TRANSFORMS)}")
    if transform == "cos":
        out = np.cos(out)
    elif transform == "sin":
        out = np.sin(out)
    elif transform == "deg":
        out = np.degrees(out)
    return out


def state_mask(
    conditions: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    x: Tensor,
    u: Tensor | None,
    system: System,
) -> np.ndarray:
    """Boolean ``(N,)``: samples meeting every condition ``min <= feature < max``.

    Raises:
        ValueError: a condition with neither ``min`` nor ``max``, or an empty list.
    """
    items = [conditions] if isinstance(conditions, Mapping) else list(conditions)
    if not items:
        raise ValueError("a state needs at least one condition")
    mask = np.ones(torch.as_tensor(x).shape[0], dtype=bool)
    for cond in items:
        if not isinstance(cond, Mapping):
            raise ValueError(f"a state condition must be a table, got {cond!r}")
        if not _CONDITION_KEYS & set(cond):
            raise ValueError(f"state condition {dict(cond)!r} needs 'min' and/or 'max'")
        values = compute_feature(cond, x, u, system)
        with np.errstate(invalid="ignore"):
            if "min" in cond:
                mask &= values >= float(cond["min"])
            if "max" in cond:
                mask &= values < float(cond["max"])
    return mask
