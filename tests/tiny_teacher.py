"""A DW4-shaped toy teacher setup (4 particles in 2D, EGNN 1 x 8) for fast training-loop tests."""

from __future__ import annotations

import torch

from boltzflow.train.config import TeacherConfig
from boltzflow.train.teacher import SystemShape

SHAPE = SystemShape(dim=8, n_particles=4, spatial_dim=2, mean_free=True)


def tiny_config(steps: int = 8) -> TeacherConfig:
    """EGNN 1 x 8, batch 16, RK4 sampling; logs every 2 steps, checkpoints every 4."""
    return TeacherConfig.from_dict(
        {
            "model": {"backbone": "egnn", "hidden": 8, "layers": 1},
            "train": {
                "steps": steps,
                "batch_size": 16,
                "warmup_steps": 2,
                "log_every": 2,
                "checkpoint_every": 4,
                "seed": 7,
            },
            "sample": {"method": "rk4", "steps": 4, "batch_size": 16},
        }
    )


def tiny_data() -> torch.Tensor:
    """``(200, 8)`` configurations: a square of four particles plus Gaussian noise (0.3)."""
    gen = torch.Generator().manual_seed(0)
    base = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, -2.0]]).reshape(1, 8)
    return base + 0.3 * torch.randn(200, 8, generator=gen)
