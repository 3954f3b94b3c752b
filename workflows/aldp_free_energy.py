"""Free energies of alanine dipeptide from a trained student, with CIs, compared with MD.

Runs the workflow (every finished stage is reused from its output folder), then draws N samples
with log q from a student, mirrors D-alanine samples back to L (x -> -x; the energy is
mirror-invariant and the E(3)-equivariant flows give q(-x) = q(x), so self-normalised weights are
unchanged; the mirrored fraction is reported), weights them with log w = -u(x) - log q(x)
(OpenMM energies) and estimates

- ΔF = F(0 < φ < 2) - F(rest) = -log P(0 < φ < 2) / P(rest) in kT (DESIGN.md metric), with
  delta-method and seeded bootstrap CIs;
- the free-energy profile F(φ) on 36 bins over (-π, π] with a bootstrap band;

and the same from the held-out MD frames of the workflow (``data/reference.h5``, or ``--md``).
MD frames are correlated in time, so the MD interval is from ``--md-blocks`` contiguous blocks:
P(A) is averaged over blocks, its standard error is the blocks' standard deviation / sqrt(B)
(Student t quantile), and ΔF = -log(P / (1 - P)) takes it through the delta method
(Flyvbjerg & Petersen 1989, J. Chem. Phys. 91:461, block averaging). The comparison reports the
difference with its combined standard error.

Usage:

    python workflows/aldp_free_energy.py --workflow workflows/aldp.toml [--profile gpu] \\
        [--student falcon] [--steps 4] [-n 10000] [-o runs/aldp/free_energy]

Writes ``free_energy.json``, ``free_energy.md`` and ``profile_phi.png`` (student profile with its
band, MD profile dashed) and prints the comparison.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from boltzflow.analysis.report import jsonable
from boltzflow.analysis.reweight import ALDP_STATE_A
from boltzflow.data import load_positions
from boltzflow.distill import load_student
from boltzflow.io.atomic import atomic_write_text
from boltzflow.plots import plot_free_energy_profile
from boltzflow.sampling.estimators import free_energy_difference, free_energy_profile
from boltzflow.sampling.weights import ess_fraction, log_weights
from boltzflow.systems.base import compute_energies
from boltzflow.workflow import load_workflow, run_workflow
from boltzflow.workflow.layout import REFERENCE_FILE

ROOT = Path(__file__).resolve().parents[1]


def in_state_a(phi: np.ndarray) -> np.ndarray:
    """0 < φ < 2 rad (the metastable state of positive φ)."""
    lo, hi = ALDP_STATE_A
    return (phi > lo) & (phi < hi)


def block_free_energy(in_a: np.ndarray, n_blocks: int = 10, level: float = 0.95) -> dict:
    """ΔF = -log(P / (1 - P)) from a time series of state memberships, with a block CI.

    Args:
        in_a: ``(N,)`` bool, frame in state A (time order).
        n_blocks: contiguous blocks B (>= 2); the last N mod B frames are dropped.
        level: confidence level.

    Returns:
        ``value``, ``ci_low``, ``ci_high``, ``stderr`` (kT), ``p_a`` and its ``p_stderr``,
        ``n``, ``n_blocks``; ``value`` is None (with ``undefined``) if P is 0 or 1.
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


