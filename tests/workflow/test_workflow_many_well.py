"""Many-Well-32 through the whole pipeline: log Z against the exact 164.696.

The slow test runs ``workflows/many_well_32.toml`` as shipped (MLP teacher trained on exact
samples; about 15 minutes on one core) and checks that the teacher's importance-sampling log Z
interval contains the exact value. The fast test runs the same stages at tiny size (``smoke``
profile) and checks the bookkeeping of the exact value.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from boltzflow.systems import load_system
from boltzflow.workflow import load_workflow, run_workflow

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "workflows" / "many_well_32.toml"
EXACT = 164.696


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def test_smoke_profile_reports_log_z_against_the_exact_value(tmp_path):
    wf = load_workflow(WORKFLOW, profile="smoke", output=tmp_path / "mw")
    assert wf.teacher.config.model.backbone == "mlp" and wf.data.method == "exact"
    run_workflow(wf, progress=False, log=lambda m: None)
    report = _report(tmp_path / "mw")
    assert report["exact log Z"] == pytest.approx(load_system("many_well_32").log_z, abs=0)
    assert abs(report["exact log Z"] - EXACT) < 5e-4
    labels = [r["label"] for r in report["models"]]
    assert labels == ["teacher", "f2d2-K1", "f2d2-K2", "falcon-K1", "falcon-K2"]
    for row in report["models"]:
        lz = row["estimates"]["log Z"]
        assert set(lz) == {"delta", "bootstrap"}
        for method, est in lz.items():
            inside = est["ci_low"] <= report["exact log Z"] <= est["ci_high"]
            assert row["exact log Z inside CI"][method] is inside
    assert f"exact {report['exact log Z']:.3f}" in report["table_markdown"]


@pytest.mark.slow
def test_many_well_32_workflow_log_z_within_its_ci(tmp_path):
    out = tmp_path / "many_well_32"
    run_workflow(load_workflow(WORKFLOW, output=out), progress=False)
    report = _report(out)
    teacher = report["models"][0]
    assert teacher["label"] == "teacher"
    for method in ("delta", "bootstrap"):
        est = teacher["estimates"]["log Z"][method]
        k = abs(est["value"] - EXACT) / est["stderr"]
        msg = (
            f"teacher log Z ({method}) = {est['value']:.4f} [{est['ci_low']:.4f}, "
            f"{est['ci_high']:.4f}], se {est['stderr']:.4f}: {k:.2f} standard errors from the "
            f"exact {EXACT} (ESS/N {teacher['ESS/N']:.3f}, N {teacher['N']})"
        )
        assert est["ci_low"] <= EXACT <= est["ci_high"], msg
        print(msg)
    # the first well's ΔF is known in closed form only numerically; the data's value must agree
    fe_ref = report["reference"]["estimates"]["ΔF x1 > 0 vs x1 < 0 (first well)"]["delta"]
    fe_t = teacher["estimates"]["ΔF x1 > 0 vs x1 < 0 (first well)"]["delta"]
    se = (fe_ref["stderr"] ** 2 + fe_t["stderr"] ** 2) ** 0.5
    assert abs(fe_t["value"] - fe_ref["value"]) < 4 * se, (fe_t, fe_ref)
