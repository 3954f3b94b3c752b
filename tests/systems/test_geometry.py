"""Dihedrals and chirality: closed-form angles, agreement with mdtraj, mirror images."""

from __future__ import annotations

import math

import mdtraj
import numpy as np
import pytest
import torch

from boltzflow.systems.geometry import (
    ALDP_CHIRALITY_ATOMS,
    ALDP_L_FORM_SIGN,
    ALDP_PHI_ATOMS,
    ALDP_PSI_ATOMS,
    backbone_dihedrals,
    chirality_volume,
    dihedral,
    filter_chirality,
    fix_chirality,
    is_l_form,
)
from boltzflow.systems.registry import BUILTIN_DIR

PDB = BUILTIN_DIR / "aldp" / "alanine-dipeptide.pdb"


@pytest.fixture(scope="module")
def traj() -> mdtraj.Trajectory:
    return mdtraj.load_pdb(str(PDB))


@pytest.fixture(scope="module")
def ref(traj: mdtraj.Trajectory) -> torch.Tensor:
    """Reference configuration, flat (1, 66) float64 nm."""
    return torch.from_numpy(traj.xyz.astype(np.float64).reshape(1, -1))


def _four(angle: float) -> torch.Tensor:
    """Atoms i, j, k, l with |b0| = |b1| = |b2| = 1 and dihedral ``angle`` (IUPAC sign)."""
    i = [1.0, 0.0, 0.0]
    j = [0.0, 0.0, 0.0]
    k = [0.0, 0.0, 1.0]
    l_ = [math.cos(angle), math.sin(angle), 1.0]
    return torch.tensor([i, j, k, l_], dtype=torch.float64)


@pytest.mark.parametrize("angle", [0.0, math.pi / 3, math.pi / 2, 2.0, -0.7, -math.pi / 2])
def test_dihedral_closed_form(angle: float):
    got = float(dihedral(_four(angle)[None], [0, 1, 2, 3])[0])
    assert got == pytest.approx(angle, abs=1e-12)


def test_planar_cis_and_trans_are_zero_and_pi():
    cis = torch.tensor([[1.0, 0, 0], [0, 0, 0], [0, 1, 0], [1, 1, 0]], dtype=torch.float64)
    trans = torch.tensor([[1.0, 0, 0], [0, 0, 0], [0, 1, 0], [-1, 1, 0]], dtype=torch.float64)
    # Mirror of trans in z -> the cross products get a -0.0 z component: still +pi, not -pi.
    trans_neg = trans * torch.tensor([1.0, 1.0, -1.0])
    out = dihedral(torch.stack([cis, trans, trans_neg]), [0, 1, 2, 3])
    assert out[0].item() == 0.0
    assert out[1].item() == math.pi
    assert out[2].item() == math.pi


def test_reference_matches_mdtraj(traj: mdtraj.Trajectory, ref: torch.Tensor):
    phi_idx, phi_md = mdtraj.compute_phi(traj)
    psi_idx, psi_md = mdtraj.compute_psi(traj)
    assert phi_idx.tolist() == [list(ALDP_PHI_ATOMS)]
    assert psi_idx.tolist() == [list(ALDP_PSI_ATOMS)]
    phi, psi = backbone_dihedrals(ref)
    # mdtraj stores float32 coordinates and computes in float32; the extended reference is planar.
    assert abs(math.remainder(phi.item() - float(phi_md[0, 0]), 2 * math.pi)) < 1e-5
    assert abs(math.remainder(psi.item() - float(psi_md[0, 0]), 2 * math.pi)) < 1e-5


def test_perturbed_configurations_match_mdtraj(traj: mdtraj.Trajectory, ref: torch.Tensor):
    gen = torch.Generator().manual_seed(1)
    x = ref + 0.03 * torch.randn(16, 66, generator=gen, dtype=torch.float64)
    md = mdtraj.Trajectory(x.reshape(16, 22, 3).numpy(), traj.topology)
    expected = mdtraj.compute_dihedrals(md, np.array([ALDP_PHI_ATOMS, ALDP_PSI_ATOMS]))
    phi, psi = backbone_dihedrals(x)
    got = torch.stack([phi, psi], dim=-1).numpy()
    diff = np.abs(np.remainder(got - expected + np.pi, 2 * np.pi) - np.pi)
    assert diff.max() < 1e-5, diff.max()


