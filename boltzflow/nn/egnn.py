"""E(n)-equivariant graph network (EGNN) velocity field for particle systems.

Satorras, Hoogeboom, Welling (2021), "E(n) Equivariant Graph Neural Networks", arXiv:2102.09844,
eqs. (3)-(6), in the fully connected form used as the vector field of equivariant flows (E-NF,
Satorras et al. 2021, arXiv:2105.09016) and equivariant flow matching (Klein, Krämer, Noé 2023,
arXiv:2306.15030). The output is the displacement x^L - x^0 of the coordinate stream with its
particle mean removed, so the field is translation invariant, rotation/reflection equivariant,
permutation equivariant (for identical particles) and mean-free.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from boltzflow.nn.embeddings import TimeEmbedding, broadcast_time

__all__ = ["EGNN", "EGNNLayer", "neighbour_index", "neighbours"]


def neighbour_index(n: int, device: torch.device | None = None) -> Tensor:
    """``(n, n - 1)`` indices: row i lists every particle j != i in increasing order."""
    if n < 2:
        raise ValueError(f"need at least 2 particles, got {n}")
    full = torch.arange(n, device=device).expand(n, n)
    mask = ~torch.eye(n, dtype=torch.bool, device=device)
    return full[mask].reshape(n, n - 1)


def neighbours(v: Tensor, nbr: Tensor) -> Tensor:
    """``(B, n, n - 1, F)``: row ``[b, i, k]`` is ``v[b, nbr[i, k]]`` for ``v (B, n, F)``.

    The same values as ``v[:, nbr, :]``; ``index_select`` on the flat index is several times
    faster on a CPU than advanced indexing (the gathers were a seventh of a student's time).
    Under ``torch.compile`` it is advanced indexing instead: with torch 2.13, inductor's code for
    the reverse-mode product of ``index_select`` under ``vmap`` (the rows of an exact Jacobian)
    is wrong (docs/benchmarks.md, compiled exact log q, 2026-12-08); that of indexing is right.
    """
    if torch.compiler.is_compiling():
        out = v[:, nbr.reshape(-1), :]
    else:
        out = torch.index_select(v, 1, nbr.reshape(-1))
    return out.reshape(v.shape[0], nbr.shape[0], nbr.shape[1], v.shape[-1])


class EGNNLayer(nn.Module):
    """One EGNN message-passing layer on a complete graph.

    m_ij = phi_e(h_i, h_j, |x_i - x_j|^2);
    x_i += sum_j (x_i - x_j) / (|x_i - x_j| + 1) * phi_x(m_ij);
    h_i += phi_h(h_i, sum_j m_ij). phi_x ends in ``coords_range * tanh`` for stability (E-NF).

    Args:
        hidden: feature width.
        coords_range: bound on the per-edge coordinate weight.
        attention: gate messages with a sigmoid attention weight.
    """

    def __init__(self, hidden: int, coords_range: float = 15.0, attention: bool = True) -> None:
        super().__init__()
        self.coords_range = float(coords_range)
        # phi_e's first layer on [h_i, h_j, d2] is split into per-node projections of h_i and h_j
        # plus a per-edge term in d2: the same affine map, with the wide part computed per node.
        self.edge_in = nn.Linear(hidden, 2 * hidden)
        self.edge_d2 = nn.Linear(1, hidden, bias=False)
        self.edge_mlp = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.attention = nn.Sequential(nn.Linear(hidden, 1), nn.Sigmoid()) if attention else None
        last = nn.Linear(hidden, 1, bias=False)
        nn.init.xavier_uniform_(last.weight, gain=1e-3)  # start near the identity map
        self.coord_mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), last)
        self.node_mlp = nn.Sequential(
            nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )

    def forward(self, h: Tensor, x: Tensor, nbr: Tensor) -> tuple[Tensor, Tensor]:
        """Update features ``h (B, n, H)`` and positions ``x (B, n, d)``; ``nbr`` from
        :func:`neighbour_index`."""
        diff = x[:, :, None, :] - neighbours(x, nbr)  # (B, n, n-1, d)
        d2 = diff.pow(2).sum(-1, keepdim=True)  # (B, n, n-1, 1)
        a, b = self.edge_in(h).chunk(2, dim=-1)  # (B, n, H) each
        # d2 * w rather than Linear(1, H)(d2): the same map, but batches well under torch.func
        m = self.edge_mlp(a[:, :, None, :] + neighbours(b, nbr) + d2 * self.edge_d2.weight[:, 0])
        if self.attention is not None:
            m = m * self.attention(m)
        w = self.coords_range * torch.tanh(self.coord_mlp(m))
        # The 1e-8 keeps d/d(d2) finite for coincident particles (it multiplies diff = 0 there).
        x = x + (diff / (torch.sqrt(d2 + 1e-8) + 1.0) * w).sum(dim=2)
        h = h + self.node_mlp(torch.cat([h, m.sum(dim=2)], dim=-1))
        return h, x


class EGNN(nn.Module):
    """EGNN velocity field ``v(t, x)`` (or flow-map head with two times) on flat coordinates.

    Node features start from the time embedding, plus a learned per-particle embedding when
    ``distinct_particles`` (molecules, where atoms are not interchangeable; this keeps E(n)
    equivariance but drops permutation equivariance).

    Args:
        n_particles: particles per configuration.
        spatial_dim: 2 or 3.
        hidden: feature width (EFM's DW4 teacher: 3 layers x 64).
        layers: message-passing layers.
        n_times: 1 for v(t, x), 2 for f(s, t, x).
        distinct_particles: add a per-particle embedding.
        coords_range: see :class:`EGNNLayer`.
        attention: see :class:`EGNNLayer`.

    Shapes: ``x`` is ``(B, n_particles * spatial_dim)``; ``t`` (and ``s``) scalars or ``(B,)``;
    the output has the shape of ``x`` and zero particle mean.
    """

    equivariant = True

    def __init__(
        self,
        n_particles: int,
        spatial_dim: int,
        hidden: int = 64,
        layers: int = 3,
        *,
        n_times: int = 1,
        distinct_particles: bool = False,
        coords_range: float = 15.0,
        attention: bool = True,
    ) -> None:
        super().__init__()
        self.n_particles = n_particles
        self.spatial_dim = spatial_dim
        self.dim = n_particles * spatial_dim
        self.time_embedding = TimeEmbedding(hidden, n_times=n_times)
        self.particle_embedding = nn.Embedding(n_particles, hidden) if distinct_particles else None
        self.register_buffer("nbr", neighbour_index(n_particles), persistent=False)
        self.layers = nn.ModuleList(
            EGNNLayer(hidden, coords_range=coords_range, attention=attention) for _ in range(layers)
        )

    def forward(self, t: Tensor, x: Tensor, s: Tensor | None = None) -> Tensor:
        """Velocity ``(B, dim)`` at time(s) ``t`` (and ``s``) and positions ``x (B, dim)``."""
        batch = x.shape[0]
        t = broadcast_time(t, batch, x)
        s = None if s is None else broadcast_time(s, batch, x)
        emb = self.time_embedding(t, s)  # (B, H)
        h = emb[:, None, :].expand(-1, self.n_particles, -1)
        if self.particle_embedding is not None:
            h = h + self.particle_embedding.weight.to(x.dtype)
        x0 = x.reshape(batch, self.n_particles, self.spatial_dim)
        xl = x0
        for layer in self.layers:
            h, xl = layer(h, xl, self.nbr)
        v = xl - x0
        v = v - v.mean(dim=1, keepdim=True)
        return v.reshape(batch, self.dim)
