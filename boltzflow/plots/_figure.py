"""Figure creation and atomic PNG saving without a global matplotlib backend."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from boltzflow.io.atomic import atomic_path

__all__ = ["new_figure", "save_png", "to_numpy"]


def new_figure(width: float = 6.0, height: float = 4.0) -> Figure:
    """A figure attached to an Agg canvas (no pyplot state involved)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | os.PathLike[str], dpi: int = 110) -> Path:
    """Save ``fig`` as PNG at ``path`` atomically and return the path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"plot path must end in .png, got {path.name!r}")
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path


def to_numpy(a: Any) -> np.ndarray:
    """float64 numpy view of a tensor/array (flattened to 1-D if it is (N, 1))."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)
