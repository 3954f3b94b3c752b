"""OpenMM umbrella windows along ALDP's φ: the restraint, the per-window files and resuming.

Tiny runs on ``aldp_vacuum`` (3 windows, a few hundred steps each, Reference platform).
"""

from __future__ import annotations

import math

import numpy as np
import openmm
import pytest
import torch
from openmm import unit

from boltzflow.analysis.mbar import periodic_distance
from boltzflow.analysis.umbrella import (
    UmbrellaWindow,
    phi_restraint_force,
    run_umbrella_windows,
    window_file,
    window_order,
)
from boltzflow.systems import geometry, load_system

CENTERS = [2.6, -2.8, -2.2]  # the structure has φ = π: window 1 first, window 0 across ±π
KAPPA = 200.0  # kT/rad²: std of φ about 0.07 rad


@pytest.fixture(scope="module")
def aldp():
    system = load_system("aldp_vacuum", n_workers=0)
    yield system
    system.close()


def _run(system, out, **kw):
    args = dict(n_samples=20, stride=10, out_dir=out, burn_in=200, seed=3, platform="Reference")
    args.update(kw)
    return run_umbrella_windows(system, CENTERS, KAPPA, **args)


def test_restraint_energy_matches_python(aldp):
    """OpenMM's restraint energy is ½ k d² with the periodic d, also across ±π."""
    rng = np.random.default_rng(0)
    ref = aldp.reference_configuration().reshape(aldp.n_atoms, 3).numpy()
    frames = ref[None] + 0.08 * rng.standard_normal((40, aldp.n_atoms, 3))
    phi = geometry.dihedral(torch.from_numpy(frames), aldp.phi_atoms).numpy()
    k_kj = 123.0
    for center in (math.pi - 0.05, -math.pi + 0.05, 0.3):
        system = openmm.System()
        for _ in range(aldp.n_atoms):
            system.addParticle(1.0)
        system.addForce(phi_restraint_force(aldp.phi_atoms, k_kj, center))
        ctx = openmm.Context(
            system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference")
        )
        got = []
        for x in frames:
            ctx.setPositions(x * unit.nanometer)
            e = ctx.getState(getEnergy=True).getPotentialEnergy()
            got.append(e.value_in_unit(unit.kilojoule_per_mole))
        want = 0.5 * k_kj * periodic_distance(phi, center) ** 2
        assert (np.abs(phi - center) > math.pi).any() or center == 0.3  # some frames wrap
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
        del ctx


def test_window_order_pulls_both_ways():
    centers = np.linspace(-math.pi, math.pi, 8, endpoint=False)
    first, (up, down) = window_order(centers, start_phi=-1.4)
    assert first == 2  # -π/2 is nearest
    assert [i for i, _ in up] == [3, 4, 5, 6] and [p for _, p in up] == [2, 3, 4, 5]
    assert [i for i, _ in down] == [1, 0, 7] and [p for _, p in down] == [2, 1, 0]


def test_windows_hold_phi_write_files_and_resume(aldp, tmp_path):
    out = tmp_path / "umb"
    windows = _run(aldp, out)
    assert [w.index for w in windows] == [0, 1, 2]
    for w, c in zip(windows, CENTERS, strict=True):
        assert not w.reused
        assert window_file(out, w.index).is_file()
        assert w.phi.shape == w.psi.shape == w.u.shape == (20,)
        assert np.isfinite(w.u).all()
        d = periodic_distance(w.phi, c)
        assert d.max() < 0.4, (c, w.phi)
    assert [w.settings["start_window"] for w in windows] == [1, None, 1]

    # Resume: all done, nothing reruns and the samples are identical.
    again = _run(aldp, out)
    assert all(w.reused for w in again)
    for a, b in zip(windows, again, strict=True):
        np.testing.assert_array_equal(a.phi, b.phi)

    # An interrupted run (window 0 missing) reruns only that window, from window 1's saved last
    # frame, reproducibly.
    window_file(out, 0).unlink()
    mtime = window_file(out, 1).stat().st_mtime_ns
    third = _run(aldp, out)
    assert [w.reused for w in third] == [False, True, True]
    assert window_file(out, 1).stat().st_mtime_ns == mtime
    np.testing.assert_allclose(third[0].phi, windows[0].phi, rtol=0, atol=1e-12)

    # Other settings: refused before any MD.
    with pytest.raises(ValueError, match="other settings"):
        _run(aldp, out, stride=11)


def test_window_file_round_trip(tmp_path):
    w = UmbrellaWindow(
        index=4,
        center=1.0,
        kappa=50.0,
        phi=np.array([0.9, 1.1]),
        psi=np.array([0.0, 0.1]),
        u=np.array([-3.0, -2.0]),
        last_positions=np.zeros(6),
        settings={"a": 1},
        seconds=2.5,
    )
    w.save(tmp_path / "w.npz")
    back = UmbrellaWindow.load(tmp_path / "w.npz")
    assert back.reused and back.index == 4 and back.settings == {"a": 1}
    np.testing.assert_array_equal(back.phi, w.phi)
    assert back.positions is None


@pytest.mark.slow
def test_two_processes_reproduce_one(aldp, tmp_path):
    """The up and down chains in two spawned workers give the same samples as one process.

    Slow tier: spawning two workers that import torch took 10-30 s on the shared 2-core machine.
    """
    centers = [-2.8, -2.4, 2.7, 2.3]
    kw = dict(n_samples=5, stride=10, burn_in=50, seed=1, platform="Reference")
    one = run_umbrella_windows(aldp, centers, KAPPA, out_dir=tmp_path / "one", **kw)
    two = run_umbrella_windows(aldp, centers, KAPPA, out_dir=tmp_path / "two", processes=2, **kw)
    for a, b in zip(one, two, strict=True):
        assert a.settings["start_window"] == b.settings["start_window"]
        np.testing.assert_array_equal(a.phi, b.phi)
