"""A DW4-shaped toy teacher setup (4 particles in 2D, EGNN 1 x 8) for fast training-loop tests,
and a tiny DW4-shaped teacher with its smoke-trained F2D2 student (``boltzflow distill``)."""

from __future__ import annotations

from pathlib import Path

import torch

from boltzflow.cli import main
from boltzflow.flows.cnf import TeacherCNF
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


def dw4_like(sampling: dict, *, hidden: int = 8, seed: int = 0) -> TeacherCNF:
    """An untrained DW4-shaped teacher (EGNN 1 x ``hidden``, weights seeded by ``seed``) with
    the sampling defaults ``sampling``."""
    torch.manual_seed(seed)
    return TeacherCNF.build(
        "egnn",
        dim=8,
        n_particles=4,
        spatial_dim=2,
        mean_free=True,
        backbone_options={"hidden": hidden, "layers": 1},
        sampling=sampling,
    )


def dw4_like_teacher(folder: Path, sampling: dict | None = None) -> Path:
    """An untrained DW4-shaped teacher (EGNN 1 x 8, system ``dw4``) saved in ``folder``;
    ``sampling``: its sampling defaults (default: dopri5 at atol = rtol = 1e-3)."""
    teacher = dw4_like({"atol": 1e-3, "rtol": 1e-3} if sampling is None else sampling)
    folder.mkdir()
    teacher.save(folder / "teacher.pt", extra={"run": {"system": "dw4"}})
    return folder


def smoke_f2d2(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny DW4-shaped teacher and its F2D2 student from ``boltzflow distill`` (smoke profile):
    the two run folders under ``tmp_path``."""
    teacher = dw4_like_teacher(tmp_path / "teacher")
    config = Path(__file__).resolve().parents[1] / "workflows/configs/student_f2d2_dw4.toml"
    out = tmp_path / "f2d2"
    args = ["distill", str(teacher), "--method", "f2d2", "-o", str(out)]
    assert main([*args, "--config", str(config), "--profile", "smoke"]) == 0
    return teacher, out
