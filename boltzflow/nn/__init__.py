"""Neural backbones (EGNN, particle transformer, MLP, :class:`TorusMLP` for internal
coordinates with periodic columns) and time embeddings.

Every backbone is called as ``net(t, x)`` (teacher velocity) or ``net(t, x, s=s)`` (two-time
students, built with ``n_times=2``) on flat ``(batch, dim)`` coordinates and returns
``(batch, dim)``.
Particle backbones return mean-free outputs and depend on positions only through differences.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from boltzflow.nn.egnn import EGNN
from boltzflow.nn.embeddings import SinusoidalFeatures, TimeEmbedding
from boltzflow.nn.mlp import MLP
from boltzflow.nn.torus import TorusMLP
from boltzflow.nn.transformer import ParticleTransformer

__all__ = [
    "BACKBONES",
    "EGNN",
    "MLP",
    "ParticleTransformer",
    "SinusoidalFeatures",
    "TimeEmbedding",
    "TorusMLP",
    "build_backbone",
]

#: name -> class; particle backbones take (n_particles, spatial_dim, ...), the MLP takes (dim, ...).
BACKBONES: dict[str, type[nn.Module]] = {
    "egnn": EGNN,
    "transformer": ParticleTransformer,
    "mlp": MLP,
}


def build_backbone(
    name: str,
    *,
    dim: int,
    n_particles: int | None = None,
    spatial_dim: int | None = None,
    **options: Any,
) -> nn.Module:
    """Construct a backbone by name.

    Args:
        name: one of :data:`BACKBONES`.
        dim: flat coordinate dimension.
        n_particles, spatial_dim: required by the particle backbones (``egnn``, ``transformer``).
        **options: constructor keywords (``hidden``, ``layers``, ``heads``, ``n_times``, ...).

    Raises:
        ValueError: unknown name (lists the valid ones) or missing particle structure.
        TypeError: an option the backbone does not take.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid: {sorted(BACKBONES)}")
    cls = BACKBONES[name]
    if cls is MLP:
        return MLP(dim, **options)
    if n_particles is None or spatial_dim is None:
        raise ValueError(f"backbone {name!r} needs a particle system (n_particles, spatial_dim)")
    if n_particles * spatial_dim != dim:
        raise ValueError(f"n_particles*spatial_dim = {n_particles * spatial_dim} != dim = {dim}")
    return cls(n_particles, spatial_dim, **options)
