"""Eager against compiled sampling with exact log q: samples with log q per second.

For every ``--model NAME=PATH`` (a teacher CNF: its exact divergence; FALCON, or F2D2 weighted
by ``exact_logdet``: the exact log-det jumps, at every ``--steps`` K), one run draws the same
``--n`` samples (seed ``--seed``) eagerly and through ``torch.compile`` (``set_compiled``:
:class:`boltzflow.nn.compile.CompiledPaths`), alternating the two ``--repeats`` times after
one untimed warm-up each (the compilation, reported apart as ``compile_s``). A row gives the
median samples/s of each, their ratio, and the largest difference of x and of log q between
the two (the compiled path must give the eager values to rounding).

Usage (one thread)::

    OMP_NUM_THREADS=1 .venv/bin/python workflows/benchmark_compiled_sampling.py \\
        --model teacher=models/dw4-teacher --model falcon=runs/dw4_falcon \\
        [--model f2d2=models/dw4-f2d2] [--steps 1 2 4 8] [--n 4096] [--batch 4096] \\
        [--repeats 3] [--threads 1] [--json runs/benchmark_compiled_sampling.json]

Prints a markdown table and writes the JSON atomically.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from boltzflow.distill import F2D2
from boltzflow.io.atomic import atomic_write_text
from boltzflow.nn.compile import CompiledPaths
from boltzflow.registry.loading import load_model

ROOT = Path(__file__).resolve().parents[1]


def _draw(model: Any, args: argparse.Namespace, steps: int | None) -> tuple[Any, Any, float]:
    """``x``, ``log_q`` and the seconds of one draw of ``--n`` samples."""
    settings = {"exact_logdet": True} if isinstance(model, F2D2) else {}
    start = time.perf_counter()
    x, log_q = model.sample(args.n, steps=steps, seed=args.seed, batch_size=args.batch, **settings)
    return x, log_q, time.perf_counter() - start


def _row(name: str, model: Any, steps: int | None, args: argparse.Namespace) -> dict:
    """Eager and compiled timings of one model at ``steps`` steps, interleaved."""
    model.set_compiled(False)
    x0, q0, _ = _draw(model, args, steps)  # warm-up (eager)
    model.set_compiled(True)
    x1, q1, compile_s = _draw(model, args, steps)  # warm-up (compiles)
    eager, compiled = [], []
    for _ in range(args.repeats):  # the flag alone: set_compiled would drop the graph
        model.compiled = False
        eager.append(_draw(model, args, steps)[2])
        model.compiled = True
        compiled.append(_draw(model, args, steps)[2])
    t_eager, t_comp = statistics.median(eager), statistics.median(compiled)
    return {
        "model": name,
        "kind": getattr(model, "student_kind", "teacher_cnf"),
        "steps": steps if steps is not None else "ode",
        "n": args.n,
        "eager_per_s": args.n / t_eager,
        "compiled_per_s": args.n / t_comp,
        "speedup": t_eager / t_comp,
        "compile_s": compile_s,
        "max_abs_dx": float((x1 - x0).abs().max()),
        "max_abs_dlogq": float((q1 - q0).abs().max()),
        "eager_s": eager,
        "compiled_s": compiled,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", action="append", required=True, help="NAME=PATH (repeatable)")
    parser.add_argument("--steps", type=int, nargs="+", default=[4])
    parser.add_argument("--n", type=int, default=4096, help="samples per draw")
    parser.add_argument("--batch", type=int, default=4096, help="sampling batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=str(ROOT / "runs/benchmark_compiled_sampling.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for spec in args.model:
        name, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--model expects NAME=PATH, got {spec!r}")
        model = load_model(path)
        if not isinstance(model, CompiledPaths):
            raise SystemExit(f"--model {name}: {path} has no compiled sampling path")
        model.eval()
        for steps in args.steps if model.uses_steps else [None]:
            row = _row(name, model, steps, args)
            rows.append(row)
            print(
                f"{name} K={row['steps']}: eager {row['eager_per_s']:.0f}/s, compiled "
                f"{row['compiled_per_s']:.0f}/s ({row['speedup']:.2f}x)",
                flush=True,
            )
    report = {"settings": vars(args), "torch": torch.__version__, "rows": rows}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
    print(f"\n{args.n} samples per draw, {args.threads} thread(s), median of {args.repeats}")
    print("| model | K | eager /s | compiled /s | speed-up | compile s | max dx | max dlogq |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['steps']} | {r['eager_per_s']:.0f} | "
            f"{r['compiled_per_s']:.0f} | {r['speedup']:.2f}x | {r['compile_s']:.1f} | "
            f"{r['max_abs_dx']:.1e} | {r['max_abs_dlogq']:.1e} |"
        )
    return report


if __name__ == "__main__":
    main()
