"""Generate reference data for a named system: MCMC, exact samples or molecular dynamics.

:func:`generate` picks a method per system (``method="auto"``):

* molecular (OpenMM) systems → ``"md"``: Langevin MD (:func:`boltzflow.data.md.run_md`) from the
  structure file's configuration: minimise, ``burn_in`` = 50,000 steps (50 ps) of equilibration,
  then one frame every ``stride`` = 500 steps (0.5 ps) at 1 fs, friction 1/ps, on the system's
  OpenMM platform (``Reference`` for ALDP: about 8,000 steps/s on one core, 16 frames/s);
* systems with an exact sampler (``many_well_32``, ``gmm_40``) → ``"exact"`` (``sample_exact``);
* ``dw4`` → ``"pt"``: parallel tempering with MALA moves on 4 temperatures from 1 to 5 (single
  chains do not cross between the pair-distance minima), 256 chains, 2,000 burn-in steps, a sample
  every 20 steps per chain — ``boltzflow data generate dw4 -n 10000`` takes 10–20 s on one core;
* ``lj13`` → ``"pt"``: MALA moves on 6 temperatures from 1 to 3, 128 chains, 5,000 burn-in steps;
* any other analytic system → ``"mala"``: 256 MALA chains, 2,000 burn-in steps, stride 20 (for
  ``lj55`` this is a starting point, not a validated default).

MCMC chains start at ``system.reference_configuration()`` (a low-energy state; a standard normal
draw where the system has none) plus ``init_noise`` Gaussian noise, and return ``n`` samples of
the T = 1 chains, time-major (all chains at one record, then the next record). Step sizes adapt
during burn-in towards the kernel's target acceptance and are frozen afterwards. Mean-free
particle systems yield mean-free samples (MD frames are centred too).

Settings (keyword arguments) by method, with their defaults:

* ``mala``/``hmc``: ``n_chains=256, burn_in=2000, stride=20, step_size=0.05,
  target_acceptance=None`` (0.574 MALA, 0.65 HMC), ``adapt=True, init_noise=0.05``; ``hmc`` also
  ``n_leapfrog=10``.
* ``pt``: the above plus ``kernel="mala", n_temps=4, t_max=5.0, swap_every=1``.
* ``md``: ``burn_in=50000, stride=500, timestep_fs=1.0, friction_per_ps=1.0, minimize=True,
  platform=None`` (the system's platform), ``threads=None``.
* ``md_seeded`` (molecules; ask for it by name, ``auto`` stays ``md``): training data that
  covers both φ basins of ALDP (:mod:`boltzflow.data.seeded_md`). A hot run (800 K) yields
  candidate frames; ``n_seeds`` of them, a share ``basin_fraction`` from 0 < φ < 2 and the rest
  from φ < 0, each seed a segment of 300 K MD in its own worker process, resumable through
  ``segments_dir`` (the CLI: ``<output>.segments``). **Not Boltzmann across basins** (the seeds
  set the basin populations); fine for training flows that are reweighted. Settings:
  ``n_seeds=60, basin_fraction=0.3, hot_temperature=800.0, hot_burn_in=10000, hot_frames=1000,
  hot_stride=1000, burn_in=20000, stride=100, timestep_fs=1.0, friction_per_ps=1.0,
  platform=None`` (the system's), ``engine="openmm"`` (``"torch"``: the segments as one batch
  through the torch force field), ``workers=2`` (0: in this process), ``segments_dir=None``
  (a temporary folder: not resumable), ``keep_segments=False`` (the CLI deletes the segment
  folder once the dataset is written).
* ``exact``: none.

Unknown settings raise ``TypeError`` listing the valid ones.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from boltzflow.data.seeded_md import DEFAULTS as _SEEDED_MD_DEFAULTS
from boltzflow.systems import load_system
from boltzflow.systems.base import System

__all__ = ["METHODS", "default_method", "generate", "resolve_settings"]

METHODS = ("auto", "exact", "mala", "hmc", "pt", "md", "md_seeded")
# Methods for molecular (OpenMM) systems.
_MD_METHODS = ("md", "md_seeded")

_MCMC = {
    "n_chains": 256,
    "burn_in": 2000,
    "stride": 20,
    "step_size": 0.05,
    "target_acceptance": None,
    "adapt": True,
    "init_noise": 0.05,
}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "exact": {},
    "mala": dict(_MCMC),
    "hmc": {**_MCMC, "n_leapfrog": 10},
    "pt": {
        **_MCMC,
        "kernel": "mala",
        "n_leapfrog": 10,
        "n_temps": 4,
        "t_max": 5.0,
        "swap_every": 1,
    },
    "md": {
        "burn_in": 50_000,
        "stride": 500,
        "timestep_fs": 1.0,
        "friction_per_ps": 1.0,
        "minimize": True,
        "platform": None,
        "threads": None,
    },
    "md_seeded": dict(_SEEDED_MD_DEFAULTS),
}
# Per-system method and setting overrides (applied before the caller's settings).
_SYSTEM_DEFAULTS: dict[str, dict[str, Any]] = {
    # DW4: the pair-distance minima (d ≈ 2.5 and 5.5) are separated by a 4.4 kT barrier per pair,
    # so single chains do not mix; T_max = 5 gives swap acceptance 0.5–0.67 on 4 rungs.
    "dw4": {"method": "pt", "n_temps": 4, "t_max": 5.0, "init_noise": 0.1, "step_size": 0.2},
    # LJ13 at kT = 1 (ordered-pair convention): single MALA chains started at the minimum stay in
    # different states for > 10^4 steps (energy std 8.7 vs 7.1 in the public data); 6 rungs up to
    # T = 3 swap at 0.2–0.4 and give mean -42.1 ± 0.4 kT, std 7.09 (public: -43.0, 7.10) for
    # 5,120 samples in about 2 min on one core.
    "lj13": {"method": "pt", "n_temps": 6, "t_max": 3.0, "n_chains": 128, "burn_in": 5000},
}


def _is_molecular(system: System) -> bool:
    return hasattr(system, "openmm_system")


def default_method(system: System) -> str:
    """The method ``"auto"`` resolves to for ``system`` (see the module docstring)."""
    if _is_molecular(system):
        return "md"
    if system.has_exact_samples:
        return "exact"
    return _SYSTEM_DEFAULTS.get(system.name, {}).get("method", "mala")


def resolve_settings(system: System, method: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Defaults of ``method``, then the system's own defaults, then ``settings``.

    Raises:
        TypeError: a setting that ``method`` does not take.
    """
    resolved = dict(_DEFAULTS[method])
    own = _SYSTEM_DEFAULTS.get(system.name, {})
    if own.get("method") == method:
        resolved.update({k: v for k, v in own.items() if k != "method"})
    unknown = sorted(set(settings) - set(resolved))
    if unknown:
        raise TypeError(
            f"method {method!r} has no setting(s) {unknown}; valid settings: {sorted(resolved)}"
        )
    resolved.update(settings)
    return resolved


