"""The workflow report: teacher vs students (NFE, wall time, ESS/N, energy W2, log Z and the
workflow's ΔF and observables with CIs), the full reweighting analysis of one proposal, plots.

Per model and step count (one sample store each), with N samples and log w = -u - log q:

- NFE/sample: sequential network evaluations per sample (the adaptive teacher: solver
  evaluations per batch; students: their steps); wall time of drawing the samples with log q
  (energies excluded), also per 1,000 samples;
- ESS/N (Kish) with N;
- with an ``[smc]`` stage, energy and force evaluations per sample (a plain row: one energy, no
  force; the SMC row: its counts, and its wall time includes energies and forces);
- energy W2 (with the square root, kT) between the held-out reference energies and the
  importance-weighted sample energies;
- log Z = LSE(log w) - log N and the estimates of the ``[estimates]`` table, each with its
  confidence interval (delta method and/or seeded bootstrap); the reference row evaluates the
  same ΔF and observables on the held-out reference data with uniform weights (an interval that
  treats them as independent, which MCMC/MD frames are not quite). SMC particles are
  correlated through resampling: their ΔF and observables have the delta interval with the
  particles grouped by initial ancestor (``columns/eve``), their log Z the SMC's own estimate.

The report never hides a failure: a state with zero weight gives "undefined" with the reason, and
an ESS below 30 is flagged as unreliable.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from boltzflow.analysis.report import jsonable
from boltzflow.io.atomic import atomic_write_text
from boltzflow.sampling.results import Estimate
from boltzflow.workflow.layout import REFERENCE_FILE, copy_atomic, sample_plan
from boltzflow.workflow.report_molecular import molecular_section, molecular_table
from boltzflow.workflow.spec import Workflow
from boltzflow.workflow.stage import StageContext

__all__ = ["comparison_rows", "markdown_table", "run_report_stage"]

_MIN_RELIABLE_ESS = 30


def _estimates(
    wf: Workflow,
    x: torch.Tensor,
    u: torch.Tensor,
    log_w: np.ndarray,
    system: Any,
    clusters: np.ndarray | None = None,
    log_z: Estimate | None = None,
) -> dict[str, Any]:
    """log Z, ΔF and observables of ``wf.estimates`` for one weighted sample set; correlated
    samples (SMC) give their ``clusters`` and their own ``log_z``."""
    from boltzflow.analysis.estimate import (
        estimate_methods,
        free_energy_estimates,
        observable_estimates,
    )
    from boltzflow.sampling.estimators import log_partition

    es, rp = wf.estimates, wf.report
    methods = estimate_methods(es.method)
    kw = {"level": rp.level, "n_bootstrap": rp.n_bootstrap, "seed": wf.seed}
    out: dict[str, Any] = {}
    if es.log_z:
        if log_z is not None:
            out["log Z"] = {"smc": log_z}
        else:
            out["log Z"] = {m: log_partition(log_w, method=m, **kw) for m in methods}
    common = {"methods": methods, "undefined_ok": True, "clusters": clusters, **kw}
    free = free_energy_estimates(es.free_energies, x, u, log_w, system, **common)
    out.update({f"ΔF {name}": est for name, est in free.items()})
    out.update(observable_estimates(es.observables, x, u, log_w, system, **common))
    return out


def comparison_rows(
    wf: Workflow, out_dir: Path, system: Any, u_ref: np.ndarray | None
) -> list[dict[str, Any]]:
    """One row per sample store of ``wf`` (see the module docstring)."""
    from boltzflow.io.samples import read_samples
    from boltzflow.metrics import energy_w2
    from boltzflow.sampling.weights import kish_ess

    rows = []
    for model, runs in sample_plan(wf).items():
        for label, steps in runs:
            s = read_samples(out_dir / f"samples/{label}.h5")
            prov = s.provenance
            log_w = np.asarray(s.log_w, dtype=np.float64)
            u = np.asarray(s.u, dtype=np.float64)
            ess = kish_ess(torch.as_tensor(log_w))
            row: dict[str, Any] = {
                "model": model,
                "label": label,
                "steps": steps
                if steps is not None
                else (prov.get("sampling", {}).get("method", "-") if model == "teacher" else 1),
                "log q": prov.get("log_q_kind", "-"),
                "NFE/sample": prov.get("nfe_per_sample"),
                "sample seconds": prov.get("sample_seconds"),
                "s per 1000 samples": 1000.0 * prov.get("sample_seconds", math.nan) / s.n,
                "N": s.n,
                "ESS": ess,
                "ESS/N": ess / s.n,
                "non-finite weights": int((~np.isfinite(log_w)).sum()),
                "energy evaluations per sample": prov.get("energy_evaluations_per_sample", 1.0),
                "force evaluations per sample": prov.get("force_evaluations_per_sample", 0.0),
            }
            finite = np.isfinite(u) & np.isfinite(log_w)
            if u_ref is not None and finite.any():
                w = np.exp(log_w[finite] - log_w[finite].max())
                row["energy W2 proposal (kT)"] = energy_w2(u_ref, u[finite])
                row["energy W2 reweighted (kT)"] = energy_w2(u_ref, u[finite], w / w.sum())
            x = torch.as_tensor(s.x, dtype=torch.float64)
            clusters = s.columns.get("eve")  # SMC particles: grouped by initial ancestor
            row["estimates"] = _estimates(
                wf, x, torch.as_tensor(u), log_w, system, clusters, _smc_log_z(prov)
            )
            if "smc" in prov:
                row["smc"] = prov["smc"]
            if system.log_z is not None and "log Z" in row["estimates"]:
                row["exact log Z inside CI"] = {
                    m: e.contains(system.log_z) for m, e in row["estimates"]["log Z"].items()
                }
            rows.append(row)
    return rows


def _smc_log_z(provenance: dict[str, Any]) -> Estimate | None:
    """The SMC's own log Z of a ``[smc]`` store (None for other stores)."""
    d = provenance.get("smc", {}).get("log Z")
    if not d:
        return None
    return Estimate(**{k: math.nan if v is None else v for k, v in d.items()})


