"""``boltzflow sample``: samples with log q (and u, log w) from any trained model.

    boltzflow sample runs/t -n 10000 -o samples.h5                  # teacher: exact-trace ODE
    boltzflow sample runs/dw4_f2d2 --steps 4 -n 10000 -o samples.h5 # student: 4 map steps
    boltzflow sample runs/dw4_nf -n 10000 -o samples.h5             # NF student: one pass
    boltzflow sample runs/dw4_f2d2 --steps 2 --guidance 0.1 -n 10000 -o samples.h5
                                       # F2D2 with maximum-likelihood self-guidance
    boltzflow sample runs/lj13_f2d2 --steps 4 --exact-logdet -n 2000 -o exact.h5
                                       # F2D2 weighted by its map's exact log-det (checks the head)
    boltzflow sample runs/dw4_falcon --steps 4 -n 100000 --compile -o s.h5
                                       # exact log-det steps through torch.compile
    boltzflow sample runs/t -n 10000 -o samples.h5 --resume  # continue an interrupted run

Every model kind goes through the one sampling path (:mod:`boltzflow.sampling.draw`): batches
are drawn, weighted against the system the model was trained for (or ``--system``) and
streamed into an HDF5 sample store, so an interrupted run keeps its completed batches.

Under ``torchrun --nproc_per_node=K`` each rank draws its share with its own seed into
``OUT.rank<r>-of-<K>.h5``, and rank 0 writes the manifest ``OUT.shards.json``
(:mod:`boltzflow.sampling.sharded`); ``boltzflow reweight OUT.h5`` reads the shards.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from boltzflow.cli.teacher_cmd import ode_options, ode_settings
from boltzflow.validate import arg, nonnegative_float, nonnegative_int, positive_int

__all__ = ["register"]


def _prepare(args: argparse.Namespace) -> tuple[Any, Any]:
    """This rank's plan (its output file checked) and the model."""
    from boltzflow import distributed
    from boltzflow.io.outputs import check_output_file
    from boltzflow.io.shards import manifest_path
    from boltzflow.models.protocol import check_count
    from boltzflow.registry.loading import load_model
    from boltzflow.sampling.sharded import shard_plan

    me = distributed.info()
    check_output_file(args.output)
    check_count(args.n, "-n")
    plan = shard_plan(args.output, args.n, args.seed, me)[me.rank]
    if me.distributed:
        check_output_file(plan.path)
        check_output_file(manifest_path(args.output))
    return plan, load_model(args.model, system=args.system)


