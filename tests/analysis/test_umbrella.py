"""OpenMM umbrella windows along ALDP's φ (and on a (φ, ψ) grid): the restraints, the pulling
order, the per-window files and resuming, and the workflow script end to end.

Tiny runs on ``aldp_vacuum`` (3–36 windows, a few hundred steps each, Reference platform).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import openmm
import pytest
import torch
from openmm import unit

from boltzflow.analysis.mbar import neighbour_pairs, periodic_distance
from boltzflow.analysis.umbrella import (
    PSI_CENTER_PARAMETER,
    PSI_KAPPA_PARAMETER,
    UmbrellaWindow,
    dihedral_restraint_force,
    grid_order,
    load_umbrella_windows,
    phi_restraint_force,
    run_umbrella_windows,
    window_file,
    window_order,
)
from boltzflow.systems import geometry, load_system

CENTERS = [2.6, -2.8, -2.2]  # the structure has φ = π: window 1 first, window 0 across ±π
KAPPA = 200.0  # kT/rad²: std of φ about 0.07 rad
ROOT = Path(__file__).resolve().parents[2]


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


# --- 2-D: windows restrained in φ and ψ -------------------------------------------------------


def _flat_grid(phis, psis):
    return np.repeat(phis, len(psis)), np.tile(psis, len(phis))  # φ-major


def test_grid_order_pulls_the_row_then_the_columns():
    axis = np.array([-2.0, 0.0, 2.0])
    phi_c, psi_c = _flat_grid(axis, axis)
    first, chains = grid_order(phi_c, psi_c, start_phi=0.1, start_psi=1.9)
    assert first == 5  # (φ, ψ) = (0, 2): φ nearest 0.1 in the row ψ = 2 nearest 1.9
    assert chains[:2] == [[(8, 5)], [(2, 5)]]  # the row ψ = 2, up and down in φ
    jobs = [(first, -1)] + [job for chain in chains for job in chain]
    assert sorted(i for i, _ in jobs) == list(range(9))  # every window once
    seen = {first}
    neighbours = set(neighbour_pairs(np.stack([phi_c, psi_c], axis=1)))
    for index, parent in jobs[1:]:
        assert parent in seen  # parents run first
        assert (min(index, parent), max(index, parent)) in neighbours
        seen.add(index)
    # A column without a window in the row cannot be pulled from it.
    with pytest.raises(ValueError, match="must be a grid"):
        grid_order(np.append(phi_c, 1.0), np.append(psi_c, 0.0), 0.1, 1.9)


def test_phi_and_psi_restraints_add_up(aldp):
    rng = np.random.default_rng(1)
    ref = aldp.reference_configuration().reshape(aldp.n_atoms, 3).numpy()
    frames = ref[None] + 0.08 * rng.standard_normal((10, aldp.n_atoms, 3))
    phi = geometry.dihedral(torch.from_numpy(frames), aldp.phi_atoms).numpy()
    psi = geometry.dihedral(torch.from_numpy(frames), aldp.psi_atoms).numpy()
    system = openmm.System()
    for _ in range(aldp.n_atoms):
        system.addParticle(1.0)
    system.addForce(phi_restraint_force(aldp.phi_atoms, 50.0, 3.0))
    system.addForce(
        dihedral_restraint_force(
            aldp.psi_atoms,
            80.0,
            -3.0,
            center_parameter=PSI_CENTER_PARAMETER,
            kappa_parameter=PSI_KAPPA_PARAMETER,
        )
    )
    ctx = openmm.Context(
        system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference")
    )
    got = []
    for x in frames:
        ctx.setPositions(x * unit.nanometer)
        got.append(ctx.getState(getEnergy=True).getPotentialEnergy()._value)
    want = 25.0 * periodic_distance(phi, 3.0) ** 2 + 40.0 * periodic_distance(psi, -3.0) ** 2
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)
    del ctx


def _run_grid(system, out, **kw):
    phi_c, psi_c = _flat_grid([2.8, -3.0], [3.0, -2.85, -2.55])  # around (π, π), across ±π
    args = dict(
        n_samples=10,
        stride=10,
        out_dir=out,
        psi_centers=psi_c,
        kappa_psi=150.0,
        burn_in=100,
        seed=2,
        platform="Reference",
    )
    args.update(kw)
    return run_umbrella_windows(system, phi_c, KAPPA, **args), phi_c, psi_c


def test_grid_windows_hold_phi_and_psi_and_resume(aldp, tmp_path):
    out = tmp_path / "grid"
    windows, phi_c, psi_c = _run_grid(aldp, out)
    assert [w.index for w in windows] == list(range(6))
    for w, cp, cs in zip(windows, phi_c, psi_c, strict=True):
        assert not w.reused and w.center_psi == pytest.approx(cs) and w.kappa_psi == 150.0
        assert np.isfinite(w.u).all()
        assert periodic_distance(w.phi, cp).max() < 0.4
        assert periodic_distance(w.psi, cs).max() < 0.4, (cs, w.psi)
        assert w.settings["psi_restraint_atoms"] == list(aldp.psi_atoms)
    # The structure has (φ, ψ) = (π, π): the row is ψ = 3.0, its first window φ = −3.0
    # (window 3); window 0 is pulled along φ from it, and the columns grow along ψ from the row.
    assert windows[3].settings["start_window"] is None
    assert windows[0].settings["start_window"] == 3 and windows[4].settings["start_window"] == 3
    assert windows[1].settings["start_window"] == 0

    again, _, _ = _run_grid(aldp, out)
    assert all(w.reused for w in again)
    assert [w.index for w in load_umbrella_windows(out)] == list(range(6))
    window_file(out, 5).unlink()
    third, _, _ = _run_grid(aldp, out)
    assert [w.reused for w in third] == [True] * 5 + [False]
    np.testing.assert_array_equal(third[5].psi, windows[5].psi)
    with pytest.raises(ValueError, match="other settings"):
        _run_grid(aldp, out, kappa_psi=100.0)
    with pytest.raises(ValueError, match="other settings"):  # the 1-D run of the same φ
        run_umbrella_windows(aldp, phi_c[:1], KAPPA, 10, 10, out_dir=out, burn_in=100, seed=2)


def _workflow():
    spec = importlib.util.spec_from_file_location(
        "aldp_umbrella", ROOT / "workflows" / "aldp_umbrella.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_workflow_grid_smoke_and_resume(tmp_path):
    """12 × 3 windows × 0.5 ps (κ_φ = 40): the 2-D path end to end in about 5 s. The numbers
    mean nothing at this length; the files, fields and resume do."""
    script = _workflow()
    argv = [
        "--system", "aldp_vacuum", "-o", str(tmp_path / "run"), "--windows", "12",
        "--grid-psi", "3", "--kappa", "40", "--ns-per-window", "0.0005", "--burn-in-ps", "0.1",
        "--stride", "10", "--processes", "1",
    ]  # fmt: skip
    out = script.main(argv)
    saved = json.loads((tmp_path / "run" / "profile.json").read_text())
    assert (tmp_path / "run" / "profile.png").is_file()
    assert saved["settings"]["windows_total"] == 36 and saved["settings"]["grid_psi"] == 3
    assert saved["settings"]["kappa_psi_kT_per_rad2"] == pytest.approx(100 * (3 / 36) ** 2)
    assert saved["mbar"]["restrained"] == ["phi", "psi"]
    assert len(saved["profile"]["free_energy_kT"]) == 36
    assert 0 <= saved["neighbour_overlap_min"] <= 1
    assert saved["n_decorrelated"] == sum(saved["mbar"]["n_used"]) > 36
    assert math.isfinite(saved["delta_f_kT"]) and saved["windows_reused"] == 0
    again = script.main(argv)
    assert again["windows_reused"] == 36 and again["delta_f_kT"] == out["delta_f_kT"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--grid-psi", "1"], "--grid-psi must be at least 2"),
        (["--kappa-psi", "5"], "--kappa-psi needs --grid-psi"),
        (["--kappa", "0"], "--kappa must be a positive number"),
        (["--grid-psi", "24", "--windows", "1"], "--windows must be at least 2"),
        (["--processes", "two"], "--processes must be an integer"),
    ],
)
def test_workflow_cli_errors(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        _workflow().parse_args(["-o", str(tmp_path), *argv])
    assert message in capsys.readouterr().err


def test_workflow_grid_defaults(tmp_path):
    args = _workflow().parse_args(["-o", str(tmp_path), "--grid-psi", "24"])
    assert args.windows == 24 and args.kappa == args.kappa_psi == pytest.approx(44.444, rel=1e-4)
    one_d = _workflow().parse_args(["-o", str(tmp_path)])
    assert (one_d.windows, one_d.kappa, one_d.ns_per_window, one_d.burn_in_ps) == (36, 100, 1, 20)
    assert one_d.grid_psi is None and one_d.kappa_psi is None


@pytest.mark.slow
def test_grid_two_processes_reproduce_one(aldp, tmp_path):
    """The scheduler hands grid windows to two spawned workers as their parents finish; the
    samples equal those of one process (slow tier: spawning workers takes 10-30 s)."""
    one, _, _ = _run_grid(aldp, tmp_path / "one")
    two, _, _ = _run_grid(aldp, tmp_path / "two", processes=2)
    for a, b in zip(one, two, strict=True):
        assert a.settings["start_window"] == b.settings["start_window"]
        np.testing.assert_array_equal(a.phi, b.phi)
        np.testing.assert_array_equal(a.psi, b.psi)
