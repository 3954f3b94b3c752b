"""Distilled normalizing flows on DW4: an NF teacher, a 4x+ smaller student distilled from it
(Walton et al. 2025, arXiv:2506.21003: NLL + intermediate/final latent matching + decoded-sample
matching), and the same student trained from scratch for the same number of steps.

Usage (one thread; each stage resumes from its run folder):

    OMP_NUM_THREADS=1 .venv/bin/python workflows/nf_distillation_dw4.py -o runs/nf_distill_dw4 \
        [--teacher-steps 2500] [--student-steps 2000] [--student-lr 1e-2] [--n-samples 10000] \
        [--seed 0] [--synthetic-fraction 0] [--no-anneal] \
        [--cnf-teacher runs/dw4_teacher --n-pairs 5000] [--quick]

Both student arms share steps, batch size, lr and schedule. Defaults: distillation weights 0.1
(NLL 1) annealed linearly to 0, student peak lr 1e-2. Measured with these defaults (seed 0,
teacher of 2,500 steps at lr 1e-3, 414,800 vs 71,208 parameters, val NLL in nats, paired
differences over the 10,000 val points): teacher 9.051 +- 0.016, scratch 9.078 +- 0.016,
distilled 9.312 +- 0.016; distilled - scratch +0.233 +- 0.013, scratch - teacher +0.027 +- 0.013.
So on DW4 the student gets within 0.1 nats of the teacher from the lr alone (at lr 1e-3 it was
0.9 nats behind after 2,000 steps), and distillation does not beat training from scratch: at
1,000 steps every variant tried was worse than or equal to scratch (all weights 0.1, final
latent only at 0.1 or 1, annealed weights, half of each batch from teacher samples with or
without final-latent regression).

Prints a table (parameters, NLL on the validation split +- standard error, ESS/N of N samples
weighted with the DW4 energy, wall and CPU time of training) and writes OUT/results.json. NLL
is -log q on the 6-dim mean-free subspace in raw coordinates (floor: the target entropy, about
7.15 nats). ``--cnf-teacher`` adds a student distilled from the teacher CNF's ODE pairs.
The DW4 splits are the public EFM data (Klein, Krämer, Noé 2023), via github.com/jarridrb/DEM.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from boltzflow.data import load_positions
from boltzflow.distill.base import STUDENT_FILE, load_student
from boltzflow.distill.nf import NFModelConfig, NFStudent
from boltzflow.distill.nf_losses import NFLossConfig
from boltzflow.distill.nf_train import (
    default_train_config,
    distill_nf_from_cnf,
    distill_nf_from_nf,
    train_nf,
)
from boltzflow.io.atomic import atomic_write_text
from boltzflow.sampling.weights import ess_fraction, log_weights
from boltzflow.systems import load_system

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference" / "dem"

TEACHER = NFModelConfig(blocks=8, couplings_per_block=2, hidden=128, depth=2, transform="spline")
STUDENT = NFModelConfig(blocks=4, couplings_per_block=2, hidden=64, depth=2, transform="spline")


def _timed(fn: Any, folder: Path) -> tuple[NFStudent, float, float]:
    """Run a training stage (or load its finished model); wall and CPU seconds spent now."""
    if (folder / STUDENT_FILE).is_file():
        model = load_student(folder)
        print(f"loaded finished {folder / STUDENT_FILE}", flush=True)
        return model, float("nan"), float("nan")
    w0, c0 = time.perf_counter(), time.process_time()
    model = fn()
    return model, time.perf_counter() - w0, time.process_time() - c0


def evaluate(
    model: NFStudent, system: Any, val: torch.Tensor, n_samples: int, seed: int
) -> dict[str, float]:
    """NLL on ``val`` (mean +- se) and Kish ESS/N of ``n_samples`` weighted by the energy."""
    with torch.no_grad():
        nll = -model.log_prob(val).double()
        t0 = time.perf_counter()
        x, log_q = model.sample(n_samples, seed=seed)
        sample_s = time.perf_counter() - t0
        log_w = log_weights(system.energy(x.double()), log_q.double())
    return {
        "n_parameters": model.n_parameters,
        "nll": float(nll.mean()),
        "nll_se": float(nll.std() / math.sqrt(len(nll))),
        "n_val": len(nll),
        "ess_fraction": ess_fraction(log_w),
        "n_samples": n_samples,
        "sample_s_per_1000": 1000 * sample_s / n_samples,
        "_nll_points": nll,
    }


def paired(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of the per-point difference a - b (same validation points)."""
    d = a - b
    return float(d.mean()), float(d.std() / math.sqrt(len(d)))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REFERENCE / "train_split_DW4.npy"))
    parser.add_argument("--val", default=str(REFERENCE / "val_split_DW4.npy"))
    parser.add_argument("-o", "--out", default=str(ROOT / "runs/nf_distill_dw4"))
    parser.add_argument("--teacher-steps", type=int, default=2500)
    parser.add_argument("--student-steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--teacher-lr", type=float, default=1e-3)
    parser.add_argument(
        "--student-lr", type=float, default=1e-2, help="peak lr of both student arms"
    )
    parser.add_argument("--n-samples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0, help="training and sampling seed")
    parser.add_argument("--no-augment", action="store_true", help="no O(2)/permutation augment")
    parser.add_argument("--nll-weight", type=float, default=1.0)
    parser.add_argument("--latent-weight", type=float, default=0.1)
    parser.add_argument("--final-weight", type=float, default=0.1)
    parser.add_argument("--sample-weight", type=float, default=0.1)
    parser.add_argument(
        "--synthetic-fraction",
        type=float,
        default=0.0,
        help="share of each distillation batch drawn fresh from the NF teacher",
    )
    parser.add_argument(
        "--no-anneal",
        action="store_true",
        help="constant distillation weights (default: linear to 0)",
    )
    parser.add_argument("--cnf-teacher", default=None, help="teacher CNF run folder (optional)")
    parser.add_argument("--n-pairs", type=int, default=5000)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (minutes -> s)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.teacher_steps, args.student_steps, args.n_samples = 60, 40, 500

    out = Path(args.out)
    system = load_system("dw4")
    data = torch.as_tensor(load_positions(args.data, system="dw4")).float()
    val = torch.as_tensor(load_positions(args.val, system="dw4")).float()
    aug = not args.no_augment
    loss = NFLossConfig(
        nll_weight=args.nll_weight,
        latent_weight=args.latent_weight,
        final_weight=args.final_weight,
        sample_weight=args.sample_weight,
        synthetic_fraction=args.synthetic_fraction,
        anneal=not args.no_anneal,
        rotations=aug,
        reflections=aug,
        permutations=aug,
    )
    common = {"batch_size": args.batch_size, "seed": args.seed}
    t_train = default_train_config(steps=args.teacher_steps, lr=args.teacher_lr, **common)
    s_train = default_train_config(steps=args.student_steps, lr=args.student_lr, **common)
    info = {"data": Path(args.data).name}

    rows: dict[str, dict[str, Any]] = {}
    models: dict[str, NFStudent] = {}
    stages = [
        (
            "nf_teacher",
            lambda: train_nf(
                data,
                out / "nf_teacher",
                system="dw4",
                model=TEACHER,
                train=t_train,
                loss=loss,
                run_info=info,
            ),
        ),
        (
            "student_distilled",
            lambda: distill_nf_from_nf(
                models["nf_teacher"],
                data,
                out / "student_distilled",
                model=STUDENT,
                train=s_train,
                loss=loss,
                run_info=info,
            ),
        ),
        (
            "student_scratch",
            lambda: train_nf(
                data,
                out / "student_scratch",
                system="dw4",
                model=dataclasses.replace(STUDENT, scale=models["nf_teacher"].scale),
                train=s_train,
                loss=loss,
                run_info=info,
            ),
        ),
    ]
    if args.cnf_teacher:
        from boltzflow.flows.cnf import TeacherCNF

        stages.append(
            (
                "student_from_cnf",
                lambda: distill_nf_from_cnf(
                    TeacherCNF.load(args.cnf_teacher),
                    out / "student_from_cnf",
                    system="dw4",
                    n_pairs=args.n_pairs,
                    model=STUDENT,
                    train=s_train,
                    loss=NFLossConfig(
                        final_weight=1.0, sample_weight=1.0, rotations=aug, permutations=aug
                    ),
                    run_info=info,
                ),
            )
        )
    for name, fn in stages:
        print(f"== {name}", flush=True)
        model, wall, cpu = _timed(fn, out / name)
        models[name] = model
        rows[name] = {
            **evaluate(model, system, val, args.n_samples, args.seed + 1),
            "train_wall_s": wall,
            "train_cpu_s": cpu,
        }
        r = rows[name]
        print(
            f"   NLL {r['nll']:.3f} +- {r['nll_se']:.3f}, ESS/N {r['ess_fraction']:.4f}", flush=True
        )

    teacher_nll = rows["nf_teacher"].pop("_nll_points")
    points = {k: r.pop("_nll_points") for k, r in rows.items() if k != "nf_teacher"}
    comparisons = {}
    for name, nll in points.items():
        gap, gap_se = paired(nll, teacher_nll)
        comparisons[f"{name}_minus_teacher"] = {"mean": gap, "se": gap_se}
    d_mean, d_se = paired(points["student_distilled"], points["student_scratch"])
    comparisons["distilled_minus_scratch"] = {"mean": d_mean, "se": d_se}
    ratio = rows["nf_teacher"]["n_parameters"] / rows["student_distilled"]["n_parameters"]

    header = (
        f"{'model':<18} {'params':>8} {'NLL val':>16} {'ESS/N':>8} {'N':>6} "
        f"{'wall s':>8} {'cpu s':>8}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for name, r in rows.items():
        print(
            f"{name:<18} {r['n_parameters']:>8d} {r['nll']:>9.3f} ± {r['nll_se']:.3f} "
            f"{r['ess_fraction']:>8.4f} {r['n_samples']:>6d} {r['train_wall_s']:>8.1f} "
            f"{r['train_cpu_s']:>8.1f}"
        )
    print(f"\nparameter ratio teacher/student: {ratio:.1f}")
    for key, c in comparisons.items():
        print(f"{key:<36} {c['mean']:+.3f} ± {c['se']:.3f} nats (paired over val points)")

    result = {
        "system": "dw4",
        "nll_units": "nats, density on the 6-dim mean-free subspace, raw coordinates",
        "args": vars(args),
        "teacher_model": dataclasses.asdict(TEACHER),
        "student_model": dataclasses.asdict(STUDENT),
        "loss": dataclasses.asdict(loss),
        "parameter_ratio": ratio,
        "rows": rows,
        "comparisons": comparisons,
        "torch_threads": torch.get_num_threads(),
    }
    atomic_write_text(out / "results.json", json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'results.json'}")
    return result


if __name__ == "__main__":
    main()
