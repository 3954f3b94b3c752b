"""Benchmark the teacher CNF against its few-step students and the naive Euler baselines.

One run, one system, one table: for the teacher (adaptive ODE, exact divergence) and for every
student and baseline at 1, 2, 4 and 8 steps it reports

- NFE per sample (sequential network evaluations; how log q is obtained is in the ``log q``
  column: ``ode-trace`` = exact Jacobian trace at every solver stage, ``head`` = F2D2's
  divergence head (no Jacobian), ``jac`` = full per-step Jacobian by ``dim`` forward-mode
  products, ``euler-div`` = exact trace at each Euler step, ``exact`` = one-pass NF);
- samples-with-log-q per second (batch ``--batch``, one thread unless ``--threads``);
- ESS/N (Kish, N samples);
- energy W2 (with the square root, in kT) between the reference energies and the importance
  weighted sample energies;
- NLL = -mean log q on reference data (the model's own ``log_prob`` at the same steps; for
  FALCON its sampler's density at the Newton preimages, points without one left out and
  counted, "n/a"; for the Euler baselines a backward Euler estimate, see
  :mod:`boltzflow.distill.baselines`);
- |log q - log q_teacher| at the model's own samples (median and mean over ``--n-check``
  samples), the teacher's exact log q from its adaptive backward solve; and the median of
  the same error when the model's ``log_prob`` scores those points (data -> noise);
- FALCON's inversion error |z - X^-1(X(z))| (median, max) on noise samples, X^-1 its learned
  backward map;
- for F2D2 at ``--ess-steps`` (unless ``--no-exact-check``): the ESS/N of the same samples
  with log q from the exact log-determinant of the map they went through instead of the
  divergence head (``boltzflow sample --exact-logdet``), and the spread of the difference;
- the spread of ESS/N over ``--ess-seeds`` further sampling seeds at ``--ess-steps`` steps, for
  the students and baselines and (unless ``--no-teacher-ess-seeds``) for the teacher on the
  same prior draws, with each model's ratio to the teacher seed by seed and the ESS/N of all
  the seeds' samples pooled, printed below the table;
- for a molecule with backbone dihedrals (ALDP), as ``boltzflow benchmark`` does
  (:func:`boltzflow.workflow.benchmark.molecular_columns`): the torus W2 on (φ, ψ) of the
  reweighted samples against the ``--reference`` frames, ΔF(0 < φ < 2 vs rest) with its
  delta-method 95% interval, and with ``--reference-profile FILE`` (the umbrella/MBAR profile
  of ``workflows/aldp_umbrella.py``, e.g. ``workflows/reference/aldp_umbrella_profile.json``)
  ΔF − reference with the combined standard error; F(φ) of the teacher and of every row at 4
  steps (and one-pass students) against the reference profile goes to
  ``<json stem>_profile_phi.png``.

Usage (DW4, one thread):

    OMP_NUM_THREADS=1 .venv/bin/python workflows/benchmark_students.py \\
        --teacher runs/dw4_teacher --student f2d2=runs/dw4_f2d2 \\
        --student falcon=runs/dw4_falcon [--student nf=runs/dw4_nf] \\
        --reference ../shared/reference/dem/val_split_DW4.npy --json runs/benchmark_students.json

ALDP in internal coordinates (runs trained with ``boltzflow train teacher`` / ``boltzflow
distill``; held-out seeded-MD frames):

    OMP_NUM_THREADS=1 .venv/bin/python workflows/benchmark_students.py \\
        --teacher /work/runs/teacher-aldp-ic2 --student f2d2=/work/runs/aldp-ic-f2d2 \\
        --student falcon=/work/runs/aldp-ic-falcon --reference /work/runs/aldp-heldout-5k.h5 \\
        --reference-profile workflows/reference/aldp_umbrella_profile.json \\
        --n 10000 --batch 10000 --teacher-batch 1000 --ess-seeds 0 \\
        --json runs/benchmark_students_aldp.json

Prints the table (markdown) and writes the JSON beside it; the JSON is rewritten after every row
(``"complete": false`` until the run ends), so an interrupted run keeps the rows it measured.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from boltzflow.analysis.free_energy import ReferenceProfile, load_reference_profile
from boltzflow.analysis.report import jsonable
from boltzflow.data import load_positions
from boltzflow.distill import FALCON, EulerBaseline, load_student
from boltzflow.distill.flowmap import FlowMapStudent
from boltzflow.distill.train_students import teacher_system
from boltzflow.flows.cnf import TeacherCNF
from boltzflow.io.atomic import atomic_write_text
from boltzflow.sampling.estimators import FreeEnergyProfile
from boltzflow.sampling.weights import ess_fraction
from boltzflow.systems import load_system
from boltzflow.workflow.benchmark import (
    PROFILE_STEPS,
    benchmark_table,
    ess_seed_summary,
    logq_errors,
    molecular_columns,
    molecular_reference,
    molecular_summary,
    profile_label,
    reference_nll,
    sample_log_weights,
    weighted_sample_metrics,
    weighted_samples,
)
from boltzflow.workflow.report_molecular import PhiReference, plot_phi_profiles

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference" / "dem" / "val_split_DW4.npy"
LOGQ_KIND = {
    "f2d2": "head",
    "falcon": "jac",
    "nf": "exact",
    "nf_internal": "exact",
    "euler": "euler-div",
}


def _teacher_logq(teacher: TeacherCNF, x: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    """The teacher's exact log q (adaptive backward solve, exact trace) of given points."""
    return teacher.log_prob(x, batch_size=args.teacher_batch, trace_mode=args.check_trace_mode)


