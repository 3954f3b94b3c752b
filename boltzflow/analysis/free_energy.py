"""Free energies along a molecule's backbone dihedral φ: the metastable-state ΔF with confidence
intervals, F(φ) profiles, a reference profile read from file, and comparisons with it.

The one place these are computed for the workflow report (:mod:`boltzflow.workflow.report`), the
reweighting analysis (:mod:`boltzflow.analysis.reweight`) and ``workflows/aldp_free_energy.py``:

- ΔF = F_A − F_rest = −log P(lo < φ < hi) / P(otherwise) in kT, A = ``ALDP_STATE_A`` = (0, 2) rad
  by default (DESIGN.md's ALDP metric), by
  :func:`~boltzflow.sampling.estimators.free_energy_difference` (delta method and/or bootstrap);
- F(φ) on bins of (−π, π] by :func:`~boltzflow.sampling.estimators.free_energy_profile`, on the
  reference's bins when there is one, so the curves compare bin by bin;
- ΔF from a time series of frames (MD) with a block-average interval (:func:`block_free_energy`);
- a reference profile (:func:`load_reference_profile`): the JSON written by
  ``workflows/aldp_umbrella.py`` (umbrella sampling + MBAR): ``profile`` (a
  :class:`~boltzflow.sampling.estimators.FreeEnergyProfile` as ``to_dict`` writes it, 1-D along
  φ, or 2-D over (φ, ψ), then marginalised over ψ), ``delta_f`` (an
  :class:`~boltzflow.sampling.results.Estimate`, optional) and ``region`` (its (lo, hi)).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from boltzflow.sampling.estimators import (
    FreeEnergyProfile,
    free_energy_difference,
    free_energy_profile,
)
from boltzflow.sampling.results import Estimate

__all__ = [
    "ALDP_STATE_A",
    "PHI_BINS",
    "ReferenceProfile",
    "backbone_angles",
    "block_free_energy",
    "compare_free_energy",
    "has_backbone_dihedrals",
    "in_region",
    "load_reference_profile",
    "phi_profile",
    "region_free_energy",
]

#: ALDP metastable state used for ΔF (DESIGN.md): 0 < φ < 2 rad, against everything else.
ALDP_STATE_A = (0.0, 2.0)
#: bins of F(φ) on (−π, π] when no reference profile sets them
PHI_BINS = 36


def has_backbone_dihedrals(system: Any) -> bool:
    """Whether ``system`` is a 3-D molecule with backbone dihedrals (φ, ψ)."""
    return hasattr(system, "backbone_dihedrals") and getattr(system, "spatial_dim", None) == 3


def backbone_angles(system: Any, x: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """``(φ, ψ)`` in radians of Cartesian ``x (N, 3n)`` for a molecule with backbone dihedrals
    (``system.backbone_dihedrals``); None for any other system."""
    if not has_backbone_dihedrals(system):
        return None
    phi, psi = system.backbone_dihedrals(torch.as_tensor(np.asarray(x), dtype=torch.float64))
    return phi.numpy(), psi.numpy()


def in_region(phi: Any, region: tuple[float, float] = ALDP_STATE_A) -> np.ndarray:
    """Boolean array, True where lo < φ < hi (radians, open interval)."""
    lo, hi = region
    phi = np.asarray(phi, dtype=np.float64)
    return (phi > lo) & (phi < hi)


def region_free_energy(
    phi: Any,
    log_w: Any,
    *,
    region: tuple[float, float] = ALDP_STATE_A,
    methods: tuple[str, ...] = ("delta",),
    level: float = 0.95,
    n_bootstrap: int = 200,
    seed: int = 0,
    clusters: Any | None = None,
) -> dict[str, Any]:
    """ΔF = −log P(lo < φ < hi) / P(otherwise) in kT from weighted samples.

    Args:
        phi: ``(N,)`` φ in radians.
        log_w: ``(N,)`` log importance weights (zeros for unweighted frames).
        region: (lo, hi) of state A.
        methods: interval methods, ``"delta"`` and/or ``"bootstrap"``.
        level, n_bootstrap, seed: confidence level, bootstrap replicates and seed.
        clusters: ``(N,)`` integer labels of correlated groups (SMC particles: their initial
            ancestors), or None. With clusters the interval is the clustered delta method
            alone, whatever ``methods`` says: a bootstrap of single rows would ignore the
            correlation.

    Returns:
        ``{method: Estimate}``, or ``{"undefined": reason}`` when a state carries no weight.
    """
    a = in_region(phi, region)
    kw: dict[str, Any] = {"level": level, "n_bootstrap": n_bootstrap, "seed": seed}
    if clusters is not None:
        methods, kw["clusters"] = ("delta",), clusters
    try:
        return {m: free_energy_difference(a, ~a, log_w, method=m, **kw) for m in methods}
    except ValueError as err:
        return {"undefined": str(err)}


def phi_profile(
    phi: Any,
    log_w: Any,
    *,
    reference: FreeEnergyProfile | None = None,
    bins: int = PHI_BINS,
    method: str = "bootstrap",
    level: float = 0.95,
    n_bootstrap: int = 200,
    seed: int = 0,
) -> FreeEnergyProfile:
    """F(φ) from weighted samples on the bins of ``reference`` (1-D), else ``bins`` bins of
    (−π, π]; minimum 0, band by ``method``."""
    lo, hi, nb = -math.pi, math.pi, bins
    if reference is not None:
        (edges,) = reference.edges
        lo, hi, nb = float(edges[0]), float(edges[-1]), len(edges) - 1
    return free_energy_profile(
        np.asarray(phi, dtype=np.float64),
        log_w,
        bins=nb,
        value_range=(lo, hi),
        method=method,
        level=level,
        n_bootstrap=n_bootstrap,
        seed=seed,
    )


def block_free_energy(in_a: Any, n_blocks: int = 10, level: float = 0.95) -> dict[str, Any]:
    """ΔF = −log(P / (1 − P)) from a time series of state memberships, with a block CI.

    MD frames are correlated in time, so P(A) is averaged over ``n_blocks`` contiguous blocks,
    its standard error is the blocks' standard deviation / sqrt(B) (Student t quantile), and ΔF
    takes it through the delta method (Flyvbjerg & Petersen 1989, J. Chem. Phys. 91:461, block
    averaging).

    Args:
        in_a: ``(N,)`` bool, frame in state A (time order).
        n_blocks: contiguous blocks B (>= 2); the last N mod B frames are dropped.
        level: confidence level.

    Returns:
        ``value``, ``ci_low``, ``ci_high``, ``stderr`` (kT), ``p_a`` and its ``p_stderr``,
        ``n``, ``n_blocks``; ``value`` is None (with ``undefined``) if P is 0 or 1.

    Raises:
        ValueError: fewer than 2 blocks, or fewer frames than blocks.
    """
    in_a = np.asarray(in_a, dtype=bool)
    if n_blocks < 2:
        raise ValueError(f"n_blocks must be >= 2, got {n_blocks}")
    size = len(in_a) // n_blocks
    if size < 1:
        raise ValueError(f"{len(in_a)} frames cannot fill {n_blocks} blocks")
    blocks = in_a[: size * n_blocks].reshape(n_blocks, size).mean(axis=1)
    p = float(blocks.mean())
    se_p = float(blocks.std(ddof=1) / math.sqrt(n_blocks))
    out: dict[str, Any] = {"p_a": p, "p_stderr": se_p, "n": size * n_blocks, "n_blocks": n_blocks}
    if not 0 < p < 1:
        return {**out, "value": None, "undefined": f"P(A) = {p:g}: ΔF is infinite"}
    value = -math.log(p / (1 - p))
    se = se_p / (p * (1 - p))  # d/dp [-log(p / (1 - p))] = -1 / (p (1 - p))
    t = float(stats.t.ppf(0.5 + level / 2, n_blocks - 1))
    return {
        **out,
        "value": value,
        "stderr": se,
        "ci_low": value - t * se,
        "ci_high": value + t * se,
    }


def _value_and_se(est: Any) -> tuple[float | None, float | None]:
    if isinstance(est, Estimate):
        return est.value, est.stderr
    if isinstance(est, Mapping) and est.get("value") is not None:
        return float(est["value"]), float(est.get("stderr") or 0.0)
    return None, None


def compare_free_energy(estimate: Any, reference: Any) -> dict[str, Any]:
    """Difference ``estimate − reference`` with the combined standard error.

    Args:
        estimate, reference: :class:`Estimate` s or dicts with ``value`` and ``stderr`` (as
            :func:`block_free_energy` returns); an undefined one (no value) gives no difference.

    Returns:
        ``difference``, ``stderr`` = sqrt(se_a² + se_b²), ``z`` and ``consistent_at_2se``
        (|z| <= 2); or ``{"difference": None, "note": ...}``.
    """
    a, se_a = _value_and_se(estimate)
    b, se_b = _value_and_se(reference)
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
        return {"difference": None, "note": "undefined (a state carries no weight)"}
    diff = a - b
    se = math.sqrt((se_a or 0.0) ** 2 + (se_b or 0.0) ** 2)
    z = diff / se if se > 0 else (0.0 if diff == 0 else math.inf)
    return {"difference": diff, "stderr": se, "z": z, "consistent_at_2se": bool(abs(z) <= 2)}


@dataclass(frozen=True)
class ReferenceProfile:
    """A reference F(φ) (e.g. umbrella sampling + MBAR) and its ΔF.

    Attributes:
        profile: 1-D F(φ) (a 2-D file is marginalised over ψ; its band is then not known).
        delta_f: ΔF(region vs rest) with its interval, or None if the file has none.
        region: (lo, hi) of the state ΔF refers to (radians).
        source: the file it was read from.
        label: a short description for tables and plots (the file's ``label``; else
            ``"umbrella/MBAR reference"`` for a file with an ``mbar`` record, as
            ``workflows/aldp_umbrella.py`` writes, or ``"reference (<file name>)"``).
    """

    profile: FreeEnergyProfile
    delta_f: Estimate | None
    region: tuple[float, float]
    source: str
    label: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "label": self.label,
            "source": self.source,
            "region": list(self.region),
            "delta_f": None if self.delta_f is None else self.delta_f.to_dict(),
            "profile": self.profile.to_dict(),
        }


def _marginal_phi(profile: FreeEnergyProfile) -> FreeEnergyProfile:
    """F(φ) of a 2-D (φ, ψ) profile: P(φ bin) = Σ_ψ P(φ, ψ); no band."""
    e_phi, _ = profile.edges
    p = np.asarray(profile.probability, dtype=np.float64).sum(axis=1)
    width = np.diff(e_phi)
    with np.errstate(divide="ignore"):
        f = -np.log(p / width)
    f = f - np.min(f[np.isfinite(f)])
    unknown = np.full_like(f, math.nan)
    return replace(
        profile,
        edges=(e_phi,),
        free_energy=f,
        ci_low=unknown,
        ci_high=unknown.copy(),
        stderr=np.full_like(f, math.inf),
        probability=p,
    )


def load_reference_profile(path: str | os.PathLike[str]) -> ReferenceProfile:
    """Read a reference profile file (module docstring; ``workflows/aldp_umbrella.py`` output).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, or without a usable ``profile`` (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference profile not found: {path}")
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, Mapping) or "profile" not in data:
            raise ValueError("expected a JSON object with a 'profile'")
        profile = FreeEnergyProfile.from_dict(data["profile"])
        if len(profile.edges) == 2:
            profile = _marginal_phi(profile)
        delta = data.get("delta_f")
        delta_f = Estimate.from_dict(delta) if isinstance(delta, Mapping) else None
        region = tuple(float(v) for v in data.get("region", ALDP_STATE_A))
        if len(region) != 2 or not region[0] < region[1]:
            raise ValueError(f"region must be [lo, hi] with lo < hi, got {list(region)}")
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"{path}: not a reference profile: {err}") from None
    default = "umbrella/MBAR reference" if "mbar" in data else f"reference ({path.name})"
    label = str(data.get("label") or default)
    return ReferenceProfile(profile, delta_f, (region[0], region[1]), str(path), label)
