"""SMC refinement of a few-step ALDP student in its latent space (issue #23), against the plain
student at the same number of steps.

For a student run folder (e.g. ``/work/runs/aldp-ic-f2d2``, an F2D2 student of the
internal-coordinate teacher) and N, two rows:

1. the plain student: N samples in K steps with log q, OpenMM energies (no forces), weights
   log w = -u(x) - log q(x);
2. latent SMC from the same N prior draws (:func:`boltzflow.sampling.latent.refine_latent`):
   the target pulled back to the student's latent z, annealed from the prior with MALA (or HMC)
   moves whose gradients run through the student's K steps, its log-det, the internal ->
   Cartesian transform and the energy's forces, periodic latent columns wrapped, adaptive
   tempering and resampling.

Each row reports ESS/N (Kish, final weights) with N, ΔF = F(0 < φ < 2) − F(rest) in kT with a
95% interval (plain student: delta method; SMC: delta method with the particles grouped by
their initial ancestor, since resampled particles are correlated) and its difference from the
umbrella/MBAR reference (``workflows/reference/aldp_umbrella_profile.json``), physical energy and
force evaluations per final sample, and wall time (sampling, energies and SMC; loading
excluded; the JSON adds this process's CPU time, which includes the energies with the default
in-process OpenMM, ``--n-workers 0``, and the load average, since the machine may be shared).
The SMC row also gives the temperatures, the mean acceptance, the distinct initial ancestors
("Eves") that survive, and whether the last step resampled (then every final weight is equal and
ESS/N = 1 says nothing about diversity: the Eves and the ΔF interval do).

Usage (one thread, niced on a shared machine):

    OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python workflows/aldp_smc.py /work/runs/aldp-ic-f2d2 \\
        -n 2000 --steps 4 --adaptive-ess 0.9 --n-kernel-steps 5 --json runs/aldp_smc.json

Prints the table (markdown) and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from boltzflow.analysis.free_energy import (
    backbone_angles,
    compare_free_energy,
    in_region,
    load_reference_profile,
)
from boltzflow.analysis.report import jsonable
from boltzflow.distill import load_student
from boltzflow.io.atomic import atomic_write_text
from boltzflow.sampling import free_energy_difference
from boltzflow.sampling.latent import LatentSMCOptions, refine_latent
from boltzflow.sampling.smc import KERNELS
from boltzflow.sampling.weights import ess_fraction, log_weights
from boltzflow.systems import load_system
from boltzflow.systems.base import System, compute_energies

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "workflows" / "reference" / "aldp_umbrella_profile.json"


def _delta_f(system: System, x: torch.Tensor, log_w: torch.Tensor, region, eves=None) -> Any:
    """ΔF(region vs rest) of weighted Cartesian samples (clustered by ``eves`` if given)."""
    phi, _ = backbone_angles(system, x)
    a = in_region(phi, region)
    return free_energy_difference(a, ~a, log_w, clusters=eves)


def _row(
    name: str,
    n: int,
    ess: float,
    delta_f: Any,
    ref: Any,
    energies: float,
    forces: float,
    seconds: float,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "method": name,
        "N": n,
        "ESS/N": ess,
        "ΔF": delta_f,
        "ΔF - reference": compare_free_energy(delta_f, ref),
        "energy evaluations per sample": energies,
        "force evaluations per sample": forces,
        "wall seconds": seconds,
        **extra,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="student run folder or student file")
    parser.add_argument("-n", type=int, default=1000, help="samples / particles N")
    parser.add_argument("--steps", type=int, default=4, help="student steps K")
    parser.add_argument("--seed", type=int, default=0)
    defaults = LatentSMCOptions()
    parser.add_argument("--kernel", choices=sorted(KERNELS), default=defaults.kernel)
    parser.add_argument(
        "--adaptive-ess",
        type=float,
        default=defaults.adaptive_ess,
        help="conditional ESS/N kept by each tempering step",
    )
    parser.add_argument(
        "--n-temperatures",
        type=int,
        default=defaults.n_temperatures,
        help="K > 0: K evenly spaced temperatures instead of the adaptive schedule",
    )
    parser.add_argument(
        "--n-kernel-steps", type=int, default=defaults.n_kernel_steps, help="moves per temperature"
    )
    parser.add_argument(
        "--step-size", type=float, default=defaults.step_size, help="initial step size"
    )
    parser.add_argument("--n-leapfrog", type=int, default=defaults.n_leapfrog)
    parser.add_argument("--resample-threshold", type=float, default=defaults.resample_threshold)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=1024,
        help="rows per differentiable pass through the student (FALCON: ~11 MB per row)",
    )
    parser.add_argument("--system", default="aldp")
    parser.add_argument(
        "--n-workers",
        type=int,
        default=0,
        help="OpenMM worker processes (0: in this process; on a loaded machine a niced pool "
        "can miss its start-up timeout)",
    )
    parser.add_argument("--reference", default=str(REFERENCE))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        options = LatentSMCOptions(
            kernel=args.kernel,
            adaptive_ess=args.adaptive_ess,
            n_temperatures=args.n_temperatures,
            n_kernel_steps=args.n_kernel_steps,
            step_size=args.step_size,
            n_leapfrog=args.n_leapfrog,
            resample_threshold=args.resample_threshold,
        )
    except ValueError as err:
        parser.error(str(err))
    smc_options = asdict(options)

    reference = load_reference_profile(args.reference)
    ref, region = reference.delta_f, reference.region
    model = load_student(args.run, system=args.system).eval()
    rows = []
    with load_system(args.system, n_workers=args.n_workers) as system:
        system.energy(system.reference_configuration())  # start the OpenMM pool before timing
        load_before = os.getloadavg()[0]
        t0, c0 = time.perf_counter(), time.process_time()
        x, log_q = model.sample(args.n, steps=args.steps, seed=args.seed)
        u = compute_energies(system, x)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        log_w = log_weights(u, log_q.double())
        rows.append(
            _row(
                f"{type(model).__name__} K={args.steps}",
                args.n,
                ess_fraction(log_w),
                _delta_f(system, x, log_w, region),
                ref,
                1.0,
                0.0,
                seconds,
                cpu_seconds=cpu,
            )
        )
        c0 = time.process_time()
        r = refine_latent(
            model,
            system,
            args.n,
            steps=args.steps,
            seed=args.seed,
            batch_size=args.batch_size,
            **options.smc_kwargs(),
        )
        cpu = time.process_time() - c0
        s = r.samples
        rows.append(
            _row(
                f"+ latent SMC ({args.kernel})",
                args.n,
                r.ess_fraction,
                _delta_f(system, s.x, s.log_w, region, r.smc.eves.numpy()),
                ref,
                r.energy_evaluations_per_sample,
                r.force_evaluations_per_sample,
                r.seconds,
                cpu_seconds=cpu,
                temperatures=len(r.smc.betas) - 1,
                betas=r.smc.betas,
                acceptance=float(np.mean(r.smc.acceptance)),
                acceptance_per_step=r.smc.acceptance,
                step_sizes=r.smc.step_sizes,
                ess_history=r.smc.ess_history,
                resampled=r.smc.resampled,
                last_step_resampled=bool(r.smc.resampled[-1]),
                eves=r.smc.n_eves,
                unique_particles=int(torch.unique(r.z, dim=0).shape[0]),
                initial_ess_fraction=r.initial_ess_fraction,
                last_ess_before_resampling=float(r.smc.ess_history[-1]),
                log_z=r.log_z,
            )
        )
        load_after = os.getloadavg()[0]
    results = {
        "run": str(args.run),
        "student": type(model).__name__,
        "system": args.system,
        "steps": args.steps,
        "n": args.n,
        "seed": args.seed,
        "smc": smc_options,
        "reference": {"label": reference.label, "source": reference.source, "ΔF": ref},
        "state A": f"{region[0]:g} < φ < {region[1]:g} rad",
        "rows": rows,
        "torch threads": args.threads,
        "load average (1 min) before / after": [load_before, load_after],
        "machine cores": os.cpu_count(),
    }
    text = _markdown(results)
    print(text)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(jsonable(results), indent=2) + "\n")
        print(f"wrote {path}")
    return results


def _markdown(results: dict[str, Any]) -> str:
    ref = results["reference"]["ΔF"]
    lines = [
        f"ALDP ({results['system']}), {results['student']} from {results['run']}, "
        f"K = {results['steps']}, seed {results['seed']}; reference ΔF {ref.value:.3f} ± "
        f"{ref.stderr:.3f} kT ({results['reference']['label']})",
        "",
        "| method | N | ESS/N | ΔF [kT] (95% CI) | ΔF − ref [kT] | energy evals / sample | "
        "force evals / sample | wall time [s] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        d, c = row["ΔF"], row["ΔF - reference"]
        diff = (
            "n/a"
            if c.get("difference") is None
            else (f"{c['difference']:+.3f} ± {c['stderr']:.3f}")
        )
        lines.append(
            f"| {row['method']} | {row['N']} | {row['ESS/N']:.3f} | {d.value:.3f} "
            f"({d.ci_low:.3f}, {d.ci_high:.3f}) | {diff} | "
            f"{row['energy evaluations per sample']:.0f} | "
            f"{row['force evaluations per sample']:.0f} | {row['wall seconds']:.1f} |"
        )
    smc = results["rows"][-1]
    load = results["load average (1 min) before / after"]
    lines += [
        "",
        f"SMC: {smc['temperatures']} temperatures ({_schedule(results['smc'])}), "
        f"{results['smc']['n_kernel_steps']} "
        f"{results['smc']['kernel'].upper()} moves each, mean acceptance {smc['acceptance']:.2f}, "
        f"resampled {int(np.sum(smc['resampled']))}x (last step: {smc['last_step_resampled']}), "
        f"ESS/N before any resampling at the last step {smc['last_ess_before_resampling']:.3f}, "
        f"{smc['eves']} surviving initial ancestors and {smc['unique_particles']} distinct "
        f"particles of {smc['N']}; ESS/N of the same N initial draws "
        f"{smc['initial_ess_fraction']:.3f}. Load average {load[0]:.1f} / {load[1]:.1f} "
        f"(1 min, before / after) on {results['machine cores']} cores.",
    ]
    return "\n".join(lines)


def _schedule(options: dict[str, Any]) -> str:
    if options["n_temperatures"]:
        return "evenly spaced"
    return f"adaptive, conditional ESS/N {options['adaptive_ess']}"


if __name__ == "__main__":
    main()