def _reference_row(
    wf: Workflow, ref_x: np.ndarray, u_ref: np.ndarray, system: Any
) -> dict[str, Any]:
    x = torch.as_tensor(ref_x, dtype=torch.float64)
    zeros = np.zeros(len(ref_x))
    est = _estimates(wf, x, torch.as_tensor(u_ref), zeros, system)
    est.pop("log Z", None)
    return {"model": "reference data", "N": len(ref_x), "estimates": est}


def _fmt(v: Any, spec: str = ".4g") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, Estimate):
        return _fmt_estimate(v)
    if isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
        return format(float(v), spec) if isinstance(v, (float, np.floating)) else str(v)
    return str(v).replace("|", "\\|")


def _fmt_estimate(e: Estimate) -> str:
    """``value [low, high]`` with decimals to resolve the standard error (two digits of it)."""
    if not (math.isfinite(e.value) and math.isfinite(e.stderr)) or e.stderr <= 0:
        return f"{e.value:.4g} [{e.ci_low:.4g}, {e.ci_high:.4g}]"
    digits = min(max(1 - math.floor(math.log10(e.stderr)), 0), 6)
    return f"{e.value:.{digits}f} [{e.ci_low:.{digits}f}, {e.ci_high:.{digits}f}]"


def _primary(entry: dict[str, Any]) -> Any:
    """The estimate shown in tables: delta if present, else bootstrap, else an SMC's own,
    else the failure."""
    for key in ("delta", "bootstrap", "smc"):
        if key in entry:
            return entry[key]
    return "undefined"


def markdown_table(rows: list[dict[str, Any]], exact_log_z: float | None = None) -> str:
    """Markdown table of :func:`comparison_rows` (plus the reference row, if present)."""
    est_names = list(dict.fromkeys(k for r in rows for k in r.get("estimates", {})))
    # energy and force evaluations per sample: shown when a row used forces (an SMC row)
    costs = any((r.get("force evaluations per sample") or 0) > 0 for r in rows)
    head = [
        "model",
        "steps",
        "log q",
        "NFE/sample",
        "s / 1000 samples",
        *(["energy evals/sample", "force evals/sample"] if costs else []),
        "N",
        "ESS/N",
        "E-W2 reweighted (kT)",
        *est_names,
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r.get("label", r["model"]),
            _fmt(r.get("steps")),
            _fmt(r.get("log q")),
            _fmt(r.get("NFE/sample"), ".1f"),
            _fmt(r.get("s per 1000 samples"), ".3g"),
            *(
                [
                    _fmt(r.get("energy evaluations per sample"), ".0f"),
                    _fmt(r.get("force evaluations per sample"), ".0f"),
                ]
                if costs
                else []
            ),
            _fmt(r.get("N")),
            _fmt(r.get("ESS/N"), ".4f"),
            _fmt(r.get("energy W2 reweighted (kT)"), ".3f"),
        ]
        for name in est_names:
            entry = r.get("estimates", {}).get(name)
            if entry is None:
                cell = f"exact {exact_log_z:.3f}" if name == "log Z" and exact_log_z else "-"
            else:
                cell = _fmt(_primary(entry), ".4g")
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ess_plot(rows: list[dict[str, Any]], path: Path) -> Path:
    from boltzflow.plots._figure import new_figure, save_png

    fig = new_figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    by_model: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r["model"] == "teacher":
            ax.axhline(max(r["ESS/N"], 1e-6), color="k", ls="--", label="teacher (adaptive ODE)")
        else:
            by_model.setdefault(r["model"], []).append((float(r["steps"]), r["ESS/N"]))
    for model, pts in by_model.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [max(p[1], 1e-6) for p in pts], "o-", label=model)
    ax.set_xscale("log", base=2)
    ticks = sorted({p[0] for pts in by_model.values() for p in pts})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("steps K")
    ax.set_ylabel("ESS / N")
    ax.set_title("importance-sampling efficiency by model")
    ax.legend(fontsize=8)
    return save_png(fig, path)


