"""Scaling of sampling (with energies) and DDP training over 1, 2, ... CPU processes (gloo).

    OMP_NUM_THREADS=1 python workflows/benchmark_distributed.py --procs 1 2 \\
        --model models/aldp-nf-internal --samples 4000 --train-steps 40 --json bench_dist.json

For each process count K it launches ``torchrun --standalone --nproc_per_node=K`` on this file
twice (``--worker sample`` and ``--worker train``) and reads back what rank 0 measured:

* sampling: ``write_sharded_draws`` of N samples of ``--model`` (x, log q, u(x) from the model's
  system, log w; one HDF5 shard per rank), timed between two barriers: samples/s of the whole job,
  and the seconds of the model, of the energies and of the rest on rank 0;
* training: a DW4-shaped teacher (EGNN, ``--train-hidden`` x ``--train-layers``) on Gaussian
  configurations for ``--train-steps`` steps of global batch ``--train-batch`` under DDP;
  optimiser steps/s from the trainer's own clock (set-up excluded).

Prints a table and writes JSON (``--json``). Every rank uses one torch thread; on a machine with
fewer free cores than K the ratio measures contention, not scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _sample_worker(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import torch

    from boltzflow import distributed
    from boltzflow.registry.loading import load_model
    from boltzflow.sampling.sharded import write_sharded_draws
    from boltzflow.systems import load_system

    me = distributed.info()
    model = load_model(args.model)
    with load_system(model.system) as system:
        # warm-up (lazy initialisation, OpenMM workers) outside the clock
        warm = me.world_size * 8
        write_sharded_draws(model, warm, out / "warm.h5", system=system, provenance={}, seed=99)
        distributed.barrier()
        start = time.perf_counter()
        result = write_sharded_draws(
            model, args.n, out / "s.h5", system=system, seed=args.seed, provenance={}
        )
        model_s = sum(b.out.seconds for b in result.batches)
        distributed.barrier()
        seconds = time.perf_counter() - start
    # energies on rank 0 alone, timed again on its own samples (the draw does not time them)
    x = torch.cat([b.out.x for b in result.batches])
    with load_system(model.system) as system:
        from boltzflow.systems.base import compute_energies

        t = time.perf_counter()
        compute_energies(system, x)
        energy_s = time.perf_counter() - t
    return {
        "n": result.n,
        "seconds": seconds,
        "samples_per_s": result.n / seconds,
        "rank0_rows": len(x),
        "rank0_model_s": model_s,
        "rank0_energy_s": energy_s,
        "ess_fraction": result.ess / result.n if result.ess is not None else None,
    }


def _train_worker(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import torch

    from boltzflow.train.config import TeacherConfig
    from boltzflow.train.teacher import SystemShape, train_teacher

    cfg = TeacherConfig.from_dict(
        {
            "model": {"backbone": "egnn", "hidden": args.train_hidden, "layers": args.train_layers},
            "train": {
                "steps": args.train_steps,
                "batch_size": args.train_batch,
                "warmup_steps": 2,
                "log_every": max(1, args.train_steps // 4),
                "checkpoint_every": args.train_steps,
                "seed": args.seed,
            },
            "sample": {"method": "rk4", "steps": 4},
        }
    )
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(2048, 8, generator=gen) * 1.5
    shape = SystemShape(dim=8, n_particles=4, spatial_dim=2, mean_free=True)
    train_teacher(cfg, data, out / "teacher", shape, progress=False)
    lines = (out / "teacher" / "metrics.jsonl").read_text().splitlines()
    first, last = (json.loads(lines[i]) for i in (0, -1))
    # the first logging window holds the start-up (graph warm-up): rate over the later ones
    steps, seconds = last["step"] - first["step"], last["elapsed_s"] - first["elapsed_s"]
    if steps == 0:
        steps, seconds = last["step"], last["elapsed_s"]
    return {
        "steps": args.train_steps,
        "global_batch": args.train_batch,
        "steps_per_s": steps / seconds,
        "final_loss": last["loss"],
    }


def _worker(args: argparse.Namespace) -> int:
    import torch

    from boltzflow import distributed

    torch.set_num_threads(1)
    with distributed.session() as me, tempfile.TemporaryDirectory() as tmp:
        folder = Path(distributed.broadcast_object(tmp if me.is_main else None))
        work = _sample_worker if args.worker == "sample" else _train_worker
        result = work(args, folder)
        if me.is_main:
            result["world_size"] = me.world_size
            Path(args.result).write_text(json.dumps(result))
        distributed.barrier()
    return 0


def _launch(args: argparse.Namespace, kind: str, procs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        cmd += [f"--nproc_per_node={procs}", __file__, "--worker", kind, "--result", str(result)]
        cmd += ["--model", args.model, "--samples", str(args.n), "--seed", str(args.seed)]
        for key in ("train_steps", "train_batch", "train_hidden", "train_layers"):
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        env = dict(os.environ, OMP_NUM_THREADS="1", BOLTZFLOW_QUIET="1")
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        if run.returncode != 0:
            raise SystemExit(f"{kind} on {procs} processes failed:\n{run.stderr[-4000:]}")
        return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--model", default=str(ROOT / "models" / "aldp-nf-internal"))
    # (no option may be a prefix of one of torchrun's: it would take it, e.g. --n)
    p.add_argument("-n", "--samples", dest="n", type=int, default=4000, help="samples in total")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-steps", type=int, default=40)
    p.add_argument("--train-batch", type=int, default=128, help="global batch")
    p.add_argument("--train-hidden", type=int, default=32)
    p.add_argument("--train-layers", type=int, default=3)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--worker", choices=["sample", "train"], help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args)
    rows = []
    for k in args.procs:
        sample, train = _launch(args, "sample", k), _launch(args, "train", k)
        rows.append({"procs": k, "sample": sample, "train": train})
        rate = f"{sample['samples_per_s']:.1f} samples/s, {train['steps_per_s']:.2f} steps/s"
        print(f"K={k}: {rate}", flush=True)
    base = rows[0]
    lines = [
        f"sampling: {Path(args.model).name}, N = {args.n} (with energies, HDF5 shards); "
        f"training: DW4-shaped EGNN {args.train_hidden} x {args.train_layers}, "
        f"global batch {args.train_batch}, {args.train_steps} steps",
        "",
        "| processes | samples/s | ratio | rank 0: model s / energy s | train steps/s | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, t = r["sample"], r["train"]
        ratio_s = s["samples_per_s"] / base["sample"]["samples_per_s"]
        ratio_t = t["steps_per_s"] / base["train"]["steps_per_s"]
        lines.append(
            f"| {r['procs']} | {s['samples_per_s']:.1f} | {ratio_s:.2f} | "
            f"{s['rank0_model_s']:.2f} / {s['rank0_energy_s']:.2f} | {t['steps_per_s']:.2f} | "
            f"{ratio_t:.2f} |"
        )
    table = "\n".join(lines)
    print()
    print(table)
    if args.json:
        data = {"settings": vars(args), "rows": rows, "table_markdown": table}
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
