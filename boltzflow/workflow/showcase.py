"""The shipped models at a glance: sample every model listed in ``models/showcase.toml``,
reweight, and tabulate ESS/N, samples-with-log-q per second and a free-energy difference with
its CI, side by side (``boltzflow demo`` prints this first).

The list file names model folders under ``models/`` and, per system, the ΔF to estimate::

    n = 4000                 # samples per row (default)
    seed = 0                 # sampling seed of every row
    [[model]]
    name = "dw4-teacher"     # a folder of models/ (teacher or student, see load_model)
    n = 500                  # this row's N (an exact-likelihood ODE is slow)
    [[model]]
    name = "dw4-f2d2"
    steps = [1, 4]           # one row per step count (students)
    [free_energy.dw4]        # states as in [[estimates.free_energy]] of a workflow
    name = "d01 < 4 vs d01 >= 4"
    a = [{ feature = "distance", atoms = [0, 1], max = 4.0 }]
    b = "complement"
    # reference_profile = "x.json"  # optional: a reference ΔF (workflows/aldp_umbrella.py output)

Rows are timed on the calling thread (model work only, energies excluded, as in
:class:`boltzflow.sampling.draw.SampleCost`); the figure plots ESS/N against samples per second
on a log axis, one point per model and step count.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from boltzflow.io.atomic import atomic_write_text
from boltzflow.io.tomlfile import read_toml_file

__all__ = ["ShowcaseEntry", "load_showcase", "run_showcase", "showcase_table"]

#: the list ``boltzflow demo`` reads, beside the shipped models
SHOWCASE = Path(__file__).resolve().parents[2] / "models" / "showcase.toml"
_KEYS = {"n", "seed", "model", "free_energy"}
_MODEL_KEYS = {"name", "n", "steps"}


@dataclass(frozen=True)
class ShowcaseEntry:
    """One shipped model: its folder, the step counts to sample (``(None,)``: its default) and
    the samples per row."""

    folder: Path
    steps: tuple[int | None, ...]
    n: int


@dataclass(frozen=True)
class Showcase:
    """The parsed list: models, the sampling seed and ΔF states per system name."""

    entries: tuple[ShowcaseEntry, ...]
    seed: int
    free_energy: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: per system: the reference ΔF (an Estimate) the rows are compared with
    references: dict[str, Any] = field(default_factory=dict)


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return value


def load_showcase(path: str | os.PathLike[str] = SHOWCASE) -> Showcase:
    """Read and check a showcase list (module docstring); model folders resolve against the
    list's own folder.

    Raises:
        FileNotFoundError: the list or a listed model folder is missing.
        ValueError: unknown keys, bad N or steps, an empty list.
    """
    path = Path(path)
    top = read_toml_file(path)
    unknown = set(top) - _KEYS
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; valid: {sorted(_KEYS)}")
    n_default = _positive_int(top.get("n", 4000), f"{path}: n")
    seed = top.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{path}: seed must be an integer, got {seed!r}")
    models = top.get("model", [])
    if not models:
        raise ValueError(f"{path}: no [[model]] entries")
    entries = []
    for i, m in enumerate(models):
        where = f"{path}: model {i + 1}"
        unknown = set(m) - _MODEL_KEYS
        if unknown:
            raise ValueError(
                f"{where}: unknown keys {sorted(unknown)}; valid: {sorted(_MODEL_KEYS)}"
            )
        if not isinstance(m.get("name"), str):
            raise ValueError(f"{where}: 'name' (a folder of {path.parent}) is required")
        folder = path.parent / m["name"]
        if not folder.is_dir():
            raise FileNotFoundError(f"{where}: model folder not found: {folder}")
        steps = m.get("steps")
        if steps is None:
            step_list: tuple[int | None, ...] = (None,)
        else:
            if not isinstance(steps, list) or not steps:
                raise ValueError(f"{where}: steps must be a non-empty list, got {steps!r}")
            step_list = tuple(_positive_int(k, f"{where}: steps") for k in steps)
        n = _positive_int(m.get("n", n_default), f"{where}: n")
        entries.append(ShowcaseEntry(folder, step_list, n))
    from boltzflow.analysis.free_energy import load_reference_profile

    free_energy, references = {}, {}
    for system, fe in top.get("free_energy", {}).items():
        if not isinstance(fe, dict) or "a" not in fe or "b" not in fe:
            raise ValueError(f"{path}: free_energy.{system} needs states 'a' and 'b'")
        fe = dict(fe)
        ref = fe.pop("reference_profile", None)
        if ref is not None:
            references[system] = load_reference_profile(path.parent / ref).delta_f
        free_energy[system] = fe
    return Showcase(tuple(entries), seed, free_energy, references)


def _row(entry: ShowcaseEntry, steps: int | None, showcase: Showcase) -> dict[str, Any]:
    from boltzflow.analysis.estimate import free_energy_estimates
    from boltzflow.analysis.free_energy import compare_free_energy
    from boltzflow.registry import load_model
    from boltzflow.sampling.draw import draw_samples
    from boltzflow.sampling.weights import ess_fraction
    from boltzflow.systems import load_system

    model = load_model(entry.folder)
    if not model.uses_steps:
        steps = None
    elif steps is None:
        steps = model.default_steps
    with load_system(model.system) as system:
        draw = draw_samples(model, entry.n, system=system, steps=steps, seed=showcase.seed)
        s, cost = draw.samples, draw.cost
        row: dict[str, Any] = {
            "model": entry.folder.name,
            "system": model.system,
            "steps": steps,
            "n": entry.n,
            "nfe_per_sample": cost.nfe_per_sample,
            "samples_per_s": entry.n / cost.seconds if cost.seconds > 0 else math.inf,
            "ess_fraction": ess_fraction(s.log_w),
        }
        fe = showcase.free_energy.get(model.system)
        if fe is not None:
            est = free_energy_estimates(
                [fe],
                s.x,
                s.u,
                s.log_w.numpy(),
                system,
                methods=("delta",),
                level=0.95,
                n_bootstrap=0,
                seed=showcase.seed,
                undefined_ok=True,
            )
            name, value = next(iter(est.items()))
            row["free_energy"] = {"name": name, **_estimate_dict(value.get("delta"), value)}
            ref = showcase.references.get(model.system)
            if ref is not None and "delta" in value:
                cmp = compare_free_energy(value["delta"], ref)
                row["free_energy"]["reference"] = {"value": ref.value, "stderr": ref.stderr}
                row["free_energy"]["minus_reference"] = cmp
    return row


def _estimate_dict(est: Any, raw: dict[str, Any]) -> dict[str, Any]:
    if est is None:
        return {"undefined": raw.get("undefined", "no estimate")}
    return {"value": float(est.value), "low": float(est.ci_low), "high": float(est.ci_high)}


def _one_thread_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _print_row(r: dict[str, Any]) -> None:
    print(
        f"  {r['model']} (K = {r['steps'] or '-'}): N = {r['n']}, ESS/N {r['ess_fraction']:.3f}",
        flush=True,
    )


def _rows(showcase: Showcase, workers: int, progress: bool) -> list[dict[str, Any]]:
    """One row per (entry, K), in list order; ``workers > 1``: rows run in that many worker
    processes of one torch thread each (spawned; shut down on any error or Ctrl-C)."""
    jobs = [(entry, steps) for entry in showcase.entries for steps in entry.steps]
    if workers == 1:
        rows = []
        for entry, steps in jobs:
            rows.append(_row(entry, steps, showcase))
            if progress:
                _print_row(rows[-1])
        return rows
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_one_thread_worker)
    try:
        futures = {pool.submit(_row, e, k, showcase): i for i, (e, k) in enumerate(jobs)}
        done: dict[int, dict[str, Any]] = {}
        for future in as_completed(futures):
            done[futures[future]] = future.result()
            if progress:
                _print_row(done[futures[future]])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return [done[i] for i in range(len(jobs))]


def run_showcase(
    path: str | os.PathLike[str] = SHOWCASE,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    progress: bool = True,
    workers: int = 1,
) -> list[dict[str, Any]]:
    """Sample every listed model at each of its step counts; returns one row per (model, K).

    ``workers``: processes that sample rows side by side, one torch thread each (rows are
    timed in their own process, so samples/s stay per core while the cores are not shared;
    the rows are identical for any number). With ``out_dir``: writes ``shipped_models.json``,
    ``shipped_models.md`` and the figure ``shipped_models.png`` (ESS/N against samples per
    second, log axis) there.

    Raises:
        ValueError: ``workers < 1``; the list's errors (:func:`load_showcase`).
    """
    _positive_int(workers, "workers")
    showcase = load_showcase(path)
    rows = _rows(showcase, workers, progress)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "shipped_models.json", json.dumps(rows, indent=2) + "\n")
        atomic_write_text(out / "shipped_models.md", showcase_table(rows) + "\n")
        from boltzflow.plots.tradeoff import plot_ess_vs_speed

        plot_ess_vs_speed(out / "shipped_models.png", rows)
    return rows


def _fe_cell(fe: dict[str, Any] | None) -> str:
    if fe is None:
        return "-"
    if "value" not in fe:
        return f"undefined ({fe['undefined']})"
    return f"{fe['value']:.3f} [{fe['low']:.3f}, {fe['high']:.3f}]"


def _diff_cell(fe: dict[str, Any] | None) -> str:
    cmp = (fe or {}).get("minus_reference")
    if not cmp or cmp.get("difference") is None:
        return "-"
    ref = fe["reference"]  # type: ignore[index]
    return (
        f"{cmp['difference']:+.3f} ± {cmp['stderr']:.3f} "
        f"(ref {ref['value']:.3f} ± {ref['stderr']:.3f})"
    )


def showcase_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of :func:`run_showcase` rows (ΔF: value [95% CI], kT; its difference from
    the reference with the combined standard error where the list names one)."""
    lines = [
        "| model | system | steps | N | NFE/sample | samples/s | ESS/N | ΔF (kT) [95% CI] "
        "| ΔF − reference (kT, ± combined se) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fe = r.get("free_energy")
        fe_name = f" ({fe['name']})" if fe else ""
        lines.append(
            f"| {r['model']} | {r['system']} | {r['steps'] or '-'} | {r['n']} | "
            f"{r['nfe_per_sample']:.1f} | {r['samples_per_s']:.3g} | {r['ess_fraction']:.3f} | "
            f"{_fe_cell(fe)}{fe_name} | {_diff_cell(fe)} |"
        )
    return "\n".join(lines)
