"""``boltzflow distill``: distil a teacher CNF into a few-step student.

    boltzflow distill runs/dw4_teacher --method f2d2 -o runs/dw4_f2d2 \\
        [--config workflows/configs/student_f2d2_dw4.toml] [--profile smoke]
    boltzflow distill runs/dw4_teacher --method falcon -o runs/dw4_falcon
    boltzflow distill runs/dw4_teacher --method nf -o runs/dw4_nf
    boltzflow sample runs/dw4_f2d2 --steps 4 -n 10000 -o samples.h5

``boltzflow sample`` (:mod:`boltzflow.cli.sample_cmd`) samples any of them.

Under ``torchrun`` F2D2 and FALCON students train with DistributedDataParallel (rank 0 makes the
teacher trajectories and writes the run folder); the other methods refuse to start.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from boltzflow.validate import arg, nonnegative_int, positive_int

__all__ = ["register"]


def _cmd_distill(args: argparse.Namespace) -> int:
    import contextlib

    from boltzflow import distributed
    from boltzflow.io.outputs import check_output_dir, remove_on_failure
    from boltzflow.registry.methods import METHODS

    me = distributed.info()
    if me.distributed and not METHODS[args.method].distributed:
        spread = [name for name, m in METHODS.items() if m.distributed]
        raise ValueError(
            f"--method {args.method} does not run under torchrun ({me.world_size} ranks): only "
            f"{' and '.join(spread)} students train with DistributedDataParallel (the nf "
            "students' losses draw their own minibatches, the baselines train nothing); run it "
            "as one process (without torchrun)"
        )
    output = distributed.run_on_all(lambda: check_output_dir(args.output))
    # a run folder made here that fails before its first checkpoint (or before the teacher's
    # trajectories, which a rerun reuses, are saved) is removed again, by rank 0 under torchrun
    cleanup = remove_on_failure(output, keep=_resumable) if me.is_main else contextlib.nullcontext()
    with cleanup:
        return _distill(args)


def _resumable(folder: Path) -> bool:
    """Whether a failed run left something a rerun continues from."""
    return any((folder / name).is_file() for name in ("checkpoint.pt", "trajectories.pt"))


def _distill(args: argparse.Namespace) -> int:
    from boltzflow import distributed
    from boltzflow.distill.train_students import (
        StudentConfig,
        load_student_config,
        teacher_system,
        train_student,
    )
    from boltzflow.flows.cnf import TeacherCNF
    from boltzflow.registry.methods import get_method

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.method == "nf":  # also distils an NF teacher (latent matching): its own entry
        return _distill_nf(args)
    recorded = teacher_system(args.teacher)
    if args.system and recorded and args.system != recorded:
        raise ValueError(
            f"{args.teacher}: the teacher was trained for {recorded!r}, not {args.system!r}"
        )
    system = args.system or recorded
    method = get_method(args.method)
    if method.config is not StudentConfig:  # a baseline: built from the teacher, no training
        if args.config or args.data:
            raise ValueError(f"method {args.method!r} takes no --config or --data")
        teacher = TeacherCNF.load(args.teacher, system=system)
        method.train(method.new_config(), teacher, args.output, system=system)
        print(f"{args.method} baseline for {system} -> {Path(args.output) / 'student.pt'}")
        return 0
    if args.config:
        cfg = load_student_config(args.config, args.profile, method=args.method)
    else:
        if args.profile:
            raise ValueError("--profile needs --config")
        cfg = StudentConfig(method=args.method)
    cfg.train.set_given(steps=args.train_steps, seed=args.seed, device=args.device)
    data = None
    if cfg.loss.target == "data" and not args.data:
        raise ValueError("loss.target = 'data' needs --data")
    if args.data:
        from boltzflow.data import load_positions

        data = torch.as_tensor(load_positions(args.data, system=system))
        if len(data) == 0:
            raise ValueError(f"{args.data}: no training configurations (0 rows)")
    teacher = TeacherCNF.load(args.teacher)
    info = {"teacher": str(args.teacher), "config": args.config, "profile": args.profile}
    start = time.perf_counter()
    student = train_student(
        cfg,
        teacher,
        args.output,
        system=system,
        data=data,
        resume=not args.restart,
        run_info=info,
    )
    if not distributed.is_main():
        return 0
    n_par = sum(p.numel() for p in student.parameters())
    print(
        f"distilled {args.method} student for {system} ({n_par} parameters, {cfg.train.steps} "
        f"steps, {time.perf_counter() - start:.0f} s) -> {Path(args.output) / 'student.pt'}"
    )
    return 0


def _distill_nf(args: argparse.Namespace) -> int:
    from boltzflow.distill.nf_run import distill_nf
    from boltzflow.distill.nf_train import default_train_config

    if args.config:
        raise ValueError("--config is for f2d2/falcon; the NF student takes its defaults")
    overrides: dict[str, Any] = {}
    if args.train_steps is not None:
        overrides["steps"] = args.train_steps
    if args.device is not None:
        overrides["device"] = args.device
    student = distill_nf(
        args.teacher,
        args.output,
        data=args.data,
        system=args.system,
        train=default_train_config(**overrides),
        seed=args.seed,
        resume=not args.restart,
    )
    print(f"distilled nf student for {student.system} -> {Path(args.output) / 'student.pt'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from boltzflow.registry.methods import METHODS

    p = sub.add_parser(
        "distill",
        help="distil a teacher CNF into a few-step student (any method of the registry)",
        description="Train a student from a teacher run folder; writes OUT/student.pt.",
    )
    p.add_argument("teacher", help="teacher run folder or checkpoint file")
    # methods that learn from a teacher (nf_internal learns from MD frames: `boltzflow train nf`)
    methods = [name for name, m in METHODS.items() if m.uses_teacher]
    p.add_argument("--method", required=True, choices=methods)
    p.add_argument("-o", "--output", required=True, help="student run folder")
    p.add_argument("--config", default=None, help="student TOML config (f2d2/falcon)")
    p.add_argument("--profile", default=None, help="config profile, e.g. smoke")
    p.add_argument("--system", default=None, help="system name (default: the teacher's)")
    p.add_argument(
        "--data",
        default=None,
        help="training data (FALCON from data or for loss.likelihood; NF teachers)",
    )
    p.add_argument(
        "--train-steps", type=arg(positive_int, "--train-steps"), help="override train.steps"
    )
    p.add_argument("--seed", type=arg(nonnegative_int, "--seed"), help="override train.seed")
    p.add_argument("--device", default=None, help="override train.device")
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--threads", type=arg(positive_int, "--threads"), help="torch CPU threads")
    p.set_defaults(func=_cmd_distill, distributed=True)
