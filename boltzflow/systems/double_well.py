"""DW-n: particles interacting through a double-well pair potential (e.g. DW4).

u(x) = Σ_{i<j} [a (d_ij − d0) + b (d_ij − d0)² + c (d_ij − d0)⁴] / τ,  d_ij = |x_i − x_j|,

summed over the unique pairs, dimensionless (τ plays the role of kT). DW4 is n = 4 particles in
2-D with a = 0, b = −4, c = 0.9, d0 = 4, τ = 1.

References:
    Köhler, Klein, Noé (2020), "Equivariant Flows: Exact Likelihood Generative Learning for
    Symmetric Densities", ICML, arXiv:2006.02425 (Sec. 6, DW4).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from boltzflow.systems.base import System, SystemInfo
from boltzflow.systems.minimize import relax_configuration
from boltzflow.systems.params import check_parameters, number
from boltzflow.systems.particles import as_particles, pair_indices

__all__ = ["DoubleWellSystem", "build"]

_PARAMETERS = ("a", "b", "c", "d0", "tau")


class DoubleWellSystem(System):
    """Translation-, rotation- and permutation-invariant double-well particle system.

    Args:
        info: static description; needs ``n_particles`` and ``spatial_dim``.
        a, b, c: linear, quadratic and quartic coefficients of the pair term (in units of τ).
        d0: distance offset of the pair term.
        tau: temperature-like scale; the reduced energy is divided by it (must be > 0).
    """

    def __init__(
        self, info: SystemInfo, *, a: float, b: float, c: float, d0: float, tau: float
    ) -> None:
        super().__init__(info)
        if info.n_particles is None or info.spatial_dim is None or info.n_particles < 2:
            raise ValueError(
                f"{info.name}: a double-well system needs n_particles >= 2 and spatial_dim"
            )
        if not tau > 0:
            raise ValueError(f"{info.name}: tau must be > 0, got {tau!r}")
        if c < 0 or (c == 0 and b < 0):
            raise ValueError(
                f"{info.name}: the pair term must be bounded below (c > 0, or c = 0 and b >= 0); "
                f"got b={b!r}, c={c!r}"
            )
        self.a, self.b, self.c, self.d0, self.tau = a, b, c, d0, tau
        self._reference: Tensor | None = None

    def pair_energy(self, d: Tensor) -> Tensor:
        """Reduced energy of one pair at distance ``d`` (any shape, same shape out)."""
        s = d - self.d0
        s2 = s * s
        return (self.a * s + self.b * s2 + self.c * s2 * s2) / self.tau

    def _energy(self, x: Tensor) -> Tensor:
        p = as_particles(x, self.n_particles, self.spatial_dim)
        i, j = pair_indices(self.n_particles, device=x.device)
        d2 = (p[..., i, :] - p[..., j, :]).pow(2).sum(-1)
        # Exact distance, with a zero subgradient (instead of NaN) where two particles coincide.
        tiny = torch.finfo(x.dtype).tiny
        d = torch.where(d2 > 0, d2.clamp_min(tiny).sqrt(), torch.zeros_like(d2))
        return self.pair_energy(d).sum(-1)

    def reference_configuration(self) -> Tensor:
        """A low-energy configuration ``(1, dim)`` in float64, mean-free and deterministic.

        The lowest of a few L-BFGS relaxations from seeded random starts (for DW4 the global
        minimum, u = −25.79, found from 3 of 5 starts). Cached after the first call.
        """
        if self._reference is None:
            scale = max(abs(self.d0), 1.0) * 0.75
            self._reference = relax_configuration(self, n_starts=5, scale=scale, seed=0)
        return self._reference.clone()


def build(spec: dict[str, Any], params: dict[str, Any], source_dir: Path) -> DoubleWellSystem:
    """Registry builder for ``kind = "double_well"`` (see :mod:`boltzflow.systems.registry`).

    Raises:
        ValueError: missing or unknown parameters, or a temperature given (the system is
            dimensionless: scale ``tau`` instead).
        TypeError: a non-numeric parameter.
    """
    name = spec["name"]
    check_parameters(name, params, _PARAMETERS)
    if spec.get("temperature") is not None:
        raise ValueError(
            f"system {name!r} is dimensionless (energies already in kT) and has no temperature; "
            "scale the parameter 'tau' instead"
        )
    values = {k: number(name, k, params[k]) for k in _PARAMETERS}
    info = SystemInfo.from_spec(spec, params)
    return DoubleWellSystem(info, **values)
