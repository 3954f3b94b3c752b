"""``boltzflow benchmark --workflow FILE``: the teacher-vs-students comparison for any workflow.

After the workflow's data, teacher and student stages (cached as in ``boltzflow run``), one
stage evaluates, with the same seed and N for every row:

- the teacher (its configured adaptive ODE with the exact trace);
- every student at each of ``benchmark.steps`` (an nf student once: it has no steps);
- with ``benchmark.baselines``, K Euler steps of the teacher's own velocity with the Euler-rule
  divergence and with the exact per-step log-determinant
  (:class:`boltzflow.distill.baselines.EulerBaseline`): a student that does not beat the latter
  learned nothing the teacher did not already give;

and reports per row: NFE per sample, samples (with log q) per second, ESS/N with N, energy W2
(with the square root, kT) of the reweighted samples against the held-out reference, NLL of
``n_val`` reference points under the model's own ``log_prob`` at the same steps (a backward Euler
estimate for the baselines), |log q - log q_teacher| (median, mean) at ``n_check`` of the model's
samples with the teacher's exact log q, and FALCON's inversion error |z - X^-1(X(z))|.

For a molecule with backbone dihedrals (as the report decides:
:func:`~boltzflow.analysis.free_energy.has_backbone_dihedrals`) every row also gets, from the
report's molecular section (:func:`~boltzflow.workflow.report_molecular.phi_metrics`): the
torus W2 on (φ, ψ) of the reweighted samples against the held-out frames, ΔF(φ state vs rest)
with its delta-method interval, and, with ``[report] reference_profile``, ΔF − reference with
the combined standard error; and F(φ) of the teacher and of every row at :data:`PROFILE_STEPS`
steps (and one-pass students) is drawn against the reference profile
(``benchmark_profile_phi.png``).
Writes ``benchmark.md`` and ``benchmark.json`` in the output folder.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import torch

from boltzflow.analysis.free_energy import (
    ReferenceProfile,
    backbone_angles,
    has_backbone_dihedrals,
)
from boltzflow.analysis.report import jsonable
from boltzflow.io.atomic import atomic_write_text
from boltzflow.progress import track
from boltzflow.sampling.estimators import FreeEnergyProfile
from boltzflow.sampling.results import WeightedSamples
from boltzflow.workflow.layout import (
    REFERENCE_FILE,
    TEACHER_FILE,
    stage_device,
    teacher_sampling,
)
from boltzflow.workflow.report_molecular import (
    OT_POINTS,
    PhiReference,
    format_comparison,
    format_estimate,
    phi_metrics,
    plot_phi_profiles,
)
from boltzflow.workflow.spec import Workflow
from boltzflow.workflow.stage import StageContext

__all__ = [
    "PROFILE_FIGURE",
    "PROFILE_STEPS",
    "benchmark_table",
    "ess_seed_summary",
    "logq_abs_errors",
    "logq_errors",
    "molecular_columns",
    "molecular_reference",
    "molecular_summary",
    "profile_label",
    "reference_nll",
    "run_benchmark_stage",
    "sample_log_weights",
    "weighted_metrics",
    "weighted_sample_metrics",
    "weighted_samples",
]

#: the F(φ) figure shows the teacher and the rows at this many steps (else the most benchmarked)
PROFILE_STEPS = 4
#: file name of the F(φ) figure in the output folder
PROFILE_FIGURE = "benchmark_profile_phi.png"


def weighted_sample_metrics(
    samples: WeightedSamples, u_ref: np.ndarray | None
) -> tuple[float, float | None, int]:
    """ESS/N, reweighted energy W2 (kT, with the square root) against reference energies
    ``u_ref`` (None: no W2), and the number of non-finite log weights of weighted samples."""
    from boltzflow.metrics import energy_w2
    from boltzflow.sampling.weights import ess_fraction

    log_w, u = samples.log_w, samples.u
    finite = torch.isfinite(log_w)
    w2 = None
    if u_ref is not None and bool(finite.any()):
        lw = log_w[finite].numpy()
        w = np.exp(lw - lw.max())
        w2 = energy_w2(u_ref, u[finite].numpy(), w / w.sum())
    return ess_fraction(log_w), w2, int((~finite).sum())


def weighted_samples(system: Any, x: torch.Tensor, log_q: torch.Tensor) -> WeightedSamples:
    """Samples ``x (N, dim)`` with log densities ``log_q (N,)``, weighted against ``system``
    (energies computed once; CPU)."""
    from boltzflow.systems.base import compute_energies

    x = x.detach().cpu()
    return WeightedSamples.from_energies(x, log_q.detach().cpu(), compute_energies(system, x))


def weighted_metrics(
    system: Any, x: torch.Tensor, log_q: torch.Tensor, u_ref: np.ndarray | None
) -> tuple[float, float | None, int]:
    """:func:`weighted_sample_metrics` of samples ``x (N, dim)`` with log densities
    ``log_q (N,)`` weighted against ``system``."""
    return weighted_sample_metrics(weighted_samples(system, x, log_q), u_ref)


def sample_log_weights(system: Any, x: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Log weights ``-u(x) - log q (N,)`` (float64, CPU) of samples ``x (N, dim)``."""
    return weighted_samples(system, x, log_q).log_w