def _initial_states(system: System, n_chains: int, noise: float, seed: int) -> Tensor:
    # A generator of its own so that the initial noise is not the sampler's first noise draw.
    gen = torch.Generator().manual_seed(int(seed) + 0x5EED)
    try:
        x = system.reference_configuration().to(torch.float64).reshape(1, system.dim)
    except NotImplementedError:
        x = torch.randn(1, system.dim, generator=gen, dtype=torch.float64)
    return x + noise * torch.randn(n_chains, system.dim, generator=gen, dtype=torch.float64)


def _mcmc(
    system: System, n: int, method: str, s: dict[str, Any], seed: int, progress: bool
) -> tuple[np.ndarray, np.ndarray, str, dict[str, Any]]:
    from boltzflow.data.mcmc import geometric_ladder, run_chains

    n_chains = max(1, min(int(s["n_chains"]), n))
    n_records = math.ceil(n / n_chains)
    kernel = s["kernel"] if method == "pt" else method
    temperatures = (
        geometric_ladder(int(s["n_temps"]), float(s["t_max"])) if method == "pt" else None
    )
    extra = {"swap_every": s["swap_every"]} if method == "pt" else {}
    result = run_chains(
        system,
        _initial_states(system, n_chains, float(s["init_noise"]), seed),
        n_steps=n_records * int(s["stride"]),
        kernel=kernel,
        temperatures=temperatures,
        burn_in=int(s["burn_in"]),
        stride=int(s["stride"]),
        step_size=float(s["step_size"]),
        target_acceptance=s["target_acceptance"],
        adapt=bool(s["adapt"]),
        n_leapfrog=int(s.get("n_leapfrog", 10)),
        seed=seed,
        progress=progress,
        **extra,
    )
    x = result.samples[:n].numpy()
    u = result.energies[:n].numpy()
    generator = f"parallel_tempering/{kernel}" if method == "pt" else kernel
    return (
        x,
        u,
        f"boltzflow.data.mcmc:{generator}",
        {**result.summary(), "sampler": result.settings},
    )


