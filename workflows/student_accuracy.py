"""ESS/N spread over many sampling seeds and log q error with a confidence interval, at K steps.

Complements ``benchmark_students.py`` (one table, throughput, four seeds) with larger samples of
the two accuracy targets of the students:

- ESS/N of N samples on each of ``--seeds`` sampling seeds ``first + stride * j``: mean and its
  standard error over the seeds, the lowest seed, and the ESS/N of all samples pooled, for the
  teacher (adaptive ODE, exact trace; ``--no-teacher`` skips it, about 3 min per seed on DW4)
  and every student at ``--steps``, with each mean's ratio to the teacher's;
- with ``--dlogq M``: the median |log q - log q_teacher| over M of each student's samples (seed
  ``--dlogq-seed``) with a bootstrap 95% CI, for the sampler's log q and for ``log_prob`` scoring
  the same points (data -> noise), against the teacher's exact log q.

Usage (DW4, one thread):

    OMP_NUM_THREADS=1 .venv/bin/python workflows/student_accuracy.py --teacher runs/dw4_teacher \\
        --student f2d2=runs/dw4_f2d2 --seeds 16 --dlogq 2048 --json runs/student_accuracy.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from boltzflow.distill import load_student
from boltzflow.distill.train_students import teacher_system
from boltzflow.flows.cnf import TeacherCNF
from boltzflow.io.atomic import atomic_write_text
from boltzflow.sampling.estimators import bootstrap_replicates
from boltzflow.sampling.weights import ess_fraction
from boltzflow.systems import load_system
from boltzflow.workflow.benchmark import logq_abs_errors, sample_log_weights


def ess_spread(system: Any, sample: Any, seeds: list[int]) -> dict[str, Any]:
    """ESS/N of ``sample(seed) -> (x (N, dim), log_q (N,))`` on each seed, and pooled."""
    parts = [sample_log_weights(system, *sample(seed)) for seed in seeds]
    values = [ess_fraction(lw) for lw in parts]
    mean = float(np.mean(values))
    se = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan
    return {
        "seeds": seeds,
        "ess_fraction": values,
        "mean": mean,
        "se": se,
        "lowest": min(values),
        "pooled": ess_fraction(torch.cat(parts)),
    }


def median_ci(err: np.ndarray, *, seed: int = 0) -> dict[str, float]:
    """Median of ``err (M,)`` with a percentile bootstrap 95% CI (2,000 replicates)."""
    reps = bootstrap_replicates(
        lambda idx: np.median(err[idx]), len(err), n_bootstrap=2000, seed=seed
    )
    lo, hi = np.quantile(reps, [0.025, 0.975])
    return {"median": float(np.median(err)), "lo": float(lo), "hi": float(hi)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", action="append", default=[], help="NAME=RUN_DIR (repeatable)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--n", type=int, default=4096, help="samples per seed")
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--first-seed", type=int, default=500)
    ap.add_argument("--stride", type=int, default=37)
    ap.add_argument("--no-teacher", dest="with_teacher", action="store_false")
    ap.add_argument("--dlogq", type=int, default=0, help="samples for the log q error (0: none)")
    ap.add_argument("--dlogq-seed", type=int, default=2026)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.n < 2:
        ap.error("--seeds must be >= 1 and --n >= 2")
    torch.set_num_threads(args.threads)
    teacher = TeacherCNF.load(args.teacher)
    teacher.eval()
    name = teacher_system(args.teacher)
    if name is None:
        ap.error(f"{args.teacher}: the teacher run does not name its system")
    system = load_system(name)
    students = {}
    for spec in args.student:
        key, sep, path = spec.partition("=")
        if not sep:
            ap.error(f"--student {spec!r}: expected NAME=RUN_DIR")
        students[key] = load_student(path, system=system).eval()
    seeds = [args.first_seed + args.stride * j for j in range(args.seeds)]
    rows: dict[str, dict[str, Any]] = {}
    with torch.no_grad():
        if args.with_teacher:
            rows["teacher"] = ess_spread(system, lambda s: teacher.sample(args.n, seed=s), seeds)
        for key, model in students.items():
            rows[key] = ess_spread(
                system,
                lambda s, m=model: m.sample(args.n, steps=args.steps, seed=s, batch_size=4096),
                seeds,
            )
    for key, model in students.items() if args.dlogq else ():
        x, log_q = model.sample(args.dlogq, steps=args.steps, seed=args.dlogq_seed, batch_size=4096)
        ref = teacher.log_prob(x)
        with torch.no_grad():
            err, scored = logq_abs_errors(model, args.steps, x, log_q, ref, batch_size=4096)
        rows[key]["dlogq"] = median_ci(err.numpy())
        rows[key]["dlogq_scored"] = median_ci(scored.numpy())
    base = rows.get("teacher", {}).get("mean")
    print(f"{name}: K = {args.steps}, N = {args.n} per seed, seeds {seeds[0]} + {args.stride} j")
    print("| model | ESS/N mean ± s.e. | lowest | pooled | / teacher | median |dlogq| | scored |")
    print("|---|---|---|---|---|---|---|")
    for key, r in rows.items():
        ratio = f"{r['mean'] / base:.2f}" if base else "-"
        dl = [
            f"{r[k]['median']:.3f} [{r[k]['lo']:.3f}, {r[k]['hi']:.3f}]" if k in r else "-"
            for k in ("dlogq", "dlogq_scored")
        ]
        print(
            f"| {key} | {r['mean']:.3f} ± {r['se']:.3f} | {r['lowest']:.3f} | {r['pooled']:.3f} "
            f"| {ratio} | {dl[0]} | {dl[1]} |"
        )
    if args.json:
        atomic_write_text(args.json, json.dumps({"args": vars(args), "rows": rows}, default=str))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
