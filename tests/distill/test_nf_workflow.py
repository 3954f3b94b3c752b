"""The DW4 NF-distillation workflow end to end in its --quick form (slow: about a minute)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "nf_distillation_dw4.py"


@pytest.mark.slow
def test_quick_workflow_writes_the_table(tmp_path, reference_dir):
    spec = importlib.util.spec_from_file_location("nf_distillation_dw4", WORKFLOW)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dem = reference_dir / "dem"
    result = module.main(
        [
            "--quick",
            "-o",
            str(tmp_path),
            "--data",
            str(dem / "train_split_DW4.npy"),
            "--val",
            str(dem / "val_split_DW4.npy"),
        ]
    )
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["parameter_ratio"] >= 4
    assert set(saved["rows"]) == {"nf_teacher", "student_distilled", "student_scratch"}
    for row in saved["rows"].values():
        assert row["n_val"] == 10_000 and 0 < row["ess_fraction"] <= 1
    assert result["comparisons"]["distilled_minus_scratch"]["se"] >= 0
