"""ALDP reweighting report from MD frames with a Gaussian-perturbation proposal.

Langevin MD (boltzflow.data.md, OpenMM) gives frames; the proposal is a mean-free Gaussian kernel
density (σ = 0.005 nm) around the even frames, so log q is exact; the odd frames are the
reference. The report must contain the Ramachandran and energy plots.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("openmm")
mdtraj = pytest.importorskip("mdtraj")

from boltzflow.cli import main  # noqa: E402
from boltzflow.io.samples import SampleWriter  # noqa: E402
from boltzflow.sampling.proposals import KernelDensityProposal  # noqa: E402
from boltzflow.systems import load_system  # noqa: E402


@pytest.fixture(scope="module")
def aldp_files(tmp_path_factory):
    from boltzflow.data.md import run_md

    tmp = tmp_path_factory.mktemp("aldp")
    with load_system("aldp") as system:
        md = run_md(
            system.openmm_system,
            system.reference_configuration(),
            temperature=system.temperature,
            n_frames=250,
            stride=40,
            burn_in=1000,
            platform="CPU",
            threads=1,
            progress=False,
            seed=0,
        )
    frames = md.positions
    prop = KernelDensityProposal(frames[::2], 0.005, n_particles=22, spatial_dim=3)
    x, log_q = prop.sample(300, seed=1)
    samples = tmp / "samples.h5"
    with SampleWriter(samples, dim=66, provenance={"proposal": "MD + N(0, 0.005 nm)"}) as w:
        w.append(x, log_q=log_q)
    np.save(tmp / "reference.npy", frames[1::2])
    return tmp, samples


def test_aldp_reweight_report_has_ramachandran_and_energy_plots(aldp_files, capsys):
    tmp, samples = aldp_files
    out = tmp / "report"
    code = main(
        [
            "reweight",
            str(samples),
            "--system",
            "aldp",
            "-o",
            str(out),
            "--reference",
            str(tmp / "reference.npy"),
            "--n-bootstrap",
            "30",
            "--trajectory",
            "dcd",
        ]
    )
    assert code == 0, capsys.readouterr().err
    md = (out / "report.md").read_text()
    assert "![Ramachandran](ramachandran.png)" in md
    assert "![energy histograms](energy_histograms.png)" in md
    for name in ("ramachandran.png", "energy_histograms.png", "profile_phi.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG" and (out / name).stat().st_size > 5000
    res = json.loads((out / "report.json").read_text())["results"]
    mol = res["molecular"]
    assert mol["chirality: D-form fraction, proposal"] == 0.0  # MD frames + tiny noise stay L
    assert mol["torus W2 (φ, ψ), proposal (rad)"] >= 0
    assert any(k.startswith("Ramachandran KL") for k in mol)
    assert res["weights"]["N"] == 300 and res["weights"]["ESS"] >= 1
    with load_system("aldp") as system:  # topology only, no OpenMM worker starts
        traj = mdtraj.load_dcd(str(out / "reweighted.dcd"), top=system.mdtraj_topology)
    assert traj.n_frames == 300 and traj.n_atoms == 22  # resampled by weight
