"""A torch-native batched force field compiled from an ``openmm.System``.

OpenMM has no batch API (one ``Context`` evaluates one configuration at a time; openmm issues
2535, 3875). :func:`compile_openmm_system` reads every force's parameters once into tensors, and
:class:`TorchForceField` then evaluates the potential energy of a whole batch with tensor
operations, on any device, in float32 or float64, differentiable by autograd.

Units and shapes follow :mod:`boltzflow.systems.molecular`: positions ``x`` are flat
``(batch, 3 * n_atoms)`` in nm, in the particle order of the ``openmm.System`` (for the molecular
systems, the atom order of the structure file); energies are kJ/mol, forces kJ/mol/nm, and
:meth:`TorchForceField.reduced_energy` divides by kT = R·T (:mod:`boltzflow.constants`).

Supported forces, each with the functional form of OpenMM's reference platform (OpenMM user
guide, "Standard Forces"):

- ``HarmonicBondForce``: ½ k (r − r₀)²;
- ``HarmonicAngleForce``: ½ k (θ − θ₀)²;
- ``PeriodicTorsionForce``: k (1 + cos(n φ − φ₀)), φ the IUPAC dihedral;
- ``NonbondedForce`` with ``NoCutoff``: Coulomb k_e q_i q_j / r plus Lennard-Jones
  4ε((σ/r)¹² − (σ/r)⁶) with Lorentz–Berthelot combination, every exception (excluded pairs,
  scaled 1-4 pairs) replacing the pair's parameters;
- ``GBSAOBCForce`` (OBC2, Onufriev, Bashford & Case, Proteins 55, 383 (2004)) with its ACE
  surface-area term, including OpenMM's correction for an atom buried inside another's
  descreening sphere;
- the ``CustomGBForce`` that OpenMM's AMBER loaders build (``openmm.app.internal.customgbforces``:
  HCT, OBC1, OBC2; an AMBER prmtop with ``implicitSolvent=OBC1``, or ``implicit/obc2.xml``), each
  recognised by its exact expression strings;
- ``CMMotionRemover`` is ignored, as OpenMM ignores it for energies.

Anything else (another force, a cutoff, periodic boundaries, virtual sites, parameter offsets, a
``CustomGBForce`` whose expressions differ) raises :class:`ValueError` naming the force: never a
silently wrong energy.

Example::

    from boltzflow.systems import load_system
    from boltzflow.systems.torch_ff import compile_openmm_system

    if __name__ == "__main__":
        with load_system("aldp") as aldp:
            ff = compile_openmm_system(aldp.openmm_system, temperature=aldp.temperature)
            u = ff.reduced_energy(aldp.reference_configuration())  # tensor([-38.3655])
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import openmm
import torch
from openmm import unit
from torch import Tensor, nn

from boltzflow.constants import kt_kj_per_mol
from boltzflow.nn.compile import CPU_OPTIONS, cpp_compiler

__all__ = ["ONE_4PI_EPS0", "TorchForceField", "compile_openmm_system"]

#: Coulomb constant 1/(4π ε₀) in kJ mol⁻¹ nm e⁻², as OpenMM defines it from CODATA 2018
#: (``ONE_4PI_EPS0`` in OpenMM's ``SimTKOpenMMRealType.h``). The AMBER ``CustomGBForce``
#: expressions carry their own literal (138.935485), which is read from the expression.
ONE_4PI_EPS0 = 1.0 / (
    4.0 * math.pi * 1e-6 * 8.8541878128e-12 / (1.602176634e-19**2 * 6.02214076e23)
)

# Memory a chunk of the batch may take for intermediates when ``chunk_size`` is automatic.
_CHUNK_BYTES_CPU = 64 * 2**20
_CHUNK_BYTES_GPU = 2**30
# Rows of a pass are padded to a multiple of this (covers SIMD widths of 2-64 elements).
_ROW_ALIGN = 64
# Peak memory of one pass in units of a (n_pairs, batch) tensor, bonded terms included:
# measured for ALDP with GB in float64, about 12 without a graph and 59 for energy_and_forces.
_PAIR_TEMPORARIES = 60

_T = TypeVar("_T")
_KJ = unit.kilojoule_per_mole
_NM = unit.nanometer


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _force_label(index: int, force: openmm.Force) -> str:
    name = force.getName()
    kind = type(force).__name__
    return f"force {index} ({kind})" if name == kind else f"force {index} ({kind} {name!r})"


def _tensor(values: object, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.as_tensor(np.asarray(values), dtype=dtype)


# -- bonded terms ------------------------------------------------------------------------------
# Every term works on positions laid out as (3, n_atoms, batch) and pair distances as
# (n_pairs, batch): the batch is the contiguous axis, so gathering atoms copies whole rows and
# every per-term parameter is a (n_terms, 1) column broadcast along the batch.
def _column(values: Tensor) -> Tensor:
    return values.reshape(-1, 1).clone()


def _gather(pos: Tensor, atoms: Tensor) -> Tensor:
    """``(3, n_atoms, batch)`` positions of atom list ``atoms`` -> ``(3, len(atoms), batch)``."""
    return pos.index_select(1, atoms)


def _norm(v: Tensor) -> Tensor:
    return torch.sqrt((v * v).sum(0))


class _Bonds(nn.Module):
    """Σ ½ k (r − r₀)² over bonds; r₀ in nm, k in kJ/mol/nm²."""

    def __init__(self, atoms: Tensor, length: Tensor, k: Tensor) -> None:
        super().__init__()
        self.register_buffer("atoms", atoms.T.contiguous())  # (2, n_bonds)
        self.register_buffer("length", _column(length))
        self.register_buffer("half_k", _column(0.5 * k))

    def forward(self, pos: Tensor, pair_r: Tensor | None) -> Tensor:
        r = _norm(_gather(pos, self.atoms[1]) - _gather(pos, self.atoms[0]))
        dr = r - self.length
        return (self.half_k * dr * dr).sum(0)


class _Angles(nn.Module):
    """Σ ½ k (θ − θ₀)² over angles i-j-k (j the vertex); θ in rad, k in kJ/mol/rad²."""

    def __init__(self, atoms: Tensor, angle: Tensor, k: Tensor) -> None:
        super().__init__()
        self.register_buffer("atoms", atoms.T.contiguous())  # (3, n_angles)
        self.register_buffer("angle", _column(angle))
        self.register_buffer("half_k", _column(0.5 * k))

    def forward(self, pos: Tensor, pair_r: Tensor | None) -> Tensor:
        vertex = _gather(pos, self.atoms[1])
        u, v = _gather(pos, self.atoms[0]) - vertex, _gather(pos, self.atoms[2]) - vertex
        # atan2(|u × v|, u · v) stays accurate (and differentiable) near 0 and π, unlike acos.
        cross = torch.linalg.cross(u, v, dim=0)
        sin2 = (cross * cross).sum(0)
        # Exactly at θ = 0 or π OpenMM's angle forces are zero, while the derivative of sqrt at 0
        # would make ours NaN: the inner where keeps sqrt's value and gives a zero derivative.
        straight = sin2 == 0
        sin = torch.where(straight, 0.0, torch.sqrt(torch.where(straight, 1.0, sin2)))
        theta = torch.atan2(sin, (u * v).sum(0))
        # An arm of zero length (coincident bonded atoms) leaves θ undefined; OpenMM's energy is
        # NaN there, and so is ours, so the configuration fails alike on both.
        theta = torch.where((u * u).sum(0) * (v * v).sum(0) == 0, math.nan, theta)
        dtheta = theta - self.angle
        return (self.half_k * dtheta * dtheta).sum(0)


class _Torsions(nn.Module):
    """Σ k (1 + cos(n φ − φ₀)) over proper and improper periodic torsions; k in kJ/mol."""

    def __init__(self, atoms: Tensor, periodicity: Tensor, phase: Tensor, k: Tensor) -> None:
        super().__init__()
        self.register_buffer("atoms", atoms.T.contiguous())  # (4, n_torsions)
        self.register_buffer("periodicity", _column(periodicity))
        self.register_buffer("phase", _column(phase))
        self.register_buffer("k", _column(k))

    def forward(self, pos: Tensor, pair_r: Tensor | None) -> Tensor:
        p0, p1, p2, p3 = (_gather(pos, self.atoms[m]) for m in range(4))
        b1, b2, b3 = p1 - p0, p2 - p1, p3 - p2
        n1 = torch.linalg.cross(b1, b2, dim=0)
        n2 = torch.linalg.cross(b2, b3, dim=0)
        # IUPAC sign convention: φ = atan2(|b2| b1·(b2×b3), (b1×b2)·(b2×b3)), as OpenMM uses.
        phi = torch.atan2(_norm(b2) * (b1 * n2).sum(0), (n1 * n2).sum(0))
        # With three atoms on a line (or two coincident) φ is undefined: OpenMM then takes
        # φ = π/2 and returns NaN forces (it divides by |n1|²|n2|²). We take the same value, and
        # sqrt's infinite derivative at 0 gives the same NaN derivative, so such a configuration
        # is treated alike by both (finite energy; a failed row when forces are needed).
        n1n2 = (n1 * n1).sum(0) * (n2 * n2).sum(0)
        phi = torch.where(n1n2 == 0, 0.5 * math.pi + 0.0 * torch.sqrt(n1n2), phi)
        return (self.k * (1.0 + torch.cos(self.periodicity * phi - self.phase))).sum(0)


# -- pairwise terms ----------------------------------------------------------------------------
class _Nonbonded(nn.Module):
    """Σ over interacting pairs of k_e q_i q_j / r + c12 / r¹² − c6 / r⁶ (no cutoff).

    Parameters run over the force field's list of all unique pairs: ``coulomb`` = k_e·q_i q_j
    in kJ/mol·nm, ``c12`` = 4εσ¹², ``c6`` = 4εσ⁶ (exceptions already substituted), zero for
    pairs that do not interact; ``keep`` marks the interacting pairs (None: all of them).
    A mask rather than a gather of the interacting pairs' distances: compiled, the gather
    became an element-by-element load and made this term 3x slower.
    """

    def __init__(
        self, keep: Tensor | None, coulomb: Tensor, c12: Tensor, c6: Tensor, has_lj: bool
    ) -> None:
        super().__init__()
        self.register_buffer("keep", None if keep is None else _column(keep))
        self.register_buffer("coulomb", _column(coulomb))
        self.register_buffer("c12", _column(c12))
        self.register_buffer("c6", _column(c6))
        self.has_lj = has_lj

    def forward(self, pos: Tensor, pair_r: Tensor | None) -> Tensor:
        assert pair_r is not None  # internal: the force field computes it for pairwise terms
        r = pair_r
        if self.keep is not None:
            # Pairs with no interaction have zero parameters; r = 1 there keeps them finite
            # (and their gradient zero) when two such atoms coincide.
            r = torch.where(self.keep, r, 1.0)
        inv_r = 1.0 / r
        energy = self.coulomb * inv_r
        if self.has_lj:
            inv_r2 = inv_r * inv_r
            inv_r6 = inv_r2 * inv_r2 * inv_r2
            energy = energy + (self.c12 * inv_r6 - self.c6) * inv_r6
        return energy.sum(0)


class _GeneralizedBorn(nn.Module):
    """Generalized Born implicit solvent with HCT/OBC Born radii and the ACE surface term.

    Born radii (Hawkins, Cramer & Truhlar, J. Phys. Chem. 100, 19824 (1996); Onufriev, Bashford
    & Case, Proteins 55, 383 (2004), Eqs. 6-8): I_i = Σ_{j≠i} h(r_ij, ρ̃_i, s_j ρ̃_j) with ρ̃ the
    offset radius ρ − 0.009 nm, then B_i = 1 / (1/ρ̃_i − tanh(α ψ − β ψ² + γ ψ³) / ρ_i) with
    ψ = I_i ρ̃_i (OBC), or B_i = 1 / (1/ρ̃_i − I_i) (HCT). Energy:
    −½ k_e (1/ε_in − 1/ε_out) [Σ_i q_i² / B_i + 2 Σ_{i<j} q_i q_j / f_ij],
    f_ij = sqrt(r² + B_i B_j exp(−r² / (4 B_i B_j))) (Still et al. 1990), plus the ACE term
    Σ_i 4π γ_SA (ρ_i + 0.14)² (ρ_i / B_i)⁶ (Schaefer, Bartels & Karplus 1998, as modified in
    OpenMM's ``ReferenceObc.cpp``).
    """

    def __init__(
        self,
        charge: Tensor,
        offset_radius: Tensor,
        scaled_radius: Tensor,
        tanh_radius: Tensor,
        sa_radius: Tensor,
        *,
        obc: tuple[float, float, float] | None,
        self_coef: float,
        pair_coef: float,
        sa_coef: float,
        probe: float,
        buried_correction: bool,
        pair_i: Tensor,
        pair_j: Tensor,
    ) -> None:
        super().__init__()
        self.n_atoms = int(charge.numel())
        self.obc = obc
        self.buried_correction = buried_correction
        self.has_sa = sa_coef != 0.0
        self.register_buffer("pair_i", pair_i)
        self.register_buffer("pair_j", pair_j)
        self.register_buffer("self_weight", _column(self_coef * charge**2))
        self.register_buffer("pair_weight", _column(pair_coef * charge[pair_i] * charge[pair_j]))
        self.register_buffer("inv_offset_radius", _column(1.0 / offset_radius))
        self.register_buffer("offset_radius", _column(offset_radius))
        self.register_buffer("inv_tanh_radius", _column(1.0 / tanh_radius))
        self.register_buffer("sa_radius", _column(sa_radius))
        self.register_buffer("sa_weight", _column(sa_coef * (sa_radius + probe) ** 2))
        # Per-pair parameters for both directions of the descreening integral.
        for tag, (a, b) in {"ij": (pair_i, pair_j), "ji": (pair_j, pair_i)}.items():
            self.register_buffer(f"rho_{tag}", _column(offset_radius[a]))
            self.register_buffer(f"inv_rho_{tag}", _column(1.0 / offset_radius[a]))
            self.register_buffer(f"s_{tag}", _column(scaled_radius[b]))
            self.register_buffer(f"s2_{tag}", _column(scaled_radius[b] ** 2))

    def _descreening(
        self, r: Tensor, inv_r: Tensor, rho: Tensor, inv_rho: Tensor, s: Tensor, s2: Tensor
    ) -> Tensor:
        """HCT pair integral h(r, ρ̃_i, s_j) (OpenMM's ``I`` expression), shape of ``r``."""
        upper = r + s
        lower = torch.maximum(rho, (r - s).abs())
        inv_u, inv_l = 1.0 / upper, 1.0 / lower
        value = 0.5 * (
            inv_l
            - inv_u
            + 0.25 * (r - s2 * inv_r) * (inv_u * inv_u - inv_l * inv_l)
            + 0.5 * torch.log(lower * inv_u) * inv_r
        )
        if self.buried_correction:
            # Atom i entirely inside j's descreening sphere (ρ̃_i < s_j − r, so L = s_j − r):
            # GBSAOBCForce adds 2(1/ρ̃_i − 1/L) to the paper's integrand, i.e. 1/ρ̃_i − 1/L to
            # h (OpenMM ReferenceObc.cpp, after Tinker); the CustomGBForce forms do not.
            value = value + torch.where(rho < s - r, inv_rho - inv_l, torch.zeros_like(r))
        # step(r + s_j − ρ̃_i): no contribution when j's sphere does not reach i.
        return torch.where(upper >= rho, value, torch.zeros_like(r))

    def forward(self, pos: Tensor, pair_r: Tensor | None) -> Tensor:
        assert pair_r is not None  # internal: the force field computes it for pairwise terms
        r = pair_r
        inv_r = 1.0 / r
        h_ij = self._descreening(r, inv_r, self.rho_ij, self.inv_rho_ij, self.s_ij, self.s2_ij)
        h_ji = self._descreening(r, inv_r, self.rho_ji, self.inv_rho_ji, self.s_ji, self.s2_ji)
        integral = r.new_zeros(self.n_atoms, r.shape[1])
        integral = integral.index_add(0, self.pair_i, h_ij).index_add(0, self.pair_j, h_ji)
        if self.obc is None:
            inv_born = self.inv_offset_radius - integral
        else:
            alpha, beta, gamma = self.obc
            psi = integral * self.offset_radius
            t = torch.tanh(psi * (alpha + psi * (gamma * psi - beta)))
            inv_born = self.inv_offset_radius - t * self.inv_tanh_radius
        energy = (self.self_weight * inv_born).sum(0)
        if self.has_sa:
            ratio = self.sa_radius * inv_born
            ratio3 = ratio * ratio * ratio
            energy = energy + (self.sa_weight * ratio3 * ratio3).sum(0)
        born = 1.0 / inv_born
        bb = born.index_select(0, self.pair_i) * born.index_select(0, self.pair_j)
        r2 = r * r
        f = torch.sqrt(r2 + bb * torch.exp(-0.25 * r2 / bb))
        return energy + (self.pair_weight / f).sum(0)


# -- compiling OpenMM forces --------------------------------------------------------------------
def _check_no_pbc(index: int, force: openmm.Force) -> None:
    if force.usesPeriodicBoundaryConditions():
        raise ValueError(
            f"{_force_label(index, force)} uses periodic boundary conditions, which the torch "
            "force field does not support"
        )


def _bonds(index: int, force: openmm.HarmonicBondForce) -> _Bonds:
    _check_no_pbc(index, force)
    rows = [force.getBondParameters(b) for b in range(force.getNumBonds())]
    return _Bonds(
        _tensor([[p[0], p[1]] for p in rows], torch.long).reshape(-1, 2),
        _tensor([p[2].value_in_unit(_NM) for p in rows]),
        _tensor([p[3].value_in_unit(_KJ / _NM**2) for p in rows]),
    )


def _angles(index: int, force: openmm.HarmonicAngleForce) -> _Angles:
    _check_no_pbc(index, force)
    rows = [force.getAngleParameters(a) for a in range(force.getNumAngles())]
    return _Angles(
        _tensor([p[:3] for p in rows], torch.long).reshape(-1, 3),
        _tensor([p[3].value_in_unit(unit.radian) for p in rows]),
        _tensor([p[4].value_in_unit(_KJ / unit.radian**2) for p in rows]),
    )


def _torsions(index: int, force: openmm.PeriodicTorsionForce) -> _Torsions:
    _check_no_pbc(index, force)
    rows = [force.getTorsionParameters(t) for t in range(force.getNumTorsions())]
    return _Torsions(
        _tensor([p[:4] for p in rows], torch.long).reshape(-1, 4),
        _tensor([float(p[4]) for p in rows]),
        _tensor([p[5].value_in_unit(unit.radian) for p in rows]),
        _tensor([p[6].value_in_unit(_KJ) for p in rows]),
    )


def _pair_slot(i: np.ndarray, j: np.ndarray, n: int) -> np.ndarray:
    """Position of unique pairs (i, j), i < j, in the row-major list of all unique pairs."""
    return i * n - i * (i + 1) // 2 + (j - i - 1)


def _nonbonded(index: int, force: openmm.NonbondedForce, n: int, pairs: Tensor) -> _Nonbonded:
    label = _force_label(index, force)
    if force.getNonbondedMethod() != openmm.NonbondedForce.NoCutoff:
        raise ValueError(
            f"{label}: nonbonded method {force.getNonbondedMethod()} is not supported, only "
            "NoCutoff (0)"
        )
    if force.getNumParticleParameterOffsets() or force.getNumExceptionParameterOffsets():
        raise ValueError(f"{label}: parameter offsets (global-parameter scaling) are not supported")
    params = [force.getParticleParameters(a) for a in range(n)]
    q = np.array([p[0].value_in_unit(unit.elementary_charge) for p in params])
    sigma = np.array([p[1].value_in_unit(_NM) for p in params])
    eps = np.array([p[2].value_in_unit(_KJ) for p in params])
    i, j = pairs[:, 0].numpy(), pairs[:, 1].numpy()
    qq, sig, ep = q[i] * q[j], 0.5 * (sigma[i] + sigma[j]), np.sqrt(eps[i] * eps[j])
    for e in range(force.getNumExceptions()):
        a, b, charge_prod, s, epsilon = force.getExceptionParameters(e)
        slot = _pair_slot(min(a, b), max(a, b), n)
        qq[slot] = charge_prod.value_in_unit(unit.elementary_charge**2)
        sig[slot] = s.value_in_unit(_NM)
        ep[slot] = epsilon.value_in_unit(_KJ)
    keep = (qq != 0.0) | (ep != 0.0)  # pairs fully excluded (or uncharged, no LJ) drop out
    qq, ep = np.where(keep, qq, 0.0), np.where(keep, ep, 0.0)
    s6 = sig**6
    return _Nonbonded(
        None if keep.all() else torch.as_tensor(keep),
        _tensor(ONE_4PI_EPS0 * qq),
        _tensor(4.0 * ep * s6 * s6),
        _tensor(4.0 * ep * s6),
        has_lj=bool((ep != 0.0).any()),
    )


def _gbsa_obc(index: int, force: openmm.GBSAOBCForce, n: int, pairs: Tensor) -> _GeneralizedBorn:
    label = _force_label(index, force)
    if force.getNonbondedMethod() != openmm.GBSAOBCForce.NoCutoff:
        raise ValueError(
            f"{label}: nonbonded method {force.getNonbondedMethod()} is not supported, only "
            "NoCutoff (0)"
        )
    rows = [force.getParticleParameters(a) for a in range(n)]
    q = _tensor([p[0].value_in_unit(unit.elementary_charge) for p in rows])
    radius = _tensor([p[1].value_in_unit(_NM) for p in rows])
    scale = _tensor([float(p[2]) for p in rows])
    # Dielectric offset 0.009 nm, probe radius 0.14 nm and OBC-II (α, β, γ) = (1, 0.8, 4.85):
    # the constants of OpenMM's ObcParameters (ObcTypeII), fixed for GBSAOBCForce.
    offset_radius = radius - 0.009
    e_in, e_out = force.getSoluteDielectric(), force.getSolventDielectric()
    prefactor = -ONE_4PI_EPS0 * (1.0 / e_in - 1.0 / e_out) if e_in and e_out else 0.0
    return _GeneralizedBorn(
        q,
        offset_radius,
        scale * offset_radius,
        radius,
        radius,
        obc=(1.0, 0.8, 4.85),
        self_coef=0.5 * prefactor,
        pair_coef=prefactor,
        sa_coef=4.0 * math.pi * force.getSurfaceAreaEnergy().value_in_unit(_KJ / _NM**2),
        probe=0.14,
        buried_correction=True,
        pair_i=pairs[:, 0].clone(),
        pair_j=pairs[:, 1].clone(),
    )


# The expressions of openmm.app.internal.customgbforces (OpenMM 8), whitespace removed; {name}
# marks a number read from the expression.
_GB_I = (
    "select(step(r+sr2-or1),0.5*(1/L-1/U+0.25*(r-sr2^2/r)*(1/(U^2)-1/(L^2))+0.5*log(L/U)/r),0);"
    "U=r+sr2;L=max(or1,D);D=abs(r-sr2)"
)
_GB_BORN = {  # model -> (expression, (α, β, γ) or None for HCT)
    "HCT": ("1/(1/or-I)", None),
    "OBC1": (
        "1/(1/or-tanh(0.8*psi+2.909125*psi^3)/radius);psi=I*or;radius=or+offset;offset={offset}",
        (0.8, 0.0, 2.909125),
    ),
    "OBC2": (
        "1/(1/or-tanh(psi-0.8*psi^2+4.85*psi^3)/radius);psi=I*or;radius=or+offset;offset={offset}",
        (1.0, 0.8, 4.85),
    ),
}
_GB_PARAMS = ";solventDielectric={e_out};soluteDielectric={e_in};kappa={kappa};offset={offset}"
_GB_SELF = "-0.5*{ke}*(1/soluteDielectric-1/solventDielectric)*charge^2/B" + _GB_PARAMS
_GB_SA = "{sa}*(radius+{probe})^2*(radius/B)^6;radius=or+offset" + _GB_PARAMS
_GB_PAIR = (
    "-{ke}*(1/soluteDielectric-1/solventDielectric)*charge1*charge2/f;"
    "f=sqrt(r^2+B1*B2*exp(-r^2/(4*B1*B2)))" + _GB_PARAMS
)
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


def _match(template: str, expression: str) -> dict[str, float] | None:
    """Numbers named in ``template`` if ``expression`` has exactly its form, else None."""
    pattern, seen = "", set()
    for literal, name in re.findall(r"([^{]*)(?:\{(\w+)\})?", template):
        pattern += re.escape(literal)
        if name:
            pattern += f"(?P={name})" if name in seen else f"(?P<{name}>{_NUMBER})"
            seen.add(name)
    found = re.fullmatch(pattern, re.sub(r"\s+", "", expression))
    return None if found is None else {k: float(v) for k, v in found.groupdict().items()}


def _custom_gb(index: int, force: openmm.CustomGBForce, n: int, pairs: Tensor) -> _GeneralizedBorn:
    label = _force_label(index, force)

    def refuse(why: str) -> ValueError:
        return ValueError(
            f"{label}: not a CustomGBForce form the torch force field knows ({why}); only the "
            "HCT/OBC1/OBC2 forces of openmm.app.internal.customgbforces with no cutoff are "
            "supported"
        )

    pair_no_excl = openmm.CustomGBForce.ParticlePairNoExclusions
    single = openmm.CustomGBForce.SingleParticle
    if force.getNonbondedMethod() != openmm.CustomGBForce.NoCutoff:
        raise refuse(f"nonbonded method {force.getNonbondedMethod()}, not NoCutoff")
    names = [
        force.getPerParticleParameterName(p) for p in range(force.getNumPerParticleParameters())
    ]
    if names != ["charge", "or", "sr"]:
        raise refuse(f"per-particle parameters {names}, expected ['charge', 'or', 'sr']")
    if force.getNumGlobalParameters() or force.getNumTabulatedFunctions():
        raise refuse("global parameters or tabulated functions")
    if force.getNumComputedValues() != 2:
        raise refuse(f"{force.getNumComputedValues()} computed values, expected I and B")
    (i_name, i_expr, i_type), (b_name, b_expr, b_type) = (
        force.getComputedValueParameters(v) for v in range(2)
    )
    if (i_name, i_type, b_name, b_type) != ("I", pair_no_excl, "B", single):
        raise refuse("computed values are not I (pair, no exclusions) then B (single particle)")
    if _match(_GB_I, i_expr) is None:
        raise refuse(f"descreening integral I = {i_expr!r}")
    model = None
    for key, (template, coefficients) in _GB_BORN.items():
        found = _match(template, b_expr)
        if found is not None:
            model, obc, b_offset = key, coefficients, found.get("offset", 0.009)
    if model is None:
        raise refuse(f"Born radius B = {b_expr!r}")
    self_term = sa_term = pair_term = None
    for t in range(force.getNumEnergyTerms()):
        expr, kind = force.getEnergyTermParameters(t)
        self_found, sa_found = _match(_GB_SELF, expr), _match(_GB_SA, expr)
        pair_found = _match(_GB_PAIR, expr)
        if kind == single and self_found is not None and self_term is None:
            self_term = self_found
        elif kind == single and sa_found is not None and sa_term is None:
            sa_term = sa_found
        elif kind == pair_no_excl and pair_found is not None and pair_term is None:
            pair_term = pair_found
        else:
            raise refuse(f"energy term {t} = {expr!r} (type {kind})")
    if self_term is None or pair_term is None:
        raise refuse("missing the self or the pair energy term")

    def coefficient(term: dict[str, float]) -> float:
        e_in, e_out = term["e_in"], term["e_out"]
        return -term["ke"] * (1.0 / e_in - 1.0 / e_out)

    rows = np.array([force.getParticleParameters(a) for a in range(n)], dtype=np.float64)
    q, offset_radius, scaled = (_tensor(rows[:, c]) for c in range(3))
    sa_offset = sa_term["offset"] if sa_term is not None else 0.0
    return _GeneralizedBorn(
        q,
        offset_radius,
        scaled,
        offset_radius + b_offset,
        offset_radius + sa_offset,
        obc=obc,
        self_coef=0.5 * coefficient(self_term),
        pair_coef=coefficient(pair_term),
        sa_coef=0.0 if sa_term is None else sa_term["sa"],
        probe=0.0 if sa_term is None else sa_term["probe"],
        buried_correction=False,
        pair_i=pairs[:, 0].clone(),
        pair_j=pairs[:, 1].clone(),
    )


# -- the force field ----------------------------------------------------------------------------
_POOL: ThreadPoolExecutor | None = None
_POOL_THREADS = 0
_POOL_LOCK = threading.Lock()


def _chunk_pool(threads: int) -> ThreadPoolExecutor:
    """One process-wide pool of ``threads`` threads for compiled chunks, kept between calls
    (a thread's first call into a compiled function costs several milliseconds)."""
    global _POOL, _POOL_THREADS
    with _POOL_LOCK:
        if _POOL is None or _POOL_THREADS != threads:
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            _POOL = ThreadPoolExecutor(threads, thread_name_prefix="boltzflow-ff")
            _POOL_THREADS = threads
        return _POOL


def _forget_pool() -> None:
    # A forked child inherits the pool object but not its threads: it makes its own.
    global _POOL
    _POOL = None


os.register_at_fork(after_in_child=_forget_pool)


class TorchForceField(nn.Module):
    """Batched potential energy of a compiled ``openmm.System`` (see :func:`compile_openmm_system`).

    Args:
        n_atoms: number of particles.
        terms: ``{label: term}``, one term per compiled OpenMM force.
        force_index: ``{label: index of the force in the openmm.System}``.
        pairs: ``(2, n_pairs)`` all unique atom pairs (i < j), or None without pairwise terms.
        temperature: default temperature in K for :meth:`reduced_energy` (None: pass one).
        chunk_size: configurations per evaluation pass (None: :meth:`auto_chunk_size`).
        compiled: evaluate through ``torch.compile`` (fuses the elementwise work; on CPU
            about 6-12x faster than eager here, after a one-off compilation of 5-20 s per chunk
            size, dtype and gradient mode). Chunks are padded to ``chunk_size`` so one shape
            serves; on CPU they run one per thread, ``torch.get_num_threads()`` at a time, in
            a pool of threads kept for the process.

    ``to(device)`` / ``to(dtype)`` move every parameter, as for any ``nn.Module``.
    """

    def __init__(
        self,
        n_atoms: int,
        terms: dict[str, nn.Module],
        force_index: dict[str, int],
        pairs: Tensor | None,
        *,
        temperature: float | None = None,
        chunk_size: int | None = None,
        compiled: bool = False,
    ) -> None:
        super().__init__()
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")
        self.n_atoms = int(n_atoms)
        self.terms = nn.ModuleDict(terms)
        self.force_index = dict(force_index)
        self.register_buffer("pairs", pairs)
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.compiled = compiled
        self._forget_compiled()

    def _forget_compiled(self) -> None:
        """No compiled graph yet: the next compiled evaluation compiles (once per key)."""
        self._compiled_total: object = None
        self._compiled_keys: set[tuple[object, ...]] = set()

    def _apply(self, fn: Callable[..., object], recurse: bool = True) -> TorchForceField:
        # .to(device / dtype): compile anew, with the options of the new device.
        out = super()._apply(fn, recurse)
        self._forget_compiled()
        return out

    def __getstate__(self) -> dict[str, object]:
        # A copy (copy.deepcopy, pickle) compiles its own graph: the compiled callable is
        # bound to this instance.
        state = dict(super().__getstate__())
        del state["_compiled_total"], state["_compiled_keys"]
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        super().__setstate__(state)
        self._forget_compiled()

    @property
    def dim(self) -> int:
        return 3 * self.n_atoms

    @property
    def dtype(self) -> torch.dtype:
        for buffer in self.buffers():
            if buffer.is_floating_point():
                return buffer.dtype
        return torch.get_default_dtype()

    @property
    def device(self) -> torch.device:
        for buffer in self.buffers():
            return buffer.device
        return torch.device("cpu")

    def auto_chunk_size(self) -> int:
        """Configurations per pass: intermediates near 64 MiB on CPU, 1 GiB on a GPU.

        On CPU small passes keep the working set near the caches (for ALDP, 256-1024
        configurations ran as fast as larger passes); a GPU needs large passes to be busy.
        """
        itemsize = torch.finfo(self.dtype).bits // 8
        n_pairs = 0 if self.pairs is None else self.pairs.shape[1]
        n_bonded = sum(
            t.atoms.shape[1]
            for t in self.terms.values()
            if isinstance(t, _Bonds | _Angles | _Torsions)
        )
        per_config = itemsize * (_PAIR_TEMPORARIES * n_pairs + 30 * n_bonded + 30 * self.n_atoms)
        budget = _CHUNK_BYTES_CPU if self.device.type == "cpu" else _CHUNK_BYTES_GPU
        return max(_ROW_ALIGN, budget // max(per_config, 1) // _ROW_ALIGN * _ROW_ALIGN)

    def _chunks(self, x: Tensor, chunk_size: int | None) -> tuple[int, Iterator[Tensor]]:
        """The pass size and the chunks of ``x``, each moved to this field's device and dtype
        only when reached (a large CPU batch is never copied whole)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (batch, {self.dim}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")
        size = chunk_size or self.chunk_size or self.auto_chunk_size()
        device, dtype = self.device, self.dtype
        return size, (chunk.to(device=device, dtype=dtype) for chunk in x.split(size))

    def _positions(self, x: Tensor) -> Tensor:
        """``(batch, 3 n)`` -> ``(3, n, batch)``: the batch becomes the contiguous axis.

        Kept outside the compiled region: inside it the compiler would fuse the transpose
        into every load and gather each atom's coordinates element by element (stride 3 n)
        instead of loading whole vectors along the batch.
        """
        return x.reshape(x.shape[0], self.n_atoms, 3).permute(2, 1, 0).contiguous()

    def _evaluate(self, pos: Tensor) -> dict[str, Tensor]:
        pair_r = None
        if self.pairs is not None:
            pair_r = _norm(_gather(pos, self.pairs[1]) - _gather(pos, self.pairs[0]))
        return {label: term(pos, pair_r) for label, term in self.terms.items()}

    def _total(self, pos: Tensor) -> Tensor:
        total = pos.new_zeros(pos.shape[2])
        for value in self._evaluate(pos).values():
            total = total + value
        return total

    def _padded(self, chunk: Tensor, size: int) -> Tensor:
        # Pad with copies of a real row to a multiple of _ROW_ALIGN rows (compiled: to the
        # chunk size, one compiled shape for every chunk). Vectorised loops compute the
        # trailing rows that do not fill a SIMD register with scalar code, whose log/exp/tanh
        # differ from the vector ones in the last bit; padding keeps every real row in the
        # vector path, so results do not depend on the chunk size or the batch, bit for bit.
        rows = chunk.shape[0]
        target = _round_up(size if self.compiled else rows, _ROW_ALIGN)
        if rows == target:
            return chunk
        return torch.cat([chunk, chunk[:1].expand(target - rows, -1)])

    def _chunk_energy(self, chunk: Tensor, size: int) -> Tensor:
        rows = chunk.shape[0]
        padded = self._padded(chunk, size)
        pos = self._positions(padded)
        if not self.compiled:
            return self._total(pos)[:rows]
        if self._compiled_total is None:
            # On CPU: kernels of one thread each, called from a C++ wrapper that releases the
            # GIL, so that _map_chunks can run one chunk per core (the compiler's own OpenMP
            # loops gained only 1.3x from a second core here; one chunk per core gains 2x).
            options = (
                {**CPU_OPTIONS, "cpp_wrapper": True, "cpp.threads": 1}
                if pos.device.type == "cpu"
                else {}
            )
            self._compiled_total = torch.compile(self._total, dynamic=False, options=options)
        return self._compiled_total(pos)[:rows]

    def _map_chunks(
        self, fn: Callable[[Tensor], _T], chunks: Iterator[Tensor], key: tuple[object, ...]
    ) -> list[_T]:
        """``[fn(chunk) for chunk in chunks]``; compiled on CPU, in torch.get_num_threads()
        threads, at most two chunks per thread in flight (memory stays bounded).

        ``key`` names what ``fn`` compiles (pass size, gradient mode): the first chunk of a
        new key runs in the calling thread, so that compilation happens there, once.
        """
        threads = torch.get_num_threads()
        if not self.compiled or self.device.type != "cpu" or threads < 2:
            return [fn(chunk) for chunk in chunks]
        results = []
        key = (*key, self.dtype, self.device)  # .to() makes a new graph too
        if key not in self._compiled_keys:
            first = next(chunks, None)
            if first is None:
                return []
            results.append(fn(first))
            self._compiled_keys.add(key)
        pool = _chunk_pool(threads)
        pending: deque[Future[_T]] = deque()
        try:
            for chunk in chunks:
                pending.append(pool.submit(fn, chunk))
                if len(pending) >= 2 * threads:
                    results.append(pending.popleft().result())
            results.extend(future.result() for future in pending)
        finally:  # on an error or Ctrl-C, drop what has not started and wait for the rest
            for future in pending:
                future.cancel()
            for future in pending:
                if not future.cancelled():
                    future.exception()
        return results

    def energy_terms(self, x: Tensor, *, chunk_size: int | None = None) -> dict[str, Tensor]:
        """Energy of each compiled force, ``{label: (batch,)}`` in kJ/mol (never compiled).

        Labels read ``"force 3 (NonbondedForce)"``; :attr:`force_index` maps them to the
        index of the force in the ``openmm.System``.
        """
        _, chunks = self._chunks(x, chunk_size)
        parts = []
        for chunk in chunks:
            terms = self._evaluate(self._positions(self._padded(chunk, chunk.shape[0])))
            parts.append({label: value[: chunk.shape[0]] for label, value in terms.items()})
        if not parts:
            empty = x.new_zeros(0, dtype=self.dtype, device=self.device)
            return {label: empty for label in self.terms}
        return {label: torch.cat([p[label] for p in parts]) for label in self.terms}

    def energy(self, x: Tensor, *, chunk_size: int | None = None) -> Tensor:
        """Potential energy ``(batch,)`` in kJ/mol of positions ``x`` ``(batch, 3 n_atoms)`` nm.

        Differentiable in ``x`` (higher orders too, uncompiled). ``x`` is converted to the
        force field's dtype and device, where the result lives. The batch is evaluated
        ``chunk_size`` rows at a time: without gradients memory stays bounded for any batch;
        with a graph (``x`` requiring grad) every chunk's graph is kept, so use
        :meth:`energy_and_forces` for bounded memory.
        """
        size, chunks = self._chunks(x, chunk_size)
        if torch.is_grad_enabled() and x.requires_grad:
            # Grad mode is per thread: a graph is built in the calling thread only.
            outs = [self._chunk_energy(chunk, size) for chunk in chunks]
        else:

            def evaluate(chunk: Tensor) -> Tensor:
                with torch.no_grad():
                    return self._chunk_energy(chunk, size)

            outs = self._map_chunks(evaluate, chunks, (size, "energy"))
        return torch.cat(outs) if outs else x.new_zeros(0, dtype=self.dtype, device=self.device)

    def forward(self, x: Tensor) -> Tensor:
        """Same as :meth:`energy`: ``(batch, 3 n_atoms)`` nm -> ``(batch,)`` kJ/mol."""
        return self.energy(x)

    def energy_and_forces(
        self, x: Tensor, *, chunk_size: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Energies ``(batch,)`` kJ/mol and forces −dU/dx ``(batch, 3 n_atoms)`` kJ/mol/nm.

        Each chunk's graph is freed before the next, so memory stays bounded; the results
        carry no graph.
        """
        size, chunks = self._chunks(x, chunk_size)

        def evaluate(chunk: Tensor) -> tuple[Tensor, Tensor]:
            with torch.enable_grad():
                xc = chunk.detach().requires_grad_(True)
                e = self._chunk_energy(xc, size)
                (grad,) = torch.autograd.grad(e.sum(), xc)
            return e.detach(), -grad

        results = self._map_chunks(evaluate, chunks, (size, "energy_and_forces"))
        energies, forces = [e for e, _ in results], [f for _, f in results]
        if not energies:
            empty = x.new_zeros(0, dtype=self.dtype, device=self.device)
            return empty, empty.reshape(0, self.dim)
        return torch.cat(energies), torch.cat(forces)

    def forces(self, x: Tensor, *, chunk_size: int | None = None) -> Tensor:
        """Forces −dU/dx ``(batch, 3 n_atoms)`` in kJ/mol/nm (bounded memory, no graph)."""
        return self.energy_and_forces(x, chunk_size=chunk_size)[1]

    def reduced_energy(
        self, x: Tensor, temperature: float | None = None, *, chunk_size: int | None = None
    ) -> Tensor:
        """u(x) = U(x) / kT ``(batch,)``, kT = R·T as in :mod:`boltzflow.systems.molecular`.

        Args:
            x: ``(batch, 3 n_atoms)`` positions in nm.
            temperature: kelvin; defaults to the one given at compile time.
        """
        temperature = self.temperature if temperature is None else temperature
        if temperature is None:
            raise ValueError("reduced_energy needs a temperature (none was given at compile time)")
        return self.energy(x, chunk_size=chunk_size) / kt_kj_per_mol(temperature)

    def extra_repr(self) -> str:
        return (
            f"n_atoms={self.n_atoms}, dtype={self.dtype}, chunk_size={self.chunk_size}, "
            f"compiled={self.compiled}"
        )


def compile_openmm_system(
    system: openmm.System,
    *,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    temperature: float | None = None,
    chunk_size: int | None = None,
    compiled: bool = False,
) -> TorchForceField:
    """Read every force of ``system`` once into tensors and return a batched force field.

    Args:
        system: the OpenMM system (constraints are ignored: they do not enter the energy).
        dtype: float32 or float64 for parameters and evaluation.
        device: where parameters live and energies are computed.
        temperature: default temperature in K for :meth:`TorchForceField.reduced_energy`.
        chunk_size: configurations per evaluation pass (None: automatic, see
            :meth:`TorchForceField.auto_chunk_size`).
        compiled: evaluate through ``torch.compile`` (see :class:`TorchForceField`).

    Raises:
        ValueError: a force or setting the torch force field cannot reproduce exactly; the
            message names the force (index, class and name); ``compiled=True`` on the CPU
            without a C++ compiler.
    """
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if compiled and torch.device(device).type == "cpu" and not cpp_compiler():
        raise ValueError(
            "compiled=True on the CPU needs a C++ compiler on PATH (g++, or $CXX); "
            "use compiled=False"
        )
    n = system.getNumParticles()
    for a in range(n):
        if system.isVirtualSite(a):
            raise ValueError(f"particle {a} is a virtual site, which is not supported")
    i, j = np.triu_indices(n, k=1)
    pairs = torch.as_tensor(np.stack([i, j], axis=1), dtype=torch.long)
    terms: dict[str, nn.Module] = {}
    force_index: dict[str, int] = {}
    needs_pairs = False
    for index, force in enumerate(system.getForces()):
        label = _force_label(index, force)
        if isinstance(force, openmm.CMMotionRemover):
            continue  # changes velocities only; no energy (OpenMM ignores it for energies too)
        if isinstance(force, openmm.HarmonicBondForce):
            term: nn.Module = _bonds(index, force)
        elif isinstance(force, openmm.HarmonicAngleForce):
            term = _angles(index, force)
        elif isinstance(force, openmm.PeriodicTorsionForce):
            term = _torsions(index, force)
        elif isinstance(force, openmm.NonbondedForce):
            term, needs_pairs = _nonbonded(index, force, n, pairs), True
        elif isinstance(force, openmm.GBSAOBCForce):
            term, needs_pairs = _gbsa_obc(index, force, n, pairs), True
        elif isinstance(force, openmm.CustomGBForce):
            term, needs_pairs = _custom_gb(index, force, n, pairs), True
        else:
            raise ValueError(
                f"{label} is not supported by the torch force field (supported: "
                "HarmonicBondForce, HarmonicAngleForce, PeriodicTorsionForce, NonbondedForce "
                "with NoCutoff, GBSAOBCForce, the AMBER HCT/OBC CustomGBForce, CMMotionRemover)"
            )
        terms[label] = term
        force_index[label] = index
    ff = TorchForceField(
        n,
        terms,
        force_index,
        pairs.T.contiguous() if needs_pairs else None,
        temperature=temperature,
        chunk_size=chunk_size,
        compiled=compiled,
    )
    return ff.to(device=device, dtype=dtype)
