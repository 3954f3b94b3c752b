r"""Internal coordinates of any molecule: a batched, exact Cartesian ↔ Z-matrix transform.

The transform (Noé et al., Science 365, eaaw1147 (2019), Boltzmann generators; Midgley et al.,
ICLR 2023, arXiv:2208.01893, FAB; Köhler et al., ICML 2021, arXiv:2110.00351, smooth normalizing
flows) represents a molecule of n atoms by the 3n − 6 coordinates of a :class:`~boltzflow.systems.
zmatrix.ZMatrix`: bond lengths r (nm), angles θ ∈ (0, π) and dihedrals φ (rad). Rigid translation
and rotation are integrated out; the inverse puts the molecule in the *standard frame*: ``atoms[0]``
at the origin, ``atoms[1]`` on the +x axis, ``atoms[2]`` in the xy-plane with y > 0 (a proper
rotation, so a mirror image keeps its handedness). The forward map of any rotated and translated
copy of x gives the same z.

Volume element (rigid motions split off; dR the Haar measure of SO(3), total 8π²)::

    d³ᴺx = d³t · dR · J(z) · dz,   J = r₁² · r₂² sin θ₂ · ∏_{i≥3} rᵢ² sin θᵢ,
    log J = 2 Σ_bonds log r + Σ_angles log sin θ.

With the frame atoms fixed, the map z → (x₁; x₂, y₂; x_i, y_i, z_i for i ≥ 3) has the Jacobian
r₂ · ∏_{i≥3} rᵢ² sin θᵢ; the remaining r₁² r₂ sin θ₂ is the rotation measure (the tests check both).

Normalisation, fitted from data by :meth:`InternalCoordinates.fit` and part of the transform:

- bonds and angles standardised, z = (r − μ)/σ (log-det −Σ log σ);
- each dihedral's cut moved to its least populated angle c (:func:`least_populated_angle`):
  z = wrap(φ − c − π), so the new variable jumps at ±π exactly where φ crosses c and the density
  is continuous inside the interval (a bijection of the circle; log-det 0). Trans peptide bonds
  (ω ≈ ±π) are the standard case where this matters;
- ``periodic=False``: dihedral features in (−π, π], for flows on an interval; ``periodic=True``:
  in [−π, π), for flows on the torus (the cut shift is then harmless and optional);
- optionally (``standardize_dihedrals=s`` in :meth:`InternalCoordinates.fit`), each *narrow*
  dihedral, one whose circular standard deviation √(−2 log R) in the data is below s rad (in
  alanine dipeptide 14 of 19: the dihedrals that place hydrogens, carbonyl oxygens and the trans
  peptide bonds, spreads 0.08–0.19 rad), is standardised after the cut shift,
  z = (wrap(φ − c − π) − μ)/σ (log-det −log σ), and becomes a real feature: a flow then maps a
  normal prior onto it instead of squeezing a uniform angle into a 0.1-rad spike. Its domain is
  the interval ((−π − μ)/σ, (π − μ)/σ]; a z outside it is no dihedral, and :meth:`inverse` gives
  such a row a NaN log-det (the cut sits at the least populated angle, many σ away, so a fitted
  flow puts negligible mass there). Boltzmann generators (Noé et al. 2019) and FAB (Midgley et
  al. 2023) keep only a few dihedrals circular in the same way. :meth:`periodic_mask` lists the
  dihedrals that stay on the circle.

Layout of z, ``(batch, 3n − 6)``: ``[bonds (n − 1) | angles (n − 2) | dihedrals (n − 3)]``, each
block in placement order (:meth:`ZMatrix.bond_rows` etc.).

**One density convention** (DESIGN.md): ``forward(x)`` returns ``(z, log_det)`` with
log_det = −log J(z) − Σ log σ (σ of bonds, angles and standardised dihedrals),
``inverse(z)`` returns ``(x, −that)``, so a model with density
log q(z) reports, for its Cartesian sample x (nm),
``log q(x) = log q(z) − log J(z) − Σ log σ = log q(z) − inverse_log_det``: the density per
d³ᴺx / (d³t dR). It equals the density of the Cartesian configuration integrated over rigid
motions, so log w = −u(x) − log q(x) gives correct weights; log Z differs from the mean-free
Cartesian convention by the constant rigid-motion volume.

Example:
    >>> import mdtraj
    >>> top = mdtraj.load("alanine-dipeptide.pdb").topology       # doctest: +SKIP
    >>> ic = InternalCoordinates.fit(zmatrix_from_topology(top), x_md)   # doctest: +SKIP
    >>> z, ld = ic(x_md)                                           # doctest: +SKIP
    >>> x, ld_inv = ic.inverse(z_flow)                             # doctest: +SKIP
    >>> log_q_x = log_q_z - ld_inv                                 # doctest: +SKIP
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from boltzflow.systems.geometry import dihedral
from boltzflow.systems.zmatrix import ZMatrix
from boltzflow.validate import nonnegative_float

__all__ = [
    "LOG_Q_CONVENTION",
    "LOG_Q_INTERNAL",
    "CartesianDensity",
    "InternalCoordinates",
    "cartesian_from_internal",
    "internal_from_cartesian",
    "least_populated_angle",
    "log_volume",
    "standard_frame",
    "wrap_angle",
]

_FORMAT = "boltzflow.internal_coordinates"
#: name of the extra per-sample column of internal-coordinate models: log q(x) + log J(z), the
#: density of the physical internal coordinates (bonds nm, angles and dihedrals rad)
LOG_Q_INTERNAL = "log_q_internal"
#: what the log q of an internal-coordinate model is a density of (recorded in sample files)
LOG_Q_CONVENTION = (
    "density per d^3N x / (d^3t dR): log q(z) - log J(z) - normalisation log-dets "
    "(internal coordinates; rigid motions integrated out)"
)
#: the normalised blocks of z, in layout order (buffers ``{block}_mean`` / ``{block}_std``)
_BLOCKS = ("bond", "angle", "dihedral")
#: buffers that version 1 dicts do not have
_V2_BUFFERS = ("dihedral_mean", "dihedral_std", "dihedral_periodic")


@lru_cache(maxsize=32)
class CartesianDensity(NamedTuple):
    """A model's samples in internal coordinates brought to Cartesian form
    (:meth:`InternalCoordinates.cartesian_density`), all ``float64``.

    Attributes:
        x: ``(B, 3n)`` positions (nm, standard frame).
        log_q: ``(B,)`` log q(x) = log q(z) − log J(z) − Σ log σ (:data:`LOG_Q_CONVENTION`);
            ``+inf`` for rows whose z is no molecule (weight 0).
        log_q_internal: ``(B,)`` log q(x) + log J(z) (:data:`LOG_Q_INTERNAL`).
    """

    x: Tensor
    log_q: Tensor
    log_q_internal: Tensor


def _rows(zmatrix: ZMatrix) -> tuple[Tensor, Tensor, Tensor]:
    return (
        torch.tensor(zmatrix.bond_rows(), dtype=torch.long).reshape(-1, 2),
        torch.tensor(zmatrix.angle_rows(), dtype=torch.long).reshape(-1, 3),
        torch.tensor(zmatrix.dihedral_rows(), dtype=torch.long).reshape(-1, 4),
    )


def _positions(x: Tensor, zmatrix: ZMatrix, name: str = "x") -> Tensor:
    """``(batch, n, 3)`` view of flat ``(batch, 3n)`` positions, with clear errors."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    n = zmatrix.n_atoms
    if x.ndim != 2 or x.shape[1] != 3 * n:
        raise ValueError(
            f"{name} must have shape (batch, {3 * n}) for {n} atoms, got {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).any(dim=1).nonzero().flatten().tolist()
        raise ValueError(f"{name} has non-finite values (NaN or inf) in rows {bad[:10]}")
    return x.reshape(x.shape[0], n, 3)


def wrap_angle(angle: Tensor, *, periodic: bool = False) -> Tensor:
    """Angles reduced modulo 2π to (−π, π] (``periodic=False``) or [−π, π) (``periodic=True``)."""
    two_pi = 2 * math.pi
    if periodic:
        out = torch.remainder(angle + math.pi, two_pi) - math.pi
        return torch.where(out >= math.pi, out - two_pi, out)
    out = math.pi - torch.remainder(math.pi - angle, two_pi)
    return torch.where(out <= -math.pi, out + two_pi, out)


def internal_from_cartesian(x: Tensor, zmatrix: ZMatrix) -> tuple[Tensor, Tensor, Tensor]:
    """Bond lengths, angles and dihedrals of Cartesian positions.

    Args:
        x: ``(batch, 3n)`` positions (nm), finite.
        zmatrix: the :class:`ZMatrix` over the n atoms.

    Returns:
        ``(bonds, angles, dihedrals)`` of shapes ``(batch, n − 1)`` (nm), ``(batch, n − 2)`` (rad,
        in [0, π]) and ``(batch, n − 3)`` (rad, in (−π, π], :func:`~boltzflow.systems.geometry.
        dihedral`), in placement order; differentiable.
    """
    p = _positions(x, zmatrix)
    bond_idx, angle_idx, dihedral_idx = (t.to(p.device) for t in _rows(zmatrix))
    bonds = torch.linalg.vector_norm(p[:, bond_idx[:, 0]] - p[:, bond_idx[:, 1]], dim=-1)
    u = p[:, angle_idx[:, 0]] - p[:, angle_idx[:, 1]]
    v = p[:, angle_idx[:, 2]] - p[:, angle_idx[:, 1]]
    # atan2(|u × v|, u · v) is accurate near 0 and π, where acos is not.
    angles = torch.atan2(
        torch.linalg.vector_norm(torch.linalg.cross(u, v), dim=-1), (u * v).sum(-1)
    )
    if len(dihedral_idx):
        dihedrals = dihedral(p, dihedral_idx)
    else:
        dihedrals = p.new_zeros(p.shape[0], 0)
    return bonds, angles, dihedrals


def _unit(v: Tensor) -> Tensor:
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)