def molecular_reference(
    system: Any, ref_x: Any, profile: ReferenceProfile | None
) -> PhiReference | None:
    """What the molecular columns compare with: the (φ, ψ) of held-out frames ``ref_x
    (M, dim)`` (Cartesian; None: no torus W2) and a reference profile; None for a system
    without backbone dihedrals (no molecular columns).

    Raises:
        ValueError: a reference profile for a system without backbone dihedrals.
    """
    if not has_backbone_dihedrals(system):
        if profile is not None:
            raise ValueError(
                f"a reference profile along φ ({profile.source}) needs a molecule with backbone "
                "dihedrals"
            )
        return None
    angles = None
    if ref_x is not None and len(ref_x):
        angles = np.stack(backbone_angles(system, ref_x), 1)
    return PhiReference(angles, profile)


def molecular_columns(
    system: Any,
    samples: WeightedSamples,
    ref: PhiReference,
    *,
    level: float = 0.95,
    n_bootstrap: int = 200,
    seed: int = 0,
    profile: bool = False,
) -> tuple[dict[str, Any], FreeEnergyProfile | None]:
    """The molecular columns of one benchmark row (the report's
    :func:`~boltzflow.workflow.report_molecular.phi_metrics` of the weighted samples).

    Args:
        system: a molecule with backbone dihedrals.
        samples: the row's weighted samples, Cartesian ``x (N, dim)``.
        ref: the held-out frames' angles and the reference profile.
        level, n_bootstrap, seed: confidence level, bootstrap replicates of F(φ), seed.
        profile: also return the row's F(φ).

    Returns:
        ``{"torus_w2": reweighted torus W2 (rad; None without frames or weight), "delta_f":
        {"delta": Estimate} or {"undefined": reason} (kT), "delta_f_vs_reference": difference
        from the reference ΔF with the combined standard error (None without one)}`` and F(φ)
        (None unless ``profile`` and some weight is finite).
    """
    phi, psi = backbone_angles(system, samples.x)
    m = phi_metrics(
        phi,
        psi,
        samples.log_w.double().numpy(),
        ref,
        methods=("delta",),
        level=level,
        n_bootstrap=n_bootstrap,
        seed=seed,
        proposal_w2=False,
        profile=profile,
    )
    entry = m["φ"]
    cols = {
        "torus_w2": m.get("torus W2 (φ, ψ) reweighted (rad)"),
        "delta_f": entry["ΔF"],
        "delta_f_vs_reference": entry.get("ΔF - reference"),
    }
    return cols, entry.get("profile")


