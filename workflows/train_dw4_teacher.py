"""Train the DW4 teacher CNF and measure it: ESS/N, log Z, entropy floor, NLL, NFE, cost.

Usage (one thread; resumes an interrupted run from OUT/checkpoint.pt):

    OMP_NUM_THREADS=1 .venv/bin/python workflows/train_dw4_teacher.py -o runs/dw4_teacher \
        [--config workflows/configs/teacher_dw4.toml] [--profile smoke] \
        [--data ../shared/reference/dem/train_split_DW4.npy] \
        [--val ../shared/reference/dem/val_split_DW4.npy] [--n-samples 10000] [--json FILE]

Prints a table and writes OUT/report.json (or --json). The DW4 data are the public EFM splits
(Klein, Krämer, Noé 2023), redistributed in github.com/jarridrb/DEM; any (N, 8) .npy/HDF5 works.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from boltzflow.data import load_positions
from boltzflow.flows.cnf import MODEL_FILE, TeacherCNF
from boltzflow.flows.evaluate import evaluate_flow
from boltzflow.io.atomic import atomic_write_text
from boltzflow.systems import load_system
from boltzflow.train.config import load_teacher_config
from boltzflow.train.teacher import SystemShape, train_teacher

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference" / "dem"


def efm_nll(nll: float, event_dim: int) -> float:
    """The NLL in the normalisation of the EFM paper (Klein, Krämer, Noé 2023, Table 1).

    Their code (bgflow) scores points under ``MeanFreeNormalDistribution``, whose energy is
    |x|^2 / 2 *without* the Gaussian's normalising constant (bgflow/distribution/normal.py, "TODO:
    make consistent"), so their log q lacks -(event_dim / 2) log(2 pi): for DW4 (event_dim 6)
    their NLL is ours minus 3 log(2 pi) = 5.514 nats (floor 7.15 -> 1.64, their 1.68-1.72).
    """
    return nll - 0.5 * event_dim * math.log(2 * math.pi)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "workflows/configs/teacher_dw4.toml"))
    parser.add_argument("--profile", default=None, help="config profile (smoke, gpu)")
    parser.add_argument("--data", default=str(REFERENCE / "train_split_DW4.npy"))
    parser.add_argument("--val", default=str(REFERENCE / "val_split_DW4.npy"))
    parser.add_argument("-o", "--out", default=str(ROOT / "runs/dw4_teacher"))
    parser.add_argument("--n-samples", type=int, default=10_000)
    parser.add_argument("--n-val", type=int, default=None, help="use the first N val points")
    parser.add_argument(
        "--quadrature-check",
        type=int,
        default=1000,
        help="samples on which Gauss-Legendre trace is compared (0: skip)",
    )
    parser.add_argument("--seed", type=int, default=1, help="sampling seed")
    parser.add_argument("--json", default=None, help="report path (default OUT/report.json)")
    parser.add_argument(
        "--samples", default=None, help="also write the N samples (x, log q, u, log w) to this .h5"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--trace-mode",
        default=None,
        choices=["vjp", "jvp"],
        help="exact-trace mode (default: model's)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = load_teacher_config(args.config, args.profile)
    system = load_system("dw4")
    shape = SystemShape.of(system)
    out = Path(args.out)

    t0 = time.perf_counter()
    if (out / MODEL_FILE).is_file():
        teacher = TeacherCNF.load(out / MODEL_FILE)
        print(f"loaded trained teacher {out / MODEL_FILE}")
    else:
        data = torch.as_tensor(load_positions(args.data, system="dw4"))
        run_info = {"system": "dw4", "data": str(Path(args.data).name), "profile": args.profile}
        teacher = train_teacher(cfg, data, out, shape, run_info=run_info)
    train_wall = time.perf_counter() - t0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_s = metrics[-1]["elapsed_s"] if metrics else float("nan")

    val = torch.as_tensor(load_positions(args.val, system="dw4"))
    if args.n_val:
        val = val[: args.n_val]
    if args.trace_mode:
        teacher.sampling["trace_mode"] = args.trace_mode
    report = evaluate_flow(
        teacher,
        system,
        n_samples=args.n_samples,
        seed=args.seed,
        val=val,
        progress=True,
        samples_path=args.samples,
    )
    report.update(
        system="dw4",
        config=str(args.config),
        profile=args.profile,
        train_steps=cfg.train.steps,
        train_seconds=train_s,
        train_wall_this_call_s=train_wall,
        final_loss=metrics[-1]["loss"] if metrics else None,
        event_dim=teacher.event_dim,
        n_parameters=sum(p.numel() for p in teacher.parameters()),
        nll_efm=efm_nll(report["nll"], teacher.event_dim),
        entropy_val_efm=efm_nll(report["entropy_val"], teacher.event_dim),
        sampling={k: v for k, v in teacher.sampling.items()},
        checkpoint=str(out / MODEL_FILE),
        checkpoint_bytes=(out / MODEL_FILE).stat().st_size
        if (out / MODEL_FILE).is_file()
        else None,
        torch_threads=torch.get_num_threads(),
    )
    if args.quadrature_check:
        k = args.quadrature_check
        exact = teacher.sample_with_stats(k, seed=args.seed + 7)
        quad = teacher.sample_with_stats(k, seed=args.seed + 7, divergence="quadrature")
        report.update(
            quadrature_points=teacher.sampling["quadrature_points"],
            quadrature_max_abs_dlogq=float((quad.log_q - exact.log_q).abs().max()),
            quadrature_mean_abs_dlogq=float((quad.log_q - exact.log_q).abs().mean()),
            quadrature_s_per_1000=quad.seconds_per_1000,
            quadrature_cpu_s_per_1000=quad.cpu_seconds_per_1000,
            exact_s_per_1000_check=exact.seconds_per_1000,
            exact_cpu_s_per_1000_check=exact.cpu_seconds_per_1000,
        )

    rows = [
        ("samples N", f"{report['n_samples']}"),
        ("ESS/N (Kish, exact log q)", f"{report['ess_fraction']:.4f}"),
        ("log Z (IS)", f"{report['log_z']:.4f} ± {report['log_z_se']:.4f}"),
        ("<u> (IS) / (val data)", f"{report['mean_u_is']:.4f} / {report['mean_u_val']:.4f}"),
        ("entropy H = log Z + <u>_val", f"{report['entropy_val']:.4f}"),
        ("NLL val (mean-free, raw units)", f"{report['nll']:.4f} ± {report['nll_se']:.4f}"),
        ("NLL - H", f"{report['nll_gap']:.4f} ± {report['nll_gap_se']:.4f}"),
        (
            "NLL val, EFM normalisation",
            f"{report['nll_efm']:.4f} (floor {report['entropy_val_efm']:.4f})",
        ),
        (
            "NFE per batch (sample / NLL)",
            f"{report['sample_nfe_per_batch']:.1f} / {report['nll_nfe_per_batch']:.1f}",
        ),
        (
            "wall (CPU) s per 1000: sample / NLL",
            f"{report['sample_s_per_1000']:.1f} ({report['sample_cpu_s_per_1000']:.1f}) / "
            f"{report['nll_s_per_1000']:.1f} ({report['nll_cpu_s_per_1000']:.1f})",
        ),
        ("train steps / seconds", f"{report['train_steps']} / {report['train_seconds']:.0f}"),
    ]
    if args.quadrature_check:
        rows.append(
            (
                "GL-12 trace: wall (CPU) s/1000, max|Δlog q|",
                f"{report['quadrature_s_per_1000']:.1f} "
                f"({report['quadrature_cpu_s_per_1000']:.1f}) "
                f"vs exact {report['exact_s_per_1000_check']:.1f} "
                f"({report['exact_cpu_s_per_1000_check']:.1f}), "
                f"{report['quadrature_max_abs_dlogq']:.2e}",
            )
        )
    width = max(len(r[0]) for r in rows)
    print("\nDW4 teacher CNF")
    for name, value in rows:
        print(f"  {name.ljust(width)}  {value}")
    path = Path(args.json) if args.json else out / "report.json"
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")
    return report


if __name__ == "__main__":
    main()
