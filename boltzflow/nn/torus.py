r"""Time-conditioned MLP velocity field on R^k x T^m (internal coordinates with periodic dihedrals).

The periodic columns enter the network only through (cos, sin), so the field is exactly
2π-periodic in them: v(t, z + 2π e_i) = v(t, z) for every periodic column i (up to the round-off
of cos/sin). A flow driven by it on the flat chart R^(k+m) therefore projects to a flow on the
torus, and wrapping the periodic state into [−π, π) (at any time) changes neither the trajectory
on the torus nor the density (Chen & Lipman 2023, arXiv:2302.03660, Riemannian flow matching on
flat manifolds; Rezende et al. 2020, arXiv:2002.02428, flows on tori). The divergence is the
Euclidean one of the flat chart, which is the Riemannian divergence of the flat torus.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from boltzflow.nn.embeddings import TimeEmbedding, broadcast_time

__all__ = ["TorusMLP"]


class TorusMLP(nn.Module):
    """``v(t, z) = MLP([z_flat, cos z_per, sin z_per, emb(t)])``, SiLU, zero-initialised output.

    Args:
        dim: coordinate dimension k + m.
        periodic: indices of the m periodic columns (angles in rad, any real value).
        hidden: width of the hidden layers.
        layers: number of hidden layers (>= 1).
        n_times: 1 for v(t, z), 2 for f(s, t, z).

    Shapes: ``z`` ``(B, dim)``, ``t`` (and ``s``) scalar or ``(B,)``; output ``(B, dim)``
    (velocities in z units per unit time; rad per unit time on the periodic columns).
    """

    equivariant = False
    periodic_mask: Tensor

    def __init__(
        self,
        dim: int,
        periodic: Sequence[int],
        hidden: int = 256,
        layers: int = 3,
        *,
        n_times: int = 1,
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        idx = sorted({int(i) for i in periodic})
        if idx and (idx[0] < 0 or idx[-1] >= dim):
            raise ValueError(f"periodic columns must lie in [0, {dim}), got {idx}")
        self.dim = dim
        self.periodic = tuple(idx)
        mask = torch.zeros(dim, dtype=torch.bool)
        mask[list(idx)] = True
        # rebuilt from the constructor arguments: not part of the state_dict
        self.register_buffer("periodic_mask", mask, persistent=False)
        n_features = dim + len(idx)  # k flat + 2m (cos, sin)
        self.time_embedding = TimeEmbedding(hidden, n_times=n_times)
        mods: list[nn.Module] = [nn.Linear(n_features + hidden, hidden), nn.SiLU()]
        for _ in range(layers - 1):
            mods += [nn.Linear(hidden, hidden), nn.SiLU()]
        out = nn.Linear(hidden, dim)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(*mods, out)

    def features(self, z: Tensor) -> Tensor:
        """``(B, k + 2m)`` input features: the flat columns, then cos and sin of the angles."""
        mask = self.periodic_mask
        angles = z[:, mask]
        return torch.cat([z[:, ~mask], torch.cos(angles), torch.sin(angles)], dim=-1)

    def forward(self, t: Tensor, z: Tensor, s: Tensor | None = None) -> Tensor:
        """Velocity ``(B, dim)``."""
        batch = z.shape[0]
        t = broadcast_time(t, batch, z)
        s = None if s is None else broadcast_time(s, batch, z)
        return self.net(torch.cat([self.features(z), self.time_embedding(t, s)], dim=-1))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, periodic={len(self.periodic)} columns"
