"""Run a whole workflow: build its stage graph (:func:`boltzflow.workflow.stages.build_stages`)
and hand it to the stage engine (:func:`boltzflow.workflow.runner.run_stages`).

This sits above both so that neither the engine nor the stage definitions import the other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from boltzflow.workflow.runner import run_stages
from boltzflow.workflow.stage import StageResult

__all__ = ["WorkflowRun", "run_workflow"]


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

    # imported here so that ``import boltzflow.workflow`` stays free of torch
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
