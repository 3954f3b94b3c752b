"""Molecular internal coordinates: dihedral angles and chirality (torch, batched, differentiable).

:func:`dihedral` is the one dihedral implementation of boltzflow; everything that needs φ/ψ calls
it (directly or through :func:`backbone_dihedrals`). Positions may be flat ``(..., 3 * n_atoms)``
or ``(..., n_atoms, 3)``; any length unit.

Chirality: a Cartesian generative model can also produce the mirror image of a molecule, which for
alanine dipeptide is D-alanine, a different molecule with the same energy. The chirality of the
alanine Cα is the sign of the signed volume (N − Cα) · ((C − Cα) × (Cβ − Cα)); it is positive for
the L-alanine of the shipped PDB (checked by the tests). The whole configuration is mirrored by
x → −x, which flips the sign of that volume and of every dihedral.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "ALDP_CHIRALITY_ATOMS",
    "ALDP_L_FORM_SIGN",
    "ALDP_PHI_ATOMS",
    "ALDP_PSI_ATOMS",
    "backbone_dihedrals",
    "chirality_volume",
    "dihedral",
    "filter_chirality",
    "fix_chirality",
    "is_l_form",
]

#: Backbone φ of alanine dipeptide (C(ACE), N, Cα, C), 0-based in the atom order of the built-in
#: ALDP PDB (``boltzflow/systems/definitions/aldp``).
ALDP_PHI_ATOMS: tuple[int, int, int, int] = (4, 6, 8, 14)
#: Backbone ψ of alanine dipeptide (N, Cα, C, N(NME)).
ALDP_PSI_ATOMS: tuple[int, int, int, int] = (6, 8, 14, 16)
#: Alanine Cα chirality atoms: (Cα, N, C, Cβ).
ALDP_CHIRALITY_ATOMS: tuple[int, int, int, int] = (8, 6, 14, 10)
#: Sign of :func:`chirality_volume` of L-alanine with :data:`ALDP_CHIRALITY_ATOMS`.
ALDP_L_FORM_SIGN = 1


def _as_atoms(x: Tensor) -> Tensor:
    """``(..., n, 3)`` view of flat ``(..., 3n)`` or particle ``(..., n, 3)`` positions."""
    if not isinstance(x, Tensor):
        raise TypeError(f"positions must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim >= 2 and x.shape[-1] == 3:
        return x
    if x.ndim >= 1 and x.shape[-1] % 3 == 0 and x.shape[-1] > 3:
        return x.reshape(*x.shape[:-1], x.shape[-1] // 3, 3)
    raise ValueError(
        f"positions must be flat (..., 3 * n_atoms) or (..., n_atoms, 3), got {tuple(x.shape)}"
    )


def _index_tensor(indices: Sequence[int] | Tensor, width: int, n_atoms: int) -> Tensor:
    idx = torch.as_tensor(indices, dtype=torch.long)
    if idx.shape[-1:] != (width,) or idx.ndim > 2:
        raise ValueError(
            f"atom indices must have shape ({width},) or (k, {width}), got {tuple(idx.shape)}"
        )
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_atoms):
        raise ValueError(f"atom indices {idx.tolist()} out of range for {n_atoms} atoms")
    return idx


def dihedral(x: Tensor, indices: Sequence[int] | Tensor) -> Tensor:
    """Dihedral angle(s) of atoms (i, j, k, l), IUPAC sign convention, in radians in (−π, π].

    With b0 = r_j − r_i, b1 = r_k − r_j, b2 = r_l − r_k the angle is
    atan2(|b1| b0·(b1×b2), (b0×b1)·(b1×b2)) (Blondel & Karplus, J. Comput. Chem. 17, 1132 (1996);
    the same convention as mdtraj.compute_dihedrals). Cis is 0, trans is π.

    Args:
        x: positions, flat ``(..., 3 * n_atoms)`` or ``(..., n_atoms, 3)``.
        indices: four atom indices, or ``(k, 4)`` for k dihedrals at once.

    Returns:
        ``(...)`` angles for four indices, ``(..., k)`` for ``(k, 4)``; differentiable in ``x``
        except at collinear atoms.
    """
    p = _as_atoms(x)
    idx = _index_tensor(indices, 4, p.shape[-2]).to(p.device)
    a, b, c, d = (p[..., idx[..., m], :] for m in range(4))
    b0, b1, b2 = b - a, c - b, d - c
    n12 = torch.linalg.cross(b1, b2)
    y = torch.linalg.vector_norm(b1, dim=-1) * (b0 * n12).sum(-1)
    xx = (torch.linalg.cross(b0, b1) * n12).sum(-1)
    angle = torch.atan2(y, xx)
    # atan2(-0.0, negative) is -π; report the half-open interval (−π, π].
    return torch.where(angle <= -math.pi, angle + 2 * math.pi, angle)


def backbone_dihedrals(
    x: Tensor,
    phi_atoms: Sequence[int] = ALDP_PHI_ATOMS,
    psi_atoms: Sequence[int] = ALDP_PSI_ATOMS,
) -> tuple[Tensor, Tensor]:
    """Backbone (φ, ψ) in radians, each of shape ``(...)``; defaults are alanine dipeptide's."""
    angles = dihedral(x, [list(phi_atoms), list(psi_atoms)])
    return angles[..., 0], angles[..., 1]


