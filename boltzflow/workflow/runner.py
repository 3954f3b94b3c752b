"""Run a graph of cached stages: skip what is up to date, run the rest in dependency order.

A :class:`~boltzflow.workflow.stage.Stage` is a function with declared dependencies (other
stages), external input files, output files (relative to the output folder) and a JSON-able
configuration. :func:`run_stages` computes each stage's key
(:func:`boltzflow.workflow.cache.stage_key`) from its configuration and the current fingerprints
of everything it reads, skips it when the manifest shows the same key with intact outputs, and
otherwise runs it and records it. An interrupted run therefore resumes at the first unfinished
stage; training stages also resume inside their work folder.

Each stage announces itself on one line (``[3/7] teacher: running (not run yet)``) and shows its
own progress bars; :func:`format_stage_table` renders the final table.

The engine knows nothing of what a workflow's stages are: :mod:`boltzflow.workflow.pipeline`
builds them (:mod:`boltzflow.workflow.stages`) and hands them to :func:`run_stages`.

Under ``torchrun`` (several ranks) rank 0 owns the output folder: it holds the lock, decides
from the manifest which stages are up to date, prepares work folders, records results and
writes the log. It sends each decision to the other ranks (:func:`~boltzflow.distributed.
wait_group`, which waits as long as rank 0 works alone); they run the stages marked
``distributed`` (training, sampling) with it and skip the others, which rank 0 runs as a single
process (:func:`~boltzflow.distributed.alone`). Keys never depend on the number of processes,
so a folder made by one process is up to date for K and the other way round.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from boltzflow import distributed
from boltzflow.workflow.cache import (
    Manifest,
    file_fingerprint,
    prepare_workdir,
    run_lock,
    stage_key,
)
from boltzflow.workflow.stage import Stage, StageContext, StageResult

__all__ = ["format_stage_table", "run_stages"]


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
    me = distributed.info()
    main = me.is_main
    say = (log or (lambda msg: print(msg, flush=True))) if main else _silent
    out = Path(out_dir).absolute()  # stage outputs are recorded relative to this folder
    results: list[StageResult] = []
    group = distributed.wait_group() if me.distributed else None
    with run_lock(out) if main else contextlib.nullcontext():
        manifest = Manifest(out, workflow) if main else None
        summaries: dict[str, dict[str, Any]] = {}
        for i, stage in enumerate(order, 1):
            tag = f"[{i}/{len(order)}] {stage.name}"
            decision: dict[str, Any] | None = None
            if main:
                key = _key(stage, manifest)
                current, reason = manifest.current(stage.name, key)
                if stage.name in force:
                    current, reason = False, "forced"
                resumed = None
                if not current and stage.workdir is not None:
                    resumed = prepare_workdir(out / stage.workdir, key)
                decision = {"key": key, "current": current, "reason": reason, "resumed": resumed}
                if current:
                    rec = manifest.get(stage.name) or {}
                    summaries[stage.name] = dict(rec.get("summary", {}))
                decision["upstream"] = {d: summaries.get(d, {}) for d in stage.deps}
            if me.distributed:
                decision = distributed.broadcast_object(decision, group=group)
            key, current, reason = decision["key"], decision["current"], decision["reason"]
            resumed = decision["resumed"]
            if current:
                summary = summaries.get(stage.name, {})
                say(f"{tag}: up to date, skipped")
                results.append(StageResult(stage.name, "cached", 0.0, "up to date", summary))
                continue
            if not main and not stage.distributed:  # rank 0 runs it alone
                results.append(StageResult(stage.name, "ran", 0.0, "on rank 0", {}))
                continue
            say(
                f"{tag}: running ({reason})"
                + (f" - {stage.description}" if stage.description else "")
            )
            workdir = None if stage.workdir is None else out / stage.workdir
            ctx = StageContext(
                out_dir=out,
                stage=stage,
                key=key,
                workdir=workdir,
                resumed=bool(resumed),
                progress=progress,
                upstream=decision["upstream"],
            )
            start, cpu_start = time.perf_counter(), time.process_time()
            together = stage.distributed or not me.distributed
            try:
                with contextlib.nullcontext() if together else distributed.alone():
                    summary = dict(stage.run(ctx) or {})
                missing = [rel for rel in stage.outputs if not (out / rel).is_file()]
                if main and missing:
                    raise ValueError(f"stage {stage.name!r} did not write its output(s) {missing}")
            except BaseException as err:
                seconds = time.perf_counter() - start
                if main:
                    manifest.forget(stage.name)
                what = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
                say(f"{tag}: {what} after {seconds:.1f} s: {type(err).__name__}: {err}")
                cpu = time.process_time() - cpu_start
                results.append(StageResult(stage.name, "failed", seconds, str(err), {}, cpu))
                raise
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            outputs = list(dict.fromkeys([*stage.outputs, *ctx.extra_outputs]))
            if main:
                manifest.record(
                    stage.name, key, outputs, seconds=seconds, cpu_seconds=cpu, summary=summary
                )
            summaries[stage.name] = summary
            say(f"{tag}: done in {seconds:.1f} s (CPU {cpu:.1f} s)")
            results.append(StageResult(stage.name, "ran", seconds, reason, summary, cpu))
    return results


def _silent(msg: str) -> None:
    """The log of the ranks other than 0 (rank 0 writes it)."""


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
