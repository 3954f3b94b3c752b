"""Molecular systems on both energy backends (torch force field, OpenMM pool): energies against
an independent OpenMM build, forces against finite differences, dtype/device handling,
regularisation, the three ALDP definitions. The agreement of the two backends with each other is
in test_energy_backends.py."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit

from boltzflow.constants import MOLAR_GAS_CONSTANT
from boltzflow.systems import load_system
from boltzflow.systems.molecular import MolecularSystem, build, regularise_energy
from boltzflow.systems.registry import BUILTIN_DIR, definition

ALDP = BUILTIN_DIR / "aldp"
VARIANTS = ["aldp", "aldp_vacuum", "aldp_ff96_obc1"]
BACKENDS = ["torch", "openmm"]
KT = MOLAR_GAS_CONSTANT * 300.0  # kJ/mol
# Reduced energies of the PDB configuration (OpenMM 8.6, Reference platform); see the report.
REFERENCE_ENERGY = {"aldp": -38.365532, "aldp_vacuum": -22.187345, "aldp_ff96_obc1": -55.723446}


def _expected_system(name: str) -> openmm.System:
    """The OpenMM system each definition should produce, built here without boltzflow."""
    pdb = app.PDBFile(str(ALDP / "alanine-dipeptide.pdb"))
    if name == "aldp":
        ff = app.ForceField("amber99sbildn.xml", "amber99_obc.xml")
        return ff.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff, constraints=None)
    if name == "aldp_vacuum":
        ff = app.ForceField("amber99sbildn.xml")
        return ff.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff, constraints=None)
    prmtop = app.AmberPrmtopFile(str(ALDP / "alanine-dipeptide.prmtop"))
    return prmtop.createSystem(
        implicitSolvent=app.OBC1, nonbondedMethod=app.NoCutoff, constraints=None
    )


def _openmm_reduced(
    system: openmm.System, x: np.ndarray, platform: str = "Reference"
) -> np.ndarray:
    """Potential energy / kT of flat ``(batch, 66)`` nm positions, one fresh context."""
    context = openmm.Context(
        system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName(platform)
    )
    out = []
    for row in x:
        context.setPositions(row.reshape(22, 3) * unit.nanometer)
        energy = context.getState(getEnergy=True).getPotentialEnergy()
        out.append(energy.value_in_unit(unit.kilojoule_per_mole) / KT)
    return np.array(out)


@pytest.fixture(scope="module", params=[(v, b) for v in VARIANTS for b in BACKENDS], ids="-".join)
def variant(request: pytest.FixtureRequest):
    name, backend = request.param
    # The definition's own settings (OpenMM: 1 worker process) with the backend chosen.
    system = load_system(name, backend=backend)
    yield name, system
    system.close()


def _perturbed(system: MolecularSystem, n: int = 8, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    noise = 0.01 * torch.randn(n - 1, system.dim, generator=gen, dtype=torch.float64)
    ref = system.reference_configuration()
    return torch.cat([ref, ref + noise])


def test_energy_matches_independent_openmm(variant):
    # Against the double-precision Reference platform, whatever platform the definition uses.
    name, system = variant
    assert system._pool is None  # the pool starts lazily
    x = _perturbed(system)
    got = system.energy(x)
    assert got.dtype == torch.float64 and got.shape == (8,)
    if system.backend == "openmm":
        assert system.pool.n_workers == 1 and len(system.pool.pids) == 1
    else:
        assert system._pool is None  # the torch backend never starts OpenMM
    expected = _openmm_reduced(_expected_system(name), x.numpy())
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=0)
    assert got[0].item() == pytest.approx(REFERENCE_ENERGY[name], rel=1e-6)


def test_float32_input(variant):
    name, system = variant
    x = _perturbed(system).float()
    got = system.energy(x)
    assert got.dtype == torch.float32
    # Expected at the same (float32-rounded) positions on the same platform; the output itself
    # is rounded to float32 (6e-8 relative).
    expected = _openmm_reduced(_expected_system(name), x.double().numpy(), system.platform_name)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", VARIANTS)
def test_forces_match_finite_differences(name: str, backend: str):
    # Reference platform or torch float64: double precision throughout, so differences of
    # energies 2e-6 nm apart are meaningful (the CPU platform's single-precision nonbonded terms
    # are not).
    system = load_system(name, backend=backend, platform="Reference", n_workers=0)
    x = _perturbed(system, n=3, seed=1)[1:]
    grad = -system.force(x)
    # Central differences, h = 1e-6 nm: the truncation error h^2 u'''/6 measured at about
    # 1e-8 relative, rounding about eps * |u| / h = 3e-8 kT/nm; the tolerance leaves a 30x margin
    # and still catches a wrong unit (factor kT = 2.49) or sign.
    h = 1e-6
    for k in (0, 13, 26, 31, 47, 65):
        step = torch.zeros(system.dim, dtype=torch.float64)
        step[k] = h
        fd = (system.energy(x + step) - system.energy(x - step)) / (2 * h)
        err = (fd - grad[:, k]).abs()
        assert (err <= 1e-6 * (1 + grad[:, k].abs())).all(), (k, fd, grad[:, k])


def test_autograd_dtypes_and_devices(variant, device, dtype):
    _, system = variant
    x = _perturbed(system, n=3).to(device=device, dtype=dtype).requires_grad_(True)
    u = system.energy(x)
    assert u.dtype == dtype and u.device == x.device and u.requires_grad
    (grad,) = torch.autograd.grad((u * torch.arange(1.0, 4.0, device=device, dtype=dtype)).sum(), x)
    assert grad.dtype == dtype and grad.device == x.device
    expected = -system.force(x.detach().double().cpu()) * torch.arange(1.0, 4.0)[:, None].double()
    torch.testing.assert_close(grad.double().cpu(), expected, rtol=1e-4, atol=1e-3)
    with torch.no_grad():
        assert not system.energy(x).requires_grad


def test_nonfinite_rows_and_empty_batch(variant):
    _, system = variant
    x = _perturbed(system, n=4)
    x[2, 5] = float("nan")
    before_nonfinite, before_failed = system.n_nonfinite, system.n_failed
    xg = x.clone().requires_grad_(True)
    u = system.energy(xg)
    u[torch.isfinite(u)].sum().backward()
    assert math.isinf(u[2].item()) and u[2].item() > 0
    assert torch.isfinite(u[[0, 1, 3]]).all()
    assert torch.isfinite(xg.grad).all() and not xg.grad[2].any()
    assert system.n_nonfinite == before_nonfinite + 1
    # Overlapping atoms with finite coordinates: +inf from the worker guard, counted.
    y = system.reference_configuration()
    y[0, 3:6] = y[0, 0:3]
    assert math.isinf(system.energy(y).item())
    assert system.n_failed >= before_failed + 1
    assert system.energy(torch.zeros(0, 66)).shape == (0,)


def test_reference_structure_and_topology(variant):
    name, system = variant
    ref = system.reference_configuration()
    assert ref.shape == (1, 66) and ref.dtype == torch.float64
    torch.testing.assert_close(ref.reshape(22, 3).mean(0), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(system.positions_nm, ref)
    assert system.mdtraj_topology.n_atoms == 22 and system.topology.getNumAtoms() == 22
    assert isinstance(system.openmm_system, openmm.System)
    assert system.openmm_system.getNumConstraints() == 0
    assert system.platform_name == ("CPU" if name == "aldp_ff96_obc1" else "Reference")
    assert system.phi_atoms == (4, 6, 8, 14) and system.psi_atoms == (6, 8, 14, 16)
    assert system.chirality_atoms == (8, 6, 14, 10) and system.l_form_sign == 1
    assert system.info.temperature == 300.0 and system.mean_free
    phi, psi = system.backbone_dihedrals(ref)
    assert phi.item() == pytest.approx(math.pi, abs=1e-2)  # the PDB is the extended form
    assert psi.item() == pytest.approx(math.pi, abs=1e-2)
    fixed, fraction = system.fix_chirality(torch.cat([ref, -ref]))
    assert fraction == 0.5 and torch.equal(fixed, torch.cat([ref, ref]))
    # Mirror images have the same energy (OpenMM's CustomGBForce, used for OBC1 from a prmtop,
    # differs by about 2e-6 kT between the two: summation order).
    u = system.energy(torch.cat([ref, -ref]))
    assert u[0].item() == pytest.approx(u[1].item(), rel=1e-6)


def test_close_and_restart():
    system = load_system("aldp_vacuum", backend="openmm", n_workers=2, threads=1)
    x = _perturbed(system, n=5)
    u = system.energy(x)
    pids = system.pool.pids
    assert len(pids) == 2
    system.close()
    assert system._pool is None
    torch.testing.assert_close(system.energy(x), u, rtol=0, atol=0)  # new pool, same numbers
    assert system.pool.pids != pids
    with system:
        pass
    assert system._pool is None


def test_in_process_and_cpu_platform():
    x = _perturbed(load_system("aldp_vacuum", n_workers=0), n=4)
    expected = _openmm_reduced(_expected_system("aldp_vacuum"), x.numpy())
    local = load_system("aldp_vacuum", backend="openmm", n_workers=0)
    np.testing.assert_allclose(local.energy(x).numpy(), expected, rtol=1e-12)
    assert local.pool.pids == []
    # The CPU platform computes nonbonded terms in single precision: measured 3e-7 relative.
    cpu = load_system("aldp", backend="openmm", platform="CPU", n_workers=0, threads=1)
    expected = _openmm_reduced(_expected_system("aldp"), x.numpy())
    np.testing.assert_allclose(cpu.energy(x).numpy(), expected, rtol=1e-5)
    assert cpu.platform_name == "CPU"


def test_energy_cap_regularises_above_the_cap():
    x = _perturbed(load_system("aldp_vacuum", n_workers=0), n=4)
    plain = load_system("aldp_vacuum", n_workers=0)
    cap = 100.0
    capped = load_system("aldp_vacuum", n_workers=0, energy_cap=cap)
    u, uc = plain.energy(x), capped.energy(x)
    above = u > cap
    assert above.sum() >= 2 and (~above).sum() >= 1  # the reference is below, noisy rows above
    torch.testing.assert_close(uc[~above], u[~above], rtol=0, atol=0)
    torch.testing.assert_close(uc[above], cap + torch.log1p(u[above] - cap), rtol=1e-12, atol=0)
    slope = 1.0 / (1.0 + (u[above] - cap))
    torch.testing.assert_close(capped.force(x)[above], plain.force(x)[above] * slope[:, None])
    u_reg, s = regularise_energy(np.array([0.0, 100.0, 101.0, np.inf]), 100.0)
    np.testing.assert_allclose(u_reg, [0.0, 100.0, 100.0 + math.log(2.0), np.inf])
    np.testing.assert_allclose(s, [1.0, 1.0, 0.5, 0.0])


def test_prmtop_order_matches_pdb_and_crd():
    prmtop = app.AmberPrmtopFile(str(ALDP / "alanine-dipeptide.prmtop"))
    pdb = app.PDBFile(str(ALDP / "alanine-dipeptide.pdb"))
    crd = app.AmberInpcrdFile(str(ALDP / "alanine-dipeptide.crd"))
    elements = [a.element.symbol for a in pdb.topology.atoms()]
    assert [a.element.symbol for a in prmtop.topology.atoms()] == elements
    a = np.asarray(pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    b = np.asarray(crd.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
    assert np.abs(a - b).max() < 1e-4  # the PDB rounds to 0.001 A


def test_definition_errors(tmp_path: Path):
    spec = definition("aldp_ff96_obc1")
    params = dict(spec["parameters"])
    with pytest.raises(ValueError, match="unknown parameters"):
        build(spec, {**params, "cutoff": 1.0}, BUILTIN_DIR)
    with pytest.raises(ValueError, match="exactly one"):
        build(spec, {**params, "forcefield": ["amber99sbildn.xml"]}, BUILTIN_DIR)
    with pytest.raises(ValueError, match="implicit_solvent"):
        build(spec, {**params, "implicit_solvent": "OBC3"}, BUILTIN_DIR)
    with pytest.raises(FileNotFoundError, match="structure"):
        build(spec, {**params, "structure": "aldp/missing.pdb"}, BUILTIN_DIR)
    with pytest.raises(TypeError, match="no parameter"):
        load_system("aldp", cutoff=1.0)
    # A structure whose atom order differs from the prmtop is refused.
    lines = (ALDP / "alanine-dipeptide.pdb").read_text().splitlines(keepends=True)
    atoms = [i for i, line in enumerate(lines) if line.startswith("ATOM")]
    lines[atoms[0]], lines[atoms[1]] = lines[atoms[1]], lines[atoms[0]]
    (tmp_path / "aldp").mkdir()
    (tmp_path / "aldp" / "alanine-dipeptide.pdb").write_text("".join(lines))
    (tmp_path / "aldp" / "alanine-dipeptide.prmtop").write_bytes(
        (ALDP / "alanine-dipeptide.prmtop").read_bytes()
    )
    with pytest.raises(ValueError, match="atom orders must match"):
        build(spec, params, tmp_path)
