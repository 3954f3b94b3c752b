"""Importance sampling: weights, effective sample size, resampling, estimators, SMC."""

from boltzflow.sampling.weights import ess_fraction, kish_ess, log_weights, normalized_weights

__all__ = ["ess_fraction", "kish_ess", "log_weights", "normalized_weights"]
