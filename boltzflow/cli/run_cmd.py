"""``boltzflow run WORKFLOW.toml`` and ``boltzflow benchmark --workflow WORKFLOW.toml``.

    boltzflow run workflows/quickstart.toml [--profile gpu] [-o runs/qs] [--set sample.n=4000]
    boltzflow run workflows/quickstart.toml --check          # validate, data files too
    boltzflow run workflows/quickstart.toml --force teacher  # re-run a stage (and what follows)
    boltzflow benchmark --workflow workflows/quickstart.toml

The whole workflow file (and every file it names) is validated before any work starts. Each
stage is cached in the output folder (``manifest.json``): a second run skips finished stages,
and deleting an output or changing a setting re-runs only what depends on it.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["load_from_args", "print_outputs", "register"]


def _overrides(pairs: list[str] | None) -> dict[str, Any]:
    from boltzflow.workflow.spec import parse_assignment

    out: dict[str, Any] = {}
    for text in pairs or []:
        keys, value = parse_assignment(text)
        out[".".join(keys)] = value
    return out


def load_from_args(args: argparse.Namespace, path: str) -> Any:
    """The validated workflow named by the command line (profile, ``--set``, ``-o``), its output
    folder checked."""
    from boltzflow.io.outputs import check_output_dir
    from boltzflow.workflow.spec import load_workflow

    wf = load_workflow(
        path, profile=args.profile, overrides=_overrides(args.set), output=args.output
    )
    check_output_dir(wf.output)  # before any stage runs
    return wf


def print_outputs(run: Any) -> None:
    """The stage table, then where the outputs are."""
    from boltzflow.workflow.runner import format_stage_table

    print()
    print(format_stage_table(run.results))
    print()
    width = max(len(k) for k in run.outputs)
    for name, path in run.outputs.items():
        suffix = "/*.png" if name == "plots" else ""
        print(f"{name.ljust(width)}  {path}{suffix}")


def _check(args: argparse.Namespace, wf: Any) -> int:
    """``--check``: the workflow and its data files (shape, finite rows, complete) are valid."""
    from boltzflow.workflow.spec import check_data

    rows = check_data(wf)
    data = ", ".join(f"{key} {n} rows" for key, n in rows.items()) or "generated data"
    print(
        f"{args.workflow}: valid workflow {wf.name!r} for {wf.system}; {data}; output {wf.output}"
    )
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from boltzflow import distributed
    from boltzflow.workflow.pipeline import run_workflow

    wf = distributed.run_on_all(lambda: load_from_args(args, args.workflow))
    if args.check:
        return _check(args, wf) if distributed.is_main() else 0
    # under torchrun rank 0 owns the folder and the report; every rank trains and samples
    run = run_workflow(wf, progress=not args.no_progress, force=args.force or ())
    if not distributed.is_main():
        return 0
    report = run.out_dir / "report.json"
    if report.is_file():
        print()
        print(json.loads(report.read_text()).get("table_markdown", ""))
    print_outputs(run)
    return 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from boltzflow.workflow.pipeline import run_workflow

    wf = load_from_args(args, args.workflow)
    if args.check:
        return _check(args, wf)
    run = run_workflow(wf, benchmark=True, progress=not args.no_progress, force=args.force or ())
    data = json.loads((run.out_dir / "benchmark.json").read_text())
    settings = data.get("settings", {})
    print()
    print(f"{data['system']}: N = {settings.get('n')} samples per row, seed {settings.get('seed')}")
    print(data.get("table_markdown", ""))
    print_outputs(run)
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default=None, help="apply [profiles.NAME] of the workflow")
    p.add_argument("-o", "--output", default=None, help="output folder (default: the file's)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a key, e.g. --set sample.n=4000 (repeatable; VALUE is a TOML literal)",
    )
    p.add_argument("--force", action="append", metavar="STAGE", help="re-run this stage")
    p.add_argument(
        "--check", action="store_true", help="only validate the workflow and read its data files"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run a workflow TOML: data, teacher, students, samples, report (cached)",
        description="Run a workflow: data -> teacher -> students -> samples -> report. The file "
        "is validated first; finished stages are reused (output folder manifest.json).",
    )
    p.add_argument("workflow", help="workflow TOML file (e.g. workflows/quickstart.toml)")
    _common(p)
    p.set_defaults(func=_cmd_run, distributed=True)

    p = sub.add_parser(
        "benchmark",
        help="teacher vs students vs Euler baselines for a workflow",
        description="Run a workflow's data/teacher/student stages (cached) and benchmark them.",
    )
    p.add_argument("--workflow", required=True, help="workflow TOML file")
    _common(p)
    p.set_defaults(func=_cmd_benchmark)
