"""Helpers for particle systems: reshaping, centre of mass, pair distances.

Coordinates at API boundaries are flat, shape ``(batch, n_particles * spatial_dim)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["as_particles", "pair_distances", "pair_indices", "remove_mean"]


def as_particles(x: Tensor, n_particles: int, spatial_dim: int) -> Tensor:
    """View flat ``(..., n*d)`` coordinates as ``(..., n, d)``."""
    return x.reshape(*x.shape[:-1], n_particles, spatial_dim)


def remove_mean(x: Tensor, n_particles: int, spatial_dim: int) -> Tensor:
    """Project flat coordinates onto the mean-free subspace (centre of mass at the origin).

    Args:
        x: ``(..., n*d)`` coordinates.

    Returns:
        ``(..., n*d)`` coordinates whose particle mean is zero.
    """
    p = as_particles(x, n_particles, spatial_dim)
    return (p - p.mean(dim=-2, keepdim=True)).reshape(x.shape)


def pair_indices(n_particles: int, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Indices ``(i, j)`` of the unique pairs ``i < j``, each of shape ``(n*(n-1)/2,)``."""
    return torch.triu_indices(n_particles, n_particles, offset=1, device=device).unbind(0)


def pair_distances(x: Tensor, n_particles: int, spatial_dim: int) -> Tensor:
    """Distances of the unique pairs ``i < j``.

    Args:
        x: ``(..., n*d)`` coordinates.

    Returns:
        ``(..., n*(n-1)/2)`` distances, ordered as :func:`pair_indices`.
    """
    p = as_particles(x, n_particles, spatial_dim)
    i, j = pair_indices(n_particles, device=x.device)
    diff = p[..., i, :] - p[..., j, :]
    # Written out rather than torch.linalg.norm so the gradient at coincident particles is finite
    # only where the distance is nonzero; energies blow up there anyway.
    return diff.pow(2).sum(-1).sqrt()
