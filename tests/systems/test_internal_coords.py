"""Internal coordinates: Z-matrix construction, float64 round trips on MD frames, log J against a
brute-force autograd Jacobian, the density convention against a Cartesian density with a known
answer, the normalisation and the dihedral cut shift, serialisation and errors."""

from __future__ import annotations

import json
import math

import mdtraj
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from boltzflow.systems.internal_coords import (
    InternalCoordinates,
    cartesian_from_internal,
    internal_from_cartesian,
    least_populated_angle,
    log_volume,
    standard_frame,
    wrap_angle,
)
from boltzflow.systems.registry import BUILTIN_DIR
from boltzflow.systems.zmatrix import ZMatrix, zmatrix_from_bonds, zmatrix_from_topology

PDB = BUILTIN_DIR / "aldp" / "alanine-dipeptide.pdb"
F64 = torch.float64
#: A 4-atom chain 0-1-2-3 and a 5-atom star (centre 0), as small test molecules.
CHAIN4 = [(0, 1), (1, 2), (2, 3)]
STAR5 = [(0, 1), (0, 2), (0, 3), (0, 4)]


@pytest.fixture(scope="module")
def traj() -> mdtraj.Trajectory:
    return mdtraj.load_pdb(str(PDB))


@pytest.fixture(scope="module")
def zm(traj: mdtraj.Trajectory) -> ZMatrix:
    return zmatrix_from_topology(traj.topology)


@pytest.fixture(scope="module")
def md_frames(traj: mdtraj.Trajectory) -> torch.Tensor:
    """100 frames (flat (100, 66) float64 nm) of 300 K Langevin MD of ALDP (amber99sbildn + OBC,
    Reference platform, 1 fs, every 50 fs after 2 ps), the PDB frame first."""
    openmm = pytest.importorskip("openmm")
    from openmm import app, unit

    pdb = app.PDBFile(str(PDB))
    ff = app.ForceField("amber99sbildn.xml", "amber99_obc.xml")
    system = ff.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff, constraints=None)
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 0.001)
    integrator.setRandomNumberSeed(7)
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(pdb.positions)
    context.setVelocitiesToTemperature(300 * unit.kelvin, 7)
    integrator.step(2000)
    frames = [traj.xyz[0].astype(np.float64)]
    for _ in range(99):
        integrator.step(50)
        pos = context.getState(getPositions=True).getPositions(asNumpy=True)
        frames.append(np.asarray(pos.value_in_unit(unit.nanometer), dtype=np.float64))
    return torch.from_numpy(np.stack(frames).reshape(100, 66))


