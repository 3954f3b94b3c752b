"""LJ13 and ALDP workflows at tiny size (the `smoke` profiles), and the ALDP free-energy script."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from boltzflow.workflow import load_workflow, run_workflow

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location(
        "aldp_free_energy", ROOT / "workflows" / "aldp_free_energy.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lj13_smoke_profile_runs_end_to_end(tmp_path):
    wf = load_workflow(ROOT / "workflows" / "lj13.toml", profile="smoke", output=tmp_path / "lj13")
    run = run_workflow(wf, progress=False, log=lambda m: None)
    assert {r.status for r in run.results} == {"ran"}
    report = json.loads((tmp_path / "lj13" / "report.json").read_text())
    assert [r["label"] for r in report["models"]] == [
        "teacher",
        "f2d2-K1",
        "f2d2-K2",
        "falcon-K1",
        "falcon-K2",
    ]
    assert report["reference"]["N"] == 32
    for row in report["models"]:
        assert 0 < row["ESS/N"] <= 1 and row["N"] == 32


def test_aldp_smoke_workflow_and_free_energy_script(tmp_path, capsys):
    out = tmp_path / "aldp"
    results = _script().main(
        [
            "--workflow",
            str(ROOT / "workflows" / "aldp.toml"),
            "--profile",
            "smoke",
            "--output-run",
            str(out),
            "-n",
            "16",
            "--n-bootstrap",
            "20",
            "--md-blocks",
            "2",
            "--bins",
            "12",
        ]
    )
    for name in (
        "report.md",
        "report.json",
        "samples.h5",
        "free_energy/free_energy.json",
        "free_energy/free_energy.md",
        "free_energy/profile_phi.png",
    ):
        assert (out / name).is_file(), name
    assert results["student"] == "falcon" and results["steps"] == 4 and results["n"] == 16
    assert 0 <= results["D-form fraction mirrored to L"] <= 1
    assert 0 < results["ESS/N"] <= 1
    assert results["ΔF MD (block CI)"]["n"] == 16
    saved = json.loads((out / "free_energy/free_energy.json").read_text())
    assert saved["profile φ, student"]["n"] == 16
    assert "ALDP free energies" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert [r["label"] for r in report["models"]] == ["teacher", "f2d2-K1", "falcon-K1"]