def molecular_summary(
    ref: PhiReference, level: float, frames_boltzmann: bool, *, frames: str = "held-out frames"
) -> dict[str, Any]:
    """What the molecular columns were computed against, with a one-paragraph ``note`` for the
    markdown: the φ state, the interval level, the reference frames (called ``frames``; are
    they Boltzmann across the φ basins?) and the reference ΔF."""
    lo, hi = ref.region
    note = (
        f"Molecular columns: torus W2 on (φ, ψ) of the reweighted samples against the "
        f"{frames if ref.angles is not None else f'(no {frames})'} (exact OT, "
        f"wrapped distance, at most {OT_POINTS:,} points a side, W2 with the root); "
        f"ΔF = F({lo:g} < φ < {hi:g}) − F(rest) in kT with its {100 * level:g}% delta-method "
        "interval"
    )
    if ref.profile is not None and ref.profile.delta_f is not None:
        d = ref.profile.delta_f
        note += (
            f"; ΔF − reference against the {ref.profile.label} (ΔF = {d.value:.3f} ± "
            f"{d.stderr:.3f} kT), ± the combined standard error, with z"
        )
    note += "."
    if ref.angles is not None and not frames_boltzmann:
        note += (
            f" The {frames} are seeded MD, not Boltzmann across the φ basins: torus W2 "
            "against them measures fit to those frames, not distance to the target."
        )
    return {
        "region": [lo, hi],
        "level": level,
        "held-out frames": None if ref.angles is None else len(ref.angles),
        "held-out frames Boltzmann across basins": frames_boltzmann,
        "reference": ref.profile,
        "note": note,
    }


def profile_label(row: dict[str, Any], profile_steps: int) -> str | None:
    """The legend entry of ``row`` in the F(φ) figure, or None if the row is not drawn: the
    teacher (its steps are a solver name), one-pass models (steps ``"-"``) and rows at
    ``profile_steps`` steps."""
    steps = row["steps"]
    if steps == "-" or isinstance(steps, str):
        return str(row["model"])
    return f"{row['model']} K={steps}" if steps == profile_steps else None


