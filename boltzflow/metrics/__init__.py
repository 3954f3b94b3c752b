"""Sample-quality metrics as the field reports them: energy W1/W2, torus W2, NLL, Ramachandran KL,
chirality rate. Kish and forward ESS live in :mod:`boltzflow.sampling.weights`."""

from boltzflow.metrics.likelihood import nll
from boltzflow.metrics.molecular import chirality_rate, ramachandran_histogram, ramachandran_kl
from boltzflow.metrics.wasserstein import energy_w1, energy_w2, torus_w2, wasserstein_1d

__all__ = [
    "chirality_rate",
    "energy_w1",
    "energy_w2",
    "nll",
    "ramachandran_histogram",
    "ramachandran_kl",
    "torus_w2",
    "wasserstein_1d",
]
