"""Free-energy reference along φ for alanine dipeptide: umbrella sampling + MBAR.

Plain 300 K MD does not visit 0 < φ < 2 in 12 ns (DESIGN.md), so this reference uses the field's
own tools: K umbrella windows along the backbone φ with a periodic harmonic restraint
½ κ d(φ, c_k)² (OpenMM ``CustomTorsionForce``; Torrie & Valleau 1977), pulled window by window
from the structure file's φ in both directions, then MBAR (Shirts & Chodera 2008, ``pymbar``) on
the decorrelated samples of every window. It reports F(φ) on bins with standard errors and
ΔF = −log(P(0 < φ < 2) / P(otherwise)) in kT with a standard error and 95% CI
(``--uncertainty analytical``: pymbar's asymptotic covariance; ``bootstrap``: resampling each
window's decorrelated samples), and the smallest overlap between neighbouring windows (pymbar's
overlap matrix).

Usage (production settings are the defaults: 36 windows × 1 ns, κ = 100 kT/rad², two worker
processes; about 34 CPU-minutes for ``aldp``, so about 18 minutes on two free cores):

    python workflows/aldp_umbrella.py --system aldp -o runs/umbrella-aldp

1-D windows leave ψ free, and ψ changes basin only every few hundred ps inside them (the 1 ns
production run kept 4–10 decorrelated samples in some windows). ``--grid-psi N`` restrains ψ as
well: a grid of ``--windows`` × N windows in (φ, ψ) (``--windows`` defaults to N there), each
with ½ κ_φ d(φ, c^φ)² + ½ κ_ψ d(ψ, c^ψ)², pulled along φ at the PDB's ψ and then along ψ from
each of those windows; everything else relaxes in picoseconds, so the windows are short (defaults
for a grid: 25 ps + 3 ps burn-in per window, κ = 100·(n/36)² kT/rad² on each axis, the 1-D
default's σ/spacing; 44.4 kT/rad², σ = 0.15 rad, for n = 24). The 24 × 24 grid below is 16.1 M
MD steps (about 7.4 min on two free cores at 55 µs/step) and an MBAR over about 576 × 250
samples (5–8 min on one core, up to about 8 GB of memory); see docs/benchmarks.md:

    python workflows/aldp_umbrella.py --system aldp -o runs/umbrella2d-aldp --grid-psi 24

``aldp_ff96_obc1`` costs about 7× more per step (its OBC1 is a ``CustomGBForce``; the CPU
platform is picked for it), so shorten its windows, e.g. ``--ns-per-window 0.15``.

Re-running the same command resumes: finished windows (``<out>/windows/window_XXX.npz``) are
reused, so an interrupted run continues where it stopped; different settings in the same folder
are refused. Writes ``<out>/profile.json`` (F(φ) with errors, ΔF ± error, N, the smallest
neighbour overlap, settings, wall time, command) and ``<out>/profile.png`` (F(φ) with its band),
and prints a table.
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
from boltzflow.validate import arg, nonnegative_float, positive_float, positive_int

#: defaults of the 1-D run (ψ free) and of a (φ, ψ) grid (--grid-psi)
DEFAULTS_1D = {"windows": 36, "ns_per_window": 1.0, "burn_in_ps": 20.0}
DEFAULTS_GRID = {"ns_per_window": 0.025, "burn_in_ps": 3.0}


def default_kappa(windows: int) -> float:
    """κ in kT/rad² for ``windows`` centres on the circle with the σ/spacing of the 1-D default
    (κ = 100 at 36 windows: σ = 0.1 rad, spacing 0.175 rad): κ = 100·(windows/36)²."""
    return 100.0 * (windows / 36) ** 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--system", default="aldp", help="aldp, aldp_ff96_obc1 or aldp_vacuum")
    p.add_argument("-o", "--out", required=True, type=Path, help="output folder")
    p.add_argument(
        "--windows",
        type=arg(positive_int, "--windows"),
        default=None,
        help="windows (φ centres) evenly spaced on (-π, π]; default 36, or --grid-psi's N",
    )
    p.add_argument(
        "--grid-psi",
        type=arg(positive_int, "--grid-psi"),
        default=None,
        metavar="N",
        help="also restrain ψ: a grid of --windows × N windows in (φ, ψ) (default: ψ free)",
    )
    p.add_argument(
        "--kappa",
        type=arg(positive_float, "--kappa"),
        default=None,
        help="φ force constant, kT/rad²; default 100 (1-D) or 100·(windows/36)² (grid)",
    )
    p.add_argument(
        "--kappa-psi",
        type=arg(positive_float, "--kappa-psi"),
        default=None,
        help="ψ force constant with --grid-psi, kT/rad²; default 100·(N/36)²",
    )
    p.add_argument(
        "--ns-per-window",
        type=arg(positive_float, "--ns-per-window"),
        default=None,
        help=f"production per window, ns; default {DEFAULTS_1D['ns_per_window']:g} (1-D) or "
        f"{DEFAULTS_GRID['ns_per_window']:g} (grid)",
    )
    p.add_argument(
        "--burn-in-ps",
        type=arg(nonnegative_float, "--burn-in-ps"),
        default=None,
        help=f"equilibration per window, ps; default {DEFAULTS_1D['burn_in_ps']:g} (1-D) or "
        f"{DEFAULTS_GRID['burn_in_ps']:g} (grid)",
    )
    p.add_argument(
        "--stride", type=arg(positive_int, "--stride"), default=100, help="steps between samples"
    )
    p.add_argument("--timestep-fs", type=arg(positive_float, "--timestep-fs"), default=1.0)
    p.add_argument(
        "--bins", type=arg(positive_int, "--bins"), default=36, help="bins of F(φ) on (-π, π]"
    )
    p.add_argument("--uncertainty", choices=("analytical", "bootstrap"), default="analytical")
    p.add_argument(
        "--n-bootstrap",
        type=arg(positive_int, "--n-bootstrap"),
        default=200,
        help="bootstrap replicates (each re-solves MBAR: about a minute on a 24 × 24 grid)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--platform",
        default=None,
        help="OpenMM platform; default Reference, or CPU where the system has a CustomGBForce",
    )
    p.add_argument(
        "--threads",
        type=arg(positive_int, "--threads"),
        default=1,
        help="CPU-platform threads per process",
    )
    p.add_argument(
        "--processes",
        type=arg(positive_int, "--processes"),
        default=2,
        help="worker processes (1-D: up to 2 help, the up and down chains)",
    )
    args = p.parse_args(argv)
    grid = args.grid_psi is not None
    if grid and args.grid_psi < 2:
        p.error(f"--grid-psi must be at least 2 (windows along ψ), got {args.grid_psi}")
    if not grid and args.kappa_psi is not None:
        p.error("--kappa-psi needs --grid-psi (ψ is free without it)")
    defaults = DEFAULTS_GRID if grid else DEFAULTS_1D
    if args.windows is None:
        args.windows = args.grid_psi if grid else DEFAULTS_1D["windows"]
    if args.windows < 2:
        p.error(f"--windows must be at least 2, got {args.windows}")
    if args.kappa is None:
        args.kappa = default_kappa(args.windows) if grid else 100.0
    if grid and args.kappa_psi is None:
        args.kappa_psi = default_kappa(args.grid_psi)
    for name in ("ns_per_window", "burn_in_ps"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    return args


def default_platform(openmm_system: openmm.System) -> str:
    """Reference, the fastest for 22 atoms (aldp: 55 µs of CPU per step against about 3× more
    on the CPU platform), except with a ``CustomGBForce`` (the prmtop's OBC1 of
    ``aldp_ff96_obc1``): 2.1 ms per step on Reference, 0.41 ms on CPU."""
    forces = [openmm_system.getForce(i) for i in range(openmm_system.getNumForces())]
    return "CPU" if any(isinstance(f, openmm.CustomGBForce) for f in forces) else "Reference"


def circle_centers(n: int) -> np.ndarray:
    """``n`` centres on (−π, π], starting at −π + 2π/n so that π itself is a centre."""
    return -math.pi + 2 * math.pi * (np.arange(n) + 1) / n


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    grid = args.grid_psi is not None
    n_samples = max(1, round(args.ns_per_window * 1e6 / (args.timestep_fs * args.stride)))
    burn_in = round(args.burn_in_ps * 1e3 / args.timestep_fs)
    phi_axis = circle_centers(args.windows)
    if grid:
        # φ-major: window i·N + j has centre (φ_i, ψ_j).
        psi_axis = circle_centers(args.grid_psi)
        phi_c = np.repeat(phi_axis, args.grid_psi)
        psi_c = np.tile(psi_axis, args.windows)
        centers: np.ndarray = np.stack([phi_c, psi_c], axis=1)
        kappa: Any = (args.kappa, args.kappa_psi)
    else:
        phi_c, psi_c, centers, kappa = phi_axis, None, phi_axis, args.kappa
    system = load_system(args.system, n_workers=0)
    if args.platform is None:
        args.platform = default_platform(system.openmm_system)
    try:
        windows = run_umbrella_windows(
            system,
            phi_c,
            args.kappa,
            n_samples,
            args.stride,
            out_dir=args.out / "windows",
            psi_centers=psi_c,
            kappa_psi=args.kappa_psi,
            burn_in=burn_in,
            timestep_fs=args.timestep_fs,
            seed=args.seed,
            platform=args.platform,
            threads=args.threads,
            processes=args.processes,
            log_windows=not grid,  # a grid has hundreds: progress lines only
        )
    finally:
        system.close()
    md_seconds = sum(w.seconds for w in windows)
    t_mbar = time.perf_counter()
    res = mbar_profile(
        [w.phi for w in windows],
        centers,
        kappa,
        args.bins,
        psi_by_window=[w.psi for w in windows],
        uncertainty=args.uncertainty,
        n_bootstrap=args.n_bootstrap,
        seed=args.seed,
    )
    mbar_seconds = time.perf_counter() - t_mbar
    wall = time.perf_counter() - t0
    steps = len(windows) * (burn_in + n_samples * args.stride)
    i, j = res.neighbour_overlap_pair
    settings: dict[str, Any] = {
        "windows": args.windows,
        "centers": phi_axis.tolist(),
        "kappa_kT_per_rad2": args.kappa,
    }
    if grid:
        settings.update(
            grid_psi=args.grid_psi,
            windows_total=len(windows),
            psi_centers=psi_axis.tolist(),
            kappa_psi_kT_per_rad2=args.kappa_psi,
            window_index="i * grid_psi + j for centre (centers[i], psi_centers[j])",
        )
    settings.update(
        ns_per_window=args.ns_per_window,
        n_samples_per_window=n_samples,
        stride=args.stride,
        burn_in_steps=burn_in,
        timestep_fs=args.timestep_fs,
        bins=args.bins,
        uncertainty=res.uncertainty,
        seed=args.seed,
        platform=args.platform,
        threads=args.threads,
        processes=args.processes,
        window_settings=windows[0].settings,
    )
    out: dict[str, Any] = {
        "system": args.system,
        "delta_f_kT": res.delta_f.value,
        "delta_f_stderr_kT": res.delta_f.stderr,
        "delta_f": res.delta_f,
        "region": list(res.region),
        "n_decorrelated": res.delta_f.n,
        "neighbour_overlap_min": res.neighbour_overlap,
        "neighbour_overlap_windows": [
            {"index": int(k), "center": np.atleast_1d(centers[k]).tolist()}
            for k in (i, j)
            if k >= 0
        ],
        "overlap_scalar": res.overlap_scalar,
        "profile": res.profile,
        "mbar": {
            k: v for k, v in res.to_dict().items() if k not in ("profile", "delta_f", "region")
        },
        "settings": settings,
        "md_steps": steps,
        "md_seconds_all_windows": md_seconds,
        "us_per_step": 1e6 * md_seconds / steps,
        "mbar_seconds": mbar_seconds,
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
    pair = ", ".join(
        f"{w['index']} at ({', '.join(f'{x:+.2f}' for x in w['center'])})"
        for w in out["neighbour_overlap_windows"]
    )
    print(
        f"smallest neighbour overlap {res.neighbour_overlap:.3f} (windows {pair}); "
        f"overlap scalar {res.overlap_scalar:.3g}"
    )
    print(
        f"MD {out['md_steps']} steps, {out['md_seconds_all_windows']:.0f} s "
        f"({out['us_per_step']:.0f} µs/step); MBAR {out['mbar_seconds']:.0f} s; "
        f"this call {out['wall_seconds_this_call']:.0f} s"
    )


if __name__ == "__main__":
    main()
