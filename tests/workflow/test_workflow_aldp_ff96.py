"""workflows/aldp_ff96_internal.toml (the FAB system, `aldp_ff96_obc1`): the same model configs
as workflows/aldp_internal.toml, data from seeded MD on the torch engine, and the `smoke` profile
end to end (hot run in OpenMM, segments on the torch force field, teacher and NF, report)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from boltzflow.cli import main
from boltzflow.data import read_dataset
from boltzflow.systems import load_system
from boltzflow.workflow import load_workflow

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "workflows" / "aldp_ff96_internal.toml"


@pytest.mark.parametrize("profile", [None, "smoke"])
def test_settings_share_the_aldp_configs(profile: str | None) -> None:
    wf = load_workflow(WORKFLOW, profile=profile)
    assert wf.system == "aldp_ff96_obc1" and wf.data.method == "md_seeded"
    assert wf.data.holdout == "segments" and wf.data.settings["engine"] == "torch"
    assert wf.teacher.source == ROOT / "workflows/configs/teacher_aldp_internal.toml"
    assert wf.teacher.config.system == "aldp_ff96_obc1"
    assert wf.teacher.config.model.representation == "internal"
    assert set(wf.students) == {"nf"} and wf.proposal_label == "nf"
    assert wf.students["nf"].source == ROOT / "workflows/configs/nf_aldp_internal.toml"
    assert wf.report.reference_profile is None  # no umbrella reference for this force field
    if profile is None:
        assert wf.data.n_train + wf.data.n_reference == 250_000
        assert wf.data.settings["n_seeds"] == 200 and wf.sample.n == 10_000


def test_smoke_profile_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["run", str(WORKFLOW), "--profile", "smoke", "-o", str(out)]
    assert main(argv) == 0
    train = read_dataset(out / "data" / "train.h5")
    stats = train.attrs["provenance"]["statistics"]
    assert stats["engine"] == "torch" and stats["platform"] == "CPU"
    with load_system("aldp_ff96_obc1") as system:  # the stored energies are the system's
        u = system.energy(torch.from_numpy(train.positions[:20])).numpy()
    np.testing.assert_allclose(u, train.energies[:20], rtol=0, atol=1e-8)
    report = json.loads((out / "report.json").read_text())
    ess = {row["label"]: row["ESS/N"] for row in report["models"]}
    assert set(ess) == {"teacher", "nf"} and all(0 < v <= 1 for v in ess.values())
    assert report["system"] == "aldp_ff96_obc1" and report["proposal"] == "nf"
