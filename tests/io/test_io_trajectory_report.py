"""mdtraj export (.dcd/.pdb/.h5) with resampling, and markdown + JSON reports."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from boltzflow.analysis.report import write_report
from boltzflow.analysis.trajectory import export_trajectory
from boltzflow.sampling import Estimate

mdtraj = pytest.importorskip("mdtraj")


@pytest.fixture
def aldp_pdb(reference_dir):
    return reference_dir / "aldp" / "alanine-dipeptide.pdb"


def _frames(pdb, n=20, seed=0):
    top = mdtraj.load(str(pdb))
    rng = np.random.default_rng(seed)
    x = top.xyz.reshape(1, -1).astype(np.float64) + 0.01 * rng.normal(size=(n, 66))
    return x


@pytest.mark.parametrize("suffix", [".dcd", ".pdb", ".h5"])
def test_export_round_trip(tmp_path, aldp_pdb, suffix):
    if suffix == ".h5":
        pytest.importorskip("tables", reason="mdtraj's HDF5 format needs PyTables")
    x = _frames(aldp_pdb)
    out = export_trajectory(tmp_path / f"t{suffix}", x, aldp_pdb)
    traj = mdtraj.load(str(out), top=str(aldp_pdb))
    assert traj.n_frames == 20 and traj.n_atoms == 22
    tol = 1.5e-3 if suffix == ".pdb" else 1e-5  # PDB stores 3 decimals in Å
    assert np.allclose(traj.xyz.reshape(20, -1), x, atol=tol)


def test_export_resampled_by_weight(tmp_path, aldp_pdb):
    x = _frames(aldp_pdb, n=5)
    log_w = torch.tensor([0.0, -math.inf, -math.inf, -math.inf, -math.inf])
    out = export_trajectory(tmp_path / "r.dcd", x, aldp_pdb, log_w=log_w, n_resample=7)
    traj = mdtraj.load(str(out), top=str(aldp_pdb))
    assert traj.n_frames == 7
    assert np.allclose(traj.xyz.reshape(7, -1), x[0], atol=1e-5)  # only frame 0 has weight
    with pytest.raises(ValueError, match="needs log_w"):
        export_trajectory(tmp_path / "r.dcd", x, aldp_pdb, n_resample=3)
    with pytest.raises(ValueError, match="unknown trajectory format"):
        export_trajectory(tmp_path / "r.xyz", x, aldp_pdb)
    with pytest.raises(ValueError, match=r"x must be \(N, 66\)"):
        export_trajectory(tmp_path / "r.dcd", x[:, :60], aldp_pdb)


def test_report_markdown_and_json(tmp_path):
    est = Estimate(1.5, 1.0, 2.0, 0.25, 100, 50.0, "delta")
    png = tmp_path / "plot.png"
    png.write_bytes(b"\x89PNG")
    md, js = write_report(
        tmp_path / "out",
        {
            "weights": {"N": 100, "ESS/N": 0.5, "log Z": est, "bad": math.nan},
            "arrays": {"a": np.arange(3)},
        },
        title="T",
        plots={"energy": png},
        notes=["seed 0"],
    )
    data = json.loads(js.read_text())
    assert data["results"]["weights"]["log Z"]["ci_high"] == 2.0
    assert data["results"]["weights"]["bad"] is None
    assert data["results"]["arrays"]["a"] == [0, 1, 2]
    text = md.read_text()
    assert "# T" in text and "| ESS/N | 0.5 |" in text and "1.5 [1, 2]" in text
    assert "![energy](../plot.png)" in text and "- seed 0" in text