def cartesian_from_internal(
    bonds: Tensor, angles: Tensor, dihedrals: Tensor, zmatrix: ZMatrix
) -> Tensor:
    """Cartesian positions in the standard frame from internal coordinates (NeRF placement).

    Each atom i ≥ 3 is placed from its references (l, k, j) by the natural extension reference
    frame construction (Parsons et al., J. Comput. Chem. 26, 1063 (2005)), so that
    |x_i − x_j| = rᵢ, ∠(i, j, k) = θᵢ and dihedral(i, j, k, l) = φᵢ.

    Args:
        bonds: ``(batch, n − 1)`` nm; angles: ``(batch, n − 2)`` rad; dihedrals: ``(batch, n − 3)``
            rad, in placement order.
        zmatrix: the :class:`ZMatrix`.

    Returns:
        ``(batch, 3n)`` positions (nm) in the standard frame (see the module docstring);
        differentiable. Non-finite inputs give non-finite rows (no error).
    """
    n = zmatrix.n_atoms
    batch = bonds.shape[0]
    for name, t, width in (("bonds", bonds, n - 1), ("angles", angles, n - 2)):
        if t.ndim != 2 or t.shape != (batch, width):
            raise ValueError(f"{name} must have shape ({batch}, {width}), got {tuple(t.shape)}")
    if dihedrals.shape != (batch, n - 3):
        raise ValueError(
            f"dihedrals must have shape ({batch}, {n - 3}), got {tuple(dihedrals.shape)}"
        )
    pos: list[Tensor | None] = [None] * n
    zero = bonds.new_zeros(batch)
    a0, a1, a2 = zmatrix.atoms[:3]
    pos[a0] = bonds.new_zeros(batch, 3)
    pos[a1] = torch.stack([bonds[:, 0], zero, zero], dim=-1)
    j2, k2, _ = zmatrix.references[1]
    origin, toward = pos[j2], pos[k2]
    assert origin is not None and toward is not None
    along = _unit(toward - origin)  # ±x
    y_axis = torch.stack([zero, torch.ones_like(zero), zero], dim=-1)
    r2, t2 = bonds[:, 1:2], angles[:, 0:1]
    pos[a2] = origin + r2 * (torch.cos(t2) * along + torch.sin(t2) * y_axis)
    for p in range(3, n):
        j, k, l_atom = zmatrix.references[p - 1]
        c, b, a = pos[j], pos[k], pos[l_atom]
        assert a is not None and b is not None and c is not None
        r, theta, phi = bonds[:, p - 1 : p], angles[:, p - 2 : p - 1], dihedrals[:, p - 3 : p - 2]
        bc = _unit(c - b)
        normal = _unit(torch.linalg.cross(b - a, bc))
        m = torch.linalg.cross(normal, bc)
        pos[zmatrix.atoms[p]] = c + r * (
            -torch.cos(theta) * bc
            + torch.sin(theta) * (torch.cos(phi) * m + torch.sin(phi) * normal)
        )
    return torch.stack(pos, dim=1).reshape(batch, 3 * n)  # type: ignore[arg-type]