def chirality_volume(x: Tensor, atoms: Sequence[int] = ALDP_CHIRALITY_ATOMS) -> Tensor:
    """Signed volume (b − a) · ((c − a) × (d − a)) of atoms ``(a, b, c, d)``, shape ``(...)``.

    For ``(Cα, N, C, Cβ)`` its sign tells L from D; units are length cubed.
    """
    p = _as_atoms(x)
    idx = _index_tensor(atoms, 4, p.shape[-2]).to(p.device)
    if idx.ndim != 1:
        raise ValueError("chirality atoms must be four indices (centre, then three substituents)")
    centre = p[..., idx[0], :]
    u, v, w = (p[..., idx[m], :] - centre for m in (1, 2, 3))
    return (u * torch.linalg.cross(v, w)).sum(-1)


def is_l_form(
    x: Tensor, atoms: Sequence[int] = ALDP_CHIRALITY_ATOMS, l_sign: int = ALDP_L_FORM_SIGN
) -> Tensor:
    """Boolean ``(...)``: True where the chiral centre has the L configuration.

    Args:
        x: positions, flat or ``(..., n_atoms, 3)``.
        atoms: (centre, three substituents) as in :func:`chirality_volume`.
        l_sign: sign (+1 or −1) of :func:`chirality_volume` for the L form.
    """
    if l_sign not in (1, -1):
        raise ValueError(f"l_sign must be +1 or -1, got {l_sign!r}")
    return chirality_volume(x, atoms) * l_sign > 0


def fix_chirality(
    x: Tensor, atoms: Sequence[int] = ALDP_CHIRALITY_ATOMS, l_sign: int = ALDP_L_FORM_SIGN
) -> tuple[Tensor, float]:
    """Mirror (x → −x) the configurations that are not L; return them and the fraction mirrored.

    Mirroring is exact for the energy (a force field cannot tell enantiomers apart) and has unit
    Jacobian. For alanine dipeptide it also maps (φ, ψ) to (−φ, −ψ).

    Args:
        x: ``(batch, 3 * n_atoms)`` or ``(batch, n_atoms, 3)`` positions.

    Returns:
        ``(x_fixed, fraction)`` with ``x_fixed`` like ``x`` and ``fraction`` in [0, 1] (0 for an
        empty batch).
    """
    d_form = ~is_l_form(x, atoms, l_sign)
    mask = d_form.reshape(*d_form.shape, *([1] * (x.ndim - d_form.ndim)))
    fraction = float(d_form.float().mean()) if d_form.numel() else 0.0
    return torch.where(mask, -x, x), fraction


def filter_chirality(
    x: Tensor, atoms: Sequence[int] = ALDP_CHIRALITY_ATOMS, l_sign: int = ALDP_L_FORM_SIGN
) -> tuple[Tensor, Tensor]:
    """Keep only the L configurations of a batch.

    Args:
        x: ``(batch, 3 * n_atoms)`` or ``(batch, n_atoms, 3)`` positions.

    Returns:
        ``(x_l, keep)``: the kept rows and the boolean ``(batch,)`` mask (use it to filter weights
        or log-densities that belong to the same samples; the removed fraction is
        ``1 - keep.float().mean()``).
    """
    keep = is_l_form(x, atoms, l_sign)
    if keep.ndim != 1:
        raise ValueError(f"filter_chirality needs one batch dimension, got {tuple(x.shape)}")
    return x[keep], keep