def _cmd_sample(args: argparse.Namespace) -> int:
    from boltzflow import distributed
    from boltzflow.io.outputs import remove_on_failure
    from boltzflow.models.protocol import LOG_Q_KINDS
    from boltzflow.sampling.draw import cost_of
    from boltzflow.sampling.sharded import write_sharded_draws
    from boltzflow.systems import load_system
    from boltzflow.systems.base import energy_provenance_of

    if args.threads:
        torch.set_num_threads(args.threads)
    me = distributed.info()
    # every rank checks its own output; an error on one rank stops them all
    plan, model = distributed.run_on_all(lambda: _prepare(args))
    settings = ode_settings(args)
    given = sorted(k for k in settings if k not in ("steps", "batch_size", "threads"))
    if given and not hasattr(model, "sampling"):  # only a teacher has ODE settings
        raise ValueError(f"{given} are ODE settings of a teacher; {args.model} holds a student")
    given_f2d2 = {"guidance": args.guidance, "exact_logdet": args.exact_logdet or None}
    f2d2_settings = {k: v for k, v in given_f2d2.items() if v is not None}
    if f2d2_settings:  # F2D2 only (boltzflow.distill.f2d2)
        from boltzflow.distill import F2D2

        if not isinstance(model, F2D2):
            kind = getattr(model, "student_kind", "teacher_cnf")
            flags = ", ".join("--" + k.replace("_", "-") for k in f2d2_settings)
            what = "is a setting" if len(f2d2_settings) == 1 else "are settings"
            raise ValueError(f"{flags} {what} of F2D2 students; {args.model} holds a {kind}")
        settings.update(f2d2_settings)
    if args.compile:
        _compile_model(model, args, settings)
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
        "log_q_kind": LOG_Q_KINDS["step_logdet"] if args.exact_logdet else model.log_q_kind,
        "log_q": getattr(model, "log_q_convention", None)
        or ("density on the mean-free subspace" if model.mean_free else "density"),
        "energy": energy_provenance_of(system),  # what computed the u column (None: no u)
    }
    if args.compile:  # recorded only when on, so that older files still resume
        provenance["compiled"] = True
    try:
        # streamed in place: Ctrl-C keeps the completed batches (marked partial), an error
        # leaves no file; a shard of a distributed run keeps them on errors too (the job's
        # other shards stay, and the manifest says the run is incomplete)
        # (and a resumed file keeps its rows whatever happens)
        resuming = args.resume and plan.path.exists()
        keep = (lambda _: True) if me.distributed or resuming else None
        with remove_on_failure(plan.path, replaces=True, keep_on_interrupt=True, keep=keep):
            result = write_sharded_draws(
                model,
                args.n,
                args.output,
                system=system,
                steps=steps,
                seed=args.seed,
                batch_size=batch_size,
                provenance=provenance,
                progress=True,
                resume=args.resume,
                **settings,
            )
    except KeyboardInterrupt as err:
        _report_interrupted(str(plan.path), plan.n)
        if isinstance(err, distributed.Terminated):
            raise  # the command line says which rank the launcher stopped, and why
        return 130
    finally:
        if system is not None:
            system.close()
    if not me.is_main:
        return 0
    where = (
        args.output if result.manifest is None else f"{me.world_size} shards ({result.manifest})"
    )
    drawn = sum(len(b.out.x) for b in result.batches)
    line = f"wrote {result.n} samples to {where}: {provenance['model']}"
    if drawn < result.n:  # a resumed run
        line += f" ({result.n - drawn} already in the file, {drawn} drawn now)"
    if result.batches:
        cost = cost_of(result.batches)
        line += (
            f", {'' if steps is None else f'{steps} steps, '}NFE {cost.nfe_per_sample:.1f} per "
            f"sample, {cost.seconds_per_1000:.3f} s per 1000 samples"
            + (" on rank 0" if me.distributed else "")
        )
    if result.ess is not None:
        line += f", ESS/N {result.ess / result.n:.4f} (N = {result.n})"
    print(line)
    return 0


def _compile_model(model: Any, args: argparse.Namespace, settings: dict[str, Any]) -> None:
    """``--compile``: a teacher's exact divergence, or the exact log-det jumps of a FALCON
    student (of F2D2 with ``--exact-logdet``), through ``torch.compile``; refused where there
    is nothing to compile."""
    import sys

    from boltzflow.distill import FALCON
    from boltzflow.distill.flowmap import FlowMapStudent
    from boltzflow.flows.cnf import TeacherCNF
    from boltzflow.progress import is_quiet

    if isinstance(model, TeacherCNF):
        divergence = settings.get("divergence") or model.sampling["divergence"]
        if divergence not in ("exact", "quadrature"):
            raise ValueError(
                f"--compile compiles a teacher's exact divergence; this draw uses {divergence!r}"
            )
    elif not isinstance(model, FlowMapStudent):
        kind = getattr(model, "student_kind", "model")
        raise ValueError(
            f"--compile compiles a teacher's exact divergence or the exact log-det steps of "
            f"flow-map students (FALCON, F2D2 with --exact-logdet); {args.model} holds a {kind}"
        )
    elif not isinstance(model, FALCON) and not args.exact_logdet:
        raise ValueError(
            "--compile compiles the exact log-det steps; an F2D2 student takes them only with "
            "--exact-logdet"
        )
    model.set_compiled(True)
    if not is_quiet():
        print(
            "boltzflow sample: --compile: the first batch compiles the exact log q "
            "(once per process, 20-110 s on a CPU)",
            file=sys.stderr,
            flush=True,
        )


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
    p.add_argument(
        "--exact-logdet",
        action="store_true",
        help="F2D2 only: log q from the exact Jacobian log-determinant of every step the "
        "sampler takes instead of the divergence head (the same samples; dim reverse passes "
        "per step): checks the head's importance weights",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="a teacher's exact divergence, or the exact log-det steps of FALCON (F2D2 with "
        "--exact-logdet), through torch.compile (needs a C++ compiler on CPU; the same values "
        "to rounding, 1.6-4x faster on a CPU after 10-60 s of compilation; recorded in the "
        "provenance)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue OUT if an interrupted run of the same command (model, seed, -n, "
        "settings) left it: its rows are kept and only the rest is drawn, the same rows as an "
        "uninterrupted run (to solver tolerance); without it OUT is replaced",
    )
    p.set_defaults(func=_cmd_sample, distributed=True)
