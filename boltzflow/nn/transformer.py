"""Transformer over particles/atoms: one token per particle, rotations learned by augmentation.

Permutation equivariant without ``distinct_particles`` (no positional encoding); translation
invariant and mean-free by construction (centred input, centred output); NOT rotation
equivariant, so train it with random-rotation augmentation (see
:func:`boltzflow.flows.flow_matching.random_rotations`). Pre-norm blocks (Xiong et al. 2020,
arXiv:2002.04745) with the time embedding added to every block's input, as in DiT-style
conditioning (Peebles & Xie 2023, arXiv:2212.09748) but additive.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from boltzflow.nn.embeddings import TimeEmbedding, broadcast_time

__all__ = ["ParticleTransformer"]


class _Block(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden)
        )
        self.cond = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        # Attention written out (no fused kernels) so torch.func.vmap/jacrev apply unchanged.
        b, n, width = h.shape
        z = self.norm1(h + self.cond(c)[:, None, :])
        q, k, v = self.qkv(z).reshape(b, n, 3, self.heads, width // self.heads).unbind(2)
        att = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(width // self.heads)
        out = torch.einsum("bhij,bjhd->bihd", att.softmax(dim=-1), v).reshape(b, n, width)
        h = h + self.proj(out)
        return h + self.mlp(self.norm2(h))


class ParticleTransformer(nn.Module):
    """Transformer velocity field ``v(t, x)`` over particles, flat ``(B, n * d)`` in and out.

    Args:
        n_particles: particles (atoms) per configuration.
        spatial_dim: 2 or 3.
        hidden: token width.
        layers: transformer blocks.
        heads: attention heads.
        n_times: 1 for v(t, x), 2 for f(s, t, x).
        distinct_particles: add a learned per-particle embedding (atoms of a molecule).
    """

    equivariant = False

    def __init__(
        self,
        n_particles: int,
        spatial_dim: int,
        hidden: int = 128,
        layers: int = 4,
        heads: int = 4,
        *,
        n_times: int = 1,
        distinct_particles: bool = True,
    ) -> None:
        super().__init__()
        self.n_particles = n_particles
        self.spatial_dim = spatial_dim
        self.dim = n_particles * spatial_dim
        self.time_embedding = TimeEmbedding(hidden, n_times=n_times)
        self.inp = nn.Linear(spatial_dim, hidden)
        self.particle_embedding = nn.Embedding(n_particles, hidden) if distinct_particles else None
        self.blocks = nn.ModuleList(_Block(hidden, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, spatial_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, t: Tensor, x: Tensor, s: Tensor | None = None) -> Tensor:
        """Velocity ``(B, dim)`` with zero particle mean."""
        batch = x.shape[0]
        t = broadcast_time(t, batch, x)
        s = None if s is None else broadcast_time(s, batch, x)
        c = self.time_embedding(t, s)
        p = x.reshape(batch, self.n_particles, self.spatial_dim)
        p = p - p.mean(dim=1, keepdim=True)
        h = self.inp(p)
        if self.particle_embedding is not None:
            h = h + self.particle_embedding.weight.to(x.dtype)
        for block in self.blocks:
            h = block(h, c)
        v = self.out(self.norm(h))
        v = v - v.mean(dim=1, keepdim=True)
        return v.reshape(batch, self.dim)
