"""The accuracy-cost trade-off of samplers: ESS/N against samples-with-log-q per second."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from boltzflow.plots._figure import new_figure, save_png

__all__ = ["plot_ess_vs_speed"]


def plot_ess_vs_speed(path: str | os.PathLike[str], rows: list[dict[str, Any]]) -> Path:
    """One point per row (``model``, ``steps``, ``samples_per_s``, ``ess_fraction``): ESS/N
    against samples per second on a log axis, each model's step counts joined by a line and
    labelled with K. Rows without a finite positive rate are left out."""
    fig = new_figure(6.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    by_model: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        rate = float(r["samples_per_s"])
        if 0 < rate < float("inf"):
            by_model.setdefault(f"{r['model']}", []).append(r)
    for name, group in by_model.items():
        group = sorted(group, key=lambda r: float(r["samples_per_s"]))
        xs = [float(r["samples_per_s"]) for r in group]
        ys = [float(r["ess_fraction"]) for r in group]
        (line,) = ax.plot(xs, ys, marker="o", label=name)
        for r, x, y in zip(group, xs, ys, strict=True):
            if r.get("steps"):
                ax.annotate(
                    f"K={r['steps']}",
                    (x, y),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                    color=line.get_color(),
                )
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.set_xlabel("samples with log q per second (one CPU thread, energies excluded)")
    ax.set_ylabel("ESS/N (Kish)")
    ax.set_title("Shipped models: importance-sampling efficiency against speed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return save_png(fig, path)
