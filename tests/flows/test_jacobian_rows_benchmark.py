"""The row-chunk benchmark script runs, and every chunking gives the one-pass Jacobians."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_jacobian_rows_benchmark_smoke(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "benchmark_jacobian_rows", ROOT / "workflows/benchmark_jacobian_rows.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "rows.json"
    module.main(["--batch", "40", "--rows", "40", "16", "7", "--repeats", "1", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert [r["rows"] for r in saved["rows"]] == [40, 16, 7]
    for r in saved["rows"]:
        assert r["max_abs_diff"] < 1e-4, r  # float32: chunks change only the summation order
        assert r["trace_vjp_s"] > 0 and r["falcon_step_s"] > 0