def _training(ctx: StageContext, wf: Workflow) -> dict[str, Any]:
    out = {"teacher": ctx.upstream.get("teacher", {})}
    for name in wf.students:
        out[name] = ctx.upstream.get(f"student-{name}", {})
    return {k: {kk: vv for kk, vv in v.items() if kk != "note"} for k, v in out.items()}


def run_report_stage(ctx: StageContext, wf: Workflow) -> dict[str, Any]:
    """The ``report`` stage: comparison table, estimates, reweighting analysis and plots."""
    from boltzflow.analysis.estimate import estimate_methods
    from boltzflow.analysis.free_energy import load_reference_profile
    from boltzflow.analysis.reweight import reweight_analysis
    from boltzflow.data import read_dataset
    from boltzflow.systems.base import compute_energies

    out = ctx.out_dir
    ref_path = out / REFERENCE_FILE
    label = wf.proposal_label
    reference = None
    if wf.report.reference_profile is not None:
        reference = load_reference_profile(wf.report.reference_profile)
    with wf.open_system() as system:
        ref_x = u_ref_all = u_ref = None
        ref_boltzmann = True
        if ref_path.is_file():
            ref_ds = read_dataset(ref_path)
            ref_x = ref_ds.positions.astype(np.float64)
            provenance = ref_ds.attrs.get("provenance") or {}
            ref_boltzmann = provenance.get("boltzmann_across_basins", True) is not False
            u_ref_all = compute_energies(system, torch.as_tensor(ref_x)).numpy()
            u_ref = u_ref_all[np.isfinite(u_ref_all)]
        rows = comparison_rows(wf, out, system, u_ref)
        molecular = molecular_section(
            wf,
            out,
            system,
            rows,
            ref_x=ref_x,
            ref_boltzmann=ref_boltzmann,
            reference=reference,
            methods=estimate_methods(wf.estimates.method),
        )
        all_rows = list(rows)
        if ref_x is not None:
            all_rows.append(_reference_row(wf, ref_x, u_ref_all, system))
        analysis = reweight_analysis(
            out / f"samples/{label}.h5",
            system,
            out / "analysis",
            reference=ref_path if ref_path.is_file() else None,
            n_bootstrap=wf.report.n_bootstrap,
            level=wf.report.level,
            seed=wf.seed,
        )
        exact = system.log_z
    plots = {k: Path(v) for k, v in analysis.get("plots", {}).items()}
    if any(r["model"] != "teacher" for r in rows):
        plots["ESS/N by model and steps"] = _ess_plot(rows, out / "analysis" / "ess_by_model.png")
    if molecular is not None:
        plots.update(molecular["plots"])
    for path in plots.values():
        ctx.add_output(path)
    ctx.add_output(out / "analysis" / "report.md")
    ctx.add_output(out / "analysis" / "report.json")
    copy_atomic(out / f"samples/{label}.h5", out / "samples.h5")
    table = markdown_table(all_rows, exact)
    training = _training(ctx, wf)
    notes = _notes(wf, rows, exact, u_ref is not None)
    if not ref_boltzmann:
        notes.append(
            "the held-out frames are seeded MD, Boltzmann within but not across the φ basins: "
            "their ΔF (reference row) is not a reference, and energy and torus W2 against them "
            "measure fit to those frames, not distance to the target"
        )
    mol_md = ""
    if molecular is not None:
        mol_md = molecular_table(rows, molecular, wf.report.level)
    payload = {
        "workflow": wf.name,
        "system": wf.system,
        "profile": wf.profile,
        "proposal": label,
        "exact log Z": exact,
        "models": rows,
        "reference": all_rows[-1] if ref_x is not None else None,
        "training": training,
        "analysis of the proposal": {
            k: v for k, v in analysis.items() if k not in ("plots", "report")
        },
        "plots": {k: str(p.relative_to(out)) for k, p in plots.items()},
        "notes": notes,
        "table_markdown": table,
    }
    if molecular is not None:
        payload["molecular"] = {k: v for k, v in molecular.items() if k != "plots"} | {
            "table_markdown": mol_md
        }
    atomic_write_text(out / "report.json", json.dumps(jsonable(payload), indent=2) + "\n")
    atomic_write_text(
        out / "report.md",
        _markdown(wf, table, training, analysis, plots, notes, out, molecular=mol_md),
    )
    best = max(rows, key=lambda r: r["ESS/N"])
    return {
        "rows": len(rows),
        "best": best["label"],
        "note": f"{len(rows)} sample sets; best ESS/N {best['ESS/N']:.3f} ({best['label']})",
    }


