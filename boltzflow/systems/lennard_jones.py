"""Lennard-Jones clusters (LJ13, LJ55) held together by a harmonic tether to their centre.

u(x) = s · Σ_{i<j} ε [(r_m/d_ij)¹² − 2 (r_m/d_ij)⁶] + c · Σ_i |x_i − x̄|²,

dimensionless (kT = 1), with the pair-sum convention an explicit parameter:

- ``pair_convention = "unique"`` (s = 1): each pair once, as bgflow's ``LennardJonesPotential``
  (Köhler, Klein, Noé 2020);
- ``pair_convention = "ordered"`` (s = 2): the sum over ordered pairs i ≠ j without a ½, as the
  code that generated the public LJ13/LJ55 samples of equivariant flow matching (Klein, Krämer,
  Noé 2023), reused by DEM/iDEM and later papers. The named ``lj13``/``lj55`` use this one.

The energy is exact: it is ``+inf`` (never NaN) where particles coincide and finite elsewhere.

References:
    Köhler, Klein, Noé (2020), arXiv:2006.02425; Klein, Krämer, Noé (2023), arXiv:2306.15030.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from boltzflow.systems.base import System, SystemInfo
from boltzflow.systems.minimize import relax_configuration
from boltzflow.systems.params import check_parameters, number
from boltzflow.systems.particles import as_particles, pair_indices

__all__ = ["PAIR_CONVENTIONS", "LennardJonesSystem", "build"]

#: Pair-sum conventions and the factor each puts in front of the unique-pair sum.
PAIR_CONVENTIONS: dict[str, float] = {"unique": 1.0, "ordered": 2.0}

_PARAMETERS = ("epsilon", "r_m", "tether", "pair_convention")


class LennardJonesSystem(System):
    """Tethered Lennard-Jones cluster of ``n_particles`` in ``spatial_dim`` dimensions.

    Args:
        info: static description; needs ``n_particles`` and ``spatial_dim``.
        epsilon: well depth ε of one pair (> 0, in kT).
        r_m: distance of the pair minimum (> 0); the pair term is zero at 2^(−1/6) r_m.
        tether: strength c >= 0 of the harmonic term c · Σ_i |x_i − x̄|² (kT per length²).
        pair_convention: ``"ordered"`` or ``"unique"`` (see the module docstring).

    Raises:
        ValueError: an unknown ``pair_convention`` (the message lists the valid ones) or a
            parameter out of range.
    """

    def __init__(
        self,
        info: SystemInfo,
        *,
        epsilon: float,
        r_m: float,
        tether: float,
        pair_convention: str,
    ) -> None:
        super().__init__(info)
        if info.n_particles is None or info.spatial_dim is None or info.n_particles < 2:
            raise ValueError(
                f"{info.name}: a Lennard-Jones system needs n_particles >= 2 and spatial_dim"
            )
        if pair_convention not in PAIR_CONVENTIONS:
            raise ValueError(
                f"{info.name}: unknown pair_convention {pair_convention!r}; valid: "
                f"{sorted(PAIR_CONVENTIONS)}"
            )
        if not epsilon > 0 or not r_m > 0 or not tether >= 0:
            raise ValueError(
                f"{info.name}: need epsilon > 0, r_m > 0, tether >= 0; got epsilon={epsilon!r}, "
                f"r_m={r_m!r}, tether={tether!r}"
            )
        self.epsilon, self.r_m, self.tether = epsilon, r_m, tether
        self.pair_convention = pair_convention
        self._reference: Tensor | None = None

    def pair_energy(self, d2: Tensor) -> Tensor:
        """ε[(r_m/d)¹² − 2(r_m/d)⁶] of one pair from its squared distance ``d2`` (any shape).

        Written as q·(q − 2) with q = (r_m²/d²)³ so that d → 0 gives ``+inf`` rather than
        ``inf − inf = NaN``.
        """
        q = (self.r_m**2 / d2) ** 3
        return self.epsilon * q * (q - 2.0)

    def pair_part(self, x: Tensor) -> Tensor:
        """Pair energy with the convention's factor applied, shape ``(batch,)``."""
        p = as_particles(x, self.n_particles, self.spatial_dim)
        i, j = pair_indices(self.n_particles, device=x.device)
        d2 = (p[..., i, :] - p[..., j, :]).pow(2).sum(-1)
        return PAIR_CONVENTIONS[self.pair_convention] * self.pair_energy(d2).sum(-1)

    def tether_part(self, x: Tensor) -> Tensor:
        """Harmonic tether c · Σ_i |x_i − x̄|², shape ``(batch,)``."""
        return self.tether * self.remove_mean(x).pow(2).sum(-1)

    def _energy(self, x: Tensor) -> Tensor:
        return self.pair_part(x) + self.tether_part(x)

    def reference_configuration(self) -> Tensor:
        """A compact low-energy cluster ``(1, dim)`` in float64, mean-free and deterministic.

        The lowest of three L-BFGS relaxations from seeded Gaussian starts at liquid-like
        density; a local minimum (LJ13 reaches the icosahedron), not guaranteed global for LJ55.
        Cached after the first call.
        """
        if self._reference is None:
            n, d = self.n_particles, self.spatial_dim
            # Starting spread: a ball holding n particles at about one particle per r_m^d.
            scale = 0.5 * self.r_m * n ** (1.0 / d)
            self._reference = relax_configuration(self, n_starts=3, scale=scale, seed=0)
        return self._reference.clone()


def build(spec: dict[str, Any], params: dict[str, Any], source_dir: Path) -> LennardJonesSystem:
    """Registry builder for ``kind = "lennard_jones"`` (see :mod:`boltzflow.systems.registry`).

    Raises:
        ValueError: missing/unknown parameters, an unknown pair convention, or a temperature
            given (the system is dimensionless: scale ``epsilon`` and ``tether`` instead).
        TypeError: a non-numeric parameter.
    """
    name = spec["name"]
    check_parameters(name, params, _PARAMETERS)
    if spec.get("temperature") is not None:
        raise ValueError(
            f"system {name!r} is dimensionless (energies already in kT) and has no temperature; "
            "scale 'epsilon' and 'tether' instead"
        )
    convention = params["pair_convention"]
    if not isinstance(convention, str):
        raise TypeError(f"system {name!r}: pair_convention must be a string, got {convention!r}")
    values = {k: number(name, k, params[k]) for k in ("epsilon", "r_m", "tether")}
    info = SystemInfo.from_spec(spec, params)
    return LennardJonesSystem(info, pair_convention=convention, **values)
