"""How many sample rows one vectorised Jacobian pass should take on this machine.

The exact trace of the teacher (:func:`boltzflow.flows.ode.exact_divergence`) and FALCON's
step log-determinant (:func:`boltzflow.distill.flowmap.map_and_logdet`) stack ``dim`` products
with ``vmap``; on CPU a smaller pass keeps the ``dim`` copies of each intermediate in cache.
This script times both, and the reverse passes in a Python loop (``trace_mode="loop"``), at one
batch for several row-chunk sizes, with the DW4 EGNN (3 x 64, untrained: the cost does not depend
on the weights), and checks every chunked result against the one-pass value.

Usage (one thread)::

    OMP_NUM_THREADS=1 .venv/bin/python workflows/benchmark_jacobian_rows.py \\
        [--batch 4096] [--rows 4096 1024 512 256 128 64] [--repeats 3] \\
        [--json runs/benchmark_jacobian_rows.json]

Prints a markdown table (seconds per evaluation of the whole batch) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from boltzflow.distill.falcon import FALCON
from boltzflow.distill.flowmap import map_and_logdet, subspace_basis
from boltzflow.flows.ode import exact_divergence
from boltzflow.flows.priors import MeanFreeGaussian
from boltzflow.io.atomic import atomic_write_text
from boltzflow.nn.egnn import EGNN

ROOT = Path(__file__).resolve().parents[1]


def _seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--rows", type=int, nargs="+", default=[4096, 1024, 512, 256, 128, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=str(ROOT / "runs/benchmark_jacobian_rows.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    prior = MeanFreeGaussian(4, 2)
    teacher_net = EGNN(4, 2, hidden=64, layers=3)
    falcon = FALCON.build(
        "egnn",
        prior=prior,
        n_particles=4,
        spatial_dim=2,
        backbone_options={"hidden": 64, "layers": 3},
        signed=False,
    ).eval()
    x = prior.sample(args.batch, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(0.3)
    basis = subspace_basis(prior, x)

    def step(y: Tensor) -> Tensor:
        return falcon.flow_map(y, 0.25, 0.5)

    with torch.no_grad():
        _, div_ref = exact_divergence(teacher_net, t, x, batch_rows=args.batch)
        _, ld_ref = map_and_logdet(step, x, basis, batch_rows=args.batch)
    rows_out = []
    for rows in args.rows:
        with torch.no_grad():
            _, div = exact_divergence(teacher_net, t, x, batch_rows=rows)
            _, ld = map_and_logdet(step, x, basis, batch_rows=rows)
        row = {
            "rows": rows,
            "trace_vjp_s": _seconds(
                lambda r=rows: exact_divergence(teacher_net, t, x, batch_rows=r), args.repeats
            ),
            "trace_loop_s": _seconds(
                lambda r=rows: [
                    exact_divergence(teacher_net, t, c, mode="loop") for c in x.split(r)
                ],
                args.repeats,
            ),
            "falcon_step_s": _seconds(
                lambda r=rows: map_and_logdet(step, x, basis, batch_rows=r), args.repeats
            ),
            "max_abs_diff": max(
                float((div - div_ref).abs().max()), float((ld - ld_ref).abs().max())
            ),
        }
        rows_out.append(row)
        print(
            f"rows {rows}: trace {row['trace_vjp_s']:.3f} s (loop {row['trace_loop_s']:.3f} s), "
            f"FALCON step {row['falcon_step_s']:.3f} s",
            flush=True,
        )
    print()
    print("| rows per pass | exact trace, vmap (s) | exact trace, loop (s) | FALCON step (s) |")
    print("|---|---|---|---|")
    for r in rows_out:
        print(
            f"| {r['rows']} | {r['trace_vjp_s']:.3f} | {r['trace_loop_s']:.3f} "
            f"| {r['falcon_step_s']:.3f} |"
        )
    result = {
        "batch": args.batch,
        "threads": args.threads,
        "dtype": str(x.dtype),
        "repeats": args.repeats,
        "rows": rows_out,
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
