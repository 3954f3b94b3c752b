"""OpenMM Langevin MD: exact equipartition on a tiny system, reproducibility, interrupts, ALDP."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import openmm
import pytest
import torch
from openmm import unit

from boltzflow.constants import kt_kj_per_mol
from boltzflow.data import generate, read_dataset, write_dataset
from boltzflow.data import md as md_module
from boltzflow.data.md import openmm_seed, run_md
from boltzflow.systems import load_system

K_SE = 5.0
N_ATOMS = 20
SPRING = 1000.0  # kJ/mol/nm^2
TEMPERATURE = 300.0


def _oscillators() -> openmm.System:
    """20 independent particles in an isotropic harmonic well ½ k |r|² (k in kJ/mol/nm²).

    Classical equipartition: ⟨U⟩ = 3N/2 kT exactly and ⟨x²⟩ = kT/k per coordinate.
    """
    system = openmm.System()
    force = openmm.CustomExternalForce("0.5*k*(x^2+y^2+z^2)")
    force.addGlobalParameter("k", SPRING)
    for i in range(N_ATOMS):
        system.addParticle(12.0)
        force.addParticle(i, [])
    system.addForce(force)
    return system


def _start() -> np.ndarray:
    return np.random.default_rng(0).normal(scale=0.05, size=(N_ATOMS, 3))


def test_tiny_system_equipartition() -> None:
    # High friction so frames 0.2 ps apart are nearly independent; blocks give the SE anyway.
    res = run_md(
        _oscillators(),
        _start(),
        temperature=TEMPERATURE,
        n_frames=400,
        stride=200,
        burn_in=2000,
        friction_per_ps=10.0,
        seed=3,
        platform="Reference",
        progress=False,
    )
    assert res.positions.shape == (400, 3 * N_ATOMS) and res.energies.shape == (400,)
    assert not res.interrupted and res.settings["openmm_seed"] == openmm_seed(3)
    blocks = res.energies.reshape(20, 20).mean(axis=1)
    se = blocks.std(ddof=1) / math.sqrt(len(blocks))
    expected = 1.5 * N_ATOMS
    assert abs(res.energies.mean() - expected) < K_SE * se, (
        f"<U>/kT = {res.energies.mean():.3f} ± {se:.3f}, expected {expected}: > {K_SE} SE"
    )
    x2 = (res.positions**2).mean(axis=1)  # nm^2, averaged over the 60 coordinates
    x2_blocks = x2.reshape(20, 20).mean(axis=1)
    x2_se = x2_blocks.std(ddof=1) / math.sqrt(len(x2_blocks))
    expected_x2 = kt_kj_per_mol(TEMPERATURE) / SPRING
    assert abs(x2.mean() - expected_x2) < K_SE * x2_se, (x2.mean(), x2_se, expected_x2)
    # Energies really are U/kT of the stored positions (nm).
    u_direct = 0.5 * SPRING * (res.positions**2).sum(axis=1) / kt_kj_per_mol(TEMPERATURE)
    np.testing.assert_allclose(res.energies, u_direct, rtol=1e-10)


def test_reference_platform_is_reproducible_by_seed() -> None:
    kw = dict(
        temperature=TEMPERATURE,
        n_frames=5,
        stride=20,
        burn_in=10,
        platform="Reference",
        progress=False,
    )
    a = run_md(_oscillators(), _start(), seed=1, **kw)
    b = run_md(_oscillators(), _start(), seed=1, **kw)
    c = run_md(_oscillators(), _start(), seed=2, **kw)
    assert np.array_equal(a.positions, b.positions) and np.array_equal(a.energies, b.energies)
    assert not np.array_equal(a.positions, c.positions)
    assert openmm_seed(0) != 0 and openmm_seed(2**31 - 2) != 0


def test_interrupt_keeps_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    real = md_module._steps
    calls = {"n": 0}

    def flaky(integrator: openmm.Integrator, n: int, bar: object) -> None:
        calls["n"] += 1
        if calls["n"] == 4:  # burn-in, frame 1, frame 2, then Ctrl-C
            raise KeyboardInterrupt
        real(integrator, n, bar)

    monkeypatch.setattr(md_module, "_steps", flaky)
    res = run_md(
        _oscillators(),
        _start(),
        temperature=TEMPERATURE,
        n_frames=10,
        stride=5,
        burn_in=5,
        platform="Reference",
        progress=False,
    )
    assert res.interrupted and res.positions.shape == (2, 3 * N_ATOMS)
    assert res.summary()["interrupted"] is True


def test_md_argument_errors() -> None:
    with pytest.raises(ValueError, match="platform 'Nope' is not available"):
        run_md(_oscillators(), _start(), temperature=300.0, n_frames=1, platform="Nope")
    with pytest.raises(ValueError, match="20 x 3 coordinates"):
        run_md(_oscillators(), np.zeros((3, 3)), temperature=300.0, n_frames=1)
    with pytest.raises(ValueError, match="stride"):
        run_md(_oscillators(), _start(), temperature=300.0, n_frames=1, stride=0)


def test_blow_up_is_an_error() -> None:
    system = _oscillators()
    # A 1-ps step on a stiff well diverges within a few steps.
    with pytest.raises(RuntimeError, match=r"blew up|OpenMM failed"):
        run_md(
            system,
            _start(),
            temperature=TEMPERATURE,
            n_frames=20,
            stride=50,
            burn_in=0,
            timestep_fs=1000.0,
            minimize=False,
            platform="Reference",
            progress=False,
        )


def test_aldp_short_run_writes_valid_dataset(tmp_path: Path) -> None:
    kw = dict(seed=4, burn_in=200, stride=50, platform="Reference", progress=False)
    x, u, prov = generate("aldp", 8, **kw)
    assert prov["method"] == "md" and prov["temperature"] == 300.0
    assert x.shape == (8, 66) and np.isfinite(u).all()
    assert prov["statistics"]["minimized_energy_kT"] < u.min()
    np.testing.assert_allclose(x.reshape(8, 22, 3).mean(axis=1), 0.0, atol=1e-12)
    with load_system("aldp") as system:
        u_sys = system.energy(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(u, u_sys, atol=1e-6)  # same Reference force field, same kT
    path = write_dataset(tmp_path / "aldp.h5", x, system="aldp", provenance=prov, energies=u)
    ds = read_dataset(path)
    assert ds.attrs["generator"] == "boltzflow.data.md:run_md"
    assert ds.attrs["generator_settings"]["platform"] == "Reference"
    assert ds.attrs["temperature"] == 300.0
    x2, u2, _ = generate("aldp", 8, **kw)
    assert np.array_equal(x, x2) and np.array_equal(u, u2)


def test_positions_in_nanometres_match_openmm_units() -> None:
    res = run_md(
        _oscillators(),
        _start(),
        temperature=TEMPERATURE,
        n_frames=1,
        stride=1,
        burn_in=0,
        minimize=False,
        platform="Reference",
        progress=False,
    )
    ctx = openmm.Context(
        _oscillators(),
        openmm.VerletIntegrator(0.001),
        openmm.Platform.getPlatformByName("Reference"),
    )
    ctx.setPositions(res.positions[0].reshape(N_ATOMS, 3) * unit.nanometer)
    e = ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    assert res.energies[0] == pytest.approx(e / kt_kj_per_mol(TEMPERATURE), rel=1e-10)
