"""Plots of importance weights: energy histograms, the log-weight histogram, ESS against N."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from boltzflow.plots._figure import new_figure, save_png, to_numpy
from boltzflow.sampling.weights import kish_ess

__all__ = ["ess_curve", "plot_energy_histograms", "plot_ess_vs_n", "plot_log_weights"]


def _weights_from_log(log_w: Any) -> np.ndarray:
    lw = to_numpy(log_w)
    lw = np.where(np.isnan(lw), -np.inf, lw)
    return np.exp(lw - np.max(lw))


def plot_energy_histograms(
    path: str | os.PathLike[str],
    u_proposal: Any,
    *,
    log_w: Any = None,
    u_reference: Any = None,
    bins: int = 80,
    quantile_range: tuple[float, float] = (0.005, 0.995),
    title: str = "Reduced energy",
) -> Path:
    """Densities of u(x) for proposal samples, reweighted samples and reference samples.

    Args:
        path: output ``.png``.
        u_proposal: ``(N,)`` reduced energies (kT) of the proposal samples.
        log_w: ``(N,)`` log weights; adds the reweighted histogram.
        u_reference: ``(M,)`` reference energies; adds the reference histogram.
        bins: histogram bins.
        quantile_range: x-range from these quantiles of all finite energies (long tails of
            poor proposals would otherwise squeeze the plot); values outside are not drawn.
        title: axes title.
    """
    u = to_numpy(u_proposal)
    finite = np.isfinite(u)
    series = [("proposal", u[finite], None)]
    if log_w is not None:
        w = _weights_from_log(log_w)
        ok = finite & (w > 0)
        series.append(("reweighted", u[ok], w[ok]))
    if u_reference is not None:
        ur = to_numpy(u_reference)
        series.append(("reference", ur[np.isfinite(ur)], None))
    pooled = np.concatenate([s[1] for s in series])
    if pooled.size == 0:
        raise ValueError("no finite energies to plot")
    lo, hi = np.quantile(pooled, quantile_range)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    fig = new_figure()
    ax = fig.add_subplot()
    for (label, values, weights), style in zip(series, ("-", "--", ":")):
        if values.size:
            ax.hist(
                values,
                bins=bins,
                range=(lo, hi),
                weights=weights,
                density=True,
                histtype="step",
                linestyle=style,
                linewidth=1.6,
                label=label,
            )
    ax.set_xlabel("u(x) [kT]")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend()
    return save_png(fig, path)


def plot_log_weights(path: str | os.PathLike[str], log_w: Any, *, bins: int = 80) -> Path:
    """Histogram of log w - max(log w), annotated with N and the Kish ESS/N."""
    lw = to_numpy(log_w)
    finite = lw[np.isfinite(lw)]
    if finite.size == 0:
        raise ValueError("all log weights are -inf or NaN: nothing to plot")
    ess = kish_ess(torch.from_numpy(np.where(np.isfinite(lw), lw, -np.inf)))
    fig = new_figure()
    ax = fig.add_subplot()
    ax.hist(finite - finite.max(), bins=bins, color="C0")
    ax.set_xlabel("log w - max log w")
    ax.set_ylabel("count")
    n_zero = lw.size - finite.size
    ax.set_title(f"log weights: N = {lw.size}, ESS/N = {ess / lw.size:.3g}, zero weight: {n_zero}")
    ax.set_yscale("log")
    return save_png(fig, path)


def ess_curve(log_w: Any, *, n_points: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Kish ESS of the first n samples of a seeded random permutation, for n on a log grid.

    Returns:
        ``(n_values, ess_values)``.
    """
    lw = to_numpy(log_w)
    lw = np.where(np.isnan(lw), -np.inf, lw)
    perm = np.random.default_rng(seed).permutation(lw.size)
    lw = lw[perm]
    start = min(10, lw.size)
    grid = np.unique(np.geomspace(start, lw.size, n_points).astype(int))
    ess = []
    for n in grid:
        head = torch.from_numpy(lw[:n])
        ess.append(kish_ess(head) if bool(torch.isfinite(head).any()) else 0.0)
    return grid, np.asarray(ess)


def plot_ess_vs_n(path: str | os.PathLike[str], log_w: Any, *, seed: int = 0) -> Path:
    """ESS and ESS/N against the number of samples N (random order, seeded)."""
    n, ess = ess_curve(log_w, seed=seed)
    fig = new_figure(8.0, 3.5)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.loglog(n, np.maximum(ess, 1e-300), "o-")
    ax1.loglog(n, n, "k:", label="ESS = N")
    ax1.set_xlabel("N")
    ax1.set_ylabel("Kish ESS")
    ax1.legend()
    ax2.semilogx(n, ess / n, "o-")
    ax2.set_xlabel("N")
    ax2.set_ylabel("ESS / N")
    ax2.set_ylim(0, 1.05)
    return save_png(fig, path)
