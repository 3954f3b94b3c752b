"""``boltzflow sample``: samples with log q (and u, log w) from any trained model.

    boltzflow sample runs/t -n 10000 -o samples.h5                  # teacher: exact-trace ODE
    boltzflow sample runs/dw4_f2d2 --steps 4 -n 10000 -o samples.h5 # student: 4 map steps
    boltzflow sample runs/dw4_nf -n 10000 -o samples.h5             # NF student: one pass
    boltzflow sample runs/dw4_f2d2 --steps 2 --guidance 0.1 -n 10000 -o samples.h5
                                       # F2D2 with maximum-likelihood self-guidance

Every model kind goes through the one sampling path (:mod:`boltzflow.sampling.draw`): batches
are drawn, weighted against the system the model was trained for (or ``--system``) and
streamed into an HDF5 sample store, so an interrupted run keeps its completed batches.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from boltzflow.cli.teacher_cmd import ode_options, ode_settings
from boltzflow.validate import arg, nonnegative_float, nonnegative_int, positive_int

__all__ = ["register"]


def _cmd_sample(args: argparse.Namespace) -> int:
    from boltzflow.io.outputs import check_output_file, remove_on_failure
    from boltzflow.models.protocol import check_count
    from boltzflow.registry.loading import load_model
    from boltzflow.sampling.draw import cost_of, iter_draws, write_draws
    from boltzflow.sampling.weights import ess_fraction
    from boltzflow.systems import load_system
    from boltzflow.systems.base import energy_provenance_of

    output = check_output_file(args.output)
    if args.threads:
        torch.set_num_threads(args.threads)
    check_count(args.n, "-n")
    model = load_model(args.model, system=args.system)
    settings = ode_settings(args)
    given = sorted(k for k in settings if k not in ("steps", "batch_size", "threads"))
    if given and not hasattr(model, "sampling"):  # only a teacher has ODE settings
        raise ValueError(f"{given} are ODE settings of a teacher; {args.model} holds a student")
    if args.guidance is not None:  # F2D2 only (boltzflow.distill.f2d2_guidance)
        from boltzflow.distill import F2D2

        if not isinstance(model, F2D2):
            kind = getattr(model, "student_kind", "teacher_cnf")
            raise ValueError(
                f"--guidance is a setting of F2D2 students; {args.model} holds a {kind}"
            )
        settings["guidance"] = args.guidance
    steps = settings.pop("steps", None)
    batch_size = settings.pop("batch_size", None)
    system_name = args.system or model.system
    system = load_system(system_name) if system_name and not args.no_energy else None
    provenance = {
        "model": getattr(model, "student_kind", "teacher_cnf"),
        "checkpoint": str(args.model),
        "system": system_name,
        "seed": args.seed,
        "n": args.n,
        "steps": steps,
        "sampling": settings,
        "log_q_kind": model.log_q_kind,
        "log_q": getattr(model, "log_q_convention", None)
        or ("density on the mean-free subspace" if model.mean_free else "density"),
        "energy": energy_provenance_of(system),  # what computed the u column (None: no u)
    }
    try:
        batches = iter_draws(
            model,
            args.n,
            system=system,
            steps=steps,
            seed=args.seed,
            batch_size=batch_size,
            progress=True,
            **settings,
        )
        # streamed in place: Ctrl-C keeps the completed batches (marked partial), an error
        # leaves no file
        with remove_on_failure(output, replaces=True, keep_on_interrupt=True):
            output.parent.mkdir(parents=True, exist_ok=True)  # as every other command does
            done = write_draws(
                output,
                batches,
                dim=model.dim,
                provenance=provenance,
                atomic=False,
                n_planned=args.n,
            )
    except KeyboardInterrupt:
        _report_interrupted(str(output), args.n)
        return 130
    finally:
        if system is not None:
            system.close()
    cost = cost_of(done)
    line = (
        f"wrote {args.n} samples to {args.output}: {provenance['model']}, "
        f"{'' if steps is None else f'{steps} steps, '}NFE {cost.nfe_per_sample:.1f} per sample, "
        f"{cost.seconds_per_1000:.3f} s per 1000 samples"
    )
    if system is not None:
        log_w: Any = torch.cat([b.log_w for b in done])
        line += f", ESS/N {ess_fraction(log_w):.4f} (N = {args.n})"
    print(line)
    return 0


def _report_interrupted(path: str, n: int) -> None:
    """Say how many rows an interrupted run kept, and that the file is marked partial."""
    import sys

    from boltzflow.io.samples import read_samples

    try:
        kept = read_samples(path, allow_partial=True).n
    except (OSError, ValueError):
        kept = 0
    if kept:
        print(
            f"boltzflow sample: interrupted: kept {kept} of {n} samples in {path}, marked "
            "partial (analyse them with `reweight --allow-partial`)",
            file=sys.stderr,
        )
    else:
        print("boltzflow sample: interrupted before any sample was written", file=sys.stderr)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="draw samples with log q from any trained model (teacher or student)",
        description="Samples with log q, and with a system u and log w, to an HDF5 store.",
    )
    p.add_argument("model", help="run folder or model file (teacher, student, baseline)")
    p.add_argument("-n", type=arg(positive_int, "-n"), required=True, help="number of samples")
    p.add_argument("-o", "--output", required=True, help="HDF5 sample file")
    p.add_argument("--seed", type=arg(nonnegative_int, "--seed"), default=0)
    p.add_argument("--system", default=None, help="target system (default: the model's)")
    p.add_argument("--no-energy", action="store_true", help="skip u and log w")
    ode_options(p, steps_help="a student's map steps, or steps of a teacher's fixed-step method")
    p.add_argument(
        "--guidance",
        type=arg(nonnegative_float, "--guidance"),
        default=None,
        help="F2D2 only: maximum-likelihood self-guidance scale (flow units^2 per nat; "
        "default 0, off); log q stays the exact density of the guided map",
    )
    p.set_defaults(func=_cmd_sample)