def log_volume(bonds: Tensor, angles: Tensor) -> Tensor:
    """log J = 2 Σ log r + Σ log sin θ, shape ``(batch,)``: the volume factor (module docstring).

    Args:
        bonds: ``(batch, n − 1)`` nm (log J is in log nm^(2(n−1))); angles: ``(batch, n − 2)`` rad.
        Rows with r ≤ 0 or θ outside (0, π) have no molecule: their log J is NaN or −inf.
    """
    return 2 * torch.log(bonds).sum(-1) + torch.log(torch.sin(angles)).sum(-1)


def standard_frame(x: Tensor, zmatrix: ZMatrix) -> Tensor:
    """Positions moved rigidly (translation + proper rotation) into the standard frame.

    ``atoms[0]`` to the origin, ``atoms[1]`` onto the +x axis, ``atoms[2]`` into the xy-plane with
    y > 0; ``cartesian_from_internal(*internal_from_cartesian(x))`` returns exactly this.

    Args:
        x: ``(batch, 3n)`` nm. Returns: ``(batch, 3n)`` nm.
    """
    p = _positions(x, zmatrix)
    a0, a1, a2 = zmatrix.atoms[:3]
    p = p - p[:, a0 : a0 + 1]
    e1 = _unit(p[:, a1])
    v = p[:, a2]
    e2 = _unit(v - (v * e1).sum(-1, keepdim=True) * e1)
    e3 = torch.linalg.cross(e1, e2)
    rotation = torch.stack([e1, e2, e3], dim=1)  # rows: the new axes
    return torch.einsum("bij,bnj->bni", rotation, p).reshape(x.shape)


