"""The seed claim of "Distilling Normalizing Flows" (Walton et al. 2025, arXiv:2506.21003) where
NFs are at home: ALDP in internal coordinates. A >= 4x smaller NF distilled from the shipped NF
(``models/aldp-nf-internal``) by latent matching, against the same small NF trained from
scratch by maximum likelihood on the same MD frames, for the same steps, with the same seed.

Usage (one thread; each run folder resumes; data from ``boltzflow data generate``, two seeds):

    boltzflow data generate aldp --method md_seeded -n 48000 --seed 101 --set workers=1 \
        -o runs/nf_seed_aldp/aldp-train-s101.h5
    boltzflow data generate aldp --method md_seeded -n 4000 --seed 202 --set workers=1 \
        --set n_seeds=20 --set hot_frames=300 --set burn_in=10000 \
        -o runs/nf_seed_aldp/aldp-heldout-s202.h5
    OMP_NUM_THREADS=1 .venv/bin/python workflows/nf_distillation_aldp.py \
        --data runs/nf_seed_aldp/aldp-train-s101.h5 \
        --heldout runs/nf_seed_aldp/aldp-heldout-s202.h5 -o runs/nf_seed_aldp/run \
        [--seeds 0 1 2] [--steps 500] [--lr 1e-3] [--n-samples 10000]

Both arms (:func:`boltzflow.distill.nf_internal_distill.train_icnf_student`) share the
architecture, the teacher's fitted internal coordinates (latents can only be matched on the
same normalised coordinates; the from-scratch arm uses them as its fixed standardisation),
initialisation, minibatches, optimiser, schedule and EMA; they differ in the loss alone: NLL
for scratch; NLL + 0.1 x intermediate-latent MSE + 0.1 x final-latent MSE (annealed linearly to
0; student block j against teacher block 2j + 1) for the distilled arm, as in
``workflows/nf_distillation_dw4.py``. No decoded-sample term by default (``--sample-weight``;
it doubles the cost of a step).

Per seed: held-out NLL (nats per frame, -log q(x) in the one Cartesian density convention,
rigid motions integrated out; the same coordinates for every model) on the held-out frames of
another MD seed, and Kish ESS/N of N samples (the same base noise for both arms) weighted with
the torch energy of ``aldp``; then the paired differences distilled - scratch, mean +- standard
error over seeds. The held-out frames are seeded MD (not Boltzmann across the two phi basins),
so the NLL measures the fit to those frames; ESS/N measures the fit to the target. Prints a
table and writes OUT/results.json.
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
from torch import Tensor

from boltzflow.data import load_positions
from boltzflow.distill.base import STUDENT_FILE, load_student
from boltzflow.distill.nf_internal import ICNFModelConfig, InternalNFStudent
from boltzflow.distill.nf_internal_distill import train_icnf_student
from boltzflow.distill.nf_losses import NFLossConfig
from boltzflow.io.atomic import atomic_write_text
from boltzflow.registry.loading import load_model
from boltzflow.sampling.weights import ess_fraction, log_weights
from boltzflow.systems import load_system
from boltzflow.systems.base import compute_energies, describe_energy_provenance
from boltzflow.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "models" / "aldp-nf-internal"
ARMS = ("distilled", "scratch")


def small_config(teacher: InternalNFStudent, blocks: int, hidden: int) -> ICNFModelConfig:
    """The teacher's architecture with fewer blocks and narrower conditioners."""
    return ICNFModelConfig(**{**teacher.model_config["model"], "blocks": blocks, "hidden": hidden})


def train_arm(
    arm: str,
    teacher: InternalNFStudent,
    frames: Tensor,
    folder: Path,
    *,
    model: ICNFModelConfig,
    train: TrainConfig,
    loss: NFLossConfig,
) -> tuple[InternalNFStudent, float, float]:
    """One arm for one seed (or its finished model): the student, wall and CPU seconds now."""
    if (folder / STUDENT_FILE).is_file():
        print(f"loaded finished {folder / STUDENT_FILE}", flush=True)
        return load_student(folder), float("nan"), float("nan")
    w0, c0 = time.perf_counter(), time.process_time()
    if arm == "distilled":
        student = train_icnf_student(
            frames, folder, teacher=teacher, model=model, train=train, loss=loss, progress=False
        )
    else:
        mle = dataclasses.replace(loss, latent_weight=0.0, final_weight=0.0, sample_weight=0.0)
        student = train_icnf_student(
            frames,
            folder,
            ic=teacher.ic,
            model=model,
            train=train,
            loss=mle,
            system=teacher.system,
            progress=False,
        )
    return student, time.perf_counter() - w0, time.process_time() - c0


