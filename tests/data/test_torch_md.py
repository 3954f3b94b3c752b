"""Batched Langevin dynamics on the torch force field (:mod:`boltzflow.data.torch_md`).

Two checks with exact answers: without friction the scheme is OpenMM's LangevinMiddleIntegrator
step for step (same trajectory to round-off), and for a harmonic potential its configurations
are exactly Boltzmann at a time step where ω·dt = 1 (BAOAB's property; velocity Verlet with the
thermostat around the whole step, OBABO, has <U> too high by the factor 1 / (1 − (ω dt / 2)²),
4/3, there: 2 kT instead of 1.5 kT for a 3-D oscillator).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import openmm
import pytest
import torch
from openmm import unit

from boltzflow.constants import kt_kj_per_mol
from boltzflow.data import generate
from boltzflow.data.torch_md import maxwell_boltzmann, particle_masses, run_langevin
from boltzflow.systems import load_system
from boltzflow.systems.torch_ff import compile_openmm_system


def test_without_friction_the_trajectory_is_openmms() -> None:
    with load_system("aldp_vacuum", backend="torch") as aldp:
        omm = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(aldp.openmm_system))
        x0 = aldp.reference_configuration().double()
    for i in reversed(range(omm.getNumForces())):  # OpenMM would also zero the momentum
        if isinstance(omm.getForce(i), openmm.CMMotionRemover):
            omm.removeForce(i)
    ff = compile_openmm_system(omm, temperature=300.0)
    masses = particle_masses(omm)
    v0 = maxwell_boltzmann(masses, 300.0, 1, generator=torch.Generator().manual_seed(1))
    run = run_langevin(
        ff.energy_and_forces, masses, x0, temperature=300.0, n_frames=3, stride=20,
        friction_per_ps=0.0, velocities=v0,
    )  # fmt: skip
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 0.0, 1 * unit.femtosecond)
    context = openmm.Context(omm, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(x0.numpy().reshape(-1, 3) * unit.nanometer)
    context.setVelocities(v0.numpy().reshape(-1, 3) * unit.nanometer / unit.picosecond)
    for frame in range(3):
        integrator.step(20)
        state = context.getState(getPositions=True, getEnergy=True)
        x = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer).ravel()
        np.testing.assert_allclose(run.positions[0, frame], x, rtol=0, atol=1e-12)
        e = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
        assert run.energies_kj[0, frame] == pytest.approx(e, abs=1e-8)


def test_harmonic_configurations_are_exactly_boltzmann_at_a_large_step() -> None:
    # Two 1-amu particles joined by a zero-length harmonic bond: the relative coordinate is an
    # isotropic 3-D oscillator, <U> = 3/2 kT exactly; ω = sqrt(k/μ) = 1000/ps, so ω dt = 1.
    omm = openmm.System()
    omm.addParticle(1.0)
    omm.addParticle(1.0)
    bond = openmm.HarmonicBondForce()
    bond.addBond(0, 1, 0.0, 0.5 * 1000.0**2)
    omm.addForce(bond)
    ff = compile_openmm_system(omm, temperature=300.0)
    replicas = 400
    x0 = torch.zeros(replicas, 6, dtype=torch.float64)
    x0[:, 3] = 0.01
    run = run_langevin(
        ff.energy_and_forces, particle_masses(omm), x0, temperature=300.0, n_frames=200, stride=10,
        burn_in=500, timestep_fs=1.0, friction_per_ps=50.0, seed=3,
    )  # fmt: skip
    u = run.energies_kj / kt_kj_per_mol(300.0)
    per_replica = u.mean(axis=1)  # replicas are independent: their means give the error
    se = per_replica.std(ddof=1) / np.sqrt(replicas)
    assert abs(per_replica.mean() - 1.5) < 4 * se, (per_replica.mean(), se)
    assert se < 0.02  # sharp: OBABO would give 2.0


def test_blow_up_names_the_replica_and_bad_input_is_refused() -> None:
    def force_fn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        energy = x.pow(2).sum(1)
        energy[1] = float("nan") if bool((x.abs() > 0.5).any()) else energy[1]
        return energy, -2 * x

    kwargs: dict[str, Any] = {"temperature": 300.0, "n_frames": 2, "stride": 5}
    x0 = torch.zeros(2, 3, dtype=torch.float64)
    x0[1] = 1.0
    with pytest.raises(RuntimeError, match=r"replica\(s\) \[1\]"):
        run_langevin(force_fn, torch.ones(1), x0, **kwargs)
    with pytest.raises(ValueError, match="positive mass"):
        run_langevin(force_fn, torch.zeros(1), x0, **kwargs)
    with pytest.raises(ValueError, match="3 coordinates, masses 2 atoms"):
        run_langevin(force_fn, torch.ones(2), x0, **kwargs)
    with pytest.raises(ValueError, match="stride"):
        run_langevin(force_fn, torch.ones(1), x0, **{**kwargs, "stride": 0})


def test_seeded_md_with_the_torch_engine() -> None:
    settings: dict[str, Any] = {
        "n_seeds": 4, "basin_fraction": 0.5, "hot_temperature": 1000.0, "hot_burn_in": 1000,
        "hot_frames": 150, "hot_stride": 200, "burn_in": 200, "stride": 20, "workers": 0,
    }  # fmt: skip
    x, u, prov = generate(
        "aldp_vacuum", 42, seed=0, method="md_seeded", progress=False, engine="torch", **settings
    )
    stats = prov["statistics"]
    assert x.shape == (42, 66) and np.isfinite(u).all()
    assert stats["engine"] == "torch" and stats["frames_per_seed"] == [11, 11, 10, 10]
    assert sum(0 < p < 2 for p in stats["seed_phi"]) == 2
    with load_system("aldp_vacuum", backend="torch") as aldp:  # stored energies are the system's
        np.testing.assert_allclose(aldp.energy(torch.from_numpy(x)).numpy(), u, atol=1e-8)
    with pytest.raises(ValueError, match="engine must be one of"):
        generate("aldp_vacuum", 42, seed=0, method="md_seeded", engine="gpu", **settings)
