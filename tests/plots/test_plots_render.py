"""Every plot renders a non-empty PNG without touching pyplot."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from boltzflow.plots import (
    ess_curve,
    plot_energy_histograms,
    plot_ess_vs_n,
    plot_free_energy_profile,
    plot_free_energy_profiles,
    plot_log_weights,
    plot_ramachandran,
)
from boltzflow.sampling import free_energy_profile

PNG = b"\x89PNG\r\n\x1a\n"


def _check(path):
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 2000, f"{path} is not a rendered PNG"


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    u = rng.normal(size=2000) ** 2
    lw = -0.5 * u + rng.normal(size=2000)
    lw[:5] = -np.inf
    u[:5] = np.inf
    phi, psi = rng.uniform(-math.pi, math.pi, size=(2, 2000))
    return u, lw, phi, psi


def test_weight_plots(tmp_path, data):
    u, lw, _, _ = data
    _check(plot_energy_histograms(tmp_path / "e.png", u, log_w=lw, u_reference=u[5:] + 0.1))
    _check(plot_log_weights(tmp_path / "w.png", lw))
    _check(plot_ess_vs_n(tmp_path / "n.png", lw))
    n, ess = ess_curve(lw, n_points=5)
    assert n[-1] == 2000 and np.all(ess <= n + 1e-9)
    with pytest.raises(ValueError, match=r"\.png"):
        plot_log_weights(tmp_path / "w.jpg", lw)


def test_landscape_plots(tmp_path, data):
    _, lw, phi, psi = data
    w = np.exp(lw - lw.max())
    panels = {
        "proposal": (phi, psi, None),
        "reweighted": (phi, psi, w),
        "reference": (psi, phi, None),
    }
    _check(plot_ramachandran(tmp_path / "r.png", panels))
    prof = free_energy_profile(phi, lw, bins=30, value_range=(-math.pi, math.pi), n_bootstrap=20)
    ref = free_energy_profile(
        phi, np.zeros_like(phi), bins=30, value_range=(-math.pi, math.pi), method="delta"
    )
    _check(plot_free_energy_profile(tmp_path / "p.png", prof, label="φ", reference=ref))
    prof2 = free_energy_profile(np.stack([phi, psi], 1), lw, bins=12, n_bootstrap=10)
    _check(plot_free_energy_profile(tmp_path / "p2.png", prof2, label="φ, ψ"))
    many = {
        "a": prof,
        "b (one sample)": free_energy_profile(
            phi[10:11], lw[10:11], bins=30, value_range=(-math.pi, math.pi)
        ),
    }
    _check(plot_free_energy_profiles(tmp_path / "m.png", many, reference=ref, label="φ"))
    _check(plot_free_energy_profiles(tmp_path / "m2.png", {}, reference=ref, f_max=5.0))
    with pytest.raises(ValueError, match="no profiles"):
        plot_free_energy_profiles(tmp_path / "m3.png", {})
    with pytest.raises(ValueError, match="not 1-D"):
        plot_free_energy_profiles(tmp_path / "m4.png", {"2-D": prof2})
    assert "matplotlib.pyplot" not in sys.modules
