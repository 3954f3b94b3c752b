"""The ``boltzflow estimate`` analysis, and the one evaluation of an estimate spec.

:func:`observable_estimates` and :func:`free_energy_estimates` turn the ``[[observable]]`` and
``[[free_energy]]`` tables of a spec (features and states, see
:mod:`boltzflow.sampling.features`) into :class:`~boltzflow.sampling.results.Estimate` s for one
weighted sample set. :func:`estimate_from_spec` (the ``estimate`` command: a TOML spec naming a
sample file) and the workflow report (:mod:`boltzflow.workflow.report`: the ``[estimates]``
table, per model) both use them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from boltzflow.analysis.report import write_report
from boltzflow.analysis.reweight import sample_energies
from boltzflow.io.samples import read_samples
from boltzflow.io.tomlfile import read_toml_file
from boltzflow.sampling.estimators import free_energy_difference, snis_expectation
from boltzflow.sampling.features import compute_feature, state_mask
from boltzflow.sampling.weights import clip_log_weights, kish_ess, log_weights
from boltzflow.systems.base import System

__all__ = [
    "ESTIMATE_METHODS",
    "estimate_from_spec",
    "estimate_methods",
    "free_energy_estimates",
    "observable_estimates",
]

#: the ``method`` of a spec -> the interval methods it asks for
ESTIMATE_METHODS = {
    "both": ("delta", "bootstrap"),
    "delta": ("delta",),
    "bootstrap": ("bootstrap",),
}


def estimate_methods(method: str) -> tuple[str, ...]:
    """The interval methods (``"delta"``, ``"bootstrap"``) of a spec's ``method``."""
    if method not in ESTIMATE_METHODS:
        raise ValueError(f"method must be one of {sorted(ESTIMATE_METHODS)}, got {method!r}")
    return ESTIMATE_METHODS[method]


def observable_estimates(
    observables: Iterable[Mapping[str, Any]],
    x: Tensor,
    u: Tensor,
    log_w: np.ndarray,
    system: System,
    *,
    methods: tuple[str, ...],
    level: float,
    n_bootstrap: int,
    seed: int,
    undefined_ok: bool = False,
    clusters: Any | None = None,
) -> dict[str, dict[str, Any]]:
    """Self-normalized importance-sampling estimates of observables.

    Args:
        observables: ``[[observable]]`` tables (``name`` + a feature; default name
            ``"observable <i>"``).
        x, u, log_w: the samples, their reduced energies and log weights.
        system: the target (features may need it).
        methods: interval methods, e.g. ``estimate_methods("both")``.
        level, n_bootstrap, seed: confidence level, bootstrap replicates and seed.
        undefined_ok: an estimate that cannot be formed (e.g. zero total weight) becomes
            ``{"undefined": reason}`` instead of raising ValueError.
        clusters: ``(N,)`` integer labels of correlated groups (SMC particles: their initial
            ancestors), or None; with clusters the interval is the clustered delta method
            alone, whatever ``methods`` says (a bootstrap of single rows would ignore the
            correlation).

    Returns:
        ``{name: {method: Estimate}}``.
    """
    kw, methods = _interval_options(methods, level, n_bootstrap, seed, clusters)
    out: dict[str, dict[str, Any]] = {}
    for i, obs in enumerate(observables):
        name = obs.get("name", f"observable {i}")
        values = compute_feature(obs, x, u, system)
        try:
            out[name] = {m: snis_expectation(values, log_w, method=m, **kw) for m in methods}
        except ValueError as err:
            if not undefined_ok:
                raise
            out[name] = {"undefined": str(err)}
    return out


def free_energy_estimates(
    free_energies: Iterable[Mapping[str, Any]],
    x: Tensor,
    u: Tensor,
    log_w: np.ndarray,
    system: System,
    *,
    methods: tuple[str, ...],
    level: float,
    n_bootstrap: int,
    seed: int,
    undefined_ok: bool = False,
    clusters: Any | None = None,
) -> dict[str, dict[str, Any]]:
    """Free-energy differences ΔF = -log P(a) / P(b) (kT) between states.

    Args:
        free_energies: ``[[free_energy]]`` tables (``name``, default ``"free energy <i>"``;
            ``a`` = state, ``b`` = state or ``"complement"``).
        Others as in :func:`observable_estimates`.

    Returns:
        ``{name: {method: Estimate}}``.
    """
    kw, methods = _interval_options(methods, level, n_bootstrap, seed, clusters)
    out: dict[str, dict[str, Any]] = {}
    for i, fe in enumerate(free_energies):
        name = fe.get("name", f"free energy {i}")
        if "a" not in fe or "b" not in fe:
            raise ValueError(f"free_energy {name!r} needs states 'a' and 'b'")
        in_a = state_mask(fe["a"], x, u, system)
        in_b = ~in_a if fe["b"] == "complement" else state_mask(fe["b"], x, u, system)
        try:
            out[name] = {
                m: free_energy_difference(in_a, in_b, log_w, method=m, **kw) for m in methods
            }
        except ValueError as err:
            if not undefined_ok:
                raise
            out[name] = {"undefined": str(err)}
    return out


