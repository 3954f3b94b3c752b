"""Importance sampling: weights, effective sample size, resampling, estimators, SMC.

Submodules: :mod:`~boltzflow.sampling.weights` (log weights, Kish and forward ESS, clipping),
:mod:`~boltzflow.sampling.results` (``WeightedSamples``, ``Estimate``),
:mod:`~boltzflow.sampling.resampling`, :mod:`~boltzflow.sampling.estimators` (SNIS, log Z, ΔF,
profiles; delta method and bootstrap), :mod:`~boltzflow.sampling.proposals`,
:mod:`~boltzflow.sampling.kernels` (MALA/HMC), :mod:`~boltzflow.sampling.smc` (AIS/SMC),
:mod:`~boltzflow.sampling.latent` (SMC in a few-step sampler's latent space) and
:mod:`~boltzflow.sampling.features` (the last two not imported here). The ``reweight`` and
``estimate`` analyses built on these live in :mod:`boltzflow.analysis`.
"""

from boltzflow.sampling.estimators import (
    FreeEnergyProfile,
    free_energy_difference,
    free_energy_profile,
    log_partition,
    snis_expectation,
)
from boltzflow.sampling.resampling import (
    multinomial_resample,
    resample,
    resample_indices,
    systematic_resample,
)
from boltzflow.sampling.results import Estimate, WeightedSamples
from boltzflow.sampling.smc import SMCResult, ais, smc
from boltzflow.sampling.weights import (
    ClippedWeights,
    clip_log_weights,
    ess_fraction,
    forward_ess_fraction,
    kish_ess,
    log_weights,
    normalized_weights,
)

__all__ = [
    "ClippedWeights",
    "Estimate",
    "FreeEnergyProfile",
    "SMCResult",
    "WeightedSamples",
    "ais",
    "clip_log_weights",
    "ess_fraction",
    "forward_ess_fraction",
    "free_energy_difference",
    "free_energy_profile",
    "kish_ess",
    "log_partition",
    "log_weights",
    "multinomial_resample",
    "normalized_weights",
    "resample",
    "resample_indices",
    "smc",
    "snis_expectation",
    "systematic_resample",
]
