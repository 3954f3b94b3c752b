"""Deterministic energy minimisation used for reference configurations."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from boltzflow.systems.base import System

__all__ = ["relax_configuration"]


def relax_configuration(
    system: System, *, n_starts: int, scale: float, seed: int = 0, max_iter: int = 2000
) -> Tensor:
    """Lowest-energy result of L-BFGS minimisations of ``system.energy`` from random starts.

    Args:
        system: a particle system (the result is centred with :meth:`System.remove_mean`).
        n_starts: number of starts, each ``scale * N(0, I)`` from one seeded CPU generator.
        scale: spread of the starting coordinates (same units as the coordinates).
        seed: seed of the starting points; the result is deterministic on CPU.
        max_iter: L-BFGS iterations per start.

    Returns:
        ``(1, dim)`` float64 configuration.
    """
    gen = torch.Generator().manual_seed(seed)
    best, best_u = None, math.inf
    for _ in range(n_starts):
        x = (
            scale * torch.randn(1, system.dim, generator=gen, dtype=torch.float64)
        ).requires_grad_()
        opt = torch.optim.LBFGS(
            [x],
            max_iter=max_iter,
            tolerance_grad=1e-10,
            tolerance_change=1e-14,
            line_search_fn="strong_wolfe",
        )

        def closure(x: Tensor = x, opt: torch.optim.LBFGS = opt) -> Tensor:
            opt.zero_grad()
            u = system.energy(x).sum()
            u.backward()
            return u

        with torch.enable_grad():
            opt.step(closure)
        u = float(system.energy(x.detach()))
        if u < best_u:
            best, best_u = x.detach(), u
    if best is None:
        raise RuntimeError(f"{system.name}: every relaxation ended at a non-finite energy")
    return system.remove_mean(best)
