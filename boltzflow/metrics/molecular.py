"""Metrics on molecular samples: Ramachandran KL divergence and the chirality (D-form) rate."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["chirality_rate", "ramachandran_histogram", "ramachandran_kl"]


def _np(a: Any) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64).reshape(-1)


def ramachandran_histogram(
    phi: Any, psi: Any, weights: Any = None, *, bins: int = 60, pseudocount: float = 0.0
) -> np.ndarray:
    """Normalised (optionally weighted) 2-D histogram of (φ, ψ) on [-π, π]^2.

    Args:
        phi: ``(N,)`` φ in radians.
        psi: ``(N,)`` ψ in radians.
        weights: ``(N,)`` non-negative weights (any scale) or None.
        bins: bins per angle.
        pseudocount: probability added to every bin before renormalising (keeps log finite).

    Returns:
        ``(bins, bins)`` probabilities summing to 1, indexed ``[phi_bin, psi_bin]``.
    """
    phi, psi = _np(phi), _np(psi)
    if phi.shape != psi.shape:
        raise ValueError(f"phi and psi differ in length: {phi.size} vs {psi.size}")
    w = np.ones_like(phi) if weights is None else _np(weights)
    if w.shape != phi.shape or not np.isfinite(w).all() or np.any(w < 0):
        raise ValueError(f"weights must be ({phi.size},), finite and non-negative")
    keep = (w > 0) & np.isfinite(phi) & np.isfinite(psi)
    if not keep.any():
        raise ValueError("no finite (φ, ψ) with positive weight")
    if not pseudocount >= 0:
        raise ValueError(f"pseudocount must be >= 0, got {pseudocount!r}")
    edges = np.linspace(-math.pi, math.pi, bins + 1)
    h, _, _ = np.histogram2d(phi[keep], psi[keep], bins=[edges, edges], weights=w[keep])
    h = h / h.sum() + pseudocount
    return h / h.sum()


def ramachandran_kl(
    phi_reference: Any,
    psi_reference: Any,
    phi: Any,
    psi: Any,
    weights: Any = None,
    *,
    bins: int = 60,
    pseudocount: float = 1e-6,
) -> float:
    """KL(reference || samples) in nats between weighted Ramachandran histograms.

    Both histograms use ``bins x bins`` cells on [-π, π]^2 and get ``pseudocount`` probability per
    cell before renormalisation, so empty cells of the sample histogram give a large but finite
    penalty. The value depends on ``bins`` and ``pseudocount``: report them with it.

    Args:
        phi_reference: ``(N,)`` reference φ (radians).
        psi_reference: ``(N,)`` reference ψ.
        phi: ``(M,)`` sample φ.
        psi: ``(M,)`` sample ψ.
        weights: ``(M,)`` importance weights of the samples (e.g. normalised weights) or None.
        bins: bins per angle.
        pseudocount: probability added per cell.
    """
    p = ramachandran_histogram(phi_reference, psi_reference, bins=bins, pseudocount=pseudocount)
    q = ramachandran_histogram(phi, psi, weights, bins=bins, pseudocount=pseudocount)
    mask = p > 0
    return float(np.sum(p[mask] * (np.log(p[mask]) - np.log(q[mask]))))


def chirality_rate(
    x: Tensor,
    atoms: Sequence[int] | None = None,
    l_sign: int = 1,
    weights: Any = None,
) -> float:
    """Fraction of configurations with the wrong (D) chirality at the given centre.

    Uses :func:`boltzflow.systems.geometry.is_l_form` (the one chirality test of boltzflow).

    Args:
        x: ``(N, 3 * n_atoms)`` positions.
        atoms: (centre, three substituents); default alanine dipeptide's Cα.
        l_sign: sign of the chirality volume of the L form (``MolecularSystem.l_form_sign``).
        weights: optional ``(N,)`` non-negative weights: the weighted D fraction.

    Returns:
        D-form fraction in [0, 1].
    """
    from boltzflow.systems import geometry

    atoms = geometry.ALDP_CHIRALITY_ATOMS if atoms is None else atoms
    d_form = (~geometry.is_l_form(torch.as_tensor(x), atoms, l_sign)).cpu().numpy()
    if d_form.ndim != 1 or d_form.size == 0:
        raise ValueError(f"x must be a non-empty batch (N, 3 * n_atoms), got {tuple(x.shape)}")
    if weights is None:
        return float(d_form.mean())
    w = _np(weights)
    if w.shape != d_form.shape or not np.isfinite(w).all() or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be ({d_form.size},), finite, non-negative, not all 0")
    return float(np.sum(w * d_form) / w.sum())
