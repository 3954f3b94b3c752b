"""Free-energy reference along φ for alanine dipeptide: umbrella sampling + MBAR.

Plain 300 K MD does not visit 0 < φ < 2 in 12 ns (DESIGN.md), so this reference uses the field's
own tools: K umbrella windows along the backbone φ with a periodic harmonic restraint
½ κ d(φ, c_k)² (OpenMM ``CustomTorsionForce``; Torrie & Valleau 1977), pulled window by window
from the structure file's φ in both directions, then MBAR (Shirts & Chodera 2008, ``pymbar``) on
the decorrelated samples of every window. It reports F(φ) on bins with standard errors and
ΔF = −log(P(0 < φ < 2) / P(otherwise)) in kT with a standard error and 95% CI
(``--uncertainty analytical``: pymbar's asymptotic covariance; ``bootstrap``: resampling each
window's decorrelated samples).

Usage (production settings are the defaults: 36 windows × 1 ns, κ = 100 kT/rad², two worker
processes; about 34 CPU-minutes for ``aldp``, so about 18 minutes on two free cores):

    python workflows/aldp_umbrella.py --system aldp -o runs/umbrella-aldp

``aldp_ff96_obc1`` costs about 7× more per step (its OBC1 is a ``CustomGBForce``; the CPU
platform is picked for it), so shorten its windows, e.g. ``--ns-per-window 0.15``.

Re-running the same command resumes: finished windows (``<out>/windows/window_XXX.npz``) are
reused, so an interrupted run continues where it stopped; different settings in the same folder
are refused. Writes ``<out>/profile.json`` (F(φ) with errors, ΔF ± error, settings, wall time,
command) and ``<out>/profile.png`` (F(φ) with its band), and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import openmm

from boltzflow.analysis.mbar import mbar_profile
from boltzflow.analysis.report import jsonable
from boltzflow.analysis.umbrella import run_umbrella_windows
from boltzflow.io.atomic import atomic_write_text
from boltzflow.plots import plot_free_energy_profile
from boltzflow.systems import load_system


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--system", default="aldp", help="aldp, aldp_ff96_obc1 or aldp_vacuum")
    p.add_argument("-o", "--out", required=True, type=Path, help="output folder")
    p.add_argument("--windows", type=int, default=36, help="windows evenly spaced on (-π, π]")
    p.add_argument("--kappa", type=float, default=100.0, help="force constant, kT/rad²")
    p.add_argument("--ns-per-window", type=float, default=1.0, help="production per window, ns")
    p.add_argument("--burn-in-ps", type=float, default=20.0, help="equilibration per window, ps")
    p.add_argument("--stride", type=int, default=100, help="steps between samples")
    p.add_argument("--timestep-fs", type=float, default=1.0)
    p.add_argument("--bins", type=int, default=36, help="bins of F(φ) on (-π, π]")
    p.add_argument("--uncertainty", choices=("analytical", "bootstrap"), default="analytical")
    p.add_argument("--n-bootstrap", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--platform",
        default=None,
        help="OpenMM platform; default Reference, or CPU where the system has a CustomGBForce",
    )
    p.add_argument("--threads", type=int, default=1, help="CPU-platform threads per process")
    p.add_argument(
        "--processes", type=int, choices=(1, 2), default=2, help="2: up/down chains in parallel"
    )
    args = p.parse_args(argv)
    if args.windows < 2 or args.ns_per_window <= 0 or args.stride < 1 or args.kappa <= 0:
        p.error("need --windows >= 2, --ns-per-window > 0, --stride >= 1, --kappa > 0")
    return args


def default_platform(openmm_system: openmm.System) -> str:
    """Reference, the fastest for 22 atoms (aldp: 55 µs of CPU per step against about 3× more
    on the CPU platform), except with a ``CustomGBForce`` (the prmtop's OBC1 of
    ``aldp_ff96_obc1``): 2.1 ms per step on Reference, 0.41 ms on CPU."""
    forces = [openmm_system.getForce(i) for i in range(openmm_system.getNumForces())]
    return "CPU" if any(isinstance(f, openmm.CustomGBForce) for f in forces) else "Reference"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    n_samples = max(1, round(args.ns_per_window * 1e6 / (args.timestep_fs * args.stride)))
    burn_in = round(args.burn_in_ps * 1e3 / args.timestep_fs)
    # Centres on (−π, π], starting at −π + 2π/K so that π itself is a centre.
    centers = -math.pi + 2 * math.pi * (np.arange(args.windows) + 1) / args.windows
    system = load_system(args.system, n_workers=0)
    if args.platform is None:
        args.platform = default_platform(system.openmm_system)
    try:
        windows = run_umbrella_windows(
            system,
            centers,
            args.kappa,
            n_samples,
            args.stride,
            out_dir=args.out / "windows",
            burn_in=burn_in,
            timestep_fs=args.timestep_fs,
            seed=args.seed,
            platform=args.platform,
            threads=args.threads,
            processes=args.processes,
        )
    finally:
        system.close()
    md_seconds = sum(w.seconds for w in windows)
    res = mbar_profile(
        [w.phi for w in windows],
        centers,
        args.kappa,
        args.bins,
        psi_by_window=[w.psi for w in windows],
        uncertainty=args.uncertainty,
        n_bootstrap=args.n_bootstrap,
        seed=args.seed,
    )
    wall = time.perf_counter() - t0
    steps = len(windows) * (burn_in + n_samples * args.stride)
    out: dict[str, Any] = {
        "system": args.system,
        "delta_f_kT": res.delta_f.value,
        "delta_f_stderr_kT": res.delta_f.stderr,
        "delta_f": res.delta_f,
        "region": list(res.region),
        "profile": res.profile,
        "mbar": {
            k: v for k, v in res.to_dict().items() if k not in ("profile", "delta_f", "region")
        },
        "settings": {
            "windows": args.windows,
            "centers": centers.tolist(),
            "kappa_kT_per_rad2": args.kappa,
            "ns_per_window": args.ns_per_window,
            "n_samples_per_window": n_samples,
            "stride": args.stride,
            "burn_in_steps": burn_in,
            "timestep_fs": args.timestep_fs,
            "bins": args.bins,
            "uncertainty": res.uncertainty,
            "seed": args.seed,
            "platform": args.platform,
            "threads": args.threads,
            "processes": args.processes,
            "window_settings": windows[0].settings,
        },
        "md_steps": steps,
        "md_seconds_all_windows": md_seconds,
        "us_per_step": 1e6 * md_seconds / steps,
        "windows_reused": int(sum(w.reused for w in windows)),
        "wall_seconds_this_call": wall,
        "command": "python " + shlex.join(["workflows/aldp_umbrella.py", *(argv or sys.argv[1:])]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "profile.json", json.dumps(jsonable(out), indent=1) + "\n")
    plot_free_energy_profile(args.out / "profile.png", res.profile, label="φ [rad]", f_max=None)
    _print_table(res, out)
    return out


def _print_table(res: Any, out: dict[str, Any]) -> None:
    prof = res.profile
    (c,) = prof.centers
    print(f"\nF(φ) by MBAR ({prof.method}), {out['system']}, N = {prof.n} decorrelated samples")
    print(f"{'φ [rad]':>8} {'F [kT]':>8} {'se':>6}")
    for x, f, s in zip(c, prof.free_energy, prof.stderr, strict=True):
        print(f"{x:8.3f} {f:8.3f} {s:6.3f}")
    d = res.delta_f
    print(
        f"\nΔF = -log P(0<φ<2)/P(rest) = {d.value:.3f} ± {d.stderr:.3f} kT "
        f"(95% CI {d.ci_low:.3f}, {d.ci_high:.3f}); g per window "
        f"{np.min(res.statistical_inefficiency):.1f}–{np.max(res.statistical_inefficiency):.1f}"
    )
    print(
        f"MD {out['md_steps']} steps, {out['md_seconds_all_windows']:.0f} s "
        f"({out['us_per_step']:.0f} µs/step); this call {out['wall_seconds_this_call']:.0f} s"
    )


if __name__ == "__main__":
    main()
