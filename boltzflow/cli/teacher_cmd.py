"""``boltzflow train teacher`` and ``boltzflow nll`` for teacher CNFs (``boltzflow sample`` is
:mod:`boltzflow.cli.sample_cmd`).

    boltzflow train teacher --system dw4 --data train.npy --config teacher_dw4.toml -o runs/t
    boltzflow nll runs/t --data val.npy

``train`` is a command group: student modules add their own ``train <model>`` subcommand with
:func:`train_group`. All densities are on the mean-free subspace for particle systems.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch

from boltzflow.flows.ode import ADAPTIVE_METHODS, DIVERGENCES, FIXED_METHODS, TRACE_MODES

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


def ode_options(
    p: argparse.ArgumentParser, *, steps_help: str = "steps of a fixed-step method"
) -> None:
    """Add the ODE settings of a teacher (and ``--threads``) to a command's parser."""
    g = p.add_argument_group("ODE settings (default: the model's own)")
    g.add_argument("--method", choices=ADAPTIVE_METHODS + FIXED_METHODS)
    g.add_argument("--atol", type=float)
    g.add_argument("--rtol", type=float)
    g.add_argument("--steps", type=int, help=steps_help)
    g.add_argument("--divergence", choices=DIVERGENCES)
    g.add_argument("--trace-mode", choices=TRACE_MODES)
    g.add_argument("--quadrature-points", type=int)
    g.add_argument("--batch-size", type=int, help="samples per batch")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")


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
    from boltzflow.data import load_positions
    from boltzflow.train.config import load_teacher_config
    from boltzflow.train.teacher import SystemShape, train_teacher

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
    run_info = {"system": system, "data": str(args.data), "profile": args.profile}
    teacher = train_teacher(
        cfg, data, args.output, shape, resume=not args.restart, run_info=run_info
    )
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

    if args.threads:
        torch.set_num_threads(args.threads)
    teacher, info = _load_teacher(args.model)
    system = args.system or info.get("system")
    x = load_positions(args.data, args.dataset, system=system)
    if args.n is not None:
        x = x[: args.n]
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
    print(
        f"NLL {report['nll']:.4f} ± {report['nll_se']:.4f} nats over {report['n_val']} points "
        f"(density on {space}; EFM normalisation {report['nll_efm_normalisation']:.4f}); "
        f"NFE {out.nfe_per_batch:.1f} per batch, {out.seconds_per_1000:.2f} s per 1000"
    )
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
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
    p.add_argument("-o", "--output", required=True, help="run folder")
    p.add_argument("--steps", type=int, default=None, help="override train.steps")
    p.add_argument("--seed", type=int, default=None, help="override train.seed")
    p.add_argument("--device", default=None, help="override train.device (cpu, cuda)")
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("nll", help="negative log-likelihood of configurations under a teacher")
    p.add_argument("model", help="teacher run folder or checkpoint file")
    p.add_argument("--data", required=True, help=".npy or HDF5 configurations")
    p.add_argument("--dataset", default=None, help="HDF5 dataset name (default: positions)")
    p.add_argument("-n", type=int, default=None, help="use the first N configurations")
    p.add_argument("--system", default=None, help="system (for centring); default: the model's")
    p.add_argument("--json", default=None, help="write the summary as JSON")
    ode_options(p)
    p.set_defaults(func=_cmd_nll)
