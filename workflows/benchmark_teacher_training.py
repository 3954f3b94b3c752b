"""Teacher training speed with the minibatches built inline or by a background worker, and
with the loss compiled (``train.compile``).

With equivariant-OT couplings the assignment problems of one DW4 step (the 4! x B x B orbit
cost and the Hungarian solve) cost about as much as the EGNN's forward and backward pass, so a
worker process that builds the next batches while the optimiser runs raises the steps per second
on two cores (1.4x measured on 2026-12-02, docs/benchmarks.md). This script trains the DW4
teacher config for the same number of steps in each layout, side by side, times the steady
state (after the first logged window), and checks that every layout ends with bit-identical
weights (the batches depend on (seed, step) only); compiled layouts are compared with the first
compiled one (compilation changes the float rounding, not the batches). Rates are steady-state:
the compilation itself (tens of seconds, in the first window) is left out.
On a shared virtual machine the rate drifts by tens of percent over minutes, so the layouts are
run in turn ``--repeats`` times and the median rate is reported.

Usage (two idle cores)::

    .venv/bin/python workflows/benchmark_teacher_training.py [--steps 500] [--repeats 3] \\
        [--layouts 1x0 2x0 1x1 1x2 1x1c] [--json runs/benchmark_teacher_training.json]

A layout ``TxW`` is T torch threads in the training process and W data workers (one thread
each); a trailing ``c`` compiles the loss. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from boltzflow.data import load_positions
from boltzflow.io.atomic import atomic_write_text
from boltzflow.io.checkpoint import load_checkpoint
from boltzflow.systems import load_system
from boltzflow.train.config import load_teacher_config
from boltzflow.train.teacher import SystemShape, train_teacher

ROOT = Path(__file__).resolve().parents[1]


def _layout(text: str) -> tuple[int, int, bool]:
    compiled = text.lower().endswith("c")
    try:
        threads, workers = (int(v) for v in text.lower().removesuffix("c").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"layout must look like 1x1 or 1x1c, got {text!r}"
        ) from None
    if threads < 1 or workers < 0:
        raise argparse.ArgumentTypeError(f"need >= 1 thread and >= 0 workers, got {text!r}")
    return threads, workers, compiled


def time_layout(
    cfg: Any,
    data: torch.Tensor,
    shape: SystemShape,
    threads: int,
    workers: int,
    steps: int,
    compiled: bool = False,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Train ``steps`` steps in one layout; returns its timing row and final raw weights."""
    cfg.train.data_workers = workers
    cfg.train.compile = compiled
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            train_teacher(cfg, data, tmp, shape, progress=False, stop_at=steps)
            lines = (Path(tmp) / "metrics.jsonl").read_text().splitlines()
            state = load_checkpoint(Path(tmp) / "checkpoint.pt", kind="training")["model"]
    finally:
        torch.set_num_threads(previous)
    metrics = [json.loads(line) for line in lines]
    first, last = metrics[0], metrics[-1]
    steady = (last["step"] - first["step"]) / (last["elapsed_s"] - first["elapsed_s"])
    row = {
        "layout": f"{threads}x{workers}" + ("c" if compiled else ""),
        "threads": threads,
        "data_workers": workers,
        "compile": compiled,
        "steps": last["step"],
        "wall_s": last["elapsed_s"],
        "steps_per_s": steady,
    }
    return row, state


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "workflows/configs/teacher_dw4.toml"))
    parser.add_argument("--profile", default=None)
    parser.add_argument(
        "--data", default=str(ROOT.parent / "shared/reference/dem/train_split_DW4.npy")
    )
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--layouts",
        type=_layout,
        nargs="+",
        default=[(1, 0, False), (2, 0, False), (1, 1, False), (1, 2, False), (1, 1, True)],
    )
    parser.add_argument("--json", default=str(ROOT / "runs/benchmark_teacher_training.json"))
    args = parser.parse_args(argv)

    cfg = load_teacher_config(args.config, args.profile)
    if not 2 <= args.steps <= cfg.train.steps:
        parser.error(f"--steps must be in [2, train.steps = {cfg.train.steps}], got {args.steps}")
    cfg.train.log_every = max(1, min(cfg.train.log_every, args.steps // 5))  # >= 2 windows
    cfg.train.checkpoint_every = args.steps
    shape = SystemShape.of(load_system(cfg.system))
    data = torch.as_tensor(load_positions(args.data, system=cfg.system))

    runs: dict[str, list[dict[str, Any]]] = {}
    reference: dict[bool, dict[str, torch.Tensor]] = {}  # first weights, eager and compiled
    for repeat in range(args.repeats):
        for threads, workers, compiled in args.layouts:
            row, state = time_layout(cfg, data, shape, threads, workers, args.steps, compiled)
            first = reference.setdefault(compiled, state)
            row["same_weights"] = all(torch.equal(v, first[k]) for k, v in state.items())
            runs.setdefault(row["layout"], []).append(row)
            print(
                f"  [{repeat + 1}/{args.repeats}] {row['layout']}: "
                f"{row['steps_per_s']:.2f} steps/s",
                flush=True,
            )
    rows = []
    for reps in runs.values():
        row = dict(reps[0])
        row.update(
            steps_per_s=statistics.median(r["steps_per_s"] for r in reps),
            steps_per_s_runs=[r["steps_per_s"] for r in reps],
            wall_s=statistics.median(r["wall_s"] for r in reps),
            same_weights=all(r["same_weights"] for r in reps),
        )
        rows.append(row)
    base = rows[0]["steps_per_s"]
    for row in rows:
        row["speedup"] = row["steps_per_s"] / base

    print(
        f"\n{cfg.system} teacher training, {args.steps} steps x {args.repeats} repeats, "
        f"batch {cfg.train.batch_size}"
    )
    print("| threads x workers (c: compiled) | steps/s (median) | runs | speed-up | same weights |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['layout']} | {r['steps_per_s']:.2f} "
            f"| {', '.join(f'{v:.1f}' for v in r['steps_per_s_runs'])} | {r['speedup']:.2f}x "
            f"| {'yes' if r['same_weights'] else 'NO'} |"
        )
    report = {"config": args.config, "steps": args.steps, "repeats": args.repeats, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(args.json), json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return rows


if __name__ == "__main__":
    main()