def logq_abs_errors(
    model: Any,
    steps: int | None,
    x: torch.Tensor,
    log_q: torch.Tensor,
    ref: torch.Tensor,
    *,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Finite |log q - ref| (nats, float64) for the sampler's ``log_q (B,)`` and for
    ``model.log_prob`` scoring the same points ``x (B, dim)``; ``ref (B,)`` the teacher's
    exact log q of ``x``."""
    ref = ref.detach().double().cpu()

    def finite_abs_error(lq: torch.Tensor) -> torch.Tensor:
        err = (lq.detach().double().cpu() - ref).abs()
        return err[torch.isfinite(err)]

    scored = model.log_prob(x, steps=steps, batch_size=batch_size)
    return finite_abs_error(log_q), finite_abs_error(scored)


def reference_nll(
    model: Any, val: torch.Tensor, steps: int | None, *, batch_size: int | None
) -> tuple[float | None, int]:
    """Mean ``-model.log_prob`` (nats) over reference points ``val (M, dim)`` with a finite log
    q, and how many were left out (a FALCON point that its exact inverse did not reach gets
    NaN and a warning); None when none is finite."""
    nll = -model.log_prob(val, steps=steps, batch_size=batch_size).detach().double().cpu()
    finite = torch.isfinite(nll)
    return (float(nll[finite].mean()) if finite.any() else None), int((~finite).sum())


def logq_errors(
    model: Any,
    steps: int | None,
    x: torch.Tensor,
    log_q: torch.Tensor,
    ref: torch.Tensor,
    *,
    batch_size: int,
) -> dict[str, float | None]:
    """|log q - reference log q| at given samples, two ways (nats; non-finite errors dropped).

    Args:
        model: a student, baseline or teacher with ``log_prob(x, steps, batch_size=...)``.
        x: ``(B, dim)`` the model's samples; ``log_q (B,)`` the log q its sampler gave them.
        ref: ``(B,)`` the teacher's exact log q of ``x``.

    Returns:
        ``logq_err_median``/``logq_err_mean`` for the sampler's log q and
        ``logq_err_score_median`` for ``model.log_prob`` scoring the same points (data -> noise).
    """
    err, scored = logq_abs_errors(model, steps, x, log_q, ref, batch_size=batch_size)
    return {
        "logq_err_median": float(err.median()) if len(err) else None,
        "logq_err_mean": float(err.mean()) if len(err) else None,
        "logq_err_score_median": float(scored.median()) if len(scored) else None,
    }


def benchmark_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the benchmark rows (the first row is the teacher: speed-up base).

    ``dlogq`` columns compare log q with the teacher's exact log q at the model's own samples:
    as the sampler gives it, and (optional ``logq_err_score_median``) as the model's
    ``log_prob`` scores the same points (data -> noise); "-" where a row lacks it. When rows
    carry the molecular columns (:func:`molecular_columns`: ``delta_f``), three more follow:
    reweighted torus W2, ΔF with its interval and ΔF − reference ± its standard error.
    """
    molecular = any("delta_f" in r for r in rows)
    head = (
        "| model | steps | log q | NFE/sample | samples/s | speed-up | ESS/N | E-W2 | NLL "
        "| median abs dlogq | mean abs dlogq | median abs dlogq, scored | inv. err (median/max) |"
    )
    if molecular:
        head += " torus W2 rw (rad) | ΔF (kT) [CI] | ΔF − ref (kT) |"
    lines = [head, "|" + "---|" * (16 if molecular else 13)]
    base = rows[0]["samples_per_s"] if rows else 1.0

    def f(v: Any, spec: str) -> str:
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "-"
        return format(v, spec) if isinstance(v, (int, float)) else str(v)

    for r in rows:
        inv = (
            f"{r['inv_err_median']:.1e} / {r['inv_err_max']:.1e}" if "inv_err_median" in r else "-"
        )
        nll = f(r["nll"], ".3f")
        if r.get("nll_unscored"):
            nll += f" ({r['nll_unscored']} n/a)"
        lines.append(
            f"| {r['model']} | {r['steps']} | {r['log_q']} | {f(r['nfe_per_sample'], '.1f')} "
            f"| {f(r['samples_per_s'], '.1f')} | {r['samples_per_s'] / base:.0f}x "
            f"| {f(r['ess_fraction'], '.4f')} | {f(r['energy_w2'], '.3f')} | {nll} "
            f"| {f(r['logq_err_median'], '.3f')} | {f(r['logq_err_mean'], '.3f')} "
            f"| {f(r.get('logq_err_score_median'), '.3f')} | {inv} |"
        )
        if molecular:
            cells = (
                f(r.get("torus_w2"), ".3f"),
                _delta_f_cell(r.get("delta_f")),
                format_comparison(r.get("delta_f_vs_reference")),
            )
            lines[-1] += "".join(f" {c.replace('|', '/')} |" for c in cells)
    return "\n".join(lines)


def _delta_f_cell(entry: dict[str, Any] | None) -> str:
    """ΔF with its interval, "undefined" when a state has no weight, "-" for none."""
    if not entry:
        return "-"
    if "undefined" in entry:
        return "undefined"
    return format_estimate(next(iter(entry.values())))


def ess_seed_summary(rows: list[dict[str, Any]]) -> str:
    """Markdown list of ESS/N over sampling seeds, one line per row with ``ess_fraction_seeds``.

    With ``ess_fraction_pooled`` (ESS/N of all the seeds' samples together) it is shown beside
    the mean. When the first row (the teacher) has seeds too, every other line adds the ratio to
    the teacher seed by seed (same prior draws), of the means and of the pooled values; "" when
    no row has seeds.
    """
    teacher = rows[0].get("ess_fraction_seeds") if rows else None
    lines = []
    for i, r in enumerate(rows):
        seeds = r.get("ess_fraction_seeds")
        if not seeds:
            continue
        line = f"- {r['model']} K={r['steps']}: " + ", ".join(f"{e:.3f}" for e in seeds)
        line += f" (mean {float(np.mean(seeds)):.3f}"
        pooled = r.get("ess_fraction_pooled")
        line += f"; pooled {pooled:.3f})" if pooled is not None else ")"
        if i > 0 and teacher and len(teacher) == len(seeds):
            ratios = ", ".join(f"{e / t:.2f}" for e, t in zip(seeds, teacher, strict=True))
            line += (
                f"; / teacher, seed by seed: {ratios}; "
                f"of the means: {float(np.mean(seeds)) / float(np.mean(teacher)):.2f}"
            )
            t_pooled = rows[0].get("ess_fraction_pooled")
            if pooled is not None and t_pooled:
                line += f"; pooled: {pooled / t_pooled:.2f}"
        lines.append(line)
    return "\n".join(lines)


def run_benchmark_stage(ctx: StageContext, wf: Workflow) -> dict[str, Any]:
    """The ``benchmark`` stage (see the module docstring)."""
    from boltzflow.analysis.free_energy import load_reference_profile
    from boltzflow.data import read_dataset
    from boltzflow.distill import EulerBaseline, load_student
    from boltzflow.flows.cnf import TeacherCNF
    from boltzflow.sampling.draw import draw_samples
    from boltzflow.systems.base import compute_energies

    bm, device = wf.benchmark, stage_device(wf)
    n, seed = bm.n, wf.seed + 1
    teacher = TeacherCNF.load(ctx.path(TEACHER_FILE), system=wf.system, map_location=device)
    teacher.eval()
    t_settings = teacher_sampling(wf)
    teacher.sampling = teacher.settings_with(t_settings)
    ref_path = ctx.path(REFERENCE_FILE)
    rows: list[dict[str, Any]] = []
    profiles: dict[str, FreeEnergyProfile] = {}
    profile_steps = PROFILE_STEPS if PROFILE_STEPS in bm.steps else max(bm.steps)
    rp = wf.report
    reference = None
    if rp.reference_profile is not None:
        reference = load_reference_profile(rp.reference_profile)
    with wf.open_system() as system:
        u_ref = val = ref = None
        ref_boltzmann = True
        if ref_path.is_file():
            ref_ds = read_dataset(ref_path)
            provenance = ref_ds.attrs.get("provenance") or {}
            ref_boltzmann = provenance.get("boltzmann_across_basins", True) is not False
            ref = torch.as_tensor(ref_ds.positions)
            u_ref = compute_energies(system, ref).numpy()
            u_ref = u_ref[np.isfinite(u_ref)]
            val = ref[: bm.n_val].to(device=device, dtype=torch.float32)
        mol = molecular_reference(system, ref, reference)

        models: list[tuple[str, Any, str]] = [("teacher", teacher, "teacher")]
        for name, st in wf.students.items():
            student = load_student(
                ctx.path(f"students/{name}/student.pt"), system=wf.system, map_location=device
            )
            models.append((name, student, st.method))
        if bm.baselines:
            for logdet, label in (("euler", "Euler-rule log q"), ("exact", "exact step log-det")):
                models.append((f"euler ({label})", EulerBaseline(teacher, logdet=logdet), "euler"))
        jobs = [
            (label, model, kind, k)
            for label, model, kind in models
            for k in (bm.steps if model.uses_steps else [None])
        ]
        for label, model, kind, k in track(
            jobs, desc="benchmark", unit="model", enabled=ctx.progress
        ):
            model.eval()
            # the teacher batches by its own ODE settings, the few-step models by the workflow's
            batch = None if kind == "teacher" else wf.sample.batch_size
            draw = draw_samples(
                model, n, system=system, steps=k, seed=seed, batch_size=batch, progress=False
            )
            samples, seconds = draw.samples, draw.cost.seconds
            ess, w2, n_bad = weighted_sample_metrics(samples, u_ref)
            row: dict[str, Any] = {
                "model": label,
                "steps": t_settings["method"] if kind == "teacher" else "-" if k is None else k,
                "log_q": model.log_q_kind,
                "nfe_per_sample": draw.cost.nfe_per_sample,
                "samples_per_s": n / max(seconds, 1e-9),
                "seconds": seconds,
                "n": n,
                "ess_fraction": ess,
                "energy_w2": w2,
                "non_finite_weights": n_bad,
                "nll": None,
            }
            if val is not None:
                row["nll"], row["nll_unscored"] = reference_nll(model, val, k, batch_size=batch)
            if mol is not None:
                drawn = profile_label(row, profile_steps)
                cols, prof = molecular_columns(
                    system,
                    samples,
                    mol,
                    level=rp.level,
                    n_bootstrap=rp.n_bootstrap,
                    seed=wf.seed,
                    profile=drawn is not None,
                )
                row.update(cols)
                if drawn is not None and prof is not None:
                    profiles[drawn] = prof
            if kind == "teacher":  # the reference log q itself
                row.update(logq_err_median=0.0, logq_err_mean=0.0, logq_err_score_median=0.0)
                rows.append(row)
                continue
            check = samples.x[: bm.n_check].to(device)
            ref_lq = teacher.log_prob(check)
            row.update(
                logq_errors(
                    model,
                    k,
                    check,
                    samples.log_q[: bm.n_check],
                    ref_lq,
                    batch_size=wf.sample.batch_size,
                )
            )
            if kind == "falcon":
                p = model._param()
                z = model.prior.sample(
                    bm.n_check,
                    generator=torch.Generator().manual_seed(seed + 3),
                    dtype=p.dtype,
                    device=p.device,
                )
                inv = model.inversion_error(z, k)
                row["inv_err_median"] = float(inv.median())
                row["inv_err_max"] = float(inv.max())
            rows.append(row)
    table = benchmark_table(rows)
    header = (
        f"{wf.system}: N = {n} samples per row (seed {seed}), NLL on "
        f"{0 if val is None else len(val)} reference points, log q check on {bm.n_check} "
        f"samples, device {device}"
    )
    molecular = None
    if mol is not None:
        molecular = molecular_summary(mol, rp.level, ref_boltzmann)
        molecular["profiles"] = profiles
        if profiles or reference is not None:
            plot_phi_profiles(ctx.path(PROFILE_FIGURE), profiles, reference)
            ctx.add_output(PROFILE_FIGURE)
            molecular["plot"] = PROFILE_FIGURE
    payload = {
        "workflow": wf.name,
        "system": wf.system,
        "settings": {
            "n": n,
            "seed": seed,
            "steps": list(bm.steps),
            "n_val": bm.n_val,
            "n_check": bm.n_check,
            "device": device,
        },
        "teacher_sampling": t_settings,
        "rows": rows,
        "table_markdown": table,
    }
    if molecular is not None:
        payload["molecular"] = molecular
    atomic_write_text(ctx.path("benchmark.json"), json.dumps(jsonable(payload), indent=2) + "\n")
    md = [
        f"# Benchmark: {wf.name} ({wf.system})",
        "",
        header,
        "",
        "ESS/N: Kish; E-W2: energy W2 with the square root (kT) of the reweighted samples; NLL: "
        "-mean log q of reference points (nats, density on the mean-free subspace for particle "
        "systems); dlogq: |log q - log q_teacher| at the model's own samples.",
        "",
    ]
    if molecular is not None:
        md += [molecular["note"], ""]
    md += [table, ""]
    if molecular is not None and "plot" in molecular:
        md += [f"![F(φ): teacher and K={profile_steps} rows vs reference]({PROFILE_FIGURE})", ""]
    atomic_write_text(ctx.path("benchmark.md"), "\n".join(md))
    best = max(rows[1:] or rows, key=lambda r: r["ess_fraction"])
    return {
        "rows": len(rows),
        "table": table,
        "header": header,
        "note": f"{len(rows)} rows; best few-step ESS/N {best['ess_fraction']:.3f} "
        f"({best['model']} K={best['steps']})",
    }
