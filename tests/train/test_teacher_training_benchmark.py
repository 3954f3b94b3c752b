"""The teacher-training speed benchmark runs, and every layout trains the same weights (the
compiled one the same as other compiled ones; here it is the only one)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_teacher_training_benchmark_smoke(reference_dir: Path, tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "benchmark_teacher_training", ROOT / "workflows/benchmark_teacher_training.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "speed.json"
    module.main(
        [
            "--profile", "smoke",
            "--data", str(reference_dir / "dem/train_split_DW4.npy"),
            "--steps", "6",
            "--repeats", "2",
            "--layouts", "1x0", "1x1", "1x0c",
            "--json", str(out),
        ]
    )  # fmt: skip
    saved = json.loads(out.read_text())
    assert [r["layout"] for r in saved["rows"]] == ["1x0", "1x1", "1x0c"]
    assert [r["compile"] for r in saved["rows"]] == [False, False, True]
    for r in saved["rows"]:
        assert r["same_weights"], r
        assert r["steps"] == 6 and len(r["steps_per_s_runs"]) == 2 and r["steps_per_s"] > 0
    assert saved["rows"][0]["speedup"] == 1.0
