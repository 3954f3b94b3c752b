"""``boltzflow demo``: the main job. Prints the systems table, samples and reweights the shipped
models (``models/showcase.toml``: ESS/N, samples per second and ΔF side by side, in well under a
minute; :mod:`boltzflow.workflow.showcase`), then runs the quickstart workflow
(``workflows/quickstart.toml``: DW4 data, teacher CNF, F2D2 and FALCON students, importance
sampling, report) into ``runs/quickstart`` and ends by printing where the report, the plots and
the samples are.

    boltzflow demo [-o runs/quickstart] [--workflow FILE] [--set KEY=VALUE ...] [--no-models]

A second ``boltzflow demo`` reuses every finished stage (see ``boltzflow run``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from boltzflow.cli.systems_cmd import format_table, systems_table

__all__ = ["QUICKSTART", "register"]

#: processes that sample the shipped models side by side (one torch thread each; fewer on a
#: machine with fewer cores)
SHOWCASE_WORKERS = 2
#: the demo's workflow, in the source checkout beside the package
QUICKSTART = Path(__file__).resolve().parents[2] / "workflows" / "quickstart.toml"


def _cmd_demo(args: argparse.Namespace) -> int:
    from boltzflow.cli.run_cmd import load_from_args, print_outputs
    from boltzflow.workflow.pipeline import run_workflow

    path = Path(args.workflow) if args.workflow else QUICKSTART
    if not path.is_file():
        raise FileNotFoundError(
            f"demo workflow not found: {path} (the demo runs from a source checkout; pass "
            "--workflow FILE)"
        )
    wf = load_from_args(args, str(path))  # validated before anything runs
    if not args.no_systems:
        print(format_table(systems_table()))
        print()
    if not args.no_models:
        _show_models(Path(wf.output) / "shipped_models")
    print(f"running {path.name}: {wf.description or wf.name} -> {wf.output}")
    run = run_workflow(wf, progress=not args.no_progress)
    report = run.out_dir / "report.json"
    print()
    print(json.loads(report.read_text()).get("table_markdown", ""))
    print_outputs(run)
    print(f"\nopen {run.out_dir / 'report.md'} for the full report")
    return 0


def _show_models(out_dir: Path) -> None:
    from boltzflow.workflow.showcase import SHOWCASE, run_showcase, showcase_table

    if not SHOWCASE.is_file():
        print(f"no shipped models to show ({SHOWCASE} not found)\n")
        return
    workers = max(1, min(SHOWCASE_WORKERS, os.cpu_count() or 1))
    print(
        f"shipped models ({SHOWCASE.parent}): sampling and reweighting, one CPU thread per "
        f"model, {workers} side by side"
    )
    start = time.perf_counter()
    rows = run_showcase(SHOWCASE, out_dir, progress=True, workers=workers)
    print()
    print(showcase_table(rows))
    print(
        f"({time.perf_counter() - start:.0f} s; samples/s: model work only, energies excluded; "
        f"figure {out_dir / 'shipped_models.png'}; each model's card gives ESS/N at larger N)\n"
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the quickstart workflow (DW4, a few minutes on a CPU) and show the report",
        description="Print the systems table, sample and reweight the shipped models "
        "(models/showcase.toml), run workflows/quickstart.toml (DW4: data, teacher, "
        "F2D2 and FALCON students, importance sampling) and show where the report, plots and "
        "samples are. Finished stages are reused on a second run.",
    )
    p.add_argument("--workflow", default=None, help=f"workflow TOML (default {QUICKSTART.name})")
    p.add_argument("-o", "--output", default=None, help="output folder (default runs/quickstart)")
    p.add_argument("--profile", default=None, help="apply [profiles.NAME] of the workflow")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override a workflow key (repeatable)"
    )
    p.add_argument("--no-systems", action="store_true", help="skip the systems table")
    p.add_argument(
        "--no-models", action="store_true", help="skip sampling the shipped models (models/)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)
