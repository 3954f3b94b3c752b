"""Workflows: one TOML file runs data -> teacher -> students -> samples -> report, cached.

- :mod:`~boltzflow.workflow.spec`: the TOML schema and its strict validation
  (:func:`load_workflow`): dataclasses with their defaults and checks, plus the file and feature
  checks of :mod:`~boltzflow.workflow.checks`;
- :mod:`~boltzflow.workflow.cache`: stage keys, content fingerprints, the manifest;
- :mod:`~boltzflow.workflow.stage`: the stage data types (:class:`Stage`, :class:`StageContext`,
  :class:`StageResult`);
- :mod:`~boltzflow.workflow.runner`: the stage engine (:func:`run_stages`);
- :mod:`~boltzflow.workflow.stages`: the stage graph of a workflow;
- :mod:`~boltzflow.workflow.pipeline`: :func:`run_workflow` (builds the stage graph and runs
  it);
- :mod:`~boltzflow.workflow.report` / :mod:`~boltzflow.workflow.benchmark`: the final report and
  the teacher-vs-students benchmark.

Example:
    >>> from boltzflow.workflow import load_workflow, run_workflow  # doctest: +SKIP
    >>> run = run_workflow(load_workflow("workflows/quickstart.toml"))  # doctest: +SKIP
    >>> run.outputs["report.md"]  # doctest: +SKIP
"""

from boltzflow.workflow.pipeline import WorkflowRun, run_workflow
from boltzflow.workflow.runner import format_stage_table, run_stages
from boltzflow.workflow.spec import Workflow, load_workflow
from boltzflow.workflow.stage import Stage, StageContext, StageResult

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
