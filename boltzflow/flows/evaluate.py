"""Quality report of a flow against its target: ESS, log Z, entropy floor, NLL, cost.

With samples x ~ q, log weights log w = -u(x) - log q(x) (:mod:`boltzflow.sampling.weights`):

- Kish ESS/N;
- log Z ~ LSE(log w) - log N (importance sampling; biased low by about var(w)/(2 N w̄²));
- the target's entropy H = -E_p[log p] = log Z + <u>_p, with <u>_p either self-normalised
  importance sampling or the average over reference data;
- NLL = -<log q(x)> over reference data x ~ p, which exceeds H by KL(p || q) >= 0.

All densities are on the space the flow lives on: the (n - 1) d-dimensional mean-free subspace
for translation-invariant particle systems.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from torch import Tensor

from boltzflow.sampling.draw import Draw, iter_draws, write_draws
from boltzflow.sampling.weights import ess_fraction, kish_ess, normalized_weights
from boltzflow.systems.base import compute_energies, energy_provenance_of

__all__ = ["evaluate_flow", "nll_summary"]


def nll_summary(log_q: Tensor) -> dict[str, float]:
    """Mean NLL with its standard error from per-point log densities ``(N,)``."""
    nll = -log_q.double()
    n = nll.numel()
    return {
        "nll": float(nll.mean()),
        "nll_se": float(nll.std() / math.sqrt(n)) if n > 1 else float("nan"),
        "n_val": n,
    }


def evaluate_flow(
    flow: Any,
    system: Any,
    *,
    n_samples: int,
    seed: int = 0,
    val: Tensor | None = None,
    progress: bool = False,
    samples_path: str | os.PathLike[str] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Sample a flow, weight against the system, and (optionally) score reference data.

    Args:
        flow: a model with ``sample_with_stats`` and ``log_prob_with_stats`` (the teacher CNF).
        system: the target :class:`~boltzflow.systems.System` (``energy`` in kT).
        n_samples: number of samples N.
        seed: sampling seed.
        val: ``(M, dim)`` reference configurations for the NLL (mean-free where required).
        samples_path: also write the samples (``x``, ``log_q``, ``u``, ``log_w``) to this HDF5
            sample store (:class:`~boltzflow.io.samples.SampleWriter`, replaced if present).
        **settings: ODE settings forwarded to the flow (``method``, ``atol``, ...).

    Returns:
        a flat dict: ``n_samples``, ``ess``, ``ess_fraction``, ``log_z`` (``log_z_se``),
        ``mean_u_is``, ``entropy_is``, sampling cost (``sample_nfe_per_batch``,
        ``sample_s_per_1000``), and with
        ``val``: ``nll``, ``nll_se``, ``n_val``, ``mean_u_val``, ``entropy_val``, ``nll_gap``
        (NLL - entropy_val, with ``nll_gap_se``), ``nll_nfe_per_batch``, ``nll_s_per_1000``.
    """
    batches = list(
        iter_draws(flow, n_samples, system=system, seed=seed, progress=progress, **settings)
    )
    if samples_path is not None:
        provenance = {
            "model": type(flow).__name__,
            "seed": seed,
            "settings": settings,
            "energy": energy_provenance_of(system),  # what computed the u column
        }
        write_draws(samples_path, batches, dim=flow.dim, provenance=provenance)
    draw = Draw.from_batches(batches)
    u, log_w, cost = draw.samples.u, draw.samples.log_w, draw.cost
    n_finite = int(torch.isfinite(log_w).sum())
    log_z = float(torch.logsumexp(log_w, 0) - math.log(n_samples))
    w = normalized_weights(log_w)
    finite_u = torch.where(torch.isfinite(u), u, torch.zeros_like(u))
    mean_u_is = float((w * finite_u).sum())
    ess = kish_ess(log_w)
    report: dict[str, Any] = {
        "n_samples": n_samples,
        "n_finite_weights": n_finite,
        "ess": ess,
        "ess_fraction": ess_fraction(log_w),
        "log_z": log_z,
        # delta method: var(log Z_hat) ~ var(w) / (N mean(w)^2) = (N / ESS - 1) / N
        "log_z_se": math.sqrt(max(n_samples / ess - 1.0, 0.0) / n_samples),
        "mean_u_is": mean_u_is,
        "entropy_is": log_z + mean_u_is,
        "sample_nfe_per_batch": cost.nfe_per_sample,
        "sample_trace_evals": cost.trace_evals,
        "sample_seconds": cost.seconds,
        "sample_s_per_1000": cost.seconds_per_1000,
        "sample_cpu_s_per_1000": 1000.0 * cost.cpu_seconds / n_samples,
    }
    if val is not None:
        lp = flow.log_prob_with_stats(val, progress=progress, **settings)
        u_val = compute_energies(system, lp.x)
        mean_u_val = float(u_val.mean())
        report.update(nll_summary(lp.log_q))
        # NLL - H = mean(-log q - u) over the data - log Z: one per-point average and log Z
        per_point = -(lp.log_q.double() + u_val)
        gap_se = math.sqrt(float(per_point.var()) / len(per_point) + report["log_z_se"] ** 2)
        report.update(
            {
                "mean_u_val": mean_u_val,
                "entropy_val": log_z + mean_u_val,
                "nll_gap": report["nll"] - (log_z + mean_u_val),
                "nll_gap_se": gap_se,
                "nll_nfe_per_batch": lp.nfe_per_batch,
                "nll_seconds": lp.seconds,
                "nll_s_per_1000": lp.seconds_per_1000,
                "nll_cpu_s_per_1000": lp.cpu_seconds_per_1000,
            }
        )
    return report
