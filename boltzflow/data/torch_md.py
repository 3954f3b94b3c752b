"""Batched Langevin dynamics on the torch force field: many independent replicas in one pass.

OpenMM integrates one configuration per ``Context``; for a molecule whose OpenMM forces are slow
on the CPU (``aldp_ff96_obc1``: its prmtop OBC1 is a ``CustomGBForce``, about 410 µs per step on
one thread) a batch of replicas through :class:`~boltzflow.systems.torch_ff.TorchForceField`
costs a few tens of µs per replica and step. The scheme is OpenMM's ``LangevinMiddleIntegrator``
(Zhang, Liu, Yan, Tuckerman & Liu 2019, J. Phys. Chem. A 123, 6056), a leapfrog with the
friction and noise in the middle of the position update:

    v <- v + dt F(x) / m
    x <- x + dt/2 v
    v <- a v + sqrt((1 - a²) kT / m) ξ,     a = exp(-γ dt),  ξ ~ N(0, 1)
    x <- x + dt/2 v

Its positions are those of BAOAB, which samples the configurations of a harmonic potential
exactly at any stable time step (Leimkuhler & Matthews 2013, Appl. Math. Res. Express 2013, 34).
With γ = 0 it is velocity Verlet, step for step the same trajectory as OpenMM's integrator.

Units (OpenMM's): positions nm, velocities nm/ps, masses amu (g/mol), forces kJ/mol/nm,
energies kJ/mol, time ps; kJ/mol = amu nm²/ps². Shapes: ``x`` and ``v`` flat ``(R, 3 n_atoms)``.
No constraints, no virtual sites (massless particles are refused).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from boltzflow.constants import kt_kj_per_mol

__all__ = ["LangevinRun", "maxwell_boltzmann", "particle_masses", "run_langevin"]

#: ``force_fn(x (R, 3n) nm) -> (energies (R,) kJ/mol, forces (R, 3n) kJ/mol/nm)``.
ForceFn = Callable[[Tensor], tuple[Tensor, Tensor]]


@dataclass
class LangevinRun:
    """Frames of :func:`run_langevin`: ``positions`` ``(R, n_frames, 3 n_atoms)`` float64 nm,
    ``energies_kj`` ``(R, n_frames)`` kJ/mol, ``steps`` per replica, ``seconds`` of wall time."""

    positions: np.ndarray
    energies_kj: np.ndarray
    steps: int
    seconds: float


def particle_masses(system: Any) -> Tensor:
    """``(n_particles,)`` float64 masses in amu of an ``openmm.System``."""
    from openmm import unit

    n = system.getNumParticles()
    return torch.tensor(
        [system.getParticleMass(i).value_in_unit(unit.dalton) for i in range(n)],
        dtype=torch.float64,
    )


def _per_coordinate(masses: Tensor) -> Tensor:
    masses = torch.as_tensor(masses, dtype=torch.float64).reshape(-1)
    if not bool((masses > 0).all()):
        raise ValueError("every particle needs a positive mass (no virtual sites or fixed atoms)")
    return masses.repeat_interleave(3)


def maxwell_boltzmann(
    masses: Tensor, temperature: float, n: int, *, generator: torch.Generator
) -> Tensor:
    """``(n, 3 n_atoms)`` float64 velocities in nm/ps drawn at ``temperature`` K."""
    m = _per_coordinate(masses)
    sd = torch.sqrt(kt_kj_per_mol(temperature) / m)
    return torch.randn(n, m.numel(), generator=generator, dtype=torch.float64) * sd


def run_langevin(
    force_fn: ForceFn,
    masses: Tensor,
    positions: Tensor,
    *,
    temperature: float,
    n_frames: int,
    stride: int,
    burn_in: int = 0,
    timestep_fs: float = 1.0,
    friction_per_ps: float = 1.0,
    seed: int = 0,
    velocities: Tensor | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    progress_every: int = 1000,
) -> LangevinRun:
    """Integrate ``R`` independent replicas and record a frame every ``stride`` steps.

    Args:
        force_fn: energies and forces of a batch (see :data:`ForceFn`); its dtype is used as it
            comes, the state is kept in float64.
        masses: ``(n_atoms,)`` amu.
        positions: ``(R, 3 n_atoms)`` nm, the starting configurations.
        temperature: K.
        n_frames: frames recorded per replica after ``burn_in`` steps (not recorded).
        stride: steps between frames.
        timestep_fs: time step in fs; friction_per_ps: the collision rate γ in 1/ps (0: no
            thermostat, velocity Verlet).
        seed: seed of the initial velocities and of the noise (one stream for the batch).
        velocities: ``(R, 3 n_atoms)`` nm/ps initial velocities (default: Maxwell–Boltzmann).
        progress: called as ``progress(step, total_steps, seconds)`` every ``progress_every``
            steps.

    Returns:
        :class:`LangevinRun`.

    Raises:
        ValueError: bad shapes or settings.
        RuntimeError: a replica's energy or forces stopped being finite (the message names it).
    """
    if positions.ndim != 2:
        raise ValueError(f"positions must be (replicas, 3 n_atoms), got {tuple(positions.shape)}")
    m = _per_coordinate(masses)
    if positions.shape[1] != m.numel():
        raise ValueError(
            f"positions have {positions.shape[1]} coordinates, masses {m.numel() // 3} atoms"
        )
    for name, value in (("n_frames", n_frames), ("stride", stride)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if int(burn_in) != burn_in or burn_in < 0:
        raise ValueError(f"burn_in must be an integer >= 0, got {burn_in!r}")
    if not timestep_fs > 0 or not friction_per_ps >= 0 or not temperature > 0:
        raise ValueError(
            "timestep_fs and temperature must be positive and friction_per_ps >= 0, got "
            f"{timestep_fs!r}, {temperature!r}, {friction_per_ps!r}"
        )
    gen = torch.Generator().manual_seed(int(seed))
    x = positions.detach().to(torch.float64).clone()
    replicas = x.shape[0]
    v = (
        maxwell_boltzmann(masses, temperature, replicas, generator=gen)
        if velocities is None
        else velocities.detach().to(torch.float64).clone().reshape(x.shape)
    )
    dt = timestep_fs * 1e-3
    a = math.exp(-friction_per_ps * dt)
    noise_sd = math.sqrt(1.0 - a * a) * torch.sqrt(kt_kj_per_mol(temperature) / m)
    inv_m = 1.0 / m

    def forces(at: Tensor) -> tuple[Tensor, Tensor]:
        energy, force = force_fn(at)
        energy, force = energy.detach().to(torch.float64), force.detach().to(torch.float64)
        bad = ~torch.isfinite(energy) | ~torch.isfinite(force).all(dim=1)
        if bool(bad.any()):
            rows = torch.nonzero(bad).flatten().tolist()
            raise RuntimeError(
                f"Langevin dynamics blew up: non-finite energy or forces in replica(s) "
                f"{rows[:10]} (try a smaller timestep_fs than {timestep_fs})"
            )
        return energy, force

    total = int(burn_in) + int(n_frames) * int(stride)
    out_x = np.empty((replicas, int(n_frames), x.shape[1]))
    out_e = np.empty((replicas, int(n_frames)))
    start = time.perf_counter()
    _, f = forces(x)
    for step in range(1, total + 1):
        v += dt * f * inv_m
        x += 0.5 * dt * v
        if friction_per_ps > 0:
            v.mul_(a).add_(torch.randn(v.shape, generator=gen, dtype=torch.float64) * noise_sd)
        x += 0.5 * dt * v
        energy, f = forces(x)
        after = step - int(burn_in)
        if after > 0 and after % stride == 0:
            frame = after // stride - 1
            out_x[:, frame] = x.numpy()
            out_e[:, frame] = energy.numpy()
        if progress is not None and (step % progress_every == 0 or step == total):
            progress(step, total, time.perf_counter() - start)
    return LangevinRun(out_x, out_e, total, time.perf_counter() - start)
