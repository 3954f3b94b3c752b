"""``boltzflow train teacher`` and ``boltzflow nll`` for teacher CNFs (``boltzflow sample`` is
:mod:`boltzflow.cli.sample_cmd`).

    boltzflow train teacher --system dw4 --data train.npy --config teacher_dw4.toml -o runs/t
    boltzflow nll runs/t --data val.npy

``train`` is a command group: student modules add their own ``train <model>`` subcommand with
:func:`train_group`. All densities are on the mean-free subspace for particle systems.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from pathlib import Path
from typing import Any

import torch

from boltzflow.flows.ode import ADAPTIVE_METHODS, DIVERGENCES, FIXED_METHODS, TRACE_MODES
from boltzflow.validate import arg, nonnegative_int, positive_float, positive_int

__all__ = ["ode_options", "ode_settings", "register", "train_group"]


def train_group(sub: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """The subparsers of ``boltzflow train`` (created on first use, shared by all models)."""
    parser = sub.choices.get("train")
    if parser is None:
        parser = sub.add_parser("train", help="train a model (teacher, students)")
        group = parser.add_subparsers(dest="model", metavar="MODEL")
        group.required = True
        parser._boltzflow_group = group  # type: ignore[attr-defined]
    return parser._boltzflow_group  # type: ignore[attr-defined]


def run_options(p: argparse.ArgumentParser) -> None:
    """Add the options every ``boltzflow train MODEL`` shares: ``-o`` run folder and the
    overrides of the run configuration (``--steps``, ``--seed``, ``--device``), ``--restart``
    and ``--threads``."""
    p.add_argument("-o", "--output", required=True, help="run folder")
    p.add_argument("--steps", type=arg(positive_int, "--steps"), help="override train.steps")
    p.add_argument("--seed", type=arg(nonnegative_int, "--seed"), help="override train.seed")
    p.add_argument("--device", default=None, help="override train.device (cpu, cuda)")
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--threads", type=arg(positive_int, "--threads"), help="torch CPU threads")


def ode_options(
    p: argparse.ArgumentParser, *, steps_help: str = "steps of a fixed-step method"
) -> None:
    """Add the ODE settings of a teacher (and ``--threads``) to a command's parser."""
    g = p.add_argument_group("ODE settings (default: the model's own)")
    g.add_argument("--method", choices=ADAPTIVE_METHODS + FIXED_METHODS)
    g.add_argument("--atol", type=arg(positive_float, "--atol"))
    g.add_argument("--rtol", type=arg(positive_float, "--rtol"))
    g.add_argument("--steps", type=arg(positive_int, "--steps"), help=steps_help)
    g.add_argument("--divergence", choices=DIVERGENCES)
    g.add_argument("--trace-mode", choices=TRACE_MODES)
    g.add_argument("--quadrature-points", type=arg(positive_int, "--quadrature-points"))
    g.add_argument("--batch-size", type=arg(positive_int, "--batch-size"), help="samples per batch")
    g.add_argument("--threads", type=arg(positive_int, "--threads"), help="torch CPU threads")


