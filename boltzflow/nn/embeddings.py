"""Time embeddings: sinusoidal features of one time ``t`` or of a pair of times ``(s, t)``.

Teachers condition on one time t in [0, 1]; distilled students (flow maps X_{s->t}) condition on
two, so :class:`TimeEmbedding` takes ``n_times`` = 1 or 2 and every backbone passes its times
through it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["SinusoidalFeatures", "TimeEmbedding", "broadcast_time"]


def broadcast_time(t: Tensor | float, batch: int, like: Tensor) -> Tensor:
    """Turn a scalar or ``(batch,)`` time into a ``(batch,)`` tensor with ``like``'s dtype/device.

    Raises:
        ValueError: if ``t`` has another shape.
    """
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        return t.expand(batch)
    if t.ndim == 2 and t.shape[-1] == 1:
        t = t[:, 0]
    if t.shape != (batch,):
        raise ValueError(f"time must be a scalar or of shape ({batch},), got {tuple(t.shape)}")
    return t


class SinusoidalFeatures(nn.Module):
    """Fixed sin/cos features of a scalar in [0, 1] at geometrically spaced frequencies.

    ``features(t)[..., k] = sin(w_k t), cos(w_k t)`` with w_k from 1 to ``max_frequency``
    (Vaswani et al. 2017, as used for diffusion times by Ho et al. 2020). The raw t is appended so
    that low frequencies are never missing. The default top frequency (32 rad per unit time) is
    deliberately low: features oscillating faster than the flow itself force adaptive ODE solvers
    into small steps (1000 rad, the diffusion-model habit, made dopri5 take about 10x the NFE on
    a randomly initialised EGNN).

    Args:
        n_frequencies: number of frequencies; the output has ``2 * n_frequencies + 1`` columns.
        max_frequency: the largest angular frequency.
    """

    def __init__(self, n_frequencies: int = 8, max_frequency: float = 32.0) -> None:
        super().__init__()
        if n_frequencies < 1:
            raise ValueError(f"n_frequencies must be >= 1, got {n_frequencies}")
        freqs = torch.exp(torch.linspace(0.0, math.log(max_frequency), n_frequencies))
        self.register_buffer("freqs", freqs, persistent=False)
        self.out_dim = 2 * n_frequencies + 1

    def forward(self, t: Tensor) -> Tensor:
        """``(batch,)`` times -> ``(batch, out_dim)`` features."""
        arg = t[..., None] * self.freqs.to(t.dtype)
        return torch.cat([torch.sin(arg), torch.cos(arg), t[..., None]], dim=-1)


class TimeEmbedding(nn.Module):
    """Learned embedding of one time ``t`` or two times ``(s, t)``.

    For two times the features of s, t and t - s are concatenated (the step length t - s is what a
    flow map most depends on) before a two-layer MLP.

    Args:
        out_dim: embedding width.
        n_times: 1 (teacher velocity v(t, x)) or 2 (student flow map X(s, t, x)).
        n_frequencies: sinusoidal frequencies per time.
    """

    def __init__(self, out_dim: int, n_times: int = 1, n_frequencies: int = 8) -> None:
        super().__init__()
        if n_times not in (1, 2):
            raise ValueError(f"n_times must be 1 or 2, got {n_times}")
        self.n_times = n_times
        self.out_dim = out_dim
        self.features = SinusoidalFeatures(n_frequencies)
        n_in = self.features.out_dim * (1 if n_times == 1 else 3)
        self.mlp = nn.Sequential(nn.Linear(n_in, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: Tensor, s: Tensor | None = None) -> Tensor:
        """Embed ``(batch,)`` times; ``s`` is required iff ``n_times == 2``.

        Returns:
            ``(batch, out_dim)``.
        """
        if self.n_times == 1:
            if s is not None:
                raise ValueError("this embedding takes one time; got a second time s")
            feats = self.features(t)
        else:
            if s is None:
                raise ValueError("this embedding takes two times (s, t); s is missing")
            feats = torch.cat([self.features(s), self.features(t), self.features(t - s)], dim=-1)
        return self.mlp(feats)
