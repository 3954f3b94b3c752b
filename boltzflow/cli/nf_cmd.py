"""``boltzflow train nf``: the NF in internal coordinates of a molecule, trained on MD frames by
maximum likelihood with a held-out split and early stopping
(:mod:`boltzflow.distill.nf_internal_train`).

    boltzflow train nf --data aldp_md.h5 --system aldp \\
        --config workflows/configs/nf_aldp_internal.toml -o runs/nf-aldp
    boltzflow sample runs/nf-aldp -n 10000 -o samples.h5     # Cartesian x, log q, log_q_internal

One line per evaluation (step, training loss, train and held-out NLL, best so far) goes to
stderr, with or without a terminal.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from boltzflow.cli.teacher_cmd import run_options, train_group

__all__ = ["register"]


def _cmd_train_nf(args: argparse.Namespace) -> int:
    from boltzflow.data import load_positions
    from boltzflow.distill.base import STUDENT_FILE
    from boltzflow.distill.nf_internal_train import (
        ICNFRunConfig,
        load_icnf_config,
        train_nf_internal,
    )
    from boltzflow.io.checkpoint import load_checkpoint
    from boltzflow.io.outputs import check_output_dir, remove_on_failure
    from boltzflow.train.trainer import CHECKPOINT_FILE

    output = check_output_dir(args.output)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_icnf_config(args.config, args.profile) if args.config else ICNFRunConfig()
    system = args.system or cfg.system
    if system is None:
        raise ValueError("name the system with --system (or `system = ...` in the config)")
    if cfg.system is not None and args.system is not None and cfg.system != args.system:
        raise ValueError(f"--system {args.system!r} but {args.config} is for {cfg.system!r}")
    cfg.train.set_given(steps=args.steps, seed=args.seed, device=args.device)
    data = load_positions(args.data, args.dataset, system=system)
    if len(data) < 2:
        raise ValueError(f"{args.data}: need at least 2 frames, got {len(data)}")
    run_info = {"data": str(args.data), "config": args.config, "profile": args.profile}
    with remove_on_failure(output, keep=lambda d: (d / CHECKPOINT_FILE).is_file()):
        model = train_nf_internal(
            data, output, system=system, config=cfg, resume=not args.restart, run_info=run_info
        )
    info = load_checkpoint(Path(output) / STUDENT_FILE, kind="student").get("extra", {})
    print(
        f"trained nf_internal for {system} ({model.n_parameters} parameters, "
        f"{info.get('steps')} steps, best held-out NLL {info.get('best_val_nll', float('nan')):.3f}"
        f" nats at step {info.get('best_step')}) -> {Path(args.output) / STUDENT_FILE}"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = train_group(sub).add_parser(
        "nf",
        help="train the NF in internal coordinates (circular splines) on MD frames",
        description="Maximum likelihood on frames with a held-out split and early stopping.",
    )
    p.add_argument("--system", help="molecular system (default: `system` in the config)")
    p.add_argument("--data", required=True, help="boltzflow dataset (.h5) or .npy frames (nm)")
    p.add_argument("--dataset", default=None, help="HDF5 dataset name (default: positions)")
    p.add_argument("--config", default=None, help="TOML run configuration (default: built-in)")
    p.add_argument("--profile", default=None, help="config profile, e.g. smoke")
    run_options(p)
    p.set_defaults(func=_cmd_train_nf)