def _ess_over_seeds(
    sample: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    x: torch.Tensor,
    log_q: torch.Tensor,
    ess: float,
    *,
    system: Any,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """ESS/N at the main seed (``x``, ``log_q``, ``ess`` of the row) and at ``--ess-seeds``
    further seeds ``seed + 1000 k``, and of all their samples pooled (N times the seeds); each
    sample's energy is evaluated once."""
    parts = [sample_log_weights(system, x, log_q)]
    seeds = [args.seed + 1000 * k for k in range(1, args.ess_seeds + 1)]
    parts += [sample_log_weights(system, *sample(seed)) for seed in seeds]
    values = [ess] + [ess_fraction(lw) for lw in parts[1:]]
    return {"ess_fraction_seeds": values, "ess_fraction_pooled": ess_fraction(torch.cat(parts))}


def _frames_boltzmann(path: str) -> bool:
    """False when the reference file is a dataset whose provenance says its frames are not
    Boltzmann across the φ basins (seeded MD), else True (as the workflow report reads it)."""
    from boltzflow.data import read_dataset

    try:
        provenance = read_dataset(path).attrs.get("provenance") or {}
    except (OSError, ValueError):  # a .npy file or another format: nothing recorded
        return True
    return provenance.get("boltzmann_across_basins", True) is not False


def _row(name: str, steps: Any, logq_kind: str, **values: Any) -> dict[str, Any]:
    return {"model": name, "steps": steps, "log_q": logq_kind, **values}


def _add_molecular(
    row: dict[str, Any],
    samples: Any,
    *,
    system: Any,
    mol: PhiReference | None,
    profiles: dict[str, FreeEnergyProfile],
    args: argparse.Namespace,
) -> None:
    """The molecular columns of ``row`` (nothing for a system without backbone dihedrals), and
    its F(φ) into ``profiles`` when the figure shows the row."""
    if mol is None:
        return
    drawn = profile_label(row, args.profile_steps)
    cols, prof = molecular_columns(system, samples, mol, seed=args.seed, profile=drawn is not None)
    row.update(cols)
    if drawn is not None and prof is not None:
        profiles[drawn] = prof


def _evaluate(
    name: str,
    model: Any,
    steps: int | None,
    *,
    system: Any,
    teacher: TeacherCNF,
    args: argparse.Namespace,
    u_ref: np.ndarray,
    val: torch.Tensor,
    mol: PhiReference | None,
    profiles: dict[str, FreeEnergyProfile],
) -> dict[str, Any]:
    start = time.perf_counter()
    x, log_q = model.sample(args.n, steps=steps, seed=args.seed, batch_size=args.batch)
    seconds = time.perf_counter() - start
    samples = weighted_samples(system, x, log_q)
    ess, w2, n_bad = weighted_sample_metrics(samples, u_ref)
    nll, nll_unscored = reference_nll(model, val, steps, batch_size=args.batch)
    check = x[: args.n_check]
    ref = _teacher_logq(teacher, check, args)
    errors = logq_errors(model, steps, check, log_q[: args.n_check], ref, batch_size=args.batch)
    kind = getattr(model, "student_kind", "?")
    logq_kind = LOGQ_KIND.get(kind, kind)
    if kind == "euler":
        logq_kind = "euler-div" if model.logdet == "euler" else "jac"
    extra: dict[str, Any] = {}
    if args.ess_seeds and steps in (args.ess_steps, None):
        extra.update(
            _ess_over_seeds(
                lambda seed: model.sample(args.n, steps=steps, seed=seed, batch_size=args.batch),
                x,
                log_q,
                ess,
                system=system,
                args=args,
            )
        )
    if kind == "f2d2" and args.exact_check and steps == args.ess_steps:
        # the same samples weighted by the exact log-det of the map they went through: what the
        # head's log q is worth as an importance weight (FlowMapStudent.push_exact)
        _, log_q_exact = model.sample(
            args.n, steps=steps, seed=args.seed, batch_size=args.batch, exact_logdet=True
        )
        # same x, so same energies: only log q changes in log w = -u - log q
        lw = samples.log_w + (log_q - log_q_exact).double().cpu()
        extra.update(
            ess_fraction_exact_logdet=ess_fraction(lw),
            logq_head_minus_exact_sd=float((log_q - log_q_exact).double().std()),
        )
    if kind == "falcon":
        p = model._param()
        z = model.prior.sample(
            args.n_check, generator=torch.Generator().manual_seed(args.seed + 3), dtype=p.dtype
        )
        inv = model.inversion_error(z, steps)
        extra.update(inv_err_median=float(inv.median()), inv_err_max=float(inv.max()))
    row = _row(
        name,
        steps if model.uses_steps else "-",
        logq_kind,
        nfe_per_sample=(steps if model.uses_steps else 1),
        samples_per_s=args.n / seconds,
        seconds=seconds,
        ess_fraction=ess,
        n=args.n,
        non_finite_weights=n_bad,
        energy_w2=w2,
        nll=nll,
        nll_unscored=nll_unscored,
        **errors,
        **extra,
    )
    _add_molecular(row, samples, system=system, mol=mol, profiles=profiles, args=args)
    return row


def _compile(model: Any, args: argparse.Namespace) -> float | None:
    """``--compile``: a flow-map student's exact log-det jumps through ``torch.compile``
    (FALCON's sampler, F2D2's exact check), compiled here by an untimed warm-up draw so that
    the rows' samples/s exclude the one-off compilation; its seconds, or None."""
    if not args.compile or not isinstance(model, FlowMapStudent):
        return None
    model.set_compiled(True)
    if not isinstance(model, FALCON):
        return None  # F2D2 compiles only its exact check, which is not timed
    start = time.perf_counter()
    model.sample(min(args.batch, args.n), steps=args.steps[0], seed=args.seed + 7)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=str(ROOT / "runs/dw4_teacher"))
    parser.add_argument("--student", action="append", default=[], help="NAME=RUN_DIR (repeatable)")
    parser.add_argument("--reference", default=str(REFERENCE), help="reference configurations")
    parser.add_argument(
        "--reference-profile",
        default=None,
        metavar="FILE",
        help="molecules: reference F(φ) with its ΔF (workflows/aldp_umbrella.py output) for the "
        "ΔF − reference column and the F(φ) figure",
    )
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--n", type=int, default=4096, help="samples per row (ESS/N, W2)")
    parser.add_argument("--batch", type=int, default=4096, help="batch for the students")
    parser.add_argument("--teacher-batch", type=int, default=4096, help="batch for the teacher")
    parser.add_argument("--n-val", type=int, default=1000, help="reference points for the NLL")
    parser.add_argument("--n-check", type=int, default=256, help="samples for the log q check")
    parser.add_argument(
        "--check-trace-mode",
        default="vjp",
        choices=["vjp", "jvp"],
        help="exact-trace mode of the teacher's reference log q (same value, vjp is faster)",
    )
    parser.add_argument(
        "--ess-seeds",
        type=int,
        default=3,
        help="extra sampling seeds for the spread of ESS/N at --ess-steps (0: none)",
    )
    parser.add_argument("--ess-steps", type=int, default=4, help="steps for --ess-seeds")
    parser.add_argument(
        "--no-teacher-ess-seeds",
        dest="teacher_ess_seeds",
        action="store_false",
        help="skip the teacher on the extra seeds (each costs a full teacher sampling run)",
    )
    parser.add_argument(
        "--no-exact-check",
        dest="exact_check",
        action="store_false",
        help="skip F2D2's ESS/N at --ess-steps with the exact log-det of the same samples in "
        "place of its divergence head (event_dim reverse passes per step)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="the teacher's exact divergence and the students' exact log-det jumps (FALCON's "
        "sampler, F2D2's exact check) through torch.compile (the baselines stay eager); each "
        "compilation is done by an untimed warm-up draw and reported as compile_s",
    )
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=str(ROOT / "runs/benchmark_students.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.profile_steps = PROFILE_STEPS if PROFILE_STEPS in args.steps else max(args.steps)
    reference: ReferenceProfile | None = None
    if args.reference_profile is not None:
        try:
            reference = load_reference_profile(args.reference_profile)
        except (OSError, ValueError) as err:
            raise SystemExit(f"--reference-profile: {err}") from None

    teacher = TeacherCNF.load(args.teacher)
    teacher.eval()
    name = teacher_system(args.teacher) or "dw4"
    system = load_system(name)
    ref64 = torch.as_tensor(load_positions(args.reference, system=name), dtype=torch.float64)
    ref = ref64.float()
    u_ref = system.energy(ref64).detach().numpy()
    val = ref[: args.n_val]
    try:
        mol = molecular_reference(system, ref64, reference)
    except ValueError as err:
        system.close()
        raise SystemExit(f"--reference-profile: {err} ({name!r} has none)") from None
    profiles: dict[str, FreeEnergyProfile] = {}
    rows: list[dict[str, Any]] = []
    json_path = Path(args.json)

    def save_rows(complete: bool = False, **extra: Any) -> dict[str, Any]:
        """The report with the rows so far, written after each row (``complete`` false until
        the end), so an interrupted run keeps what it measured: on LJ13 the teacher's seeds
        take an hour."""
        report = {
            "system": name,
            "teacher": str(args.teacher),
            "students": args.student,
            "reference": str(args.reference),
            "settings": vars(args),
            "teacher_sampling": teacher.sampling,
            "rows": rows,
            **extra,
            "complete": complete,
        }
        json_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(json_path, json.dumps(jsonable(report), indent=2) + "\n")
        return report

    teacher_compile_s = None
    if args.compile:  # the teacher's exact divergence too, compiled by an untimed draw
        teacher.set_compiled(True)
        start = time.perf_counter()
        teacher.sample(8, seed=args.seed + 7)
        teacher_compile_s = time.perf_counter() - start
    # teacher: adaptive ODE with the exact trace, as configured in its checkpoint
    # progress lines (also in a log file): the teacher's exact likelihood is the slow part
    out = teacher.sample_with_stats(
        args.n, seed=args.seed, batch_size=args.teacher_batch, progress=True
    )
    samples = weighted_samples(system, out.x, out.log_q)
    ess, w2, n_bad = weighted_sample_metrics(samples, u_ref)
    lp = teacher.log_prob_with_stats(val, batch_size=args.teacher_batch)
    teacher_extra: dict[str, Any] = {}
    if args.ess_seeds and args.teacher_ess_seeds:
        teacher_extra = _ess_over_seeds(
            lambda seed: teacher.sample(
                args.n, seed=seed, batch_size=args.teacher_batch, progress=True
            ),
            out.x,
            out.log_q,
            ess,
            system=system,
            args=args,
        )
    row = _row(
        "teacher",
        f"{teacher.sampling['method']}",
        "ode-trace",
        nfe_per_sample=out.nfe_per_batch,
        samples_per_s=args.n / out.seconds,
        seconds=out.seconds,
        ess_fraction=ess,
        n=args.n,
        non_finite_weights=n_bad,
        energy_w2=w2,
        nll=float(-lp.log_q.double().mean()),
        logq_err_median=0.0,
        logq_err_mean=0.0,
        logq_err_score_median=0.0,
        **teacher_extra,
    )
    if teacher_compile_s is not None:
        row["compile_s"] = teacher_compile_s
    _add_molecular(row, samples, system=system, mol=mol, profiles=profiles, args=args)
    rows.append(row)
    save_rows()
    print(f"teacher: ESS/N {ess:.4f}, {args.n / out.seconds:.1f} samples/s", flush=True)

    models: list[tuple[str, Any]] = []
    for spec in args.student:
        label, _, path = spec.partition("=")
        if not path:
            raise SystemExit(f"--student expects NAME=RUN_DIR, got {spec!r}")
        models.append((label, load_student(path, system=name)))
    if not args.no_baselines:
        models.append(("euler (Euler-rule log q)", EulerBaseline(teacher, logdet="euler")))
        models.append(("euler (exact step log-det)", EulerBaseline(teacher, logdet="exact")))
    for label, model in models:
        model.eval()
        compile_s = _compile(model, args)
        for steps in args.steps if model.uses_steps else [None]:
            row = _evaluate(
                label,
                model,
                steps,
                system=system,
                teacher=teacher,
                args=args,
                u_ref=u_ref,
                val=val,
                mol=mol,
                profiles=profiles,
            )
            if compile_s is not None:
                row["compile_s"] = compile_s
            rows.append(row)
            save_rows()
            print(
                f"{label} K={row['steps']}: ESS/N {row['ess_fraction']:.4f}, "
                f"{row['samples_per_s']:.0f}/s, median |dlogq| {row['logq_err_median']:.3f}",
                flush=True,
            )
    system.close()
    text = benchmark_table(rows)
    spread = ess_seed_summary(rows)
    if spread:
        text += f"\n\nESS/N over {args.ess_seeds + 1} sampling seeds (N = {args.n} each):\n"
        text += spread
    checked = [r for r in rows if "ess_fraction_exact_logdet" in r]
    if checked:
        text += "\n\nF2D2's divergence head against the exact log-det of the same samples:\n"
        text += "\n".join(
            f"- {r['model']} K={r['steps']}: ESS/N {r['ess_fraction']:.4f} with the head, "
            f"{r['ess_fraction_exact_logdet']:.4f} with the exact log-det; sd of log q "
            f"(head - exact) {r['logq_head_minus_exact_sd']:.3f} nats"
            for r in checked
        )
    print()
    print(
        f"{name}: N = {args.n} samples per row, NLL on {len(val)} reference points, "
        f"log q check on {args.n_check} samples, {args.threads} thread(s)"
    )
    molecular = None
    if mol is not None:
        boltzmann = _frames_boltzmann(args.reference)
        molecular = molecular_summary(mol, 0.95, boltzmann, frames="--reference frames")
        molecular["profiles"] = profiles
        print(molecular["note"])
        if profiles or reference is not None:
            figure = json_path.with_name(f"{json_path.stem}_profile_phi.png")
            molecular["plot"] = str(plot_phi_profiles(figure, profiles, reference))
    print(text)
    extra: dict[str, Any] = {"table_markdown": text}
    if molecular is not None:
        extra["molecular"] = molecular
    report = save_rows(complete=True, **extra)
    if molecular is not None and "plot" in molecular:
        print(f"\nwrote {molecular['plot']}")
    print(f"\nwrote {json_path}")
    return report


if __name__ == "__main__":
    main()
