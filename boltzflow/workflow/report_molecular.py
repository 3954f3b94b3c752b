"""The workflow report's section for molecules with backbone dihedrals (φ, ψ): per model, the
torus W2 against the held-out frames, the D-form fraction, ΔF between the φ states with its
interval and its difference from a reference, F(φ) profiles of every model's reweighted samples
against the reference profile, and Ramachandran plots (held-out frames, proposal, reweighted).

The numbers come from :mod:`boltzflow.analysis.free_energy` (ΔF, profiles, the reference file)
and :mod:`boltzflow.metrics` (torus W2, chirality); this module only assembles them per sample
store of the workflow (:func:`~boltzflow.workflow.layout.sample_plan`).

The samples of the ``[smc]`` stage carry their initial ancestors (``columns/eve``): their ΔF
interval is the delta method with the particles grouped by ancestor.

Held-out frames from seeded MD (``md_seeded``) are not Boltzmann across the φ basins (their
provenance says so): their ΔF is shown with that caveat and their profile is not drawn, and the
reference for ΔF and F(φ) is then the reference profile alone (``[report] reference_profile``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from boltzflow.analysis.free_energy import (
    ALDP_STATE_A,
    ReferenceProfile,
    backbone_angles,
    block_free_energy,
    compare_free_energy,
    has_backbone_dihedrals,
    in_region,
    phi_profile,
    region_free_energy,
)
from boltzflow.sampling.estimators import FreeEnergyProfile
from boltzflow.workflow.spec import Workflow

__all__ = [
    "OT_POINTS",
    "PhiReference",
    "format_comparison",
    "format_estimate",
    "molecular_section",
    "molecular_table",
    "phi_metrics",
    "plot_phi_profiles",
]

#: torus W2: points per side (exact OT on a max_points x max_points cost matrix)
OT_POINTS = 2000
#: contiguous blocks for the held-out frames' ΔF interval
_MD_BLOCKS = 10
#: F axis cap of the profile plot (kT)
_F_MAX = 14.0


def _normalised(log_w: np.ndarray) -> np.ndarray | None:
    finite = np.isfinite(log_w)
    if not finite.any():
        return None
    w = np.zeros_like(log_w)
    w[finite] = np.exp(log_w[finite] - log_w[finite].max())
    return w / w.sum()


def _primary(entry: dict[str, Any]) -> Any:
    for key in ("delta", "bootstrap"):
        if key in entry:
            return entry[key]
    return None


@dataclass(frozen=True)
class PhiReference:
    """What a molecule's weighted samples are compared with.

    Attributes:
        angles: ``(M, 2)`` (φ, ψ) in radians of the held-out frames, or None.
        profile: the reference F(φ) with its ΔF, or None.
    """

    angles: np.ndarray | None = None
    profile: ReferenceProfile | None = None

    @property
    def region(self) -> tuple[float, float]:
        """(lo, hi) of the φ state of ΔF (radians): the reference profile's, else
        :data:`~boltzflow.analysis.free_energy.ALDP_STATE_A`."""
        return ALDP_STATE_A if self.profile is None else self.profile.region


def phi_metrics(
    phi: np.ndarray,
    psi: np.ndarray,
    log_w: np.ndarray,
    ref: PhiReference,
    *,
    methods: tuple[str, ...] = ("delta",),
    level: float = 0.95,
    n_bootstrap: int = 200,
    seed: int = 0,
    proposal_w2: bool = True,
    profile: bool = True,
    clusters: np.ndarray | None = None,
) -> dict[str, Any]:
    """Torus W2 against the held-out frames, ΔF with its interval and its difference from the
    reference, and F(φ), of one set of weighted samples.

    Args:
        phi, psi: ``(N,)`` the samples' backbone dihedrals (radians).
        log_w: ``(N,)`` their log importance weights (non-finite: no weight).
        ref: the held-out frames' angles and the reference profile.
        methods: ΔF interval methods (``"delta"``, ``"bootstrap"``).
        level, n_bootstrap, seed: confidence level, bootstrap replicates (also of F(φ)), seed.
        proposal_w2: also the torus W2 of the unweighted samples.
        profile: also F(φ) (on the reference's bins).
        clusters: ``(N,)`` labels of correlated samples (SMC: initial ancestors); ΔF then
            has the clustered delta interval alone (the F(φ) band ignores them).

    Returns:
        ``torus W2 (φ, ψ) proposal (rad)`` / ``reweighted (rad)`` (with held-out frames and, for
        the latter, a finite weight) and ``φ``: ``{"region", "ΔF": {method: Estimate} |
        {"undefined": reason}, "ΔF - reference"`` (with a reference ΔF), ``"profile"`` (with
        ``profile`` and a finite weight)``}``.
    """
    from boltzflow.metrics import torus_w2

    kw = {"level": level, "n_bootstrap": n_bootstrap, "seed": seed}
    w = _normalised(log_w)
    out: dict[str, Any] = {}
    if ref.angles is not None:
        angles = np.stack([phi, psi], 1)
        ot = {"max_points": OT_POINTS, "seed": seed}
        if proposal_w2:
            out["torus W2 (φ, ψ) proposal (rad)"] = torus_w2(ref.angles, angles, **ot)
        if w is not None:
            out["torus W2 (φ, ψ) reweighted (rad)"] = torus_w2(ref.angles, angles, weights=w, **ot)
    region = ref.region
    delta_f = region_free_energy(
        phi, log_w, region=region, methods=methods, clusters=clusters, **kw
    )
    entry: dict[str, Any] = {"region": list(region), "ΔF": delta_f}
    if ref.profile is not None and ref.profile.delta_f is not None:
        entry["ΔF - reference"] = compare_free_energy(_primary(delta_f), ref.profile.delta_f)
    if profile and w is not None:
        reference = None if ref.profile is None else ref.profile.profile
        entry["profile"] = phi_profile(phi, log_w, reference=reference, **kw)
    out["φ"] = entry
    return out


def plot_phi_profiles(
    path: Path, profiles: dict[str, FreeEnergyProfile], reference: ReferenceProfile | None
) -> Path:
    """F(φ) (kT, axis capped at 14 kT) of several sample sets in one panel against the
    reference profile (dashed); writes and returns ``path`` (PNG)."""
    from boltzflow.plots import plot_free_energy_profiles

    return plot_free_energy_profiles(
        path,
        profiles,
        reference=None if reference is None else reference.profile,
        reference_label="none" if reference is None else reference.label,
        label="φ [rad]",
        f_max=_F_MAX,
    )


def molecular_section(
    wf: Workflow,
    out: Path,
    system: Any,
    rows: list[dict[str, Any]],
    *,
    ref_x: np.ndarray | None,
    ref_boltzmann: bool,
    reference: ReferenceProfile | None,
    methods: tuple[str, ...],
) -> dict[str, Any] | None:
    """Add the molecular columns to ``rows`` (one per sample store, from
    :func:`~boltzflow.workflow.report.comparison_rows`) and write the plots into
    ``out/analysis``.

    Args:
        wf: the workflow (sizes, seed, level, bootstrap replicates).
        out: its output folder.
        system: the target (None of this applies without ``backbone_dihedrals``).
        rows: the comparison rows; each gains ``torus W2 (φ, ψ) proposal/reweighted (rad)``
            (with held-out frames), ``D-form fraction (proposal/reweighted)`` and ``φ``:
            ``{"region", "ΔF": {method: Estimate} | {"undefined": ...}, "ΔF - reference",
            "profile"}``.
        ref_x: held-out frames (or None).
        ref_boltzmann: False if the held-out frames are not Boltzmann across the φ basins.
        reference: the reference profile (or None).
        methods: ΔF interval methods.

    Returns:
        None for a system without backbone dihedrals; else ``{"reference", "held-out frames",
        "plots": {name: path}}``.
    """
    from boltzflow.io.samples import read_samples
    from boltzflow.metrics import chirality_rate
    from boltzflow.plots import plot_ramachandran

    if not has_backbone_dihedrals(system):
        return None
    rp, seed = wf.report, wf.seed
    ref_angles = None if ref_x is None else backbone_angles(system, ref_x)
    ref = PhiReference(None if ref_angles is None else np.stack(ref_angles, 1), reference)
    region = ref.region
    kw = {"level": rp.level, "n_bootstrap": rp.n_bootstrap, "seed": seed}
    atoms = getattr(system, "chirality_atoms", None)
    l_sign = getattr(system, "l_form_sign", 1)
    analysis = out / "analysis"
    plots: dict[str, Path] = {}
    profiles = {}
    for row in rows:
        s = read_samples(out / f"samples/{row['label']}.h5")
        log_w = np.asarray(s.log_w, dtype=np.float64)
        w = _normalised(log_w)
        phi, psi = backbone_angles(system, s.x)
        row["D-form fraction (proposal)"] = chirality_rate(s.x, atoms, l_sign)
        if w is not None:
            row["D-form fraction (reweighted)"] = chirality_rate(s.x, atoms, l_sign, w)
        clusters = s.columns.get("eve")  # SMC particles: grouped by initial ancestor
        row.update(phi_metrics(phi, psi, log_w, ref, methods=methods, clusters=clusters, **kw))
        if "profile" in row["φ"]:
            profiles[f"{row['label']} reweighted"] = row["φ"]["profile"]
        panels: dict[str, tuple[Any, Any, Any]] = {}
        if ref_angles is not None:
            panels["held-out MD"] = (*ref_angles, None)
        panels[row["label"]] = (phi, psi, None)
        if w is not None:
            panels[f"{row['label']} reweighted"] = (phi, psi, w)
        name = f"Ramachandran: held-out MD, {row['label']}, reweighted"
        plots[name] = plot_ramachandran(analysis / f"ramachandran_{row['label']}.png", panels)
    held_out: dict[str, Any] | None = None
    md_profile = None
    if ref_angles is not None:
        ref_phi = ref_angles[0]
        n_blocks = min(_MD_BLOCKS, len(ref_phi) // 2)
        held_out = {"N": len(ref_phi), "boltzmann across basins": ref_boltzmann}
        if n_blocks >= 2:
            held_out["ΔF (block CI)"] = block_free_energy(
                in_region(ref_phi, region), n_blocks, rp.level
            )
        if not ref_boltzmann:
            held_out["note"] = (
                "seeded MD: not Boltzmann across the φ basins (the seeds fix the populations), "
                "so this ΔF is not a reference"
            )
        elif reference is not None or profiles:
            md_profile = phi_profile(
                ref_phi,
                np.zeros(len(ref_phi)),
                reference=None if reference is None else reference.profile,
                method="delta",
                level=rp.level,
            )
            profiles["held-out MD"] = md_profile
            held_out["profile"] = md_profile
    if profiles or reference is not None:
        plots["F(φ): reweighted models vs reference"] = plot_phi_profiles(
            analysis / "profile_phi_models.png", profiles, reference
        )
    return {
        "region": list(region),
        "reference": reference,
        "held-out frames": held_out,
        "plots": plots,
    }


def _fmt(v: Any, spec: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
        return format(float(v), spec)
    return str(v)


def format_estimate(e: Any) -> str:
    """``value [low, high]`` (3 decimals) of an :class:`Estimate` or a
    :func:`~boltzflow.analysis.free_energy.block_free_energy` result; "-" for none."""
    if e is None:
        return "-"
    if isinstance(e, dict):  # block_free_energy's result
        if e.get("value") is None:
            return f"undefined ({e.get('undefined', '')})"
        return f"{e['value']:.3f} [{e['ci_low']:.3f}, {e['ci_high']:.3f}]"
    if not math.isfinite(e.value):
        return "-"
    return f"{e.value:.3f} [{e.ci_low:.3f}, {e.ci_high:.3f}]"


def format_comparison(c: dict[str, Any] | None) -> str:
    """A :func:`~boltzflow.analysis.free_energy.compare_free_energy` result as
    ``difference ± se (z; within 2 se)``; "-" for none."""
    if not c:
        return "-"
    if c.get("difference") is None:
        return "undefined"
    verdict = "yes" if c["consistent_at_2se"] else "**no**"
    return f"{c['difference']:+.3f} ± {c['stderr']:.3f} (z = {c['z']:.2f}; within 2 se: {verdict})"


def molecular_table(rows: list[dict[str, Any]], section: dict[str, Any], level: float) -> str:
    """The markdown of the molecular section: one row per sample store, the held-out frames
    and the reference."""
    lo, hi = section["region"]
    state = f"ΔF({lo:g} < φ < {hi:g} vs rest), kT [{100 * level:g}% CI]"
    head = [
        "model",
        "N",
        "ESS/N",
        "E-W2 rw (kT)",
        "torus W2 (φ, ψ) (rad)",
        "torus W2 rw (rad)",
        "D-form (proposal)",
        state,
        "ΔF − reference (kT)",
    ]
    intro = (
        "Against the held-out frames (torus W2 on (φ, ψ): exact OT with the wrapped distance, at "
        f"most {OT_POINTS:,} points a side, W2 with the root) and the reference profile; "
        "rw = reweighted; ΔF − reference with the combined standard error."
    )
    lines = [intro, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        phi = r.get("φ", {})
        delta = phi.get("ΔF", {})
        shown = _primary(delta)
        cells = [
            r["label"],
            str(r["N"]),
            _fmt(r["ESS/N"], ".4f"),
            _fmt(r.get("energy W2 reweighted (kT)")),
            _fmt(r.get("torus W2 (φ, ψ) proposal (rad)")),
            _fmt(r.get("torus W2 (φ, ψ) reweighted (rad)")),
            _fmt(r.get("D-form fraction (proposal)"), ".4f"),
            format_estimate(shown)
            if shown is not None
            else f"undefined ({delta.get('undefined')})",
            format_comparison(phi.get("ΔF - reference")),
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    held = section.get("held-out frames")
    if held is not None:
        note = " (not a reference: seeded MD)" if not held["boltzmann across basins"] else ""
        cells = [
            f"held-out MD{note}",
            str(held["N"]),
            "-",
            "-",
            "-",
            "-",
            "-",
            format_estimate(held.get("ΔF (block CI)")) + " (block CI)",
            "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    ref = section.get("reference")
    if ref is not None:
        cells = [
            ref.label,
            str(ref.delta_f.n) if ref.delta_f is not None else "-",
            *["-"] * 5,
            format_estimate(ref.delta_f) if ref.delta_f is not None else "-",
            "0",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
