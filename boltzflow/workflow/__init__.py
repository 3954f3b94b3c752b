"""Workflows: one TOML file runs data -> teacher -> students -> samples -> report, cached.

- :mod:`~boltzflow.workflow.spec`: the TOML schema and its strict validation
  (:func:`load_workflow`), with the table checks of :mod:`~boltzflow.workflow.checks`;
- :mod:`~boltzflow.workflow.cache`: stage keys, content fingerprints, the manifest;
- :mod:`~boltzflow.workflow.runner`: the stage engine (:func:`run_stages`) and
  :func:`run_workflow`;
- :mod:`~boltzflow.workflow.stages`: the stage graph of a workflow;
- :mod:`~boltzflow.workflow.report` / :mod:`~boltzflow.workflow.benchmark`: the final report and
  the teacher-vs-students benchmark.

Example:
    >>> from boltzflow.workflow import load_workflow, run_workflow  # doctest: +SKIP
    >>> run = run_workflow(load_workflow("workflows/quickstart.toml"))  # doctest: +SKIP
    >>> run.outputs["report.md"]  # doctest: +SKIP
"""

from boltzflow.workflow.runner import (
    Stage,
    StageContext,
    StageResult,
    WorkflowRun,
    format_stage_table,
    run_stages,
    run_workflow,
)
from boltzflow.workflow.spec import Workflow, load_workflow

__all__ = [
    "Stage",
    "StageContext",
    "StageResult",
    "Workflow",
    "WorkflowRun",
    "format_stage_table",
    "load_workflow",
    "run_stages",
    "run_workflow",
]