def test_shapes_flat_particles_and_many_indices(ref: torch.Tensor):
    x = ref + 0.02 * torch.randn(5, 66, dtype=torch.float64)
    flat = dihedral(x, ALDP_PHI_ATOMS)
    particles = dihedral(x.reshape(5, 22, 3), ALDP_PHI_ATOMS)
    both = dihedral(x, [ALDP_PHI_ATOMS, ALDP_PSI_ATOMS])
    assert flat.shape == (5,) and both.shape == (5, 2)
    torch.testing.assert_close(flat, particles, rtol=0, atol=0)
    torch.testing.assert_close(both[:, 0], flat, rtol=0, atol=0)
    assert dihedral(x[0], ALDP_PHI_ATOMS).shape == ()  # one unbatched configuration
    assert dihedral(x.float(), ALDP_PHI_ATOMS).dtype == torch.float32
    with pytest.raises(ValueError, match="out of range"):
        dihedral(x, [0, 1, 2, 22])
    with pytest.raises(ValueError, match="shape"):
        dihedral(x, [0, 1, 2])
    with pytest.raises(ValueError, match="flat"):
        dihedral(torch.zeros(4, 7), [0, 1, 2, 3])


def test_dihedral_gradcheck(ref: torch.Tensor):
    x = (ref + 0.02 * torch.randn(3, 66, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda y: dihedral(y, [ALDP_PHI_ATOMS, ALDP_PSI_ATOMS]), (x,))


def test_reference_pdb_is_l_alanine_by_the_corn_rule(ref: torch.Tensor):
    # Independent of the sign convention in geometry.py: looking from H-alpha towards C-alpha,
    # CO -> R (C-beta) -> N run clockwise for L-amino acids ("CORN" rule). Clockwise seen along
    # v = CA - HA means ((C - CA) x (CB - CA)) . v > 0.
    p = ref.reshape(22, 3)
    ca, ha, c, cb = p[8], p[9], p[14], p[10]
    assert float(torch.dot(torch.linalg.cross(c - ca, cb - ca), ca - ha)) > 0
    assert ALDP_CHIRALITY_ATOMS == (8, 6, 14, 10)
    assert float(chirality_volume(ref)[0]) * ALDP_L_FORM_SIGN > 0
    assert bool(is_l_form(ref)[0])


def test_mirror_flips_chirality_and_fix_restores(ref: torch.Tensor):
    x = ref + 0.01 * torch.randn(10, 66, dtype=torch.float64)
    x[[1, 4, 7]] = -x[[1, 4, 7]]
    expected_l = torch.ones(10, dtype=torch.bool)
    expected_l[[1, 4, 7]] = False
    assert torch.equal(is_l_form(x), expected_l)
    assert torch.equal(is_l_form(x.reshape(10, 22, 3)), expected_l)

    phi, psi = backbone_dihedrals(x)
    fixed, fraction = fix_chirality(x)
    assert fraction == pytest.approx(0.3)
    assert bool(is_l_form(fixed).all())
    torch.testing.assert_close(fixed[expected_l], x[expected_l], rtol=0, atol=0)
    torch.testing.assert_close(fixed[~expected_l], -x[~expected_l], rtol=0, atol=0)
    # Mirroring negates every dihedral (up to the wrap at +-pi).
    phi_f, psi_f = backbone_dihedrals(fixed)
    for a, b in ((phi, phi_f), (psi, psi_f)):
        d = torch.remainder(a[~expected_l] + b[~expected_l] + math.pi, 2 * math.pi) - math.pi
        assert d.abs().max() < 1e-12

    fixed_p, fraction_p = fix_chirality(x.reshape(10, 22, 3))
    torch.testing.assert_close(fixed_p.reshape(10, 66), fixed, rtol=0, atol=0)
    assert fraction_p == fraction

    kept, keep = filter_chirality(x)
    assert torch.equal(keep, expected_l)
    torch.testing.assert_close(kept, x[expected_l], rtol=0, atol=0)
    assert fix_chirality(x[:0])[1] == 0.0
