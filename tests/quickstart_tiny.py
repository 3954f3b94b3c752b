"""The quickstart workflow shrunk to seconds, shared by the workflow and README tests.

Importable from any test module: pytest puts ``tests/`` on ``sys.path`` with its conftest.py.
"""

from __future__ import annotations

import json
from typing import Any

#: ``--set``-style overrides of workflows/quickstart.toml: same stages and code paths, tiny sizes
TINY = {
    "data.n_train": 64,
    "data.n_reference": 32,
    "data.settings": {"n_chains": 16, "burn_in": 20, "stride": 2},
    "teacher.model.hidden": 8,
    "teacher.model.layers": 1,
    "teacher.train": {
        "steps": 6,
        "batch_size": 16,
        "warmup_steps": 1,
        "log_every": 2,
        "checkpoint_every": 3,
    },
    "teacher.sample.atol": 1e-3,
    "teacher.sample.rtol": 1e-3,
    "students.f2d2.trajectories": {"n": 16, "grid": 2, "batch_size": 16},
    "students.f2d2.train": {
        "steps": 3,
        "batch_size": 8,
        "warmup_steps": 1,
        "log_every": 1,
        "checkpoint_every": 2,
    },
    "students.falcon.trajectories": {"n": 16, "grid": 2, "batch_size": 16},
    "students.falcon.train": {
        "steps": 3,
        "batch_size": 8,
        "warmup_steps": 1,
        "log_every": 1,
        "checkpoint_every": 2,
    },
    "sample.n": 48,
    "sample.steps": [1, 2],
    "report.proposal_steps": 2,
    "report.n_bootstrap": 20,
    "benchmark.steps": [1],
    "benchmark.n": 16,
    "benchmark.n_val": 8,
    "benchmark.n_check": 4,
}


def toml_literal(value: Any) -> str:
    """``value`` as a TOML literal (inline tables and arrays), for ``--set KEY=VALUE``."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    return json.dumps(value)


def set_args(overrides: dict[str, Any]) -> list[str]:
    """``["--set", "KEY=VALUE", ...]`` for the command line."""
    return [arg for k, v in overrides.items() for arg in ("--set", f"{k}={toml_literal(v)}")]