def least_populated_angle(angles: Tensor, n_bins: int = 72) -> Tensor:
    """For each column of angles, the centre of its widest run of least-populated histogram bins.

    Bins of width 2π / n_bins cover the circle from −π; runs of bins with the minimum count are
    found circularly and the centre of the longest one (first on ties) is returned. A column with
    all counts equal gets π (no shift).

    Args:
        angles: ``(batch, k)`` rad, any real values (taken mod 2π).
        n_bins: number of histogram bins ≥ 2.

    Returns:
        ``(k,)`` angles in (−π, π], same dtype as ``angles``.
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 2:
        raise ValueError(f"n_bins must be an integer >= 2, got {n_bins!r}")
    if angles.ndim != 2:
        raise ValueError(f"angles must have shape (batch, k), got {tuple(angles.shape)}")
    width = 2 * math.pi / n_bins
    wrapped = wrap_angle(angles.detach().to(torch.float64), periodic=True)
    bins = ((wrapped + math.pi) / width).floor().long().clamp(0, n_bins - 1)
    cuts = []
    for column in bins.T:
        counts = torch.bincount(column, minlength=n_bins).tolist()
        low = min(counts)
        if all(c == low for c in counts):
            cuts.append(math.pi)
            continue
        start = next(b for b in range(n_bins) if counts[b] != low)  # a run cannot wrap past it
        best_len, best_start, run_len = 0, 0, 0
        for step in range(1, n_bins + 1):
            b = (start + step) % n_bins
            if counts[b] == low:
                run_len += 1
                if run_len > best_len:
                    best_len, best_start = run_len, (b - run_len + 1) % n_bins
            else:
                run_len = 0
        cuts.append(-math.pi + (best_start + best_len / 2) * width)
    out = torch.tensor(cuts, dtype=torch.float64).reshape(-1)
    return wrap_angle(out).to(angles.dtype)


class InternalCoordinates(nn.Module):
    """The normalised Cartesian ↔ internal-coordinate transform of one molecule (module docstring).

    Buffers (``state_dict``): ``bond_mean``, ``bond_std`` ``(n − 1,)`` nm; ``angle_mean``,
    ``angle_std`` ``(n − 2,)`` rad; ``dihedral_cut`` ``(n − 3,)`` rad, the angle each dihedral is
    cut at (π: unshifted); ``dihedral_mean``, ``dihedral_std`` ``(n − 3,)`` rad, the
    standardisation of the narrow dihedrals (0 and 1 for those on the circle);
    ``dihedral_periodic`` ``(n − 3,)`` bool, False for the standardised ones. Defaults are the
    identity normalisation with every dihedral periodic. :meth:`to_dict` /
    :meth:`from_dict` store everything, the Z-matrix included.

    Args:
        zmatrix: the molecule's :class:`ZMatrix`.
        periodic: dihedral features in [−π, π) (torus flows) instead of (−π, π].
    """

    bond_mean: Tensor
    bond_std: Tensor
    angle_mean: Tensor
    angle_std: Tensor
    dihedral_cut: Tensor
    dihedral_mean: Tensor
    dihedral_std: Tensor
    dihedral_periodic: Tensor

    def __init__(self, zmatrix: ZMatrix, *, periodic: bool = False) -> None:
        super().__init__()
        if not isinstance(zmatrix, ZMatrix):
            raise TypeError(f"zmatrix must be a ZMatrix, got {type(zmatrix).__name__}")
        self.zmatrix = zmatrix
        self.periodic = bool(periodic)
        n = zmatrix.n_atoms
        f64 = torch.float64
        self.register_buffer("bond_mean", torch.zeros(n - 1, dtype=f64))
        self.register_buffer("bond_std", torch.ones(n - 1, dtype=f64))
        self.register_buffer("angle_mean", torch.zeros(n - 2, dtype=f64))
        self.register_buffer("angle_std", torch.ones(n - 2, dtype=f64))
        self.register_buffer("dihedral_cut", torch.full((n - 3,), math.pi, dtype=f64))
        self.register_buffer("dihedral_mean", torch.zeros(n - 3, dtype=f64))
        self.register_buffer("dihedral_std", torch.ones(n - 3, dtype=f64))
        self.register_buffer("dihedral_periodic", torch.ones(n - 3, dtype=torch.bool))

    @classmethod
    def fit(
        cls,
        zmatrix: ZMatrix,
        x: Tensor,
        *,
        periodic: bool = False,
        shift_cuts: bool = True,
        n_bins: int = 72,
        standardize_dihedrals: float = 0.0,
    ) -> InternalCoordinates:
        """The transform with its normalisation fitted to data.

        Args:
            zmatrix: the molecule's :class:`ZMatrix`.
            x: ``(batch, 3n)`` Cartesian frames (nm), batch ≥ 2, e.g. MD samples.
            periodic: see the class.
            shift_cuts: move each dihedral's cut to its least populated angle
                (:func:`least_populated_angle` with ``n_bins``); False keeps the cut at ±π.
            n_bins: histogram bins for the cut search.
            standardize_dihedrals: standardise (and take off the circle) every dihedral whose
                circular standard deviation in the data is below this many rad (module
                docstring); 0 keeps every dihedral periodic. Needs ``shift_cuts``.

        Raises:
            ValueError: bad shapes, non-finite frames, fewer than 2 frames, a bond or angle
                that does not vary in the data (constrained bonds cannot be standardised), or a
                negative ``standardize_dihedrals`` (or one without ``shift_cuts``).
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        threshold = nonnegative_float(standardize_dihedrals, "standardize_dihedrals")
        if threshold > 0 and not shift_cuts:
            raise ValueError(
                "standardize_dihedrals needs shift_cuts (the cut must be off the data)"
            )
        ic = cls(zmatrix, periodic=periodic)
        with torch.no_grad():
            bonds, angles, dihedrals = internal_from_cartesian(x.to(torch.float64), zmatrix)
        if bonds.shape[0] < 2:
            raise ValueError(f"fitting needs at least 2 frames, got {bonds.shape[0]}")
        for name, values in (("bond", bonds), ("angle", angles)):
            std = values.std(dim=0)
            flat = (~(std > 0)).nonzero().flatten().tolist()
            if flat:
                rows = zmatrix.bond_rows() if name == "bond" else zmatrix.angle_rows()
                raise ValueError(
                    f"{name}s {[rows[i] for i in flat[:10]]} do not vary in the data (std 0; "
                    "constrained?); they cannot be standardised"
                )
            getattr(ic, f"{name}_mean").copy_(values.mean(dim=0))
            getattr(ic, f"{name}_std").copy_(std)
        if shift_cuts and dihedrals.shape[1]:
            ic.dihedral_cut.copy_(least_populated_angle(dihedrals, n_bins))
        if threshold > 0 and dihedrals.shape[1]:
            ic._standardise_narrow_dihedrals(dihedrals, threshold)
        return ic

    def _standardise_narrow_dihedrals(self, dihedrals: Tensor, threshold: float) -> None:
        """Fit mean and std of the cut-shifted dihedrals whose circular std is < threshold."""
        resultant = torch.sqrt(dihedrals.cos().mean(0) ** 2 + dihedrals.sin().mean(0) ** 2)
        circular_std = torch.sqrt(-2 * resultant.clamp_min(1e-300).log())
        narrow = circular_std < threshold
        shifted = wrap_angle(dihedrals - self.dihedral_cut - math.pi, periodic=self.periodic)
        std = shifted.std(dim=0)
        narrow &= std > 0
        self.dihedral_mean.copy_(torch.where(narrow, shifted.mean(dim=0), 0.0))
        self.dihedral_std.copy_(torch.where(narrow, std, 1.0))
        self.dihedral_periodic.copy_(~narrow)

    @property
    def n_atoms(self) -> int:
        """Number of atoms n."""
        return self.zmatrix.n_atoms

    @property
    def dim(self) -> int:
        """Number of internal features, 3n − 6."""
        return self.zmatrix.n_dof

    @property
    def bond_slice(self) -> slice:
        """Columns of z holding the standardised bonds."""
        return slice(0, self.n_atoms - 1)

    @property
    def angle_slice(self) -> slice:
        """Columns of z holding the standardised angles."""
        return slice(self.n_atoms - 1, 2 * self.n_atoms - 3)

    @property
    def dihedral_slice(self) -> slice:
        """Columns of z holding the (cut-shifted) dihedrals."""
        return slice(2 * self.n_atoms - 3, self.dim)

    def periodic_mask(self) -> Tensor:
        """Boolean ``(3n − 6,)``: True for the dihedral columns on the circle (not standardised)."""
        mask = torch.zeros(self.dim, dtype=torch.bool)
        mask[self.dihedral_slice] = self.dihedral_periodic.cpu()
        return mask

    def _normalisation_log_det(self, like: Tensor) -> Tensor:
        """Σ log σ over bonds, angles and standardised dihedrals: log |det ∂(r, θ, φ)/∂z|, a
        scalar (dtype/device of like)."""
        return sum(getattr(self, f"{k}_std").to(like).log().sum() for k in _BLOCKS)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Cartesian → normalised internal coordinates.

        Args:
            x: ``(batch, 3n)`` nm, finite, any rigid placement.

        Returns:
            ``(z, log_det)``: z ``(batch, 3n − 6)`` in the module's layout and ``log_det``
            ``(batch,)`` = −log J(z) − Σ log σ, the log-density change x → z (so
            log q(x) = log q(z) + log_det).

        Raises:
            ValueError: wrong shape, non-float or non-finite x.
        """
        bonds, angles, dihedrals = internal_from_cartesian(x, self.zmatrix)
        shifted = wrap_angle(
            dihedrals - self.dihedral_cut.to(bonds) - math.pi, periodic=self.periodic
        )
        z = torch.cat(
            [
                (values - getattr(self, f"{k}_mean").to(bonds))
                / getattr(self, f"{k}_std").to(bonds)
                for k, values in zip(_BLOCKS, (bonds, angles, shifted), strict=True)
            ],
            dim=-1,
        )
        log_det = -log_volume(bonds, angles) - self._normalisation_log_det(bonds)
        return z, log_det

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised internal coordinates → Cartesian positions in the standard frame.

        Args:
            z: ``(batch, 3n − 6)`` features in the module's layout.

        Returns:
            ``(x, log_det)``: x ``(batch, 3n)`` nm and ``log_det`` ``(batch,)`` = log J + Σ log σ,
            so that log q(x) = log q(z) − log_det. Rows whose bonds fall at r ≤ 0 or angles
            outside (0, π) are no molecule: their ``log_det`` is NaN or ±inf; so are rows with a
            standardised dihedral outside its domain (module docstring): ``log_det`` NaN.
            Non-finite rows pass through as non-finite (no error), for the energy code to count.

        Raises:
            ValueError: wrong shape or non-float z.
        """
        if not isinstance(z, Tensor):
            raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(
                f"z must have shape (batch, {self.dim}) for {self.n_atoms} atoms, "
                f"got {tuple(z.shape)}"
            )
        if not z.is_floating_point():
            raise ValueError(f"z must be a floating-point tensor, got {z.dtype}")
        bonds = z[:, self.bond_slice] * self.bond_std.to(z) + self.bond_mean.to(z)
        angles = z[:, self.angle_slice] * self.angle_std.to(z) + self.angle_mean.to(z)
        shifted = z[:, self.dihedral_slice] * self.dihedral_std.to(z) + self.dihedral_mean.to(z)
        dihedrals = shifted + self.dihedral_cut.to(z) + math.pi
        x = cartesian_from_internal(bonds, angles, dihedrals, self.zmatrix)
        log_det = log_volume(bonds, angles) + self._normalisation_log_det(z)
        standardised = ~self.dihedral_periodic.to(z.device)
        if bool(standardised.any()):
            outside = ((shifted.abs() > math.pi) & standardised).any(dim=1)
            log_det = torch.where(outside, torch.full_like(log_det, math.nan), log_det)
        return x, log_det

    def cartesian_density(self, z: Tensor, log_q_z: Tensor) -> CartesianDensity:
        """Samples ``z (B, 3n − 6)`` of a model on this transform's coordinates and their log
        density ``log_q_z (B,)`` -> Cartesian x (nm, standard frame) and log q(x) in the one
        density convention (module docstring): log q(x) = log q(z) − log J(z) − Σ log σ. The
        one place where internal-coordinate models (the NF, the flow-map students, the Euler
        baselines) turn their output into Cartesian samples.

        A row whose z is no molecule (r ≤ 0, θ outside (0, π), a standardised dihedral outside
        its domain: the inverse's log-det is not finite) decodes to positions whose density is
        not q; its log q is ``+inf`` (importance weight 0), which keeps weights unbiased:
        E_q[w · 1(valid)] = ∫ p over the valid z. Computed in float64.

        Returns:
            :class:`CartesianDensity` ``(x, log_q, log_q_internal)``, float64.
        """
        x, log_det = self.inverse(z.to(torch.float64))
        log_q = torch.where(torch.isfinite(log_det), log_q_z.double() - log_det, math.inf)
        log_j = log_det - self._normalisation_log_det(log_det)
        return CartesianDensity(x, log_q, log_q + log_j)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the Z-matrix, the mode and the fitted normalisation."""
        return {
            "format": _FORMAT,
            "version": 2,
            "zmatrix": self.zmatrix.to_dict(),
            "periodic": self.periodic,
            **{name: buf.tolist() for name, buf in self.named_buffers()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InternalCoordinates:
        """The transform written by :meth:`to_dict` (checked: format, lengths, positive stds).

        Version 1 (before dihedral standardisation) loads with every dihedral periodic.
        """
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ValueError(f"not an internal-coordinates dict (format {_FORMAT!r} expected)")
        version = data.get("version")
        if version not in (1, 2):
            raise ValueError(f"unsupported internal-coordinates version {version!r}")
        ic = cls(ZMatrix.from_dict(data["zmatrix"]), periodic=bool(data["periodic"]))
        for name, buf in ic.named_buffers():
            if version == 1 and name in _V2_BUFFERS:
                continue  # identity standardisation, every dihedral periodic
            if name not in data:
                raise ValueError(f"internal-coordinates dict misses {name!r}")
            if buf.dtype == torch.bool:
                flags = data[name]
                if not isinstance(flags, list) or not all(isinstance(f, bool) for f in flags):
                    raise ValueError(f"{name} must be a list of booleans")
                if len(flags) != buf.shape[0]:
                    raise ValueError(f"{name} must hold {buf.shape[0]} booleans")
                buf.copy_(torch.tensor(flags, dtype=torch.bool).reshape(-1))
                continue
            values = torch.as_tensor(data[name], dtype=torch.float64)
            if values.shape != buf.shape or not bool(torch.isfinite(values).all()):
                raise ValueError(f"{name} must be {buf.shape[0]} finite numbers")
            if name.endswith("_std") and not bool((values > 0).all()):
                raise ValueError(f"{name} must be positive")
            buf.copy_(values)
        return ic

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        """State dicts saved before dihedral standardisation load with every dihedral periodic."""
        if all(prefix + name not in state_dict for name in _V2_BUFFERS):
            for name in _V2_BUFFERS:
                state_dict[prefix + name] = getattr(self, name).clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"n_atoms={self.n_atoms}, dim={self.dim}, periodic={self.periodic}"
