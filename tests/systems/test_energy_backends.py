"""The two energy backends of the molecular systems, torch force field and OpenMM pool, against
each other: selection (load_system, definitions, workflows), energies and autograd forces on MD
frames and perturbed frames, chunking, non-finite input and failed rows, the energy cap.

Everything runs real OpenMM (Reference platform, in-process) and the torch force field in
float64 unless stated; tolerances are those of issue 25 (energies 1e-5 relative, forces 1e-4
relative norm), while the measured agreement is about 1e-13 (tests/systems/test_torch_ff.py).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import openmm
import pytest
import torch

from boltzflow.data.generate import generate
from boltzflow.systems import load_system, molecular, registry
from boltzflow.systems.molecular import BACKENDS, DEFAULT_BACKEND, MolecularSystem
from boltzflow.systems.registry import BUILTIN_DIR, SYSTEMS_DIR_ENV, valid_overrides

ENERGY_RTOL = 1e-5
FORCE_RTOL = 1e-4


def _pair(name: str = "aldp", **overrides: object) -> tuple[MolecularSystem, MolecularSystem]:
    """The same system on the torch and on the OpenMM backend (in-process, Reference)."""
    common = {"platform": "Reference", "n_workers": 0, **overrides}
    torch_system = load_system(name, backend="torch", **common)
    openmm_system = load_system(name, backend="openmm", **common)
    assert isinstance(torch_system, MolecularSystem) and isinstance(openmm_system, MolecularSystem)
    return torch_system, openmm_system


@pytest.fixture(scope="module")
def aldp_pair():
    pair = _pair()
    yield pair
    for system in pair:
        system.close()


@pytest.fixture(scope="module")
def frames(aldp_pair) -> tuple[torch.Tensor, torch.Tensor]:
    """8 frames of OpenMM MD at 300 K (the data generator, with its OpenMM energies in kT), and
    the same frames perturbed by 0.005 and 0.02 nm: ``(x (24, 66), u_md (8,))``."""
    system = aldp_pair[0]
    x, u_md, provenance = generate(
        system, 8, seed=3, method="md", progress=False, burn_in=200, stride=50, minimize=False
    )
    assert provenance["generator"] == "boltzflow.data.md:run_md"
    md = torch.from_numpy(x)
    gen = torch.Generator().manual_seed(5)
    noisy = [
        md + s * torch.randn(md.shape, generator=gen, dtype=torch.float64) for s in (5e-3, 2e-2)
    ]
    return torch.cat([md, *noisy]), torch.from_numpy(u_md)


# -- selection ---------------------------------------------------------------------------------
def test_default_backend_and_switch_through_load_system(aldp_pair):
    assert DEFAULT_BACKEND == "torch" and BACKENDS == ("torch", "openmm")
    default = load_system("aldp")
    assert default.backend == "torch" and default.energy_dtype == torch.float64
    assert "backend='torch'" in repr(default)
    torch_system, openmm_system = aldp_pair
    assert (torch_system.backend, openmm_system.backend) == ("torch", "openmm")
    assert torch_system.energy_provenance()["backend"] == "torch"
    assert torch_system.energy_provenance()["dtype"] == "float64"
    assert torch_system.energy_provenance()["compiled"] is False
    assert openmm_system.energy_provenance()["platform"] == "Reference"
    f32 = load_system("aldp", dtype="float32", chunk_size=16)
    assert f32.energy_dtype == torch.float32 and f32.torch_force_field().chunk_size == 16
    for name in ("aldp", "aldp_vacuum", "aldp_ff96_obc1"):
        assert "backend" in valid_overrides(name)
    # The overrides the registry accepts for any molecule are parameters the builder knows.
    assert set(registry._DEFAULTED_PARAMETERS["openmm"]) <= molecular._PARAMETERS


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown energy backend 'jax'.*'torch', 'openmm'"):
        load_system("aldp", backend="jax")
    with pytest.raises(ValueError, match=r"dtype must be one of \['float32', 'float64'\]"):
        load_system("aldp", dtype="float16")
    with pytest.raises(ValueError, match="device must be 'input' or a torch device"):
        load_system("aldp", device="gpu7")
    with pytest.raises(ValueError, match="chunk_size"):
        load_system("aldp", chunk_size=-1)
    with pytest.raises(ValueError, match="compiled must be true or false, got 'yes'"):
        load_system("aldp", compiled="yes")


def test_compiled_option_reaches_the_force_field():
    # Building does not compile (that happens at the first evaluation).
    compiled = load_system("aldp_vacuum", compiled=True)
    assert compiled.torch_force_field().compiled
    assert compiled.energy_provenance()["compiled"] is True
    assert not load_system("aldp_vacuum").torch_force_field().compiled


def test_backend_of_a_definition_without_the_key(tmp_path: Path, monkeypatch):
    # A user's molecule that names no backend gets the default, and backend="openmm" is still
    # one override away (a parameter the molecular builder defaults).
    folder = tmp_path / "systems"
    (folder / "mine").mkdir(parents=True)
    shutil.copy(BUILTIN_DIR / "aldp" / "alanine-dipeptide.pdb", folder / "mine")
    (folder / "my_vacuum.toml").write_text(
        'name = "my_vacuum"\nkind = "openmm"\ntemperature = 300.0\nmean_free = true\n'
        '[parameters]\nstructure = "mine/alanine-dipeptide.pdb"\n'
        'forcefield = ["amber99sbildn.xml"]\nplatform = "Reference"\nn_workers = 0\n'
    )
    monkeypatch.setenv(SYSTEMS_DIR_ENV, str(folder))
    assert load_system("my_vacuum").backend == DEFAULT_BACKEND
    reference = load_system("my_vacuum", backend="openmm")
    assert reference.backend == "openmm"
    x = reference.reference_configuration()
    torch.testing.assert_close(load_system("my_vacuum").energy(x), reference.energy(x))
    with pytest.raises(TypeError, match="no parameter 'cutoff'"):
        load_system("my_vacuum", cutoff=1.0)


def test_a_force_the_torch_backend_cannot_reproduce_is_refused_at_build():
    vacuum = load_system("aldp_vacuum", backend="openmm", n_workers=0)
    system = openmm.XmlSerializer.deserialize(openmm.XmlSerializer.serialize(vacuum.openmm_system))
    restraint = openmm.CustomBondForce("0.5*k*r^2")
    restraint.addGlobalParameter("k", 1.0)
    restraint.addBond(0, 21, [])
    system.addForce(restraint)
    args = (vacuum.info, system, vacuum.topology, vacuum.reference_configuration().reshape(22, 3))
    with pytest.raises(ValueError, match=r"CustomBondForce.*backend='openmm'"):
        MolecularSystem(*args, backend="torch")
    assert MolecularSystem(*args, backend="openmm", n_workers=0).backend == "openmm"


# -- agreement ---------------------------------------------------------------------------------
def test_energies_match_on_md_and_perturbed_frames(aldp_pair, frames):
    torch_system, openmm_system = aldp_pair
    x, u_md = frames
    u_torch, u_openmm = torch_system.energy(x), openmm_system.energy(x)
    assert u_torch.dtype == torch.float64 and torch.isfinite(u_torch).all()
    torch.testing.assert_close(u_torch, u_openmm, rtol=ENERGY_RTOL, atol=0)
    # The MD generator's own (OpenMM) energies of the frames it wrote.
    torch.testing.assert_close(u_torch[:8], u_md, rtol=ENERGY_RTOL, atol=0)
    # float32 force field: float32 rounding of terms up to ~1e3 kJ/mol (measured ~1e-6).
    f32 = load_system("aldp", dtype="float32")
    torch.testing.assert_close(f32.energy(x), u_openmm, rtol=1e-4, atol=0)
    assert f32.energy(x.float()).dtype == torch.float32  # the output follows the input


def test_autograd_forces_match_openmm_forces(aldp_pair, frames):
    torch_system, openmm_system = aldp_pair
    x, _ = frames
    xg = x.clone().requires_grad_(True)
    u = torch_system.energy(xg)
    (grad,) = torch.autograd.grad(u.sum(), xg)
    f_openmm = openmm_system.force(x)  # OpenMM's forces / kT
    error = (-grad - f_openmm).norm(dim=1) / f_openmm.norm(dim=1)
    assert error.max() < FORCE_RTOL, error.max()
    torch.testing.assert_close(torch_system.force(x), -grad, rtol=0, atol=0)


def test_chunking_gives_identical_results(frames):
    x, _ = frames
    x = torch.cat([x, x.flip(0)])  # 48 rows
    x[7, 0] = float("nan")
    whole = load_system("aldp", chunk_size=len(x))
    u_whole, f_whole = whole.energy(x), whole.force(x)
    for chunk in (1, 5, 17, 0):
        system = load_system("aldp", chunk_size=chunk)
        assert torch.equal(system.energy(x), u_whole), chunk
        assert torch.equal(system.force(x), f_whole), chunk
        assert (system.n_nonfinite, system.n_failed) == (whole.n_nonfinite, whole.n_failed)


def test_device(device: torch.device, frames):
    # "input" computes where x is; a pinned device moves chunks there and the result back.
    x, _ = frames
    x = x[:6].to(device)
    expected = load_system("aldp", backend="openmm", n_workers=0).energy(x.cpu())
    for where in ("input", "cpu", str(device)):
        system = load_system("aldp", device=where)
        xg = x.clone().requires_grad_(True)
        u = system.energy(xg)
        assert u.device == x.device and u.requires_grad
        torch.testing.assert_close(u.cpu(), expected, rtol=ENERGY_RTOL, atol=0)
        (grad,) = torch.autograd.grad(u.sum(), xg)
        assert grad.device == x.device and torch.isfinite(grad).all()


# -- failures and the cap: the same on both backends --------------------------------------------
def _bad_batch(system: MolecularSystem) -> torch.Tensor:
    """Rows: regular; NaN coordinates; coincident bonded atoms (0 and 1: an angle without an
    arm); atoms 4, 6, 8 exactly on a line (φ undefined: finite energy, forces not finite);
    regular."""
    ref = system.reference_configuration()
    nan_row = ref.clone()
    nan_row[0, 10] = float("nan")
    overlap = ref.clone()
    overlap[0, 3:6] = overlap[0, 0:3]
    straight = ref.clone().reshape(22, 3)
    straight[[6, 8], 1:] = straight[4, 1:]  # same y and z: the differences are exactly on x
    wiggle = 0.01 * torch.cos(torch.arange(66.0, dtype=torch.float64))
    return torch.cat([ref, nan_row, overlap, straight.reshape(1, 66), ref + wiggle])


@pytest.mark.parametrize("name", ["aldp", "aldp_vacuum", "aldp_ff96_obc1"])
def test_nonfinite_input_and_failed_rows_alike(name: str):
    # NaN coordinates are not an exception: the row gets u = +inf (weight zero) and zero
    # gradient, and is counted in n_nonfinite (and, evaluated as zeros, in n_failed); a row
    # whose energy, or with a gradient its forces, is not finite gets +inf and is counted in
    # n_failed. Identically on both backends.
    results = {}
    for system in _pair(name):
        x = _bad_batch(system)
        with torch.no_grad():
            u_plain = system.energy(x)  # energies only: forces are not checked
        counts = (system.n_nonfinite, system.n_failed)
        xg = x.clone().requires_grad_(True)
        u = system.energy(xg)
        u[torch.isfinite(u)].sum().backward()
        results[system.backend] = (u_plain, counts, u.detach(), xg.grad)
        counts_grad = (system.n_nonfinite - counts[0], system.n_failed - counts[1])
        results[system.backend] += (counts_grad,)
    u_plain, counts, u, grad, counts_grad = results["torch"]
    assert torch.isinf(u_plain[1:3]).all() and (u_plain[1:3] > 0).all()
    assert torch.isfinite(u_plain[[0, 3, 4]]).all()  # the straight row has an energy...
    assert torch.isinf(u[1:4]).all() and (u[1:4] > 0).all()  # ...but no forces
    assert not grad[1:4].any() and torch.isfinite(grad).all() and grad[[0, 4]].all()
    assert counts == (1, 2) and counts_grad == (1, 3)
    u_plain_o, counts_o, u_o, grad_o, counts_grad_o = results["openmm"]
    assert (counts, counts_grad) == (counts_o, counts_grad_o)
    assert torch.equal(torch.isinf(u_plain), torch.isinf(u_plain_o))
    assert torch.equal(torch.isinf(u), torch.isinf(u_o))
    rows = torch.isfinite(u_plain)
    torch.testing.assert_close(u_plain[rows], u_plain_o[rows], rtol=ENERGY_RTOL, atol=0)
    assert not grad_o[1:4].any()
    error = (grad - grad_o)[[0, 4]].norm(dim=1) / grad_o[[0, 4]].norm(dim=1)
    assert error.max() < FORCE_RTOL


def _clash(system: MolecularSystem) -> torch.Tensor:
    """The reference configuration with atom 21 (a methyl H of NME) moved to 0.12 nm from atom 1
    (the methyl C of ACE, at the other end of the molecule): a large, finite Lennard-Jones
    energy."""
    x = system.reference_configuration().reshape(22, 3)
    direction = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64) / math.sqrt(3.0)
    x[21] = x[1] + 0.12 * direction
    return x.reshape(1, 66)


def test_energy_cap_is_identical_on_both_backends():
    cap = 50.0
    plain_t, plain_o = _pair("aldp_vacuum")
    capped_t, capped_o = _pair("aldp_vacuum", energy_cap=cap)
    ref = plain_t.reference_configuration()
    x = torch.cat([ref, _clash(plain_t), ref + 0.01 * torch.sin(torch.arange(66.0)).double()])
    u = plain_o.energy(x)
    assert u[0] < cap < u[1] and math.isfinite(u[1].item()) and u[1] > 1e3  # a clash
    forces = {}
    for system, plain in ((capped_t, plain_t), (capped_o, plain_o)):
        uc, u_plain = system.energy(x), plain.energy(x)
        above = u_plain > cap
        assert torch.equal(uc[~above], u_plain[~above])
        expected = cap + torch.log1p(u_plain[above] - cap)
        torch.testing.assert_close(uc[above], expected, rtol=1e-12, atol=0)
        slope = torch.where(above, 1.0 / (1.0 + (u_plain - cap)), 1.0)
        forces[system.backend] = system.force(x)
        torch.testing.assert_close(forces[system.backend], plain.force(x) * slope[:, None])
        assert system.energy_provenance()["energy_cap"] == cap
    torch.testing.assert_close(capped_t.energy(x), capped_o.energy(x), rtol=1e-10, atol=0)
    error = (forces["torch"] - forces["openmm"]).norm(dim=1) / forces["openmm"].norm(dim=1)
    assert error.max() < FORCE_RTOL
    assert (capped_t.n_failed, capped_o.n_failed) == (0, 0)
