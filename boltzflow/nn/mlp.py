"""Time-conditioned MLP velocity field for systems without particle structure (GMM, Many-Well)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from boltzflow.nn.embeddings import TimeEmbedding, broadcast_time

__all__ = ["MLP"]


class MLP(nn.Module):
    """``v(t, x) = MLP([x, emb(t)])`` with SiLU activations and a zero-initialised output layer.

    Args:
        dim: coordinate dimension.
        hidden: width of the hidden layers.
        layers: number of hidden layers (>= 1).
        n_times: 1 for v(t, x), 2 for f(s, t, x).

    Shapes: ``x`` ``(B, dim)``, ``t`` (and ``s``) scalar or ``(B,)``; output ``(B, dim)``.
    """

    equivariant = False

    def __init__(self, dim: int, hidden: int = 256, layers: int = 3, *, n_times: int = 1) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.dim = dim
        self.time_embedding = TimeEmbedding(hidden, n_times=n_times)
        mods: list[nn.Module] = [nn.Linear(dim + hidden, hidden), nn.SiLU()]
        for _ in range(layers - 1):
            mods += [nn.Linear(hidden, hidden), nn.SiLU()]
        out = nn.Linear(hidden, dim)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(*mods, out)

    def forward(self, t: Tensor, x: Tensor, s: Tensor | None = None) -> Tensor:
        """Velocity ``(B, dim)``."""
        batch = x.shape[0]
        t = broadcast_time(t, batch, x)
        s = None if s is None else broadcast_time(s, batch, x)
        return self.net(torch.cat([x, self.time_embedding(t, s)], dim=-1))
