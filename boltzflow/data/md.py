"""Langevin molecular dynamics with OpenMM for reference data of molecular systems.

One OpenMM ``Context`` in this process runs a ``LangevinMiddleIntegrator`` (BAOAB splitting,
Zhang, Wang, Li, Leimkuhler & Chipot, J. Chem. Phys. 151, 234105 (2019), whose configurational
sampling error is small at the usual time steps): local energy minimisation, ``burn_in`` steps of
equilibration, then one frame every ``stride`` steps. Our systems have no constraints (hydrogens
move freely), so the default time step is 1 fs; friction 1/ps.

Positions come back in nm (float64), potential energies as reduced energies U/kT with
kT = R·T (:mod:`boltzflow.constants`). Seeds: OpenMM treats a random seed of 0 as "pick one at
random", so boltzflow seeds are mapped to a fixed positive integer; with the same seed, the
Reference platform (and the CPU platform with the same thread count and deterministic forces)
reproduces a run exactly.

Ctrl-C during production keeps the frames produced so far (``MDResult.interrupted``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import openmm
from openmm import unit

from boltzflow.constants import kt_kj_per_mol
from boltzflow.progress import Progress

__all__ = ["MDResult", "openmm_seed", "run_md"]

# Integrator.step is called in chunks of at most this many steps between progress updates.
_CHUNK = 1000


@dataclass(frozen=True)
class MDResult:
    """Frames of a Langevin MD run.

    Attributes:
        positions: ``(n_frames, 3 * n_atoms)`` positions in nm, float64.
        energies: ``(n_frames,)`` reduced potential energies U/kT.
        settings: the run's settings (JSON-friendly), for provenance.
        minimized_energy: reduced energy after minimisation (before equilibration).
        seconds: wall-clock time of the run.
        interrupted: True if Ctrl-C stopped production early (fewer frames than asked).
    """

    positions: np.ndarray
    energies: np.ndarray
    settings: dict[str, Any] = field(default_factory=dict)
    minimized_energy: float = float("nan")
    seconds: float = 0.0
    interrupted: bool = False

    def summary(self) -> dict[str, Any]:
        """JSON-friendly statistics of the run."""
        return {
            "n_frames": int(self.positions.shape[0]),
            "minimized_energy_kT": round(self.minimized_energy, 4),
            "mean_energy_kT": round(float(self.energies.mean()), 4) if len(self.energies) else None,
            "seconds": round(self.seconds, 3),
            "interrupted": self.interrupted,
        }


def openmm_seed(seed: int) -> int:
    """Map any integer seed to OpenMM's positive 31-bit range (0 would mean "random")."""
    return 1 + int(seed) % (2**31 - 2)


def _context(
    openmm_system: openmm.System,
    integrator: openmm.Integrator,
    platform: str,
    threads: int | None,
) -> openmm.Context:
    try:
        plat = openmm.Platform.getPlatformByName(platform)
    except openmm.OpenMMException as err:
        names = [
            openmm.Platform.getPlatform(i).getName()
            for i in range(openmm.Platform.getNumPlatforms())
        ]
        raise ValueError(f"OpenMM platform {platform!r} is not available; have {names}") from err
    props: dict[str, str] = {}
    if platform == "CPU":
        props["DeterministicForces"] = "true"
        if threads:
            props["Threads"] = str(int(threads))
    return openmm.Context(openmm_system, integrator, plat, props)


def _steps(integrator: openmm.Integrator, n: int, bar: Progress) -> None:
    while n > 0:
        k = min(n, _CHUNK)
        integrator.step(k)
        bar.update(k)
        n -= k


