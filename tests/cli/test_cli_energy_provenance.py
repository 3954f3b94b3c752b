"""Sample stores record what computed their ``u`` column, and ``reweight`` / ``estimate`` say
which energies they used: the stored column's producer, or the system that recomputed u."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_teacher import dw4_like_teacher

from boltzflow.analysis.reweight import sample_energies
from boltzflow.cli import main
from boltzflow.io.samples import SampleWriter, read_samples
from boltzflow.systems import load_system


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained DW4 teacher (2 RK4 steps)."""
    return dw4_like_teacher(tmp_path_factory.mktemp("teacher") / "t", {"method": "rk4", "steps": 2})


def _weights(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())["results"]["weights"]


def test_sample_records_the_energy_and_reweight_reports_it(teacher: Path, tmp_path: Path):
    s = tmp_path / "s.h5"
    assert main(["sample", str(teacher), "-n", "4", "-o", str(s)]) == 0
    energy = read_samples(s).provenance["energy"]
    assert energy["system"] == "dw4" and energy["backend"] == "analytic"
    for flag, expected in ((), "recomputed: dw4"), (("--use-stored-energy",), "stored column: dw4"):
        out = tmp_path / f"reweight{len(flag)}"
        assert main(["reweight", str(s), "--system", "dw4", "-o", str(out), *flag]) == 0
        assert _weights(out)["u"] == f"{expected}, analytic backend"
    spec = tmp_path / "spec.toml"
    spec.write_text(f'samples = "{s}"\nsystem = "dw4"\nrecompute_energy = false\n')
    assert main(["estimate", str(spec), "-o", str(tmp_path / "estimate")]) == 0
    estimate = json.loads((tmp_path / "estimate" / "estimate.json").read_text())
    assert estimate["results"]["weights"]["u"] == "stored column: dw4, analytic backend"
    none = tmp_path / "none.h5"
    assert main(["sample", str(teacher), "-n", "4", "-o", str(none), "--no-energy"]) == 0
    assert read_samples(none).provenance["energy"] is None


def test_stored_molecular_energies_name_their_backend(tmp_path: Path):
    openmm_aldp = load_system("aldp", backend="openmm", n_workers=0)
    torch_aldp = load_system("aldp")
    x = openmm_aldp.reference_configuration() + 0.01 * torch.randn(5, 66, dtype=torch.float64)
    u = openmm_aldp.energy(x)
    provenance = {"energy": openmm_aldp.energy_provenance()}
    with SampleWriter(tmp_path / "s.h5", dim=66, provenance=provenance) as writer:
        writer.append(x.numpy(), log_q=np.zeros(5), u=u.numpy())
    old = tmp_path / "old.h5"  # written before energy provenance existed
    with SampleWriter(old, dim=66, provenance={"seed": 0}) as writer:
        writer.append(x.numpy(), log_q=np.zeros(5), u=u.numpy())
    samples = read_samples(tmp_path / "s.h5")
    stored, record = sample_energies(samples, torch_aldp, recompute=False)
    assert torch.equal(stored, u)
    assert record["u"] == "stored column: aldp, openmm backend (platform Reference)"
    recomputed, record = sample_energies(samples, torch_aldp)
    assert record["u"] == "recomputed: aldp, torch backend (dtype float64, device input)"
    assert record["stored_u_max_abs_diff"] < 1e-9
    torch.testing.assert_close(recomputed, u, rtol=1e-10, atol=0)
    _, record = sample_energies(read_samples(old), torch_aldp, recompute=False)
    assert record["u"] == "stored column: not recorded"
    capped = load_system("aldp", energy_cap=100.0)
    _, record = sample_energies(samples, capped)
    assert record["u"].endswith("(dtype float64, device input, energy_cap 100.0 kT)")