def _exact(system: System, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    x = system.sample_exact(n, seed=seed).to(torch.float64)
    u = system.energy(x).detach()
    return x.numpy(), u.numpy()


def _md(
    system: System, n: int, s: dict[str, Any], seed: int, progress: bool
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    from boltzflow.data.md import run_md

    result = run_md(
        system.openmm_system,
        system.reference_configuration(),
        temperature=float(system.temperature),
        n_frames=n,
        seed=seed,
        progress=progress,
        **s,
    )
    x = result.positions
    if system.mean_free:  # the energy is translation invariant: store centred frames
        x = system.remove_mean(torch.from_numpy(x)).numpy()
    return x, result.energies, {**result.summary(), "integrator": result.settings}


def generate(
    system_name: str | System,
    n: int,
    *,
    seed: int,
    method: str = "auto",
    progress: bool = True,
    **settings: Any,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Draw ``n`` reference configurations of a system with their reduced energies.

    Args:
        system_name: a name from :func:`boltzflow.systems.available` (or a built ``System``).
        n: number of samples (frames for MD).
        seed: seed of every random draw; CPU runs with the same seed reproduce bit-for-bit
            (MD: on the Reference platform, or CPU with a fixed thread count).
        method: ``"auto"`` (see the module docstring), ``"exact"``, ``"mala"``, ``"hmc"``,
            ``"pt"`` (parallel tempering), ``"md"`` or ``"md_seeded"`` (seeded segments that
            cover both φ basins, not Boltzmann across them).
        progress: show progress bars (only on a terminal).
        **settings: method settings overriding the defaults (module docstring).

    Returns:
        ``positions`` ``(n, dim)`` float64 (nm for molecules), ``energies`` ``(n,)`` reduced
        energies in kT, and a ``provenance`` dict for :func:`boltzflow.data.write_dataset`
        (generator, settings, seed, system parameters, temperature, statistics). An MD run
        stopped by Ctrl-C returns the frames so far, with ``provenance["statistics"]
        ["interrupted"]`` set.

    Raises:
        KeyError: unknown system name (the message lists the known ones).
        ValueError: unknown method, or a method the system does not support.
        TypeError: unknown settings.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if seed is None or int(seed) != seed:
        raise TypeError(f"seed must be an integer, got {seed!r}")
    n, seed = int(n), int(seed)
    owned = isinstance(system_name, str)
    system = load_system(system_name) if owned else system_name
    try:
        chosen = default_method(system) if method == "auto" else method
        if chosen in _MD_METHODS and not _is_molecular(system):
            raise ValueError(
                f"method {chosen!r} needs a molecular (OpenMM) system; {system.name!r} is not"
            )
        if chosen not in _MD_METHODS and _is_molecular(system):
            raise ValueError(
                f"{system.name!r} is a molecular system: use method 'md', 'md_seeded' or 'auto'"
            )
        if chosen == "exact" and not system.has_exact_samples:
            raise ValueError(
                f"system {system.name!r} has no exact sampler; use 'mala', 'hmc' or 'pt'"
            )
        s = resolve_settings(system, chosen, settings)
        if chosen == "md" and s["platform"] is None:  # the system's own (Reference for ALDP)
            s["platform"] = getattr(system, "platform_name", "CPU")
        if chosen == "exact":
            x, u = _exact(system, n, seed)
            generator, stats = f"{type(system).__name__}.sample_exact", {}
        elif chosen == "md":
            x, u, stats = _md(system, n, s, seed, progress)
            generator = "boltzflow.data.md:run_md"
        elif chosen == "md_seeded":
            from boltzflow.data.seeded_md import run_seeded_md

            x, u, stats = run_seeded_md(system, n, seed=seed, settings=s, progress=progress)
            generator = "boltzflow.data.seeded_md:run_seeded_md"
        else:
            x, u, generator, stats = _mcmc(system, n, chosen, s, seed, progress)
        provenance = {
            "generator": generator,
            "method": chosen,
            "method_requested": method,
            "settings": s,
            "seed": seed,
            "n_requested": n,
            "system_parameters": dict(system.info.parameters),
            "temperature": system.temperature,
            "statistics": stats,
        }
        if chosen == "md_seeded":  # said at the top level too: readers must not miss it
            provenance["boltzmann_across_basins"] = False
    finally:
        if owned:
            system.close()
    return x, u, provenance
