"""Torch force field against the OpenMM worker pool: configurations per second on one batch.

Both sides evaluate the same batch of ALDP configurations (the structure file's configuration
plus Gaussian noise of ``--noise`` nm per coordinate, seeded) in one run:

- the OpenMM pool path of :class:`boltzflow.systems.molecular.MolecularSystem` (its
  ``backend="openmm"``: ``--workers`` processes, one thread each, on the definition's platform
  unless ``--platform``), energies alone (``system.energy``) and energies with forces
  (``system.force``);
- :mod:`boltzflow.systems.torch_ff` with ``--threads`` torch threads on ``--device``, in each
  ``--dtype``: ``energy`` without a graph, and ``energy_and_forces`` (autograd); with
  ``--compile`` also through ``torch.compile`` (its one-off compilation time is reported apart).

Each timing is the median of ``--repeats`` runs after one warm-up run (the pool's start-up and
the compilation are not counted). The ratio is torch over pool for the same quantity. The
largest relative difference between the torch energies and the pool's is printed as a check.

``--big`` also evaluates ``--big-n`` (default 1,000,000) configurations in a fresh process per
dtype (and compilation mode), with chunking and no graph, and reports its peak resident memory
(``resource.getrusage`` maxrss) next to the memory held by the batch itself (float32
positions, as a sampler would hand them over).

Usage (2 cores)::

    OMP_NUM_THREADS=2 .venv/bin/python workflows/benchmark_torch_ff.py \\
        [--system aldp] [--batch 10000] [--threads 2] [--workers 2] [--device cpu] \\
        [--dtype float64 float32] [--compile] [--big] [--json runs/benchmark_torch_ff.json]

Prints a markdown table and writes the JSON atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from boltzflow.io.atomic import atomic_write_text
from boltzflow.systems import load_system
from boltzflow.systems.torch_ff import compile_openmm_system

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(reference: torch.Tensor, n: int, noise: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return reference + noise * torch.randn(
        n, reference.shape[1], generator=gen, dtype=torch.float64
    )


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def big_child(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate ``--big-n`` configurations in this (fresh) process; memory and time."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    system = load_system(args.system, n_workers=0)
    ff = compile_openmm_system(
        system.openmm_system,
        dtype=DTYPES[args.dtype[0]],
        device=device,
        chunk_size=args.chunk_size,
        compiled=args.compile,
    )
    if args.compile:  # compile outside the measured pass
        ff.energy(_batch(system.reference_configuration(), 8, args.noise, args.seed))
    rss_before = _maxrss_mib()
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.big_n, system.dim, generator=gen, dtype=torch.float32)
    x.mul_(args.noise).add_(system.reference_configuration().float())  # in place: one copy
    rss_batch = _maxrss_mib()
    start = time.perf_counter()
    with torch.no_grad():
        energies = ff.energy(x)
    _sync(device)
    seconds = time.perf_counter() - start
    return {
        "n": args.big_n,
        "dtype": args.dtype[0],
        "device": str(device),
        "threads": args.threads,
        "compiled": args.compile,
        "chunk_size": args.chunk_size or ff.auto_chunk_size(),
        "seconds": seconds,
        "configs_per_s": args.big_n / seconds,
        "finite": bool(torch.isfinite(energies).all()),
        "batch_mib": x.numel() * x.element_size() / 2**20,
        "maxrss_before_batch_mib": rss_before,
        "maxrss_with_batch_mib": rss_batch,
        "maxrss_peak_mib": _maxrss_mib(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--system", default="aldp")
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--workers", type=int, default=2, help="OpenMM pool worker processes")
    parser.add_argument("--platform", default=None, help="OpenMM platform (default: definition)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype", nargs="+", choices=sorted(DTYPES), default=["float64", "float32"]
    )
    parser.add_argument("--chunk-size", type=int, default=None, help="default: automatic")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--noise", type=float, default=0.01, help="nm, around the PDB structure")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--big", action="store_true", help="also 1e6 configurations: memory")
    parser.add_argument("--big-n", type=int, default=1_000_000)
    parser.add_argument("--big-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", default=str(ROOT / "runs/benchmark_torch_ff.json"))
    args = parser.parse_args(argv)
    if args.big_child:
        result = big_child(args)
        print(json.dumps(result))
        return result

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # The pool side is the OpenMM backend (torch is the molecular systems' default backend).
    overrides: dict[str, Any] = {"backend": "openmm", "n_workers": args.workers, "threads": 1}
    if args.platform:
        overrides["platform"] = args.platform
    system = load_system(args.system, **overrides)
    x = _batch(system.reference_configuration(), args.batch, args.noise, args.seed)
    xd = x.to(device)
    cpu = torch.device("cpu")

    def pool_energy() -> torch.Tensor:
        with torch.no_grad():
            return system.energy(x) * system.kt  # kJ/mol

    # Every case: (row, callable, device). Warm-ups first; then the repeats go round-robin over
    # all cases, so that a change in the load of a shared machine hits every case alike.
    pool_label = f"OpenMM pool ({args.workers} workers, {system.platform_name})"
    cases: list[tuple[dict[str, Any], Callable[[], Any], torch.device]] = [
        ({"backend": pool_label, "what": "energy"}, pool_energy, cpu),
        ({"backend": pool_label, "what": "energy+forces"}, lambda: system.force(x), cpu),
    ]
    compile_modes = (False, True) if args.compile else (False,)
    for name in args.dtype:
        for compiled in compile_modes:
            start = time.perf_counter()
            ff = compile_openmm_system(
                system.openmm_system,
                dtype=DTYPES[name],
                device=device,
                chunk_size=args.chunk_size,
                compiled=compiled,
            )
            build_s = time.perf_counter() - start
            label = f"torch {name} {'compiled' if compiled else 'eager'} ({device}, "
            label += f"{args.threads} threads, chunk {args.chunk_size or ff.auto_chunk_size()})"

            def energies(ff: Any = ff) -> torch.Tensor:
                with torch.no_grad():
                    return ff.energy(xd)

            info = {"backend": label, "build_s": build_s}
            cases.append(({**info, "what": "energy"}, energies, device))
            cases.append(
                ({**info, "what": "energy+forces"}, lambda ff=ff: ff.energy_and_forces(xd), device)
            )
    rows: list[dict[str, Any]] = []
    try:
        results = []
        for row, fn, dev in cases:
            start = time.perf_counter()
            results.append(fn())
            _sync(dev)
            row["warmup_s"] = time.perf_counter() - start
            row["times_s"] = []
            rows.append(row)
        for _ in range(args.repeats):
            for row, fn, dev in cases:
                start = time.perf_counter()
                fn()
                _sync(dev)
                row["times_s"].append(time.perf_counter() - start)
    finally:
        system.close()
    pool_energies = results[0].numpy()
    for row, result in zip(rows, results):
        if row["backend"] != pool_label and row["what"] == "energy":
            diff = np.abs(result.double().cpu().numpy() - pool_energies) / np.abs(pool_energies)
            row["max_rel_diff_vs_pool"] = float(diff.max())
    pool_rate = {
        row["what"]: args.batch / statistics.median(row["times_s"])
        for row in rows
        if row["backend"] == pool_label
    }
    for row in rows:
        row["configs_per_s"] = args.batch / statistics.median(row["times_s"])
        row["ratio_vs_pool"] = row["configs_per_s"] / pool_rate[row["what"]]

    print(
        f"\n{args.system}, batch {args.batch}, median of {args.repeats} runs (after one warm-up; "
        "repeats interleaved across backends)\n"
    )
    print("| backend | quantity | configs/s | ratio vs pool | max rel. ΔE vs pool |")
    print("|---|---|---|---|---|")
    for row in rows:
        diff = row.get("max_rel_diff_vs_pool")
        print(
            f"| {row['backend']} | {row['what']} | {row['configs_per_s']:,.0f} "
            f"| {row['ratio_vs_pool']:.2f} | {'—' if diff is None else f'{diff:.1e}'} |"
        )
    if args.compile:
        print("\nfirst call, compilation included (not counted above):")
        for row in rows:
            if "compiled" in row["backend"]:
                print(f"  {row['backend']}, {row['what']}: {row['warmup_s']:.1f} s")

    big = []
    if args.big:
        for name, compiled in [(n, c) for n in args.dtype for c in compile_modes]:
            command = [
                sys.executable,
                str(Path(__file__).resolve()),
                "--big-child",
                "--system",
                args.system,
                "--threads",
                str(args.threads),
                "--device",
                args.device,
                "--dtype",
                name,
                "--big-n",
                str(args.big_n),
                "--noise",
                str(args.noise),
                "--seed",
                str(args.seed),
            ]
            if args.chunk_size:
                command += ["--chunk-size", str(args.chunk_size)]
            if compiled:
                command.append("--compile")
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            big.append(json.loads(out.strip().splitlines()[-1]))
        print(f"\n{args.big_n:,} configurations in a fresh process (positions float32 on CPU):\n")
        print("| dtype | compiled | chunk | seconds | configs/s | batch MiB | peak RSS MiB |")
        print("|---|---|---|---|---|---|---|")
        for b in big:
            print(
                f"| {b['dtype']} | {b['compiled']} | {b['chunk_size']} | {b['seconds']:.1f} "
                f"| {b['configs_per_s']:,.0f} | {b['batch_mib']:.0f} | {b['maxrss_peak_mib']:.0f} |"
            )

    result = {
        "system": args.system,
        "batch": args.batch,
        "threads": args.threads,
        "workers": args.workers,
        "pool_platform": system.platform_name,
        "device": str(device),
        "repeats": args.repeats,
        "noise_nm": args.noise,
        "seed": args.seed,
        "torch": torch.__version__,
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
        "rows": rows,
        "big": big,
    }
    atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return result


if __name__ == "__main__":
    main()