def _estimate(fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except ValueError as err:
        return {"undefined": str(err)}


def compare(student: Any, md: dict) -> dict:
    """Difference student - MD with the combined standard error (None if either is undefined)."""
    value = getattr(student, "value", None)
    if value is None or md.get("value") is None:
        return {"difference": None, "note": "undefined (a state carries no weight)"}
    diff = value - md["value"]
    se = math.sqrt(student.stderr**2 + md["stderr"] ** 2)
    z = diff / se if se > 0 else math.inf
    return {"difference": diff, "stderr": se, "z": z, "consistent_at_2se": abs(z) <= 2}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workflow", default=str(ROOT / "workflows" / "aldp.toml"))
    parser.add_argument("--profile", default=None)
    parser.add_argument("--output-run", default=None, help="the workflow's output folder")
    parser.add_argument("--student", default=None, help="student name (default: the report's)")
    parser.add_argument("--steps", type=int, default=None, help="student steps (default: its own)")
    parser.add_argument("-n", type=int, default=None, help="samples (default: the workflow's)")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--md", default=None, help="MD frames (default: data/reference.h5)")
    parser.add_argument("--md-blocks", type=int, default=10)
    parser.add_argument("--bins", type=int, default=36)
    parser.add_argument("--n-bootstrap", type=int, default=500)
    parser.add_argument("--level", type=float, default=0.95)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("-o", "--output", default=None, help="default: <run>/free_energy")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    wf = load_workflow(args.workflow, profile=args.profile, output=args.output_run)
    if wf.system not in ("aldp", "aldp_ff96_obc1", "aldp_vacuum"):
        raise SystemExit(f"{args.workflow}: system {wf.system!r} is not alanine dipeptide")
    name = args.student or (wf.report.proposal if wf.report.proposal in wf.students else None)
    name = name or next(iter(wf.students), None)
    if name not in wf.students:
        raise SystemExit(f"no student {name!r} in {args.workflow}: {sorted(wf.students)}")
    run_workflow(wf, progress=True)
    out_dir = Path(args.output) if args.output else wf.output / "free_energy"
    run_dir = wf.output
    student = load_student(run_dir / f"students/{name}/student.pt", system=wf.system)
    steps = student._steps(args.steps)
    n = args.n or wf.sample.n
    kw = {"level": args.level, "n_bootstrap": args.n_bootstrap, "seed": args.seed}

    with wf.open_system() as system:
        x, log_q = student.sample(n, steps=steps, seed=args.seed)
        x, mirrored = system.fix_chirality(x.double())
        u = compute_energies(system, x)
        log_w = log_weights(u, log_q.double()).numpy()
        phi = system.backbone_dihedrals(x)[0].numpy()
        md_path = Path(args.md) if args.md else run_dir / REFERENCE_FILE
        md_x = load_positions(md_path, system=wf.system)
        md_phi = system.backbone_dihedrals(torch.as_tensor(md_x, dtype=torch.float64))[0].numpy()

    a = in_state_a(phi)
    results: dict[str, Any] = {
        "workflow": wf.name,
        "student": name,
        "steps": steps,
        "n": n,
        "seed": args.seed,
        "ESS/N": ess_fraction(torch.as_tensor(log_w)),
        "D-form fraction mirrored to L": mirrored,
        "state A": f"{ALDP_STATE_A[0]:g} < φ < {ALDP_STATE_A[1]:g} rad",
        "ΔF student (delta)": _estimate(free_energy_difference, a, ~a, log_w, method="delta", **kw),
        "ΔF student (bootstrap)": _estimate(
            free_energy_difference, a, ~a, log_w, method="bootstrap", **kw
        ),
        "ΔF MD (block CI)": block_free_energy(in_state_a(md_phi), args.md_blocks, args.level),
        "MD frames": str(md_path),
    }
    results["student - MD"] = compare(results["ΔF student (delta)"], results["ΔF MD (block CI)"])
    rng = (-math.pi, math.pi)
    profile = free_energy_profile(phi, log_w, bins=args.bins, value_range=rng, **kw)
    md_profile = free_energy_profile(
        md_phi, np.zeros(len(md_phi)), bins=args.bins, value_range=rng, method="delta"
    )
    results["profile φ, student"] = profile
    results["profile φ, MD"] = md_profile
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_free_energy_profile(
        out_dir / "profile_phi.png", profile, label="φ [rad]", reference=md_profile, f_max=12.0
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


def _markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# ALDP free energies: {r['student']} student, {r['steps']} steps",
        "",
        f"N = {r['n']} samples (seed {r['seed']}), ESS/N {r['ESS/N']:.4f}; "
        f"{100 * r['D-form fraction mirrored to L']:.1f}% D-form samples mirrored to L; "
        f"state A: {r['state A']}; MD: {r['MD frames']}.",
        "",
        "| quantity | value (kT) |",
        "|---|---|",
    ]
    for key in ("ΔF student (delta)", "ΔF student (bootstrap)", "ΔF MD (block CI)"):
        lines.append(f"| {key} | {_fmt(r[key])} |")
    c = r["student - MD"]
    if c.get("difference") is None:
        lines.append(f"| student - MD | {c['note']} |")
    else:
        verdict = "consistent" if c["consistent_at_2se"] else "NOT consistent"
        lines.append(
            f"| student - MD | {c['difference']:.3f} ± {c['stderr']:.3f} (z = {c['z']:.2f}, "
            f"{verdict} within 2 se) |"
        )
    lines += ["", "![φ profile](profile_phi.png)", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