def evaluate(
    model: InternalNFStudent, system: Any, heldout: Tensor, n_samples: int, seed: int
) -> dict[str, Any]:
    """Held-out NLL per frame (mean +- se over frames) and ESS/N of ``n_samples`` drawn with
    ``seed``, weighted with the system's energy."""
    with torch.no_grad():
        nll = -model.log_prob(heldout).double()
        t0 = time.perf_counter()
        x, log_q = model.sample(n_samples, seed=seed)
        sample_s = time.perf_counter() - t0
        u = compute_energies(system, x.double())
        log_w = log_weights(u, log_q.double())
    return {
        "n_parameters": model.n_parameters,
        "nll": float(nll.mean()),
        "nll_se_frames": float(nll.std() / math.sqrt(len(nll))),
        "n_heldout": len(nll),
        "ess_fraction": ess_fraction(log_w),
        "n_samples": n_samples,
        "sampling_seed": seed,
        "sample_s": sample_s,
        "_nll_points": nll,
    }


def mean_se(values: list[float]) -> dict[str, float]:
    """Mean and standard error (sample std / sqrt(n); nan for one value) over seeds."""
    v = torch.tensor(values, dtype=torch.float64)
    se = float(v.std() / math.sqrt(len(v))) if len(v) > 1 else math.nan
    return {"mean": float(v.mean()), "se": se, "n": len(v)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=str(TEACHER))
    parser.add_argument("--data", required=True, help="training frames (boltzflow dataset)")
    parser.add_argument("--heldout", required=True, help="held-out frames (another MD seed)")
    parser.add_argument("-o", "--out", default=str(ROOT / "runs/nf_seed_aldp/run"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak lr of both arms")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--ema-decay", type=float, default=0.99)
    parser.add_argument("--nll-weight", type=float, default=1.0)
    parser.add_argument("--latent-weight", type=float, default=0.1)
    parser.add_argument("--final-weight", type=float, default=0.1)
    parser.add_argument("--sample-weight", type=float, default=0.0)
    parser.add_argument("--no-anneal", action="store_true", help="constant distillation weights")
    parser.add_argument("--n-samples", type=int, default=10_000)
    parser.add_argument("--max-frames", type=int, default=None, help="use the first N frames")
    parser.add_argument("--max-heldout", type=int, default=None, help="use the first N frames")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start, c_start = time.perf_counter(), time.process_time()
    out = Path(args.out)
    teacher = load_model(args.teacher, system="aldp")
    system = load_system("aldp")
    frames = torch.as_tensor(load_positions(args.data, system="aldp"))[: args.max_frames]
    heldout = torch.as_tensor(load_positions(args.heldout, system="aldp"))[: args.max_heldout]
    heldout = heldout.to(torch.float32)
    model = small_config(teacher, args.blocks, args.hidden)
    loss = NFLossConfig(
        nll_weight=args.nll_weight,
        latent_weight=args.latent_weight,
        final_weight=args.final_weight,
        sample_weight=args.sample_weight,
        anneal=not args.no_anneal,
    )
    seeds = list(args.seeds)
    per_seed: dict[int, dict[str, Any]] = {}
    for seed in seeds:
        train = TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            warmup_steps=min(args.warmup_steps, args.steps),
            ema_decay=args.ema_decay,
            seed=seed,
            log_every=max(1, args.steps // 10),
            checkpoint_every=max(1, args.steps // 5),
        )
        rows: dict[str, dict[str, Any]] = {}
        sampling_seed = 1000 + seed  # the same base noise for every model of this seed
        print(f"== seed {seed}: teacher", flush=True)
        rows["teacher"] = evaluate(teacher, system, heldout, args.n_samples, sampling_seed)
        for arm in ARMS:
            print(f"== seed {seed}: {arm}", flush=True)
            student, wall, cpu = train_arm(
                arm, teacher, frames, out / f"seed{seed}" / arm, model=model, train=train, loss=loss
            )
            rows[arm] = {
                **evaluate(student, system, heldout, args.n_samples, sampling_seed),
                "train_wall_s": wall,
                "train_cpu_s": cpu,
            }
        for name, r in rows.items():
            print(
                f"   {name:<10} NLL {r['nll']:.3f} +- {r['nll_se_frames']:.3f}, "
                f"ESS/N {r['ess_fraction']:.4f}",
                flush=True,
            )
        points = {k: r.pop("_nll_points") for k, r in rows.items()}
        d = points["distilled"] - points["scratch"]
        per_seed[seed] = {
            "rows": rows,
            "nll_diff": float(d.mean()),
            "nll_diff_se_frames": float(d.std() / math.sqrt(len(d))),
            "ess_diff": rows["distilled"]["ess_fraction"] - rows["scratch"]["ess_fraction"],
        }
        seed_file = out / f"seed{seed}" / "result.json"  # this seed's figures, before the rest
        atomic_write_text(seed_file, json.dumps(per_seed[seed], indent=2) + "\n")

    summary = {
        "nll_distilled_minus_scratch": mean_se([per_seed[s]["nll_diff"] for s in seeds]),
        "ess_distilled_minus_scratch": mean_se([per_seed[s]["ess_diff"] for s in seeds]),
        **{
            f"nll_{arm}": mean_se([per_seed[s]["rows"][arm]["nll"] for s in seeds])
            for arm in ("teacher", *ARMS)
        },
        **{
            f"ess_{arm}": mean_se([per_seed[s]["rows"][arm]["ess_fraction"] for s in seeds])
            for arm in ("teacher", *ARMS)
        },
    }
    n_teacher = teacher.n_parameters
    n_student = per_seed[seeds[0]]["rows"]["distilled"]["n_parameters"]

    header = (
        f"{'seed':>4} {'NLL teacher':>11} {'NLL distilled':>13} {'NLL scratch':>11} "
        f"{'dNLL (d-s)':>16} {'ESS/N teacher':>13} {'ESS/N dist.':>11} {'ESS/N scratch':>13} "
        f"{'dESS/N':>8}"
    )
    print(
        f"\nteacher {n_teacher:,} parameters, student {n_student:,} "
        f"({n_teacher / n_student:.2f}x fewer); {args.steps} steps x batch {args.batch_size}; "
        f"N = {args.n_samples} samples; {len(heldout)} held-out frames"
    )
    print(header + "\n" + "-" * len(header))
    for s in seeds:
        p, r = per_seed[s], per_seed[s]["rows"]
        print(
            f"{s:>4} {r['teacher']['nll']:>11.3f} {r['distilled']['nll']:>13.3f} "
            f"{r['scratch']['nll']:>11.3f} {p['nll_diff']:>+9.3f} ± {p['nll_diff_se_frames']:.3f} "
            f"{r['teacher']['ess_fraction']:>13.4f} {r['distilled']['ess_fraction']:>11.4f} "
            f"{r['scratch']['ess_fraction']:>13.4f} {p['ess_diff']:>+8.4f}"
        )
    for key in ("nll_distilled_minus_scratch", "ess_distilled_minus_scratch"):
        c = summary[key]
        print(f"{key:<30} {c['mean']:+.4f} ± {c['se']:.4f} (mean ± se over {c['n']} seeds)")

    result = {
        "system": "aldp",
        "nll_units": "nats per frame, -log q(x), Cartesian nm, rigid motions integrated out",
        "energy": describe_energy_provenance(system.energy_provenance()),
        "args": vars(args),
        "teacher_path": str(args.teacher),
        "n_parameters": {"teacher": n_teacher, "student": n_student},
        "parameter_ratio": n_teacher / n_student,
        "student_model": dataclasses.asdict(model),
        "loss": dataclasses.asdict(loss),
        "n_train_frames": len(frames),
        "n_heldout_frames": len(heldout),
        "per_seed": {str(s): per_seed[s] for s in seeds},
        "summary": summary,
        "wall_s": time.perf_counter() - t_start,
        "cpu_s": time.process_time() - c_start,
        "torch_threads": torch.get_num_threads(),
    }
    atomic_write_text(out / "results.json", json.dumps(result, indent=2) + "\n")
    print(f"wall {result['wall_s']:.0f} s, CPU {result['cpu_s']:.0f} s")
    print(f"wrote {out / 'results.json'}")
    return result


if __name__ == "__main__":
    main()
