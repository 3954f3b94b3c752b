"""Free energies of alanine dipeptide from a trained model, with CIs, compared with a reference.

Runs the workflow (every finished stage is reused from its output folder), then draws N samples
with log q from a model of it (a student, or the teacher), weights them with
log w = -u(x) - log q(x) (OpenMM energies) and estimates

- ΔF = F(0 < φ < 2) - F(rest) = -log P(0 < φ < 2) / P(rest) in kT (DESIGN.md metric), with
  delta-method and seeded bootstrap CIs;
- the free-energy profile F(φ) on 36 bins over (-π, π] (the reference profile's bins, if there
  is one) with a bootstrap band;

and compares them with the workflow's references: the ``[report] reference_profile`` (umbrella
sampling + MBAR, ``workflows/reference/aldp_umbrella_profile.json`` for ``aldp_internal.toml``)
and the held-out MD frames (``data/reference.h5``, or ``--md``). MD frames are correlated in
time, so the MD interval is from ``--md-blocks`` contiguous blocks
(:func:`boltzflow.analysis.free_energy.block_free_energy`); seeded MD (``md_seeded``) is not
Boltzmann across the φ basins, so its ΔF is shown with that caveat and is not the reference then.
Each comparison reports the difference with its combined standard error.

Chirality: a Cartesian E(3)-equivariant flow also produces D-alanine; its samples are mirrored
back to L (x -> -x; the energy is mirror-invariant and such a flow gives q(-x) = q(x), so
self-normalised weights are unchanged; the mirrored fraction is reported). A model in internal
coordinates (``representation = "internal"``) keeps the handedness of its training molecule and
has no such symmetry: its samples are never mirrored (their D-form fraction is reported).

The computations are those of the workflow report (:mod:`boltzflow.analysis.free_energy`).

Usage:

    python workflows/aldp_free_energy.py --workflow workflows/aldp_internal.toml [--student nf]
    python workflows/aldp_free_energy.py --workflow workflows/aldp.toml [--profile gpu] \\
        [--student falcon] [--steps 4] [-n 10000] [-o runs/aldp/free_energy]

Writes ``free_energy.json``, ``free_energy.md`` and ``profile_phi.png`` (the model's profile with
its band, the reference dashed) and prints the comparison.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from boltzflow.analysis.free_energy import (
    ALDP_STATE_A,
    block_free_energy,
    compare_free_energy,
    in_region,
    load_reference_profile,
    phi_profile,
    region_free_energy,
)
from boltzflow.analysis.report import jsonable
from boltzflow.data import load_positions, read_dataset
from boltzflow.io.atomic import atomic_write_text
from boltzflow.metrics import chirality_rate
from boltzflow.plots import plot_free_energy_profiles
from boltzflow.registry.loading import load_model
from boltzflow.sampling.weights import ess_fraction, log_weights
from boltzflow.systems.base import compute_energies
from boltzflow.workflow import load_workflow, run_workflow
from boltzflow.workflow.layout import REFERENCE_FILE, TEACHER_FILE

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["block_free_energy", "main"]


def _md_frames(path: Path, system: str) -> tuple[np.ndarray, bool]:
    """MD frames and whether they are Boltzmann across the φ basins (False for seeded MD, as
    its dataset's provenance says; True for files without one)."""
    x = load_positions(path, system=system)
    try:
        provenance = read_dataset(path).attrs.get("provenance") or {}
    except (ValueError, OSError):  # .npy or plain HDF5: no provenance
        provenance = {}
    return x, provenance.get("boltzmann_across_basins", True) is not False


def _model_path(wf: Any, name: str) -> Path:
    if name == "teacher":
        return wf.output / TEACHER_FILE
    return wf.output / f"students/{name}/student.pt"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workflow", default=str(ROOT / "workflows" / "aldp.toml"))
    parser.add_argument("--profile", default=None)
    parser.add_argument("--output-run", default=None, help="the workflow's output folder")
    parser.add_argument(
        "--student", default=None, help="a student's name or 'teacher' (default: the report's)"
    )
    parser.add_argument("--steps", type=int, default=None, help="student steps (default: its own)")
    parser.add_argument("-n", type=int, default=None, help="samples (default: the workflow's)")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--md", default=None, help="MD frames (default: data/reference.h5)")
    parser.add_argument("--md-blocks", type=int, default=10)
    parser.add_argument("--bins", type=int, default=36, help="F(φ) bins without a reference")
    parser.add_argument("--n-bootstrap", type=int, default=500)
    parser.add_argument("--level", type=float, default=0.95)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("-o", "--output", default=None, help="default: <run>/free_energy")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    wf = load_workflow(args.workflow, profile=args.profile, output=args.output_run)
    if wf.system not in ("aldp", "aldp_ff96_obc1", "aldp_vacuum"):
        raise SystemExit(f"{args.workflow}: system {wf.system!r} is not alanine dipeptide")
    name = args.student
    if name is None:  # the report's proposal, else the first student
        name = wf.report.proposal
        name = name if name in (*wf.students, "teacher") else next(iter(wf.students), None)
    if name not in wf.students and name != "teacher":
        raise SystemExit(f"no model {name!r} in {args.workflow}: {sorted(wf.students)}")
    run_workflow(wf, progress=True)
    out_dir = Path(args.output) if args.output else wf.output / "free_energy"
    run_dir = wf.output
    model = load_model(_model_path(wf, name), system=wf.system)
    steps = model._steps(args.steps) if model.uses_steps else None
    n = args.n or wf.sample.n
    kw = {"level": args.level, "n_bootstrap": args.n_bootstrap, "seed": args.seed}
    reference = None
    if wf.report.reference_profile is not None:
        reference = load_reference_profile(wf.report.reference_profile)
    region = ALDP_STATE_A if reference is None else reference.region
    mirror = getattr(model, "representation", "cartesian") == "cartesian"

    with wf.open_system() as system:
        x, log_q = model.sample(n, steps=steps, seed=args.seed)
        x, d_form = x.double(), chirality_rate(x, system.chirality_atoms, system.l_form_sign)
        if mirror:
            x = system.fix_chirality(x)[0]
        u = compute_energies(system, x)
        log_w = log_weights(u, log_q.double()).numpy()
        phi = system.backbone_dihedrals(x)[0].numpy()
        md_path = Path(args.md) if args.md else run_dir / REFERENCE_FILE
        md_x, md_boltzmann = _md_frames(md_path, wf.system)
        md_phi = system.backbone_dihedrals(torch.as_tensor(md_x, dtype=torch.float64))[0].numpy()

    delta = region_free_energy(phi, log_w, region=region, methods=("delta", "bootstrap"), **kw)
    delta = {m: delta.get(m, {"undefined": delta.get("undefined")}) for m in ("delta", "bootstrap")}
    results: dict[str, Any] = {
        "workflow": wf.name,
        "student": name,
        "representation": getattr(model, "representation", "cartesian"),
        "steps": steps,
        "n": n,
        "seed": args.seed,
        "ESS/N": ess_fraction(torch.as_tensor(log_w)),
        "D-form fraction": d_form,
        "D-form fraction mirrored to L": d_form if mirror else 0.0,
        "state A": f"{region[0]:g} < φ < {region[1]:g} rad",
        "ΔF student (delta)": delta["delta"],
        "ΔF student (bootstrap)": delta["bootstrap"],
        "ΔF MD (block CI)": block_free_energy(
            in_region(md_phi, region), args.md_blocks, args.level
        ),
        "MD frames": str(md_path),
        "MD Boltzmann across basins": md_boltzmann,
    }
    results["student - MD"] = compare_free_energy(
        results["ΔF student (delta)"], results["ΔF MD (block CI)"]
    )
    if reference is not None:
        results["reference"] = {"label": reference.label, "source": reference.source}
        if reference.delta_f is not None:
            results["ΔF reference"] = reference.delta_f
            results["student - reference"] = compare_free_energy(
                results["ΔF student (delta)"], reference.delta_f
            )
    ref_profile = None if reference is None else reference.profile
    prof_kw = {"reference": ref_profile, "bins": args.bins, **kw}
    profile = phi_profile(phi, log_w, **prof_kw)
    md_profile = phi_profile(md_phi, np.zeros(len(md_phi)), method="delta", **prof_kw)
    results["profile φ, student"] = profile
    results["profile φ, MD"] = md_profile
    curves = {f"{name} reweighted": profile}
    if md_boltzmann:
        curves["held-out MD"] = md_profile
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_free_energy_profiles(
        out_dir / "profile_phi.png",
        curves,
        reference=ref_profile,
        reference_label="" if reference is None else reference.label,
        label="φ [rad]",
        f_max=14.0,
    )
    results["plot"] = str(plot)
    atomic_write_text(out_dir / "free_energy.json", json.dumps(jsonable(results), indent=2) + "\n")
    text = _markdown(results)
    atomic_write_text(out_dir / "free_energy.md", text)
    print(text)
    print(f"wrote {out_dir / 'free_energy.json'}, {out_dir / 'free_energy.md'}, {plot}")
    return results


def _fmt(v: Any) -> str:
    if isinstance(v, dict):
        if v.get("value") is None:
            return f"undefined: {v.get('undefined', '')}"
        return f"{v['value']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}] (se {v['stderr']:.2g})"
    if hasattr(v, "ci_low"):
        return f"{v.value:.3f} [{v.ci_low:.3f}, {v.ci_high:.3f}] (se {v.stderr:.2g}, {v.method})"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _compare_row(label: str, c: dict[str, Any]) -> str:
    if c.get("difference") is None:
        return f"| {label} | {c['note']} |"
    verdict = "consistent" if c["consistent_at_2se"] else "NOT consistent"
    return (
        f"| {label} | {c['difference']:.3f} ± {c['stderr']:.3f} (z = {c['z']:.2f}, "
        f"{verdict} within 2 se) |"
    )


def _markdown(r: dict[str, Any]) -> str:
    steps = f", {r['steps']} steps" if r["steps"] is not None else ""
    if r["representation"] == "cartesian":
        chirality = f"{100 * r['D-form fraction mirrored to L']:.1f}% D-form samples mirrored to L"
    else:
        chirality = (
            f"{100 * r['D-form fraction']:.2f}% D-form samples ({r['representation']} "
            "coordinates: not mirrored)"
        )
    md_note = "" if r["MD Boltzmann across basins"] else " (seeded MD: not Boltzmann across basins)"
    lines = [
        f"# ALDP free energies: {r['student']}{steps}",
        "",
        f"N = {r['n']} samples (seed {r['seed']}), ESS/N {r['ESS/N']:.4f}; {chirality}; "
        f"state A: {r['state A']}; MD: {r['MD frames']}{md_note}.",
        "",
        "| quantity | value (kT) |",
        "|---|---|",
    ]
    keys = ["ΔF student (delta)", "ΔF student (bootstrap)", "ΔF MD (block CI)", "ΔF reference"]
    for key in keys:
        if key in r:
            label = f"{key}: {r['reference']['label']}" if key == "ΔF reference" else key
            lines.append(f"| {label} | {_fmt(r[key])} |")
    if "student - reference" in r:
        lines.append(_compare_row("student - reference", r["student - reference"]))
    lines.append(_compare_row(f"student - MD{md_note}", r["student - MD"]))
    lines += ["", "![φ profile](profile_phi.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
