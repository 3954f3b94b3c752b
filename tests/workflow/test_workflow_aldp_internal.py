"""workflows/aldp_internal.toml: its settings, and the `smoke` profile end to end (seeded MD with
whole held-out segments -> internal-coordinate teacher and NF -> samples -> report with the
molecular section) followed by workflows/aldp_free_energy.py on the same run."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from boltzflow.data import read_dataset
from boltzflow.distill.nf_internal_train import ICNFRunConfig
from boltzflow.workflow import load_workflow
from boltzflow.workflow.stages import build_stages

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "workflows" / "aldp_internal.toml"
#: ΔF of the shipped umbrella/MBAR reference (kT), as its file states it
REFERENCE_DF = json.loads((ROOT / "workflows/reference/aldp_umbrella_profile.json").read_text())[
    "delta_f_kT"
]


def _script():
    spec = importlib.util.spec_from_file_location(
        "aldp_free_energy", ROOT / "workflows" / "aldp_free_energy.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.mark.parametrize("profile", [None, "smoke"])
def test_settings_reference_the_shared_configs(profile):
    wf = load_workflow(WORKFLOW, profile=profile)
    assert wf.system == "aldp" and wf.output == Path("runs/aldp_internal")
    assert wf.data.method == "md_seeded" and wf.data.holdout == "segments"
    assert wf.teacher.source == ROOT / "workflows/configs/teacher_aldp_internal.toml"
    assert wf.teacher.config.model.representation == "internal"
    nf = wf.students["nf"]
    assert nf.method == "nf_internal" and isinstance(nf.config, ICNFRunConfig)
    assert nf.source == ROOT / "workflows/configs/nf_aldp_internal.toml"
    assert wf.report.reference_profile == ROOT / "workflows/reference/aldp_umbrella_profile.json"
    assert wf.proposal_label == "nf"
    (fe,) = wf.estimates.free_energies
    assert fe["a"] == [{"feature": "phi", "min": 0.0, "max": 2.0}] and fe["b"] == "complement"
    deps = {s.name: s.deps for s in build_stages(wf)}
    assert deps["student-nf"] == ("data",)  # the NF learns from the frames, not the teacher
    if profile is None:  # the data of docs/benchmarks.md: 60 segments, 6 held out
        assert wf.data.n_train + wf.data.n_reference == 300_000
        assert wf.data.settings["n_seeds"] == 60 and wf.sample.n == 10_000
        assert nf.config.model.hidden == 128  # profile `ship` of the NF config


def test_smoke_profile_end_to_end_and_free_energy_script(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--workflow", str(WORKFLOW), "--profile", "smoke", "--output-run", str(out)]
    results = _script().main([*argv, "-n", "32", "--n-bootstrap", "20", "--md-blocks", "3"])

    # data: 300 frames in 5 segments, the held-out frames are one whole segment
    ref = read_dataset(out / "data/reference.h5")
    train = read_dataset(out / "data/train.h5")
    split = ref.attrs["provenance"]["split"]
    counts = split["frames_per_seed"]
    assert len(ref.positions) == sum(counts[i] for i in split["heldout_segments"]) > 0
    assert len(ref.positions) + len(train.positions) == 300 == sum(counts)
    assert ref.attrs["provenance"]["boltzmann_across_basins"] is False
    assert not list((out / "data/md_seeded").glob("seed-*.npz"))  # segments cleaned up

    report = json.loads((out / "report.json").read_text())
    rows = {r["label"]: r for r in report["models"]}
    assert list(rows) == ["teacher", "nf"]
    for label, row in rows.items():
        assert row["N"] == 64 and 0 < row["ESS/N"] <= 1, label
        for key in (
            "energy W2 reweighted (kT)",
            "torus W2 (φ, ψ) proposal (rad)",
            "torus W2 (φ, ψ) reweighted (rad)",
            "D-form fraction (proposal)",
        ):
            assert _finite(row[key]), (label, key)
        phi = row["φ"]
        assert phi["region"] == [0.0, 2.0]
        delta = phi["ΔF"]
        if "undefined" in delta:  # a state without weight is said, not hidden
            assert "zero weight" in delta["undefined"]
        else:
            d = delta["delta"]
            assert _finite(d["value"]) and _finite(d["ci_low"]) and _finite(d["ci_high"])
            assert _finite(phi["ΔF - reference"]["difference"])
        assert len(phi["profile"]["edges"][0]) == 37  # the reference's 36 bins
    mol = report["molecular"]
    assert mol["reference"]["label"] == "umbrella/MBAR reference"
    assert mol["reference"]["delta_f"]["value"] == pytest.approx(REFERENCE_DF)
    assert mol["held-out frames"]["boltzmann across basins"] is False
    for name in (
        "F(φ): reweighted models vs reference",
        "Ramachandran: held-out MD, teacher, reweighted",
        "Ramachandran: held-out MD, nf, reweighted",
    ):
        path = out / report["plots"][name]
        assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG", name
    md = (out / "report.md").read_text()
    assert "## Molecule: (φ, ψ), chirality and free energy along φ" in md
    n_reference = json.loads((ROOT / "workflows/reference/aldp_umbrella_profile.json").read_text())[
        "n_decorrelated"
    ]
    assert f"| umbrella/MBAR reference | {n_reference} |" in md
    assert "torus W2 (φ, ψ) (rad)" in md and "seeded MD" in md

    # the free-energy script on the NF (internal coordinates: no mirroring)
    assert results["student"] == "nf" and results["steps"] is None and results["n"] == 32
    assert results["representation"] == "internal"
    assert results["D-form fraction mirrored to L"] == 0.0
    assert 0 <= results["D-form fraction"] <= 1 and 0 < results["ESS/N"] <= 1
    assert results["ΔF reference"].value == pytest.approx(REFERENCE_DF)
    assert results["MD Boltzmann across basins"] is False
    assert "student - reference" in results
    saved = json.loads((out / "free_energy/free_energy.json").read_text())
    assert saved["profile φ, student"]["n"] == 32
    assert np.allclose(
        saved["profile φ, student"]["edges"][0][::12],
        [-math.pi, -math.pi / 3, math.pi / 3, math.pi],
    )
    text = capsys.readouterr().out
    assert "ALDP free energies: nf" in text and "not mirrored" in text
    assert (out / "free_energy/profile_phi.png").is_file()
