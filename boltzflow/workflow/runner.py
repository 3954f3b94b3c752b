"""Run a graph of cached stages: skip what is up to date, run the rest in dependency order.

A :class:`Stage` is a function with declared dependencies (other stages), external input files,
output files (relative to the output folder) and a JSON-able configuration. :func:`run_stages`
computes each stage's key (:func:`boltzflow.workflow.cache.stage_key`) from its configuration and
the current fingerprints of everything it reads, skips it when the manifest shows the same key
with intact outputs, and otherwise runs it and records it. An interrupted run therefore resumes
at the first unfinished stage; training stages also resume inside their work folder.

Each stage announces itself on one line (``[3/7] teacher: running (not run yet)``) and shows its
own progress bars; :func:`format_stage_table` renders the final table.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from boltzflow.workflow.cache import (
    Manifest,
    file_fingerprint,
    prepare_workdir,
    run_lock,
    stage_key,
)

__all__ = [
    "Stage",
    "StageContext",
    "StageResult",
    "WorkflowRun",
    "format_stage_table",
    "run_stages",
    "run_workflow",
]


@dataclass
class StageContext:
    """What a running stage gets.

    Attributes:
        out_dir: the workflow's output folder.
        stage: the stage being run.
        key: its key.
        workdir: its work folder (None if it declared none).
        resumed: True if ``workdir`` holds partial work made with the same key.
        progress: whether to show progress bars.
        upstream: ``{dependency: summary}`` of the stages it depends on.
    """

    out_dir: Path
    stage: Stage
    key: str
    workdir: Path | None
    resumed: bool
    progress: bool
    upstream: dict[str, dict[str, Any]]
    extra_outputs: list[str] = field(default_factory=list)

    def path(self, rel: str | os.PathLike[str]) -> Path:
        """``out_dir / rel``."""
        return self.out_dir / rel

    def add_output(self, path: str | os.PathLike[str]) -> None:
        """Record one more output file (absolute or relative to ``out_dir``), e.g. a plot whose
        name is known only while running."""
        p = Path(path)
        rel = os.path.relpath(p, self.out_dir) if p.is_absolute() else str(p)
        if rel not in self.extra_outputs:
            self.extra_outputs.append(rel)


@dataclass
class Stage:
    """One step of a workflow.

    Attributes:
        name: unique name (also the manifest key).
        run: ``run(ctx) -> summary`` (a small JSON-able dict, or None); it must write every file
            in ``outputs`` (atomically: temporary file + rename).
        config: JSON-able configuration; any change re-runs the stage.
        deps: names of stages whose outputs it reads.
        inputs: external files it reads (their content is part of the key).
        outputs: files it writes, relative to the output folder.
        workdir: folder (relative) for resumable partial work, kept while the key is unchanged.
        description: one line for the log.
    """

    name: str
    run: Callable[[StageContext], Mapping[str, Any] | None]
    config: Any = None
    deps: tuple[str, ...] = ()
    inputs: tuple[Path, ...] = ()
    outputs: tuple[str, ...] = ()
    workdir: str | None = None
    description: str = ""


@dataclass(frozen=True)
class StageResult:
    """What happened to one stage: ``status`` is ``"ran"``, ``"cached"`` or ``"failed"``;
    ``seconds`` is its wall time, ``cpu_seconds`` the CPU time of this process (all threads;
    not counting worker processes such as OpenMM's)."""

    name: str
    status: str
    seconds: float
    reason: str
    summary: dict[str, Any]
    cpu_seconds: float = 0.0


def _ordered(stages: Sequence[Stage]) -> list[Stage]:
    by_name: dict[str, Stage] = {}
    for s in stages:
        if s.name in by_name:
            raise ValueError(f"duplicate stage name {s.name!r}")
        by_name[s.name] = s
    for s in stages:
        for d in s.deps:
            if d not in by_name:
                raise ValueError(f"stage {s.name!r} depends on unknown stage {d!r}")
    order: list[Stage] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(s: Stage) -> None:
        if state.get(s.name) == 2:
            return
        if state.get(s.name) == 1:
            raise ValueError(f"dependency cycle through stage {s.name!r}")
        state[s.name] = 1
        for d in s.deps:
            visit(by_name[d])
        state[s.name] = 2
        order.append(s)

    for s in stages:
        visit(s)
    return order


def _key(stage: Stage, manifest: Manifest) -> str:
    upstream = {d: manifest.output_fingerprints(d) for d in stage.deps}
    inputs = {str(p): file_fingerprint(p) for p in stage.inputs}
    return stage_key(stage.name, stage.config, upstream, inputs)


def run_stages(
    stages: Sequence[Stage],
    out_dir: str | os.PathLike[str],
    *,
    workflow: str = "",
    progress: bool = True,
    force: Sequence[str] = (),
    log: Callable[[str], None] | None = None,
) -> list[StageResult]:
    """Run ``stages`` (in dependency order) in ``out_dir``, skipping up-to-date ones.

    Args:
        stages: the graph; dependencies must name stages in the list.
        out_dir: output folder (created; holds ``manifest.json`` and a ``.lock`` while running).
        workflow: name recorded in the manifest.
        progress: progress bars inside stages.
        force: stage names to run even if up to date.
        log: where the one-line stage announcements go (default: print to stdout).

    Returns:
        one :class:`StageResult` per stage, in the order run. A failing stage re-raises its
        exception after its announcement; finished stages stay recorded, so the next run resumes.

    Raises:
        ValueError: duplicate names, unknown dependencies, cycles, unknown ``force`` names,
            a stage that did not write a declared output, or another live run in ``out_dir``.
    """
    order = _ordered(stages)
    unknown = sorted(set(force) - {s.name for s in order})
    if unknown:
        raise ValueError(
            f"cannot force unknown stage(s) {unknown}; stages: {[s.name for s in order]}"
        )
    say = log or (lambda msg: print(msg, flush=True))
    out = Path(out_dir).absolute()  # stage outputs are recorded relative to this folder
    results: list[StageResult] = []
    with run_lock(out):
        manifest = Manifest(out, workflow)
        summaries: dict[str, dict[str, Any]] = {}
        for i, stage in enumerate(order, 1):
            tag = f"[{i}/{len(order)}] {stage.name}"
            key = _key(stage, manifest)
            current, reason = manifest.current(stage.name, key)
            if stage.name in force:
                current, reason = False, "forced"
            if current:
                rec = manifest.get(stage.name) or {}
                summaries[stage.name] = dict(rec.get("summary", {}))
                say(f"{tag}: up to date, skipped")
                results.append(
                    StageResult(stage.name, "cached", 0.0, "up to date", summaries[stage.name])
                )
                continue
            say(
                f"{tag}: running ({reason})"
                + (f" - {stage.description}" if stage.description else "")
            )
            workdir = resumed = None
            if stage.workdir is not None:
                workdir = out / stage.workdir
                resumed = prepare_workdir(workdir, key)
            ctx = StageContext(
                out_dir=out,
                stage=stage,
                key=key,
                workdir=workdir,
                resumed=bool(resumed),
                progress=progress,
                upstream={d: summaries.get(d, {}) for d in stage.deps},
            )
            start, cpu_start = time.perf_counter(), time.process_time()
            try:
                summary = dict(stage.run(ctx) or {})
                missing = [rel for rel in stage.outputs if not (out / rel).is_file()]
                if missing:
                    raise ValueError(f"stage {stage.name!r} did not write its output(s) {missing}")
            except BaseException as err:
                seconds = time.perf_counter() - start
                manifest.forget(stage.name)
                what = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
                say(f"{tag}: {what} after {seconds:.1f} s: {type(err).__name__}: {err}")
                cpu = time.process_time() - cpu_start
                results.append(StageResult(stage.name, "failed", seconds, str(err), {}, cpu))
                raise
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            outputs = list(dict.fromkeys([*stage.outputs, *ctx.extra_outputs]))
            manifest.record(
                stage.name, key, outputs, seconds=seconds, cpu_seconds=cpu, summary=summary
            )
            summaries[stage.name] = summary
            say(f"{tag}: done in {seconds:.1f} s (CPU {cpu:.1f} s)")
            results.append(StageResult(stage.name, "ran", seconds, reason, summary, cpu))
    return results


def _short(summary: Mapping[str, Any], limit: int = 70) -> str:
    note = summary.get("note")
    if isinstance(note, str):
        return note if len(note) <= limit else note[: limit - 3] + "..."
    return ""


def format_stage_table(results: Sequence[StageResult]) -> str:
    """Plain-text table: stage, status, wall and CPU time, note (the stage's
    ``summary["note"]``), and a total line."""
    rows = [("stage", "status", "wall", "CPU", "note")]
    for r in results:
        status = {"cached": "skipped (cached)", "ran": "ran", "failed": "FAILED"}[r.status]
        timed = r.status != "cached"
        rows.append(
            (
                r.name,
                status,
                f"{r.seconds:.1f} s" if timed else "-",
                f"{r.cpu_seconds:.1f} s" if timed else "-",
                _short(r.summary),
            )
        )
    n_ran = sum(r.status == "ran" for r in results)
    wall = sum(r.seconds for r in results)
    cpu = sum(r.cpu_seconds for r in results)
    rows.append(("total", f"{n_ran} ran", f"{wall:.1f} s", f"{cpu:.1f} s", ""))
    widths = [max(len(row[c]) for row in rows) for c in range(5)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@dataclass(frozen=True)
class WorkflowRun:
    """The outcome of :func:`run_workflow`: per-stage results and where the outputs are."""

    name: str
    out_dir: Path
    results: list[StageResult]
    benchmark: bool = False

    @property
    def outputs(self) -> dict[str, Path]:
        """Named output paths (report, JSON, samples, plots folder; or the benchmark files)."""
        if self.benchmark:
            return {
                "benchmark.md": self.out_dir / "benchmark.md",
                "benchmark.json": self.out_dir / "benchmark.json",
            }
        return {
            "report.md": self.out_dir / "report.md",
            "report.json": self.out_dir / "report.json",
            "plots": self.out_dir / "analysis",
            "samples.h5": self.out_dir / "samples.h5",
        }

    @property
    def ran(self) -> list[str]:
        """Names of the stages that ran (not skipped)."""
        return [r.name for r in self.results if r.status == "ran"]


def run_workflow(
    workflow: Any,
    *,
    benchmark: bool = False,
    progress: bool = True,
    force: Sequence[str] = (),
    log: Callable[[str], None] | None = None,
) -> WorkflowRun:
    """Run a validated :class:`~boltzflow.workflow.spec.Workflow` (cached stage by stage).

    Args:
        workflow: from :func:`boltzflow.workflow.spec.load_workflow`.
        benchmark: run the benchmark stage instead of sampling + report.
        progress: progress bars.
        force: stage names to re-run even if cached.
        log: stage announcements (default: stdout).

    Torch's CPU thread count is set to ``workflow.threads`` (if > 0) while running and restored
    afterwards.
    """
    import torch

    from boltzflow.workflow.stages import build_stages

    stages = build_stages(workflow, benchmark=benchmark)
    previous = torch.get_num_threads()
    if workflow.threads:
        torch.set_num_threads(workflow.threads)
    try:
        results = run_stages(
            stages,
            workflow.output,
            workflow=workflow.name,
            progress=progress,
            force=force,
            log=log,
        )
    finally:
        torch.set_num_threads(previous)
    return WorkflowRun(workflow.name, Path(workflow.output), results, benchmark)