def _random_rotations(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, 3, 3, generator=gen, dtype=F64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
    return q * torch.det(q)[:, None, None]  # proper rotations


def _rigid(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each row randomly rotated and translated (by up to ~2 nm)."""
    rot = _random_rotations(x.shape[0], gen)
    shift = 2 * torch.randn(x.shape[0], 1, 3, generator=gen, dtype=F64)
    p = x.reshape(x.shape[0], -1, 3)
    return (torch.einsum("bij,bnj->bni", rot, p) + shift).reshape(x.shape)


def _free_coordinates(x: torch.Tensor, zmatrix: ZMatrix) -> torch.Tensor:
    """The 3n − 6 frame-fixed Cartesian coordinates: atom 1: x; atom 2: x, y; atoms ≥ 3: x, y, z."""
    p = x.reshape(-1, zmatrix.n_atoms, 3)
    a = zmatrix.atoms
    return torch.cat([p[:, a[1], :1], p[:, a[2], :2], p[:, list(a[3:])].flatten(1)], dim=1)


# --- Z-matrix construction ------------------------------------------------------------------


def test_aldp_zmatrix(traj: mdtraj.Trajectory, zm: ZMatrix):
    top = traj.topology
    assert zm.n_atoms == 22 and zm.n_dof == 60
    assert InternalCoordinates(zm).dim == 60
    assert sorted(zm.atoms) == list(range(22))
    assert zm.atoms[0] == 8  # Cα, the centre of the bond graph
    bonded = {frozenset((b[0].index, b[1].index)) for b in top.bonds}
    heavy = [a.index for a in top.atoms if a.element.symbol != "H"]
    position = {a: p for p, a in enumerate(zm.atoms)}
    assert max(position[a] for a in heavy) < min(position[a] for a in range(22) if a not in heavy)
    for i, j in zm.bond_rows():
        assert frozenset((i, j)) in bonded
    for _, j, k in zm.angle_rows():
        assert frozenset((j, k)) in bonded  # i-j-k is a bonded chain
    for _, j, k, l_atom in zm.dihedral_rows():
        # a proper torsion (l bonded to k) or one relative to a sibling (l bonded to j)
        assert frozenset((k, l_atom)) in bonded or frozenset((j, l_atom)) in bonded
    # the OpenMM topology gives the same Z-matrix
    from openmm import app

    assert zmatrix_from_topology(app.PDBFile(str(PDB)).topology) == zm


@pytest.mark.parametrize(("bonds", "root"), [(CHAIN4, 1), (STAR5, 0)])
def test_small_zmatrices(bonds: list[tuple[int, int]], root: int):
    n = max(max(b) for b in bonds) + 1
    zm = zmatrix_from_bonds(n, bonds)
    assert zm.atoms[0] == root and zm.n_dof == 3 * n - 6
    assert ZMatrix.from_dict(json.loads(json.dumps(zm.to_dict()))) == zm


def test_zmatrix_errors():
    with pytest.raises(ValueError, match="at least 3 atoms"):
        zmatrix_from_bonds(2, [(0, 1)])
    with pytest.raises(ValueError, match=r"not connected: atoms \[3\]"):
        zmatrix_from_bonds(4, [(0, 1), (1, 2)])
    with pytest.raises(ValueError, match="out of range"):
        zmatrix_from_bonds(3, [(0, 1), (1, 3)])
    with pytest.raises(ValueError, match="itself"):
        zmatrix_from_bonds(3, [(0, 1), (1, 1)])
    with pytest.raises(ValueError, match="3 flags, got 2"):
        zmatrix_from_bonds(3, [(0, 1), (1, 2)], hydrogens=[True, False])
    with pytest.raises(ValueError, match="placed before it"):
        ZMatrix((0, 1, 2, 3), ((0, -1, -1), (1, 0, -1), (2, 1, 3)))
    with pytest.raises(ValueError, match="permutation"):
        ZMatrix((0, 1, 1), ((0, -1, -1), (1, 0, -1)))
    with pytest.raises(ValueError, match="must be -1"):
        ZMatrix((0, 1, 2), ((0, 1, -1), (1, 0, -1)))
    with pytest.raises(TypeError, match=r"mdtraj\.Topology or openmm"):
        zmatrix_from_topology(object())


# --- round trips ----------------------------------------------------------------------------


def test_round_trip_md_frames(zm: ZMatrix, md_frames: torch.Tensor):
    gen = torch.Generator().manual_seed(3)
    perturbed = md_frames[:20] + 0.01 * torch.randn(20, 66, generator=gen, dtype=F64)
    x = _rigid(torch.cat([md_frames, perturbed]), gen)
    ic = InternalCoordinates.fit(zm, md_frames)
    z, log_det = ic(x)
    x_back, log_det_inv = ic.inverse(z)
    err = (x_back - standard_frame(x, zm)).abs().max().item()
    assert err < 1e-10, f"round trip error {err:.3g} nm"
    assert torch.equal(log_det, -log_det_inv)
    # rigid motions do not change z; pairwise distances survive the round trip
    z_moved, _ = ic(_rigid(x, gen))
    assert (z_moved - z).abs().max().item() < 1e-10
    p, q = x.reshape(-1, 22, 3), x_back.reshape(-1, 22, 3)
    assert (torch.cdist(p, p) - torch.cdist(q, q)).abs().max().item() < 1e-10
    # and internal -> Cartesian -> internal
    z_again, _ = ic(x_back)
    assert (z_again - z).abs().max().item() < 1e-10


@pytest.mark.parametrize("bonds", [CHAIN4, STAR5, [(0, 1), (1, 2)]], ids=["chain4", "star5", "3"])
def test_round_trip_small(bonds: list[tuple[int, int]]):
    n = max(max(b) for b in bonds) + 1
    zm = zmatrix_from_bonds(n, bonds)
    x = torch.randn(50, 3 * n, dtype=F64) * 0.2
    b, a, d = internal_from_cartesian(x, zm)
    assert a.min() > 0 and a.max() < math.pi
    x_back = cartesian_from_internal(b, a, d, zm)
    assert (x_back - standard_frame(x, zm)).abs().max().item() < 1e-12
    frame = x_back.reshape(50, n, 3)
    assert (frame[:, zm.atoms[0]] == 0).all()
    assert (frame[:, zm.atoms[1], 1:] == 0).all() and (frame[:, zm.atoms[1], 0] > 0).all()
    assert (frame[:, zm.atoms[2], 2] == 0).all() and (frame[:, zm.atoms[2], 1] > 0).all()


def test_mirror_flips_dihedrals_only(zm: ZMatrix, md_frames: torch.Tensor):
    b, a, d = internal_from_cartesian(md_frames, zm)
    b_m, a_m, d_m = internal_from_cartesian(-md_frames, zm)
    assert torch.allclose(b, b_m) and torch.allclose(a, a_m)
    assert torch.allclose(wrap_angle(-d), d_m, atol=1e-12)


def test_float32(zm: ZMatrix, md_frames: torch.Tensor):
    ic = InternalCoordinates.fit(zm, md_frames)
    z, log_det = ic(md_frames.float())
    assert z.dtype == log_det.dtype == torch.float32
    x, _ = ic.inverse(z)
    assert x.dtype == torch.float32
    assert (x.double() - standard_frame(md_frames, zm)).abs().max().item() < 1e-4


# --- log J against a brute-force Jacobian ---------------------------------------------------


def _check_log_det(ic: InternalCoordinates, z: torch.Tensor) -> float:
    """|log|det ∂free/∂z| + log(r₁² r₂ sin θ₂) − inverse log-det| for one row of z."""
    zm = ic.zmatrix

    def free(row: torch.Tensor) -> torch.Tensor:
        return _free_coordinates(ic.inverse(row[None])[0], zm)[0]

    jac = torch.autograd.functional.jacobian(free, z)
    sign, logabsdet = torch.linalg.slogdet(jac)
    assert sign != 0
    x, log_det = ic.inverse(z[None])
    bonds, angles, _ = internal_from_cartesian(x, zm)
    rotation = math.log(bonds[0, 0] ** 2 * bonds[0, 1] * math.sin(angles[0, 0]))
    return abs(logabsdet.item() + rotation - log_det.item())


def test_log_det_matches_autograd_jacobian(zm: ZMatrix, md_frames: torch.Tensor):
    raw = InternalCoordinates(zm)
    fitted = InternalCoordinates.fit(zm, md_frames)
    for row in (0, 37, 99):
        z_raw, _ = raw(md_frames[row : row + 1])
        assert _check_log_det(raw, z_raw[0]) < 1e-8  # plain log J
        z_fit, _ = fitted(md_frames[row : row + 1])
        assert _check_log_det(fitted, z_fit[0]) < 1e-8  # log J + normalisation
    # log J written out: 2 log r₁ + 2 log r₂ + log sin θ₂ + Σ_{i≥3} (2 log rᵢ + log sin θᵢ)
    b, a, _ = internal_from_cartesian(md_frames[:1], zm)
    by_hand = sum(2 * math.log(r) for r in b[0]) + sum(math.log(math.sin(t)) for t in a[0])
    assert log_volume(b, a).item() == pytest.approx(by_hand, abs=1e-12)


@pytest.mark.parametrize("bonds", [CHAIN4, STAR5], ids=["chain4", "star5"])
def test_log_det_small(bonds: list[tuple[int, int]]):
    n = max(max(b) for b in bonds) + 1
    zm = zmatrix_from_bonds(n, bonds)
    x = torch.randn(64, 3 * n, dtype=F64) * 0.2
    ic = InternalCoordinates.fit(zm, x)
    z, _ = ic(x)
    for row in range(4):
        assert _check_log_det(ic, z[row]) < 1e-8


# --- the density convention -----------------------------------------------------------------
# A Cartesian density with a known answer: atoms[0] at the origin and every bond vector
# x_i − x_j(i) an independent isotropic Gaussian N(0, s_i² I). It is rotation invariant, its
# bond lengths are s·χ₃, and the bond directions are independent and uniform on the sphere, so
# in internal coordinates θ has density sin θ / 2 and φ is uniform (for any choice of k, l).
# The convention log q(x) = log q(z) − log J(z) − Σ log σ must reproduce this density times the
# rotation volume 8π² (the Haar measure integrated out).

LOG_8PI2 = math.log(8 * math.pi**2)


def _bond_gaussian(zm: ZMatrix, scales: torch.Tensor, n: int, gen: torch.Generator):
    """Samples x (n, 3N) and their exact Cartesian log density (n,) on the 3(N−1) relative dims."""
    steps = torch.randn(n, zm.n_atoms - 1, 3, generator=gen, dtype=F64) * scales[:, None]
    pos = [torch.zeros(n, 3, dtype=F64)] * zm.n_atoms
    for p, (atom, (j, _, _)) in enumerate(zip(zm.atoms[1:], zm.references, strict=True)):
        pos[atom] = pos[j] + steps[:, p]
    x = torch.stack(pos, dim=1).reshape(n, -1)
    log_p = (-0.5 * (steps / scales[:, None]) ** 2 - 0.5 * math.log(2 * math.pi)).sum((1, 2))
    return x, log_p - 3 * scales.log().sum()


def _exact_log_q_z(bonds: torch.Tensor, angles: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """log density of the raw internal coordinates under :func:`_bond_gaussian`."""
    r = bonds / scales
    chi3 = math.log(math.sqrt(2 / math.pi)) + 2 * r.log() - r**2 / 2 - scales.log()
    n_dihedrals = bonds.shape[1] - 2
    return (
        chi3.sum(-1)
        + torch.log(torch.sin(angles) / 2).sum(-1)
        - n_dihedrals * math.log(2 * math.pi)
    )


@pytest.mark.parametrize("bonds", [CHAIN4, STAR5], ids=["chain4", "star5"])
def test_density_convention_exact(bonds: list[tuple[int, int]]):
    n_atoms = max(max(b) for b in bonds) + 1
    zm = zmatrix_from_bonds(n_atoms, bonds)
    gen = torch.Generator().manual_seed(5)
    scales = torch.linspace(0.1, 0.2, n_atoms - 1, dtype=F64)
    x, log_p = _bond_gaussian(zm, scales, 2000, gen)
    ic = InternalCoordinates.fit(zm, x)  # with standardisation and cut shifts
    z, log_det = ic(x)
    b, a, _ = internal_from_cartesian(x, zm)
    # density of the normalised z: raw density times Σ σ (z = (r − μ)/σ); the cut shift has det 1
    log_q_z = _exact_log_q_z(b, a, scales) + ic.bond_std.log().sum() + ic.angle_std.log().sum()
    _, log_det_inv = ic.inverse(z)
    log_q_x = log_q_z - log_det_inv
    assert (log_q_x - (log_p + LOG_8PI2)).abs().max().item() < 1e-10
    assert torch.allclose(log_q_z + log_det, log_q_x, atol=1e-12, rtol=0)


def test_density_convention_monte_carlo():
    """A flow stand-in with a Gaussian density in the internal coordinates of a 4-atom chain:
    its Cartesian log q(x) must give importance weights w = 8π² p(x) / q(x) with E_q[w] = 1 for
    the Cartesian bond-Gaussian p (fails, e.g., without the r₂² sin θ₂ frame terms)."""
    zm = zmatrix_from_bonds(4, CHAIN4)
    gen = torch.Generator().manual_seed(11)
    s = 0.1
    n = 40_000
    # proposal: bonds N(0.16, 0.1²) truncated to r > 0, angles N(π/2, 1) truncated to (0, π),
    # dihedrals uniform; its normaliser is exact via the normal CDF.
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=F64), 1.0)

    def truncated(mean: float, std: float, low: float, high: float, shape: tuple[int, int]):
        a, b = (
            normal.cdf(torch.tensor((low - mean) / std)),
            normal.cdf(torch.tensor((high - mean) / std)),
        )
        u = a + (b - a) * torch.rand(shape, generator=gen, dtype=F64)
        v = mean + std * normal.icdf(u)
        return v, normal.log_prob((v - mean) / std) - math.log(std) - torch.log(b - a)

    r, lr = truncated(0.16, 0.1, 0.0, math.inf, (n, 3))
    t, lt = truncated(math.pi / 2, 1.0, 0.0, math.pi, (n, 2))
    phi = (2 * torch.rand(n, 1, generator=gen, dtype=F64) - 1) * math.pi
    log_q_z = lr.sum(-1) + lt.sum(-1) - math.log(2 * math.pi)
    ic = InternalCoordinates(zm)
    x, log_det_inv = ic.inverse(torch.cat([r, t, phi], dim=1))
    log_q_x = log_q_z - log_det_inv
    steps = []
    p = x.reshape(n, 4, 3)
    for atom, (j, _, _) in zip(zm.atoms[1:], zm.references, strict=True):
        steps.append(p[:, atom] - p[:, j])
    steps_t = torch.stack(steps, dim=1)
    log_p = (-0.5 * (steps_t / s) ** 2).sum((1, 2)) - 9 * math.log(s * math.sqrt(2 * math.pi))
    w = torch.exp(log_p + LOG_8PI2 - log_q_x)
    mean, se = w.mean().item(), (w.std() / math.sqrt(n)).item()
    assert abs(mean - 1) < 5 * se and se < 0.02, f"E_q[w] = {mean:.4f} ± {se:.4f}, expected 1"
    # the same weights with the frame terms r₂² sin θ₂ forgotten are far off
    frame = 2 * torch.log(r[:, 1]) + torch.log(torch.sin(t[:, 0]))
    w_bad = torch.exp(log_p + LOG_8PI2 - log_q_x - frame)
    assert abs(w_bad.mean().item() - 1) > 0.5


# --- normalisation and the cut shift --------------------------------------------------------


def test_normalisation_log_det(zm: ZMatrix, md_frames: torch.Tensor):
    raw = InternalCoordinates(zm)
    ic = InternalCoordinates.fit(zm, md_frames)
    z_raw, ld_raw = raw(md_frames)
    z, ld = ic(md_frames)
    expected = ld_raw - ic.bond_std.log().sum() - ic.angle_std.log().sum()
    assert torch.allclose(ld, expected, atol=1e-12, rtol=0)
    assert torch.allclose(z[:, ic.bond_slice].mean(0), torch.zeros(21, dtype=F64), atol=1e-10)
    assert torch.allclose(z[:, ic.angle_slice].std(0), torch.ones(20, dtype=F64), atol=1e-10)
    # every fitted dihedral feature keeps half a histogram bin away from the cut at ±π
    dihedrals = z[:, ic.dihedral_slice]
    assert (math.pi - dihedrals.abs()).min().item() >= math.pi / 72 - 1e-12
    # the peptide bonds ω (C(ACE)-N and C-N(NME) torsions, trans ≈ ±π) sit at ±π unshifted and
    # near 0 after the shift
    omega_rows = [
        p for p, (i, j, k, l_atom) in enumerate(zm.dihedral_rows()) if (i, j) in ((1, 4), (18, 16))
    ]
    assert len(omega_rows) == 2
    raw_omega = z_raw[:, raw.dihedral_slice][:, omega_rows]
    assert (raw_omega.abs() > 2.5).all() and (raw_omega > 0).any() and (raw_omega < 0).any()
    assert (dihedrals[:, omega_rows].abs() < 1.0).all()


@settings(max_examples=25, deadline=None)
@given(
    mode=st.floats(-math.pi, math.pi),
    spread=st.floats(0.05, 0.5),
    seed=st.integers(0, 2**31 - 1),
)
def test_cut_shift_moves_mode_off_the_cut(mode: float, spread: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    phi = wrap_angle(mode + spread * torch.randn(500, 1, generator=gen, dtype=F64))
    cut = least_populated_angle(phi)
    shifted = wrap_angle(phi - cut - math.pi)
    assert (shifted.abs() < math.pi - 1.0).all()  # the whole mode away from ±π
    # a bijection of the circle: shifting back recovers φ
    back = wrap_angle(shifted + cut + math.pi)
    assert (back - phi).abs().max().item() < 1e-12


def test_cut_shift_in_the_transform_has_unit_det():
    zm = zmatrix_from_bonds(4, CHAIN4)
    x = torch.randn(300, 12, dtype=F64) * 0.2
    plain = InternalCoordinates.fit(zm, x, shift_cuts=False)
    shifted = InternalCoordinates.fit(zm, x)
    (z0, ld0), (z1, ld1) = plain(x), shifted(x)
    assert torch.equal(plain.dihedral_cut, torch.full((1,), math.pi, dtype=F64))
    assert torch.allclose(ld0, ld1, atol=1e-14, rtol=0)
    assert torch.allclose(z0[:, :5], z1[:, :5])
    x_back, _ = shifted.inverse(z1)
    assert (x_back - standard_frame(x, zm)).abs().max().item() < 1e-12


def test_least_populated_angle_widest_gap():
    # mass on [-π, -2] and on [1, 2]: the widest empty arc is (-2, 1) (3 rad; (2, π) is 1.14)
    gen = torch.Generator().manual_seed(0)
    phi = torch.cat(
        [
            -math.pi + (math.pi - 2) * torch.rand(400, generator=gen),
            1 + torch.rand(400, generator=gen),
        ]
    )
    cut = least_populated_angle(phi[:, None].double())
    assert cut.item() == pytest.approx(-0.5, abs=2 * math.pi / 72)
    assert least_populated_angle(torch.zeros(0, 1)).item() == pytest.approx(math.pi)  # no data
    with pytest.raises(ValueError, match="n_bins"):
        least_populated_angle(phi[:, None], n_bins=1)


def test_periodic_mode(zm: ZMatrix, md_frames: torch.Tensor):
    ic = InternalCoordinates.fit(zm, md_frames, periodic=True, shift_cuts=False)
    z, _ = ic(md_frames)
    d = z[:, ic.dihedral_slice]
    assert (d >= -math.pi).all() and (d < math.pi).all()
    assert ic.periodic_mask().sum().item() == 19 and ic.periodic_mask()[ic.dihedral_slice].all()
    x, _ = ic.inverse(z)
    assert (x - standard_frame(md_frames, zm)).abs().max().item() < 1e-10
    assert wrap_angle(torch.tensor([math.pi], dtype=F64), periodic=True).item() == -math.pi
    assert wrap_angle(torch.tensor([-math.pi], dtype=F64)).item() == math.pi


def test_standardised_dihedrals(zm: ZMatrix, md_frames: torch.Tensor):
    """Narrow dihedrals come off the circle: unit spread, exact round trip, log-det −Σ log σ
    more than the periodic transform, and rows outside a standardised dihedral's domain NaN."""
    plain = InternalCoordinates.fit(zm, md_frames, periodic=True)
    ic = InternalCoordinates.fit(zm, md_frames, periodic=True, standardize_dihedrals=0.5)
    narrow = ~ic.dihedral_periodic
    # in 300 K MD the hydrogen, carbonyl and peptide-bond dihedrals are narrow; φ, ψ, the
    # methyl rotors are not (circular spread > 0.5 rad), 2 ps is enough to see that
    assert 10 <= int(narrow.sum()) < 19
    assert torch.equal(ic.periodic_mask()[ic.dihedral_slice], ~narrow)
    assert torch.equal(ic.dihedral_cut, plain.dihedral_cut)
    (z0, ld0), (z, ld) = plain(md_frames), ic(md_frames)
    d0, d = z0[:, plain.dihedral_slice], z[:, ic.dihedral_slice]
    assert torch.allclose(d[:, narrow].std(0), torch.ones(int(narrow.sum()), dtype=F64))
    assert torch.allclose(d[:, narrow].mean(0), torch.zeros(int(narrow.sum()), dtype=F64))
    assert torch.equal(d[:, ~narrow], d0[:, ~narrow])
    assert torch.allclose(ld, ld0 - ic.dihedral_std[narrow].log().sum(), atol=1e-12, rtol=0)
    x, ld_inv = ic.inverse(z)
    assert (x - standard_frame(md_frames, zm)).abs().max().item() < 1e-10
    assert torch.allclose(ld_inv, -ld, atol=1e-10, rtol=0)
    # a standardised dihedral beyond its domain (|shifted| > π) is no dihedral: NaN log-det
    col = int(narrow.nonzero()[0])
    far = z[:3].clone()
    far[1, ic.dihedral_slice.start + col] = (
        math.pi + 0.01 - ic.dihedral_mean[col]
    ) / ic.dihedral_std[col]
    _, ld_far = ic.inverse(far)
    assert torch.isnan(ld_far[1]) and torch.isfinite(ld_far[[0, 2]]).all()
    # round trip through the dict, and a version-1 dict loads with every dihedral periodic
    again = InternalCoordinates.from_dict(json.loads(json.dumps(ic.to_dict())))
    assert torch.equal(again(md_frames)[0], z)
    old = {
        k: v
        for k, v in plain.to_dict().items()
        if not k.startswith(("dihedral_mean", "dihedral_std", "dihedral_periodic"))
    }
    old["version"] = 1
    v1 = InternalCoordinates.from_dict(old)
    assert torch.equal(v1(md_frames)[0], z0) and v1.periodic_mask().sum() == 19
    with pytest.raises(ValueError, match="dihedral_periodic must be a list of booleans"):
        InternalCoordinates.from_dict(ic.to_dict() | {"dihedral_periodic": [1.0] * 19})
    with pytest.raises(ValueError, match="standardize_dihedrals"):
        InternalCoordinates.fit(zm, md_frames, standardize_dihedrals=-1.0)
    with pytest.raises(ValueError, match="shift_cuts"):
        InternalCoordinates.fit(zm, md_frames, shift_cuts=False, standardize_dihedrals=0.5)


def test_standardised_dihedrals_log_det_matches_autograd(zm: ZMatrix, md_frames: torch.Tensor):
    """The inverse's log-det with standardised dihedrals equals log |det| of the autograd
    Jacobian of z → frame-fixed Cartesian coordinates plus the rotation measure."""
    ic = InternalCoordinates.fit(zm, md_frames, periodic=True, standardize_dihedrals=0.5)
    z, _ = ic(md_frames[:3])
    for row in z:
        jac = torch.autograd.functional.jacobian(
            lambda v: _free_coordinates(ic.inverse(v[None])[0], zm)[0], row
        )
        bonds = row[ic.bond_slice] * ic.bond_std + ic.bond_mean
        angles = row[ic.angle_slice] * ic.angle_std + ic.angle_mean
        rotation = torch.log(bonds[0] ** 2 * bonds[1] * torch.sin(angles[0]))
        expected = torch.linalg.slogdet(jac)[1] + rotation
        got = ic.inverse(row[None])[1][0]
        assert abs((got - expected).item()) < 1e-8


# --- serialisation and errors ---------------------------------------------------------------


def test_to_dict_and_state_dict(zm: ZMatrix, md_frames: torch.Tensor):
    ic = InternalCoordinates.fit(zm, md_frames)
    again = InternalCoordinates.from_dict(json.loads(json.dumps(ic.to_dict())))
    assert again.zmatrix == zm
    z, ld = ic(md_frames)
    z2, ld2 = again(md_frames)
    assert torch.equal(z, z2) and torch.equal(ld, ld2)
    fresh = InternalCoordinates(zm)
    fresh.load_state_dict(ic.state_dict())
    assert torch.equal(fresh(md_frames)[0], z)
    bad = ic.to_dict() | {"bond_std": [0.0] * 21}
    with pytest.raises(ValueError, match="bond_std must be positive"):
        InternalCoordinates.from_dict(bad)
    with pytest.raises(ValueError, match="format"):
        InternalCoordinates.from_dict({"zmatrix": zm.to_dict()})


def test_input_errors(zm: ZMatrix, md_frames: torch.Tensor):
    ic = InternalCoordinates(zm)
    with pytest.raises(ValueError, match=r"shape \(batch, 66\)"):
        ic(md_frames[:, :60])
    with pytest.raises(ValueError, match=r"shape \(batch, 66\)"):
        ic(md_frames[0])
    bad = md_frames[:3].clone()
    bad[1, 5] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values .* rows \[1\]"):
        ic(bad)
    with pytest.raises(ValueError, match="floating-point"):
        ic(md_frames.long())
    with pytest.raises(ValueError, match=r"shape \(batch, 60\)"):
        ic.inverse(torch.zeros(2, 66, dtype=F64))
    with pytest.raises(TypeError):
        ic(md_frames.numpy())
    with pytest.raises(ValueError, match="do not vary"):
        InternalCoordinates.fit(zm, md_frames[:1].expand(5, -1))
    with pytest.raises(ValueError, match="at least 2 frames"):
        InternalCoordinates.fit(zm, md_frames[:1])
    # non-finite z passes through to non-finite x (for the energy code to count), no error
    z, _ = ic(md_frames[:2])
    z[0, 0] = float("nan")
    x, _ = ic.inverse(z)
    assert not torch.isfinite(x[0]).all() and torch.isfinite(x[1]).all()


def test_gradcheck_both_directions():
    """Flows train through both maps (forward KL on data, reverse KL on samples)."""
    zm = zmatrix_from_bonds(5, STAR5)
    x = torch.randn(3, 15, dtype=F64) * 0.2
    ic = InternalCoordinates.fit(zm, torch.randn(50, 15, dtype=F64) * 0.2)
    z, _ = ic(x)
    assert torch.autograd.gradcheck(lambda t: ic(t), (x.clone().requires_grad_(),))
    assert torch.autograd.gradcheck(lambda t: ic.inverse(t), (z.clone().requires_grad_(),))