def _interval_options(
    methods: tuple[str, ...], level: float, n_bootstrap: int, seed: int, clusters: Any | None
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The estimators' keywords and methods: with ``clusters``, the clustered delta method."""
    kw: dict[str, Any] = {"level": level, "n_bootstrap": n_bootstrap, "seed": seed}
    if clusters is None:
        return kw, methods
    return {**kw, "clusters": clusters}, ("delta",)


def _resolve(base: Path, value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() else base / p


_SPEC_KEYS = {
    "samples",
    "system",
    "seed",
    "level",
    "method",
    "n_bootstrap",
    "clip_fraction",
    "recompute_energy",
    "observable",
    "free_energy",
    "title",
}


def estimate_from_spec(
    spec: Mapping[str, Any] | str | os.PathLike[str],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    system: System | None = None,
    allow_partial: bool = False,
) -> dict[str, Any]:
    """Observables and free-energy differences from a TOML spec.

    Spec keys: ``samples`` (path, relative to the TOML file), ``system`` (name), optional ``seed``
    (0), ``level`` (0.95), ``method`` (``"delta"``, ``"bootstrap"`` or ``"both"``, default both),
    ``n_bootstrap`` (1000), ``clip_fraction`` (0), ``recompute_energy`` (true), ``title``; and
    tables ``[[observable]]`` (``name`` + a feature, see :mod:`boltzflow.sampling.features`)
    and ``[[free_energy]]`` (``name``, ``a`` = state, ``b`` = state or ``"complement"``),
    evaluated by :func:`observable_estimates` and :func:`free_energy_estimates`.

    Example spec::

        samples = "samples.h5"
        system = "aldp"
        [[observable]]
        name = "mean energy"
        feature = "energy"
        [[free_energy]]
        name = "C7ax vs rest"
        a = [{feature = "phi", min = 0.0, max = 2.0}]
        b = "complement"

    ``allow_partial`` accepts a sample store whose writer did not finish (its complete
    chunks); ``weights["partial file"]`` then reports the rows used.

    Returns:
        ``{"weights": ..., "observables": {name: {method: Estimate}}, "free energies": ...}``;
        with ``out_dir`` also writes ``estimate.md`` / ``estimate.json`` there.
    """
    base = Path.cwd()
    if not isinstance(spec, Mapping):
        path = Path(spec)
        spec = read_toml_file(path, "spec")
        base = path.parent
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise ValueError(f"unknown spec keys {sorted(unknown)}; allowed: {sorted(_SPEC_KEYS)}")
    for key in ("samples", "system"):
        if key not in spec:
            raise ValueError(f"the spec needs {key!r}")
    methods = estimate_methods(spec.get("method", "both"))
    seed, level = int(spec.get("seed", 0)), float(spec.get("level", 0.95))
    n_boot = int(spec.get("n_bootstrap", 1000))
    samples = read_samples(_resolve(base, spec["samples"]), allow_partial=allow_partial)
    own_system = system is None
    if own_system:
        from boltzflow.systems import load_system

        system = load_system(spec["system"])
    try:
        if samples.log_q is None:
            raise ValueError("the sample file has no log_q column")
        x = torch.as_tensor(samples.x, dtype=torch.float64)
        recompute = spec.get("recompute_energy", True)
        u, energy_record = sample_energies(samples, system, recompute=recompute)
        log_w = log_weights(u, torch.as_tensor(samples.log_q, dtype=torch.float64))
        clip = float(spec.get("clip_fraction", 0.0))
        weights: dict[str, Any] = {"N": samples.n, "ESS/N": kish_ess(log_w) / samples.n}
        weights["u"] = energy_record["u"]
        if not samples.complete:
            weights["partial file"] = samples.partial_note()
        if clip > 0:
            c = clip_log_weights(log_w, clip)
            log_w = c.log_w
            weights.update({"clipped fraction": c.fraction_clipped, "clipped mass": c.mass_clipped})
        lw = log_w.numpy()
        kw = {"methods": methods, "level": level, "n_bootstrap": n_boot, "seed": seed}
        observables = observable_estimates(spec.get("observable", []), x, u, lw, system, **kw)
        free = free_energy_estimates(spec.get("free_energy", []), x, u, lw, system, **kw)
    finally:
        if own_system:
            system.close()
    results = {"weights": weights, "observables": observables, "free energies (kT)": free}
    if out_dir is not None:
        flat = {
            "weights": weights,
            "observables": {f"{k} [{m}]": e for k, d in observables.items() for m, e in d.items()},
            "free energies (kT)": {f"{k} [{m}]": e for k, d in free.items() for m, e in d.items()},
        }
        write_report(
            out_dir,
            flat,
            title=spec.get("title", "boltzflow estimate"),
            stem="estimate",
            notes=[f"samples {samples.path}, system {spec['system']}, seed {seed}"],
        )
    return results
