"""Plots of free-energy landscapes: Ramachandran panels and profiles with confidence bands."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from boltzflow.metrics.molecular import ramachandran_histogram
from boltzflow.plots._figure import new_figure, save_png, to_numpy
from boltzflow.sampling.estimators import FreeEnergyProfile

__all__ = ["plot_free_energy_profile", "plot_free_energy_profiles", "plot_ramachandran"]


def plot_ramachandran(
    path: str | os.PathLike[str],
    panels: Mapping[str, tuple[Any, Any, Any]],
    *,
    bins: int = 60,
    f_max: float = 10.0,
) -> Path:
    """One Ramachandran free-energy panel per entry, F = -log p(φ, ψ) in kT, minimum 0.

    Args:
        path: output ``.png``.
        panels: name -> ``(phi, psi, weights)``; angles in radians, ``weights`` (any positive
            scale, e.g. exp(log w - max)) or None; e.g. ``{"proposal": ..., "reweighted": ...,
            "reference": ...}``.
        bins: bins per angle.
        f_max: colour scale cap in kT (empty bins are left blank).
    """
    if not panels:
        raise ValueError("no Ramachandran panels given")
    fig = new_figure(4.0 * len(panels) + 0.8, 3.8)
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
    image = None
    for ax, (name, (phi, psi, weights)) in zip(axes, panels.items()):
        p = ramachandran_histogram(phi, psi, weights, bins=bins)
        with np.errstate(divide="ignore"):
            f = -np.log(p)
        f = f - np.min(f[np.isfinite(f)])
        f = np.ma.masked_invalid(np.where(f > f_max, np.nan, f))
        image = ax.imshow(
            f.T,
            origin="lower",
            extent=(-math.pi, math.pi, -math.pi, math.pi),
            vmin=0,
            vmax=f_max,
            cmap="viridis",
            aspect="equal",
            interpolation="nearest",
        )
        ax.set_title(f"{name} (N = {np.size(to_numpy(phi))})")
        ax.set_xlabel("φ [rad]")
    axes[0].set_ylabel("ψ [rad]")
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="F [kT]")
    return save_png(fig, path)


def plot_free_energy_profile(
    path: str | os.PathLike[str],
    profile: FreeEnergyProfile,
    *,
    label: str = "s",
    reference: FreeEnergyProfile | None = None,
    f_max: float | None = None,
) -> Path:
    """Plot a 1-D profile with its confidence band (or a 2-D profile as an image).

    Args:
        path: output ``.png``.
        profile: from :func:`boltzflow.sampling.estimators.free_energy_profile`.
        label: name of the coordinate(s) for the axis, e.g. ``"φ [rad]"``.
        reference: an optional reference profile drawn as a dashed line (1-D only).
        f_max: upper limit of the F axis / colour scale in kT.
    """
    fig = new_figure()
    ax = fig.add_subplot()
    level = f"{100 * profile.level:g}%"
    if len(profile.edges) == 1:
        (c,) = profile.centers
        f = np.where(np.isfinite(profile.free_energy), profile.free_energy, np.nan)
        lo = np.where(np.isfinite(profile.ci_low), profile.ci_low, np.nan)
        hi = np.where(np.isfinite(profile.ci_high), profile.ci_high, np.nan)
        ax.plot(c, f, "-", color="C0", label="estimate")
        ax.fill_between(c, lo, hi, color="C0", alpha=0.3, label=f"{level} CI ({profile.method})")
        if reference is not None:
            (rc,) = reference.centers
            rf = np.where(np.isfinite(reference.free_energy), reference.free_energy, np.nan)
            ax.plot(rc, rf, "k--", label="reference")
        ax.set_xlabel(label)
        ax.set_ylabel("F [kT]")
        if f_max is not None:
            ax.set_ylim(-0.5, f_max)
        ax.legend()
    else:
        e1, e2 = profile.edges
        f = np.ma.masked_invalid(
            np.where(np.isfinite(profile.free_energy), profile.free_energy, np.nan)
        )
        im = ax.imshow(
            f.T,
            origin="lower",
            extent=(e1[0], e1[-1], e2[0], e2[-1]),
            vmin=0,
            vmax=f_max,
            aspect="auto",
            interpolation="nearest",
        )
        fig.colorbar(im, ax=ax, label="F [kT]")
        ax.set_xlabel(label)
    ax.set_title(f"free-energy profile, N = {profile.n}, ESS = {profile.ess:.1f}")
    return save_png(fig, path)


def _finite_or_nan(a: Any) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return np.where(np.isfinite(a), a, np.nan)


def plot_free_energy_profiles(
    path: str | os.PathLike[str],
    profiles: Mapping[str, FreeEnergyProfile],
    *,
    reference: FreeEnergyProfile | None = None,
    reference_label: str = "reference",
    label: str = "s",
    f_max: float | None = None,
) -> Path:
    """Several 1-D profiles in one panel (one colour each, band shaded), and a reference as a
    black dashed line with its band in grey.

    Args:
        path: output ``.png``.
        profiles: name -> 1-D profile (e.g. each model's reweighted F(φ)).
        reference: optional reference profile (e.g. umbrella sampling + MBAR).
        reference_label: its legend entry.
        label: name of the coordinate for the axis, e.g. ``"φ [rad]"``.
        f_max: upper limit of the F axis in kT.
    """
    if not profiles and reference is None:
        raise ValueError("no profiles to plot")
    fig = new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    for i, (name, prof) in enumerate(profiles.items()):
        if len(prof.edges) != 1:
            raise ValueError(f"profile {name!r} is not 1-D")
        (c,) = prof.centers
        colour = f"C{i % 10}"
        ax.plot(c, _finite_or_nan(prof.free_energy), ".-", color=colour, label=name)
        lo, hi = _finite_or_nan(prof.ci_low), _finite_or_nan(prof.ci_high)
        ax.fill_between(c, lo, hi, color=colour, alpha=0.2)
    if reference is not None:
        (rc,) = reference.centers
        ax.plot(rc, _finite_or_nan(reference.free_energy), "k--", lw=1.5, label=reference_label)
        lo, hi = _finite_or_nan(reference.ci_low), _finite_or_nan(reference.ci_high)
        if np.isfinite(lo).any():
            ax.fill_between(rc, lo, hi, color="0.5", alpha=0.25)
    ax.set_xlabel(label)
    ax.set_ylabel("F [kT]")
    if f_max is not None:
        ax.set_ylim(-0.5, f_max)
    first = next(iter(profiles.values()), reference)
    ax.set_title(f"free-energy profiles (bands: {100 * first.level:g}% CI)")
    ax.legend(fontsize=8)
    return save_png(fig, path)