def run_md(
    openmm_system: openmm.System,
    positions: Any,
    *,
    temperature: float,
    n_frames: int,
    stride: int = 500,
    burn_in: int = 10_000,
    timestep_fs: float = 1.0,
    friction_per_ps: float = 1.0,
    minimize: bool = True,
    seed: int = 0,
    platform: str = "CPU",
    threads: int | None = None,
    progress: bool = True,
) -> MDResult:
    """Run Langevin MD and return ``n_frames`` frames taken every ``stride`` steps.

    Args:
        openmm_system: the OpenMM ``System`` (not modified).
        positions: starting positions in nm, ``(n_atoms, 3)`` or flat ``(1, 3 * n_atoms)``
            (numpy array or torch tensor).
        temperature: thermostat temperature in kelvin (also sets kT for the reduced energies).
        n_frames: frames to record after equilibration.
        stride: integration steps between frames.
        burn_in: equilibration steps after minimisation, not recorded.
        timestep_fs: time step in femtoseconds (1 fs: no constraints in our systems).
        friction_per_ps: Langevin friction coefficient in 1/ps.
        minimize: run OpenMM's local energy minimiser first.
        seed: seeds the integrator's random stream and the initial Maxwell–Boltzmann velocities.
        platform: OpenMM platform name (``"Reference"``, ``"CPU"``, ``"CUDA"``, ``"OpenCL"``).
        threads: CPU-platform threads (None: OpenMM's default, all cores).
        progress: show progress (a bar on a terminal, periodic lines otherwise).

    Returns:
        :class:`MDResult`.

    Raises:
        ValueError: bad arguments, positions of the wrong shape, unknown platform.
        RuntimeError: the simulation produced non-finite energies (blew up).
    """
    for name, value, low in (
        ("n_frames", n_frames, 0),
        ("stride", stride, 1),
        ("burn_in", burn_in, 0),
    ):
        if int(value) != value or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not temperature > 0 or not timestep_fs > 0 or not friction_per_ps > 0:
        raise ValueError(
            "temperature, timestep_fs and friction_per_ps must be positive, got "
            f"{temperature!r}, {timestep_fs!r}, {friction_per_ps!r}"
        )
    n_atoms = openmm_system.getNumParticles()
    pos = np.asarray(positions.detach().cpu() if hasattr(positions, "detach") else positions)
    if pos.size != 3 * n_atoms:
        raise ValueError(f"positions must hold {n_atoms} x 3 coordinates, got shape {pos.shape}")
    pos = pos.reshape(n_atoms, 3).astype(np.float64)
    kt = kt_kj_per_mol(temperature)
    start = time.perf_counter()
    integrator = openmm.LangevinMiddleIntegrator(
        temperature * unit.kelvin, friction_per_ps / unit.picosecond, timestep_fs * unit.femtosecond
    )
    integrator.setRandomNumberSeed(openmm_seed(seed))
    context = _context(openmm_system, integrator, platform, threads)
    frames: list[np.ndarray] = []
    energies: list[float] = []
    interrupted = False
    try:
        context.setPositions(pos * unit.nanometer)
        if minimize:
            openmm.LocalEnergyMinimizer.minimize(context)
        u_min = _energy(context, kt)
        context.setVelocitiesToTemperature(temperature * unit.kelvin, openmm_seed(seed))
        total = burn_in + n_frames * stride
        with Progress(total, desc="MD", unit="step", enabled=progress) as bar:
            _steps(integrator, burn_in, bar)
            try:
                for _ in range(n_frames):
                    _steps(integrator, stride, bar)
                    state = context.getState(getPositions=True, getEnergy=True)
                    u = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) / kt
                    if not np.isfinite(u):
                        raise RuntimeError(
                            f"MD blew up: non-finite energy at frame {len(frames)} "
                            f"(try a smaller timestep_fs than {timestep_fs})"
                        )
                    frames.append(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
                    energies.append(u)
            except KeyboardInterrupt:
                interrupted = True
    except openmm.OpenMMException as err:
        raise RuntimeError(f"OpenMM failed during MD: {err}") from err
    finally:
        del context, integrator
    settings = {
        "integrator": "LangevinMiddleIntegrator",
        "temperature": float(temperature),
        "timestep_fs": float(timestep_fs),
        "friction_per_ps": float(friction_per_ps),
        "n_frames": int(n_frames),
        "stride": int(stride),
        "burn_in": int(burn_in),
        "minimize": bool(minimize),
        "seed": int(seed),
        "openmm_seed": openmm_seed(seed),
        "platform": platform,
        "threads": threads,
        "openmm_version": openmm.__version__,
    }
    return MDResult(
        positions=np.asarray(frames, dtype=np.float64).reshape(len(frames), 3 * n_atoms),
        energies=np.asarray(energies, dtype=np.float64),
        settings=settings,
        minimized_energy=u_min,
        seconds=time.perf_counter() - start,
        interrupted=interrupted,
    )


def _energy(context: openmm.Context, kt: float) -> float:
    state = context.getState(getEnergy=True)
    return state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) / kt