def ode_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The ODE settings given on the command line (``steps`` and ``batch_size`` included)."""
    keys = ("method", "atol", "rtol", "steps", "divergence", "trace_mode", "quadrature_points")
    keys += ("batch_size",)
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def _load_teacher(folder: str) -> tuple[Any, dict[str, Any]]:
    """The teacher (EMA weights) and what its checkpoint records about the run."""
    from boltzflow.flows.cnf import TeacherCNF

    teacher = TeacherCNF.load(folder)
    return teacher, dict(teacher.source.get("run", {}), checkpoint=teacher.source["checkpoint"])


# -- train teacher ------------------------------------------------------------------------------
def _cmd_train(args: argparse.Namespace) -> int:
    from boltzflow import distributed
    from boltzflow.data import load_positions
    from boltzflow.io.outputs import check_output_dir, remove_on_failure
    from boltzflow.train.config import load_teacher_config
    from boltzflow.train.teacher import SystemShape, train_teacher
    from boltzflow.train.trainer import CHECKPOINT_FILE

    me = distributed.info()
    output = distributed.run_on_all(lambda: check_output_dir(args.output))
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_teacher_config(args.config, args.profile)
    system = args.system or cfg.system
    if system is None:
        raise ValueError("name the system with --system (or `system = ...` in the config)")
    if cfg.system is not None and args.system is not None and cfg.system != args.system:
        raise ValueError(f"--system {args.system!r} but {args.config} is for {cfg.system!r}")
    cfg.train.set_given(steps=args.steps, seed=args.seed, device=args.device)
    cfg.system = system
    shape = SystemShape.from_name(system)
    data = torch.as_tensor(load_positions(args.data, args.dataset, system=system))
    if len(data) == 0:
        raise ValueError(f"{args.data}: no training configurations (0 rows)")
    run_info = {"system": system, "data": str(args.data), "profile": args.profile}

    # a run folder made here that fails before its first checkpoint is removed again (by the
    # rank that writes it: rank 0 under torchrun, which trains with DDP on every rank)
    def keep(folder: Path) -> bool:
        return (folder / CHECKPOINT_FILE).is_file()

    cleanup = remove_on_failure(output, keep=keep) if me.is_main else contextlib.nullcontext()
    with cleanup:
        teacher = train_teacher(
            cfg, data, output, shape, resume=not args.restart, run_info=run_info
        )
    if not me.is_main:
        return 0
    print(
        f"trained teacher for {system} ({sum(p.numel() for p in teacher.parameters())} "
        f"parameters, {cfg.train.steps} steps) -> {Path(args.output) / 'teacher.pt'}"
    )
    return 0


# -- nll ------------------------------------------------------------------------------------------
def _cmd_nll(args: argparse.Namespace) -> int:
    from boltzflow.data import load_positions
    from boltzflow.flows.evaluate import nll_summary
    from boltzflow.io.atomic import atomic_write_text
    from boltzflow.io.outputs import check_output_file, remove_on_failure

    output = check_output_file(args.json) if args.json else None
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher, info = _load_teacher(args.model)
    system = args.system or info.get("system")
    x = load_positions(args.data, args.dataset, system=system)
    if args.n is not None:
        x = x[: args.n]
    if len(x) == 0:
        raise ValueError(f"{args.data}: no configurations to score (0 rows)")
    out = teacher.log_prob_with_stats(torch.as_tensor(x), progress=True, **ode_settings(args))
    report: dict[str, Any] = nll_summary(out.log_q)
    k = teacher.event_dim
    report.update(
        event_dim=k,
        # EFM (Klein et al. 2023) scores with bgflow's unnormalised mean-free Gaussian prior
        nll_efm_normalisation=report["nll"] - 0.5 * k * math.log(2 * math.pi),
        nfe_per_batch=out.nfe_per_batch,
        s_per_1000=out.seconds_per_1000,
        data=str(args.data),
        checkpoint=info.get("checkpoint"),
    )
    space = f"the {k}-dim mean-free subspace" if teacher.mean_free else f"R^{k}"
    if getattr(teacher, "representation", "cartesian") == "internal":
        space = f"Cartesian x with rigid motions integrated out, {k} internal coordinates"
    print(
        f"NLL {report['nll']:.4f} ± {report['nll_se']:.4f} nats over {report['n_val']} points "
        f"(density on {space}; EFM normalisation {report['nll_efm_normalisation']:.4f}); "
        f"NFE {out.nfe_per_batch:.1f} per batch, {out.seconds_per_1000:.2f} s per 1000"
    )
    if output is not None:
        with remove_on_failure(output):  # the folders atomic_write_text creates
            atomic_write_text(output, json.dumps(report, indent=2) + "\n")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = train_group(sub).add_parser(
        "teacher", help="train a teacher CNF by (equivariant-OT) flow matching"
    )
    p.add_argument("--system", help="system name (default: `system` in the config)")
    p.add_argument("--data", required=True, help=".npy or HDF5 training configurations")
    p.add_argument("--dataset", default=None, help="HDF5 dataset name (default: positions)")
    p.add_argument("--config", required=True, help="TOML run configuration")
    p.add_argument("--profile", default=None, help="config profile, e.g. smoke or gpu")
    run_options(p)
    p.set_defaults(func=_cmd_train, distributed=True)

    p = sub.add_parser("nll", help="negative log-likelihood of configurations under a teacher")
    p.add_argument("model", help="teacher run folder or checkpoint file")
    p.add_argument("--data", required=True, help=".npy or HDF5 configurations")
    p.add_argument("--dataset", default=None, help="HDF5 dataset name (default: positions)")
    p.add_argument("-n", type=arg(positive_int, "-n"), help="use the first N configurations")
    p.add_argument("--system", default=None, help="system (for centring); default: the model's")
    p.add_argument("--json", default=None, help="write the summary as JSON")
    ode_options(p)
    p.set_defaults(func=_cmd_nll)