def _notes(
    wf: Workflow, rows: list[dict[str, Any]], exact: float | None, has_ref: bool
) -> list[str]:
    lvl = f"{100 * wf.report.level:g}%"
    notes = [
        f"system {wf.system}; N = {wf.sample.n} samples per model and step count; seed {wf.seed}",
        "log w = -u(x) - log q(x); ESS is Kish's; energy W2 with the square root (W2, not W2²)",
        f"intervals: {lvl} confidence, {wf.estimates.method} method"
        + (f" (bootstrap B = {wf.report.n_bootstrap})" if wf.estimates.method != "delta" else ""),
        "NFE/sample counts sequential network evaluations; s / 1000 samples is the wall time of "
        "drawing x with log q (energy evaluation excluded)",
    ]
    for r in rows:
        if "smc" in r:
            d = r["smc"]
            notes.append(
                f"{r['label']}: latent SMC of {r['model'].removesuffix('+smc')} "
                f"({d['temperatures']} temperatures, {d['eves']} surviving initial ancestors of "
                f"{r['N']}, ESS/N {d['initial ESS/N']:.3f} -> {r['ESS/N']:.3f}); its wall time "
                "includes the energies and forces of every move, its NFE/sample counts K network "
                "steps per evaluation, its ΔF and observables have delta intervals with the "
                "particles grouped by initial ancestor, its log Z is the SMC's own"
            )
    if has_ref:
        notes.append(
            "reference data: the held-out data frames with uniform weights (their interval "
            "treats correlated MCMC/MD frames as independent, so it is too narrow)"
        )
    if exact is not None:
        notes.append(f"exact log Z = {exact:.4f}")
    if not has_ref:
        notes.append("no reference data held out (data.n_reference = 0): no energy W2")
    for r in rows:
        if r["ESS"] < _MIN_RELIABLE_ESS:
            notes.append(
                f"{r['label']}: ESS = {r['ESS']:.1f} < {_MIN_RELIABLE_ESS}; its intervals are not "
                "reliable"
            )
    return notes


def _markdown(
    wf: Workflow,
    table: str,
    training: dict[str, Any],
    analysis: dict[str, Any],
    plots: dict[str, Path],
    notes: list[str],
    out: Path,
    *,
    molecular: str = "",
) -> str:
    lines = [f"# boltzflow workflow report: {wf.name} ({wf.system})", ""]
    if wf.description:
        lines += [wf.description, ""]
    lines += [f"- {n}" for n in notes] + [""]
    lines += ["## Teacher vs students", "", table, ""]
    if molecular:
        lines += ["## Molecule: (φ, ψ), chirality and free energy along φ", "", molecular, ""]
    lines += [
        "## Training",
        "",
        "| model | parameters | training steps | train time (s) | final loss |",
        "|---|---|---|---|---|",
    ]
    for name, t in training.items():
        lines.append(
            f"| {name} | {_fmt(t.get('parameters'))} | {_fmt(t.get('steps'))} "
            f"| {_fmt(t.get('train_seconds'), '.1f')} | {_fmt(t.get('final_loss'), '.4g')} |"
        )
    lines += ["", f"## Reweighting analysis of {wf.proposal_label}", ""]
    weights = analysis.get("weights", {})
    lines += ["| quantity | value |", "|---|---|"]
    for k, v in weights.items():
        lines.append(f"| {_fmt(k)} | {_fmt(v, '.5g')} |")
    for k, v in analysis.get("metrics vs reference", {}).items():
        lines.append(f"| {_fmt(k)} | {_fmt(v, '.5g')} |")
    lines += [
        "",
        "Full analysis: [analysis/report.md](analysis/report.md); samples: `samples.h5`.",
        "",
    ]
    if plots:
        lines += ["## Plots", ""]
        for name, path in plots.items():
            lines += [f"### {name}", "", f"![{name}]({path.relative_to(out)})", ""]
    return "\n".join(lines)
