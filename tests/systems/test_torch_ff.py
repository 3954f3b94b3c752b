"""The torch force field against OpenMM's Reference platform (double precision).

Every comparison puts each OpenMM force in its own force group (on a copy of the system), so a
mismatch is reported term by term: the failure message names the force whose energy or forces
differ. Tolerances are those of issue 25: energies within 1e-5 relative and forces within 1e-4
relative (norm of the difference over the norm) in float64, on configurations from short MD at
300 K and 600 K plus random perturbations of them.
"""

from __future__ import annotations

import copy
import functools
import math
import multiprocessing
import threading
from pathlib import Path

import numpy as np
import openmm
import pytest
import torch
from openmm import app, unit
from openmm.app.internal import customgbforces

from boltzflow.constants import kt_kj_per_mol
from boltzflow.systems import load_system, torch_ff
from boltzflow.systems.torch_ff import TorchForceField, compile_openmm_system

KJ = unit.kilojoule_per_mole
NM = unit.nanometer
ENERGY_RTOL = 1e-5
FORCE_RTOL = 1e-4
ALDP_SYSTEMS = ["aldp", "aldp_ff96_obc1", "aldp_vacuum"]


# -- OpenMM reference and the comparison -------------------------------------------------------
class _Reference:
    """OpenMM Reference-platform energies and forces, per force group on request."""

    def __init__(self, system: openmm.System) -> None:
        self.system = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(system))
        for k, force in enumerate(self.system.getForces()):
            force.setForceGroup(k)  # force k in group k (at most 32 forces)
        self.context = openmm.Context(
            self.system,
            openmm.VerletIntegrator(0.001),
            openmm.Platform.getPlatformByName("Reference"),
        )

    def evaluate(self, x: np.ndarray, group: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Energies ``(B,)`` kJ/mol and forces ``(B, dim)`` kJ/mol/nm of ``(B, dim)`` nm."""
        groups = -1 if group is None else {group}
        energies, forces = [], []
        for row in np.asarray(x, dtype=np.float64):
            self.context.setPositions(row.reshape(-1, 3))
            state = self.context.getState(getEnergy=True, getForces=True, groups=groups)
            energies.append(state.getPotentialEnergy().value_in_unit(KJ))
            forces.append(state.getForces(asNumpy=True).value_in_unit(KJ / NM).reshape(-1))
        return np.array(energies), np.array(forces)


def _relative_errors(
    e: np.ndarray, f: np.ndarray, e_ref: np.ndarray, f_ref: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    e_err = np.abs(e - e_ref) / np.abs(e_ref)
    f_err = np.linalg.norm(f - f_ref, axis=-1) / np.linalg.norm(f_ref, axis=-1)
    return e_err, f_err


def _term_report(
    ff: TorchForceField,
    reference: _Reference,
    x: torch.Tensor,
    energy_rtol: float,
    force_rtol: float,
) -> str:
    """One line per force for one configuration: torch vs OpenMM energy and force error,
    marked where that force alone is off by more than the tolerances."""
    lines = []
    ff = copy.deepcopy(ff).to(torch.float64)
    xg = x.detach().double().clone().requires_grad_(True)
    terms = ff.energy_terms(xg)
    for label, value in terms.items():
        (grad,) = torch.autograd.grad(value.sum(), xg, retain_graph=True)
        e_ref, f_ref = reference.evaluate(xg.detach().numpy(), ff.force_index[label])
        f = -grad.detach().numpy()
        e_err = abs(value.item() - e_ref[0]) / max(abs(e_ref[0]), 1e-300)
        f_err = np.linalg.norm(f - f_ref) / max(np.linalg.norm(f_ref), 1e-300)
        mark = "  <== differs" if e_err > energy_rtol or f_err > force_rtol else ""
        lines.append(
            f"  {label}: torch {value.item():.10g}, OpenMM {e_ref[0]:.10g} kJ/mol "
            f"(rel. error {e_err:.3g}); force rel. error {f_err:.3g}{mark}"
        )
    return "\n".join(lines)


def _assert_matches(
    ff: TorchForceField,
    system: openmm.System,
    x: torch.Tensor,
    what: str,
    energy_rtol: float = ENERGY_RTOL,
    force_rtol: float = FORCE_RTOL,
) -> tuple[float, float]:
    """Energies and forces of ``ff`` against OpenMM; returns the max relative errors."""
    reference = _Reference(system)
    e_ref, f_ref = reference.evaluate(x.numpy())
    e, f = ff.energy_and_forces(x)
    e_err, f_err = _relative_errors(
        e.double().numpy(), f.double().numpy(), e_ref, f_ref.reshape(len(x), -1)
    )
    bad = np.flatnonzero((e_err > energy_rtol) | (f_err > force_rtol))
    if bad.size:
        b = int(bad[0])
        raise AssertionError(
            f"{what}: {bad.size} of {len(x)} configurations differ from OpenMM (first: row {b}, "
            f"energy rel. error {e_err[b]:.3g} > {energy_rtol:g} or force rel. error "
            f"{f_err[b]:.3g} > {force_rtol:g}); per force, in {ff.dtype}:\n"
            + _term_report(ff, reference, x[b : b + 1], energy_rtol, force_rtol)
        )
    print(f"{what}: max rel. error energy {e_err.max():.2e}, forces {f_err.max():.2e}")
    return float(e_err.max()), float(f_err.max())


# -- configurations ----------------------------------------------------------------------------
def _md_frames(
    system: openmm.System, positions: np.ndarray, seed: int, steps: int = 300, every: int = 100
) -> np.ndarray:
    """Frames ``(2 * steps / every, dim)`` nm from Langevin MD at 300 K and at 600 K (1 fs)."""
    frames = []
    for temperature in (300.0, 600.0):
        integrator = openmm.LangevinMiddleIntegrator(
            temperature * unit.kelvin, 1.0 / unit.picosecond, 0.001 * unit.picoseconds
        )
        integrator.setRandomNumberSeed(seed)
        context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
        context.setPositions(positions)
        context.setVelocitiesToTemperature(temperature * unit.kelvin, seed)
        for _ in range(steps // every):
            integrator.step(every)
            state = context.getState(getPositions=True)
            frames.append(state.getPositions(asNumpy=True).value_in_unit(NM).reshape(-1))
    return np.array(frames)


def _configurations(system: openmm.System, positions: np.ndarray, seed: int) -> torch.Tensor:
    """The start, 6 MD frames (300 K and 600 K), and each frame perturbed by 0.005 and 0.02 nm."""
    frames = _md_frames(system, positions, seed)
    rng = np.random.default_rng(seed)
    noisy = [frames + sigma * rng.standard_normal(frames.shape) for sigma in (0.005, 0.02)]
    return torch.from_numpy(np.concatenate([positions.reshape(1, -1), frames, *noisy]))


@pytest.fixture(scope="module", params=ALDP_SYSTEMS)
def aldp(request: pytest.FixtureRequest):
    system = load_system(request.param, backend="openmm", n_workers=0)
    omm = system.openmm_system
    x = _configurations(omm, system.reference_configuration().numpy().reshape(-1, 3), seed=7)
    yield request.param, system, x
    system.close()


def _tetrapeptide() -> app.Modeller:
    """Leu-Ser-Asp-Glu, zwitterionic, from the first four residues of OpenMM's villin test.pdb.

    The C-terminal OXT is placed on the bisector opposite C's other neighbours (1.25 Å), all
    hydrogens are rebuilt by :meth:`Modeller.addHydrogens` (amber14 protonation at pH 7).
    """
    pdb = app.PDBFile(str(Path(openmm.__file__).parent / "app" / "data" / "test.pdb"))
    modeller = app.Modeller(pdb.topology, pdb.positions)
    residues = list(modeller.topology.residues())
    hydrogens = [a for a in modeller.topology.atoms() if a.element == app.element.hydrogen]
    modeller.delete(residues[4:] + hydrogens)
    pos = modeller.getPositions().value_in_unit(NM)
    pos = np.array([[p[0], p[1], p[2]] for p in pos])
    last = list(modeller.topology.residues())[-1]
    atoms = {a.name: a for a in last.atoms()}
    c, ca, o = (pos[atoms[name].index] for name in ("C", "CA", "O"))
    bisector = (c - ca) / np.linalg.norm(c - ca) + (c - o) / np.linalg.norm(c - o)
    oxt = modeller.topology.addAtom("OXT", app.element.oxygen, last)
    modeller.topology.addBond(atoms["C"], oxt)
    pos = np.vstack([pos, c + 0.125 * bisector / np.linalg.norm(bisector)])
    modeller.positions = unit.Quantity([openmm.Vec3(*p) for p in pos], NM)
    modeller.addHydrogens(app.ForceField("amber14-all.xml"))
    return modeller


@pytest.fixture(scope="module")
def peptide():
    modeller = _tetrapeptide()
    md_system = app.ForceField("amber99sbildn.xml", "amber99_obc.xml").createSystem(
        modeller.topology, nonbondedMethod=app.NoCutoff, constraints=None
    )
    context = openmm.Context(
        md_system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference")
    )
    context.setPositions(modeller.positions)
    openmm.LocalEnergyMinimizer.minimize(context, 10.0, 200)  # relax the rebuilt atoms
    start = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(NM)
    return modeller.topology, _configurations(md_system, start, seed=11)


# -- matches -----------------------------------------------------------------------------------
def test_aldp_matches_openmm_float64(aldp):
    name, system, x = aldp
    ff = compile_openmm_system(system.openmm_system)
    assert x.shape == (19, 66)
    _assert_matches(ff, system.openmm_system, x, f"{name} float64")


def test_aldp_float32(aldp):
    # float32 arithmetic: energies are sums of terms up to ~1e3 kJ/mol with float32 rounding
    # (6e-8) each; measured up to ~1e-6 relative. Checked at 1e-4 (energy) and 1e-3 (forces).
    name, system, x = aldp
    ff = compile_openmm_system(system.openmm_system, dtype=torch.float32)
    assert ff.energy(x).dtype == torch.float32
    _assert_matches(ff, system.openmm_system, x, f"{name} float32", 1e-4, 1e-3)


def test_reduced_energy_matches_molecular_system(aldp):
    _, system, x = aldp
    ff = compile_openmm_system(system.openmm_system, temperature=system.temperature)
    # The MolecularSystem runs on its definition's platform (CPU for aldp_ff96_obc1, whose
    # single-precision nonbonded terms agree with Reference to about 4e-7 relative).
    expected = system.energy(x[:5])
    torch.testing.assert_close(ff.reduced_energy(x[:5]), expected, rtol=2e-6, atol=0)
    torch.testing.assert_close(
        ff.reduced_energy(x[:5], 600.0), ff.energy(x[:5]) / kt_kj_per_mol(600.0)
    )


@pytest.mark.parametrize(
    "files",
    [
        ("amber14-all.xml", "implicit/obc2.xml"),
        ("amber14-all.xml", "implicit/obc1.xml"),
        ("amber14-all.xml", "implicit/hct.xml"),
        ("amber99sbildn.xml", "amber99_obc.xml"),
    ],
    ids=["amber14-obc2", "amber14-obc1", "amber14-hct", "amber99sbildn-gbsaobc"],
)
def test_tetrapeptide_matches_openmm(peptide, files):
    topology, x = peptide
    system = app.ForceField(*files).createSystem(
        topology, nonbondedMethod=app.NoCutoff, constraints=None
    )
    kinds = {type(f).__name__ for f in system.getForces()}
    assert kinds & {"CustomGBForce", "GBSAOBCForce"} and "CMMotionRemover" in kinds
    assert x.shape == (19, 3 * topology.getNumAtoms())
    _assert_matches(compile_openmm_system(system), system, x, f"tetrapeptide {files}")


def _tiny_system(n: int) -> openmm.System:
    system = openmm.System()
    for _ in range(n):
        system.addParticle(12.0)
    return system


def test_bonded_terms_with_arbitrary_phases():
    # Torsion phases other than 0 and pi fix the sign convention of the dihedral; ALDP's AMBER
    # torsions (phases 0 and pi only) would not see a flipped sign.
    rng = np.random.default_rng(0)
    system = _tiny_system(6)
    bonds, angles, torsions = (
        openmm.HarmonicBondForce(),
        openmm.HarmonicAngleForce(),
        openmm.PeriodicTorsionForce(),
    )
    for a in range(5):
        bonds.addBond(a, a + 1, 0.1 + 0.05 * rng.random(), 1e5 * rng.random())
    for a in range(4):
        angles.addAngle(a, a + 1, a + 2, 1.5 + rng.random(), 300 * rng.random())
    for a, n in zip(range(3), (1, 2, 3)):
        torsions.addTorsion(a, a + 1, a + 2, a + 3, n, 2 * math.pi * rng.random(), 5 + rng.random())
    torsions.addTorsion(0, 2, 3, 5, 4, 0.7, 3.0)
    for force in (bonds, angles, torsions):
        system.addForce(force)
    x = torch.from_numpy(0.3 * rng.standard_normal((16, 18)))
    _assert_matches(compile_openmm_system(system), system, x, "bonded terms")


def test_degenerate_bonded_geometry_as_openmm():
    # Coincident or collinear atoms: OpenMM's angle energy is NaN for an arm of zero length and
    # its forces are zero at exactly 0 or pi; a torsion with three atoms on a line has
    # phi = pi/2 and NaN forces. The torch terms reproduce each case, so that a molecular
    # system fails (or evaluates) such a configuration alike on both energy backends.
    system = _tiny_system(4)
    torsions, angles = openmm.PeriodicTorsionForce(), openmm.HarmonicAngleForce()
    torsions.addTorsion(0, 1, 2, 3, 3, 0.7, 5.0)
    torsions.addTorsion(0, 1, 2, 3, 1, 0.0, 2.0)
    angles.addAngle(0, 1, 2, 1.9, 300.0)
    system.addForce(torsions)
    system.addForce(angles)
    reference = _Reference(system)
    ff = compile_openmm_system(system)
    cases = {
        "atoms 0 and 1 coincide": [[0, 0, 0], [0, 0, 0], [0.1, 0, 0], [0.1, 0.1, 0]],
        "atoms 1 and 2 coincide": [[0, 0.1, 0], [0, 0, 0], [0, 0, 0], [0.1, 0.1, 0.05]],
        "atoms 2 and 3 coincide": [[0, 0.1, 0], [0, 0, 0], [0.1, 0, 0], [0.1, 0, 0]],
        "angle 0-1-2 at pi": [[-0.1, 0, 0], [0, 0, 0], [0.1, 0, 0], [0.1, 0.1, 0]],
        "angle 0-1-2 at 0": [[0.2, 0, 0], [0, 0, 0], [0.1, 0, 0], [0.1, 0.1, 0]],
        "regular": [[0, 0.1, 0.02], [0, 0, 0], [0.1, 0, 0], [0.1, 0.1, 0.05]],
    }
    x = torch.tensor(list(cases.values()), dtype=torch.float64).reshape(len(cases), 12)
    for label, k in ff.force_index.items():
        e_ref, f_ref = reference.evaluate(x.numpy(), k)
        xg = x.clone().requires_grad_(True)
        e = ff.energy_terms(xg)[label]
        (grad,) = torch.autograd.grad(e.sum(), xg)
        for row, case in enumerate(cases):
            what = f"{label}, {case}"
            if math.isnan(e_ref[row]):
                assert math.isnan(e[row].item()), what
                continue
            assert e[row].item() == pytest.approx(e_ref[row], rel=1e-12), what
            finite = np.isfinite(f_ref[row]).all()
            assert bool(torch.isfinite(grad[row]).all()) == finite, what
            if finite:
                np.testing.assert_allclose(-grad[row].numpy(), f_ref[row], atol=1e-9, err_msg=what)


def test_nonbonded_exceptions_and_buried_gb_atoms():
    # Exceptions: excluded (0, 0), scaled, and one that adds LJ to an uncharged pair; GBSA
    # with a large scale factor so that one atom lies inside another's descreening sphere
    # (the "buried" branch of OpenMM's OBC code, which ALDP never reaches).
    rng = np.random.default_rng(1)
    n = 5
    system = _tiny_system(n)
    nonbonded, gbsa = openmm.NonbondedForce(), openmm.GBSAOBCForce()
    nonbonded.setNonbondedMethod(openmm.NonbondedForce.NoCutoff)
    charges = [0.5, -0.4, 0.0, 0.3, -0.4]
    for a in range(n):
        nonbonded.addParticle(charges[a], 0.25 + 0.1 * rng.random(), 0.5 * rng.random())
        gbsa.addParticle(charges[a], 0.12 + 0.08 * rng.random(), 0.7 if a else 2.5)
    nonbonded.addException(0, 1, 0.0, 1.0, 0.0)
    nonbonded.addException(1, 3, 0.5 * (-0.4 * 0.3), 0.3, 0.2)
    nonbonded.addException(2, 4, 0.0, 0.28, 0.4)
    system.addForce(nonbonded)
    system.addForce(gbsa)
    x = torch.from_numpy(0.35 * rng.standard_normal((32, 3 * n)))
    x[:, 3:6] = x[:, 0:3] + 0.05 * torch.from_numpy(rng.standard_normal((32, 3)))  # 1 near 0
    ff = compile_openmm_system(system)
    gb = ff.terms["force 1 (GBSAOBCForce)"]
    r = torch.linalg.vector_norm(x[:, 3:6] - x[:, 0:3], dim=-1)
    assert bool((gb.rho_ji[0] < gb.s_ji[0] - r).any())  # atom 1 buried in atom 0's sphere
    _assert_matches(ff, system, x, "nonbonded + buried GBSA")


@pytest.mark.parametrize("model", ["GBSAHCTForce", "GBSAOBC1Force", "GBSAOBC2Force"])
@pytest.mark.parametrize("sa", [None, "ACE"])
def test_custom_gb_forms(model: str, sa: str | None):
    rng = np.random.default_rng(2)
    n = 6
    system = _tiny_system(n)
    force = getattr(customgbforces, model)(solventDielectric=80.0, soluteDielectric=2.0, SA=sa)
    for _ in range(n):
        radius = 0.12 + 0.07 * rng.random()
        force.addParticle([rng.uniform(-0.6, 0.6), radius, 0.7 + 0.2 * rng.random()])
    force.finalize()
    system.addForce(force)
    x = torch.from_numpy(0.3 * rng.standard_normal((16, 3 * n)))
    _assert_matches(compile_openmm_system(system), system, x, f"{model} SA={sa}")


def test_a_mismatch_names_the_force():
    system = _aldp_system()
    ff = compile_openmm_system(system)
    ff.terms["force 1 (PeriodicTorsionForce)"].k.mul_(1.001)  # a wrong parameter
    x = _aldp_xml("aldp")[1]
    with pytest.raises(AssertionError) as failure:
        _assert_matches(ff, system, x, "tampered")
    lines = [line for line in str(failure.value).splitlines() if "<== differs" in line]
    assert len(lines) == 1 and "force 1 (PeriodicTorsionForce)" in lines[0]


# -- refusals ----------------------------------------------------------------------------------
@functools.cache
def _aldp_xml(name: str) -> tuple[str, torch.Tensor]:
    system = load_system(name, n_workers=0)
    return openmm.XmlSerializer.serialize(system.openmm_system), system.reference_configuration()


def _aldp_system(name: str = "aldp") -> openmm.System:
    """A fresh copy of a registered ALDP system's ``openmm.System`` (free to modify)."""
    return openmm.XmlSerializer.deserialize(_aldp_xml(name)[0])


def test_unsupported_force_is_named():
    system = _aldp_system()
    custom = openmm.CustomBondForce("k*r^2")
    custom.addGlobalParameter("k", 1.0)
    custom.setName("my restraint")
    system.addForce(custom)
    index = system.getNumForces() - 1
    with pytest.raises(ValueError, match=rf"force {index} \(CustomBondForce 'my restraint'\)"):
        compile_openmm_system(system)


def test_cutoff_and_periodic_settings_are_refused():
    system = _aldp_system()
    nonbonded = next(f for f in system.getForces() if isinstance(f, openmm.NonbondedForce))
    nonbonded.setNonbondedMethod(openmm.NonbondedForce.CutoffNonPeriodic)
    with pytest.raises(ValueError, match=r"NonbondedForce\).*NoCutoff"):
        compile_openmm_system(system)
    system = _aldp_system()
    gbsa = next(f for f in system.getForces() if isinstance(f, openmm.GBSAOBCForce))
    gbsa.setNonbondedMethod(openmm.GBSAOBCForce.CutoffNonPeriodic)
    with pytest.raises(ValueError, match=r"GBSAOBCForce\).*NoCutoff"):
        compile_openmm_system(system)
    system = _aldp_system()
    bonds = next(f for f in system.getForces() if isinstance(f, openmm.HarmonicBondForce))
    bonds.setUsesPeriodicBoundaryConditions(True)
    with pytest.raises(ValueError, match=r"HarmonicBondForce\).*periodic"):
        compile_openmm_system(system)


def test_unrecognised_custom_gb_expressions_are_refused():
    def custom_gb(system: openmm.System) -> openmm.CustomGBForce:
        return next(f for f in system.getForces() if isinstance(f, openmm.CustomGBForce))

    system = _aldp_system("aldp_ff96_obc1")
    force = custom_gb(system)
    name, expression, kind = force.getComputedValueParameters(1)
    force.setComputedValueParameters(1, name, expression.replace("0.8*psi", "0.9*psi"), kind)
    with pytest.raises(ValueError, match=r"force \d+ \(CustomGBForce\).*Born radius"):
        compile_openmm_system(system)
    system = _aldp_system("aldp_ff96_obc1")
    force = custom_gb(system)
    expression, kind = force.getEnergyTermParameters(2)
    force.setEnergyTermParameters(2, expression, openmm.CustomGBForce.ParticlePair)
    with pytest.raises(ValueError, match=r"CustomGBForce\).*energy term 2"):
        compile_openmm_system(system)
    # Salt screening (kappa > 0) and the GBn model have other functional forms.
    for force in (
        customgbforces.GBSAOBC1Force(kappa=1.0),
        customgbforces.GBSAGBnForce(),
    ):
        system = _tiny_system(1)
        force.addParticle([0.1, 0.15, 0.8])
        force.finalize()
        system.addForce(force)
        with pytest.raises(ValueError, match=r"force 0 \(CustomGBForce\)"):
            compile_openmm_system(system)


def test_virtual_sites_and_bad_arguments_are_refused():
    system = _tiny_system(3)
    system.setVirtualSite(2, openmm.TwoParticleAverageSite(0, 1, 0.5, 0.5))
    with pytest.raises(ValueError, match="virtual site"):
        compile_openmm_system(system)
    with pytest.raises(ValueError, match="dtype"):
        compile_openmm_system(_tiny_system(2), dtype=torch.float16)
    ff = compile_openmm_system(_tiny_system(2))
    with pytest.raises(ValueError, match=r"shape \(batch, 6\)"):
        ff.energy(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="chunk_size"):
        ff.energy(torch.zeros(3, 6), chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        ff.reduced_energy(torch.zeros(3, 6))


# -- batching, dtypes, devices, autograd ---------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_chunking_gives_identical_results(aldp, dtype):
    # Bit for bit: every pass is padded so that no real row falls in a scalar loop tail.
    name, system, x = aldp
    ff = compile_openmm_system(system.openmm_system, dtype=dtype)
    x = x.repeat(3, 1) + 1e-3 * torch.randn(3 * len(x), 66, dtype=torch.float64)
    whole_e, whole_f = ff.energy_and_forces(x, chunk_size=len(x))
    for chunk in (1, 5, 16, 17, None):
        e, f = ff.energy_and_forces(x, chunk_size=chunk)
        assert torch.equal(e, whole_e) and torch.equal(f, whole_f), (name, chunk)
        assert torch.equal(ff.energy(x, chunk_size=chunk), whole_e), (name, chunk)
    assert torch.equal(ff.energy(x[3:4]), whole_e[3:4])
    terms = ff.energy_terms(x, chunk_size=7)
    assert torch.equal(sum(terms.values()), whole_e)  # same terms, same order of summation
    assert ff.energy(x[:0]).shape == (0,)
    assert ff.energy_and_forces(x[:0])[1].shape == (0, 66)


def test_autograd_and_devices(device, dtype):
    system = _aldp_system()
    ff = compile_openmm_system(system, dtype=dtype, device=device)
    assert ff.dtype == dtype and ff.device.type == device.type
    x = (_aldp_xml("aldp")[1] + 0.01 * torch.randn(4, 66, dtype=torch.float64)).to(
        device=device, dtype=dtype
    )
    xg = x.clone().requires_grad_(True)
    e = ff(xg)
    assert e.shape == (4,) and e.dtype == dtype and e.device == x.device and e.requires_grad
    (grad,) = torch.autograd.grad(e.sum(), xg, create_graph=True)
    torch.testing.assert_close(-grad.detach(), ff.forces(x), rtol=1e-5, atol=1e-3)
    # Second order: a Hessian-vector product exists (e.g. for force matching losses).
    (hvp,) = torch.autograd.grad((grad * torch.ones_like(grad)).sum(), xg)
    assert torch.isfinite(hvp).all()
    # float64 input into a float32 field (or the reverse) is converted.
    assert ff.energy(x.double()).dtype == dtype
    # Moved to float64, the field computes in float64 (from float32-rounded parameters).
    ref = compile_openmm_system(system).energy(x.double().cpu())
    moved = ff.to(torch.float64).energy(x.double())
    assert moved.dtype == torch.float64
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(moved.cpu(), ref, rtol=rtol, atol=0)


def test_cmmotionremover_is_ignored():
    system = _aldp_system("aldp_vacuum")
    ff = compile_openmm_system(system)
    system.addForce(openmm.CMMotionRemover())
    ff_with = compile_openmm_system(system)
    assert list(ff_with.terms) == list(ff.terms)
    x = _aldp_xml("aldp_vacuum")[1]
    assert torch.equal(ff_with.energy(x), ff.energy(x))


def test_compiled_matches_eager():
    # In the default suite although compiling takes about 40 s here (three graphs): the
    # compiled path is the fast one, and it leans on inductor's C++ wrapper and SIMD settings.
    system = load_system("aldp", n_workers=0)
    x = system.reference_configuration() + 0.02 * torch.randn(300, 66, dtype=torch.float64)
    eager = compile_openmm_system(system.openmm_system, chunk_size=128)
    compiled = compile_openmm_system(system.openmm_system, chunk_size=128, compiled=True)
    torch.testing.assert_close(compiled.energy(x), eager.energy(x), rtol=1e-12, atol=1e-9)
    e, f = compiled.energy_and_forces(x)
    e_ref, f_ref = eager.energy_and_forces(x)
    torch.testing.assert_close(e, e_ref, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(f, f_ref, rtol=1e-10, atol=1e-8)
    # Compiled chunks run one per thread: the thread count changes no bit, and a graph
    # through the compiled energy (built in the calling thread) gives the same forces.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        e_one, f_one = compiled.energy_and_forces(x)
        torch.set_num_threads(2)
        e_two, f_two = compiled.energy_and_forces(x)
        assert torch.equal(compiled.energy(x), e_two)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(e_one, e_two) and torch.equal(f_one, f_two)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(compiled.energy(xg).sum(), xg)
    torch.testing.assert_close(-grad, f_ref, rtol=1e-10, atol=1e-8)
    # A copy, or a move to another dtype, compiles its own graph (not the original's).
    twin = copy.deepcopy(compiled)
    assert twin._compiled_total is None and compiled._compiled_total is not None
    single = copy.deepcopy(compiled).to(torch.float32)
    assert single._compiled_total is None and not single._compiled_keys
    torch.testing.assert_close(single.energy(x), e_ref.float(), rtol=1e-4, atol=1e-3)


def test_compiled_chunks_run_in_threads_in_order_and_errors_propagate():
    # The thread pool of compiled CPU chunks (no compilation happens: fn is plain Python).
    ff = compile_openmm_system(_aldp_system("aldp_vacuum"), compiled=True)
    chunks = [torch.full((3, 1), float(k)) for k in range(9)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        seen: set[str] = set()

        def tag(chunk: torch.Tensor) -> float:
            seen.add(threading.current_thread().name)
            return float(chunk[0, 0])

        assert ff._map_chunks(tag, iter(chunks), ("test", 1)) == list(range(9))
        assert any(name.startswith("boltzflow-ff") for name in seen)

        def fail_on_five(chunk: torch.Tensor) -> float:
            if chunk[0, 0] == 5:
                raise ValueError("chunk five")
            return float(chunk[0, 0])

        with pytest.raises(ValueError, match="chunk five"):
            ff._map_chunks(fail_on_five, iter(chunks), ("test", 1))
    finally:
        torch.set_num_threads(threads)


def test_forked_child_makes_its_own_chunk_pool():
    torch_ff._chunk_pool(2)
    assert torch_ff._POOL is not None
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        assert pool.apply(_pool_is_unset) is True


def _pool_is_unset() -> bool:
    return torch_ff._POOL is None


def test_compiled_on_cpu_without_a_compiler_is_refused_up_front(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++ / clang++ there
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ValueError, match="needs a C\\+\\+ compiler on PATH"):
        compile_openmm_system(_aldp_system("aldp_vacuum"), compiled=True)
    assert not compile_openmm_system(_aldp_system("aldp_vacuum")).compiled
