"""ESS/N of an F2D2 student with maximum-likelihood self-guidance, over step counts and scales.

Self-guidance (Ai et al. 2025, arXiv:2512.02636; :mod:`boltzflow.distill.f2d2_guidance`) moves
each prior draw z one gradient step uphill on the student's one-jump estimate of the
log-likelihood of its sample, then runs the K jumps; log q is the exact density of that guided
map (its Hessian log-determinant added to the student's own divergence estimate), so the
importance weights log w = -u(x) - log q(x) stay valid. This script asks whether it helps them.

For N draws of one seed it computes the guidance field (gradient and exact Hessian) once, then
for every scale lam and every K the guided samples and their weights, all from the same noise
(common random numbers: differences between scales are not seed noise), and reports per cell
ESS/N (Kish, with N), the mean reduced energy <u> of the unweighted samples (kT; guidance
towards likelihood concentrates them, lowering <u>) and <log w> (a lower bound on log Z, up to
the student's log q error). A scale at which the guided map folds at some drawn point (its
Jacobian not positive definite, so no density) is reported as such, with the largest scale the
draws allow. ``--teacher`` adds the teacher's ESS/N on N samples of the same seed (its own ODE
settings; slow: minutes on DW4, hours on LJ13 on one CPU thread).

Usage (one thread; DW4 takes about 1 min of guidance field per 4096 draws, LJ13 about 5 min):

    OMP_NUM_THREADS=1 .venv/bin/python workflows/f2d2_guidance.py --student runs/dw4_f2d2 \\
        --n 4096 --seed 0 --json runs/dw4_f2d2_guidance.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from boltzflow.analysis.report import jsonable
from boltzflow.distill import F2D2, load_student
from boltzflow.distill.f2d2_guidance import check_guidance, likelihood_guidance
from boltzflow.flows.cnf import TeacherCNF
from boltzflow.io.atomic import atomic_write_text
from boltzflow.sampling.results import WeightedSamples
from boltzflow.sampling.weights import ess_fraction
from boltzflow.systems import load_system
from boltzflow.systems.base import compute_energies

#: percentiles of the per-draw invertibility limit of the scale that the report prints
LIMIT_QUANTILES = (0.1, 1, 10, 50)


def cell_metrics(system: Any, x: torch.Tensor, log_q: torch.Tensor) -> dict[str, float]:
    """ESS/N, <u> (kT) and <log w> of samples ``x (N, dim)`` with ``log_q (N,)``."""
    x = x.detach().cpu().double()
    ws = WeightedSamples.from_energies(
        x, log_q.detach().cpu().double(), compute_energies(system, x)
    )
    finite = torch.isfinite(ws.log_w)
    return {
        "ess_fraction": ess_fraction(ws.log_w),
        "mean_energy": float(ws.u[finite].mean()),
        "mean_log_w": float(ws.log_w[finite].mean()),
        "nonfinite": int((~finite).sum()),
    }


def guidance_grid(
    model: F2D2,
    system: Any,
    *,
    n: int,
    seed: int,
    steps: list[int],
    scales: list[float],
    batch_size: int,
) -> dict[str, Any]:
    """Every (K, lam) cell from the same ``n`` prior draws of ``seed`` (those
    ``model.sample(n, seed=seed)`` starts from), one guidance field per batch."""
    p = next(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    z_all = model.prior.sample(n, generator=gen, dtype=p.dtype, device=p.device)
    parts: dict[tuple[int, float], list[tuple[torch.Tensor, torch.Tensor]]] = {
        (k, lam): [] for k in steps for lam in scales
    }
    seconds = {key: 0.0 for key in parts}
    folded: dict[float, str] = {}
    field_seconds, limits = 0.0, []
    model.eval()
    for start in range(0, n, batch_size):
        t0 = time.perf_counter()
        field = likelihood_guidance(model, z_all[start : start + batch_size])
        field_seconds += time.perf_counter() - t0
        limits.append(field.scale_limits())
        for lam in scales:
            if lam in folded:
                continue
            for k in steps:
                t0 = time.perf_counter()
                try:
                    parts[k, lam].append(model.draw_guided(field, steps=k, guidance=lam))
                except ValueError as err:  # the guided map folds at a drawn point
                    folded[lam] = str(err)
                    break
                seconds[k, lam] += time.perf_counter() - t0
    cells = []
    for (k, lam), got in parts.items():
        cell: dict[str, Any] = {
            "steps": k,
            "guidance": lam,
            "n": n,
            "invertible": lam not in folded,
        }
        if lam in folded:
            cell["error"] = folded[lam]
        else:
            x = torch.cat([g[0] for g in got])
            log_q = torch.cat([g[1] for g in got])
            cell.update(cell_metrics(system, x, log_q), push_seconds=seconds[k, lam])
        cells.append(cell)
    limit = torch.cat(limits)
    quantiles = {f"q{q:g}": float(limit.quantile(q / 100)) for q in LIMIT_QUANTILES}
    return {
        "cells": cells,
        "largest_scale": float(limit.min()),
        "scale_limit_quantiles": quantiles,
        "field_seconds": field_seconds,
    }


def _table(result: dict[str, Any], steps: list[int], scales: list[float], key: str) -> str:
    """Markdown table of ``key`` per K (rows) and lam (columns)."""
    by = {(c["steps"], c["guidance"]): c for c in result["cells"]}
    lines = [
        "| K | " + " | ".join(f"lam = {lam:g}" for lam in scales) + " |",
        "|---|" + "---|" * len(scales),
    ]
    for k in steps:
        vals = [f"{by[k, lam][key]:.4g}" if by[k, lam]["invertible"] else "folds" for lam in scales]
        lines.append(f"| {k} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--student", required=True, help="F2D2 run folder or student file")
    ap.add_argument("--teacher", help="teacher run folder: adds its ESS/N (slow)")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument(
        "--guidance", type=float, nargs="+", default=[0.0, 0.05, 0.1, 0.2, 0.5], help="scales"
    )
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=1024, help="draws per guidance field")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.n < 2 or args.batch_size < 1 or min(args.steps) < 1:
        ap.error("--n must be >= 2, --batch-size and --steps >= 1")
    try:
        scales = [check_guidance(lam) for lam in args.guidance]
    except ValueError as err:
        ap.error(str(err))
    torch.set_num_threads(args.threads)
    model = load_student(args.student)
    if not isinstance(model, F2D2):
        ap.error(f"{args.student}: holds a {model.student_kind} student, not F2D2")
    if model.system is None:
        ap.error(f"{args.student}: the student does not name its system")
    system = load_system(model.system)
    try:
        result = guidance_grid(
            model,
            system,
            n=args.n,
            seed=args.seed,
            steps=args.steps,
            scales=scales,
            batch_size=args.batch_size,
        )
        if args.teacher:
            teacher = TeacherCNF.load(args.teacher).eval()
            t0 = time.perf_counter()
            x, log_q = teacher.sample(args.n, seed=args.seed)
            result["teacher"] = cell_metrics(system, x, log_q)
            result["teacher"]["seconds"] = time.perf_counter() - t0
    finally:
        system.close()
    print(
        f"{model.system}: F2D2 {args.student}, N = {args.n}, seed {args.seed}; "
        f"guidance field {result['field_seconds']:.1f} s; largest invertible scale over the "
        f"draws {result['largest_scale']:.4g}"
    )
    q = result["scale_limit_quantiles"]
    print(
        "per-draw limits (percentiles "
        + ", ".join(f"{k[1:]}: {v:.3g}" for k, v in q.items())
        + "): a fold at any drawn point rules the scale out for all"
    )
    print("\nESS/N (Kish)\n" + _table(result, args.steps, scales, "ess_fraction"))
    print(
        "\n<u> of the unweighted samples (kT)\n" + _table(result, args.steps, scales, "mean_energy")
    )
    print("\n<log w> (lower bound on log Z)\n" + _table(result, args.steps, scales, "mean_log_w"))
    if "teacher" in result:
        t = result["teacher"]
        print(
            f"\nteacher ({args.teacher}): ESS/N {t['ess_fraction']:.4g}, <u> {t['mean_energy']:.4g}"
        )
    out = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "system": model.system,
        **result,
    }
    if args.json:
        atomic_write_text(args.json, json.dumps(jsonable(out), indent=1))  # inf -> null
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
