"""Matplotlib plots of importance-sampling results, written as PNG files.

Figures are drawn with ``matplotlib.figure.Figure`` and the Agg canvas, so no global backend is
selected and importing boltzflow never touches ``matplotlib.pyplot``.
"""

from boltzflow.plots.landscape import (
    plot_free_energy_profile,
    plot_free_energy_profiles,
    plot_ramachandran,
)
from boltzflow.plots.weights import (
    ess_curve,
    plot_energy_histograms,
    plot_ess_vs_n,
    plot_log_weights,
)

__all__ = [
    "ess_curve",
    "plot_energy_histograms",
    "plot_ess_vs_n",
    "plot_free_energy_profile",
    "plot_free_energy_profiles",
    "plot_log_weights",
    "plot_ramachandran",
]
