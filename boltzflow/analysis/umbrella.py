"""Umbrella sampling along a dihedral with OpenMM, and its MBAR free-energy profile.

A free-energy reference made with the field's own tools: K windows of Langevin MD, window k
biased by a periodic harmonic restraint on the dihedral φ (Torrie & Valleau, J. Comput. Phys. 23,
187 (1977)),

    w_k(φ) = ½ κ d(φ, c_k)²,   d(φ, c) = min(|φ − c|, 2π − |φ − c|)   (φ, c in (−π, π]),

and the windows combined by MBAR (Shirts & Chodera, J. Chem. Phys. 129, 124105 (2008), with
``pymbar``): the unbiased density of every sample is p(x) ∝ 1 / Σ_k N_k exp(f_k − w_k(φ(x))),
from which F(φ) and ΔF follow.

Units: angles in radians; κ in kT/rad² (reduced, the restraint's reduced energy is ½ κ d²; OpenMM
gets κ·kT in kJ/mol/rad²); free energies in kT.

- :func:`run_umbrella_windows` runs the windows one after another (or two chains in parallel),
  each starting from the last frame of its neighbour towards the starting structure (pulling
  along φ in both directions), and writes each finished window to ``<out_dir>/window_XXX.npz``
  atomically; a second call with the same settings reuses finished windows (resume).
- :func:`mbar_profile` turns φ samples of the windows into F(φ) on bins and
  ΔF = −log(P(lo < φ < hi) / P(otherwise)), with standard errors: pymbar's asymptotic
  ("analytical") covariance on decorrelated samples, or pymbar's bootstrap over them. Each
  window's time series is subsampled with its statistical inefficiency (pymbar.timeseries;
  Chodera, Swope, Pitera, Seok & Dill, J. Chem. Theory Comput. 3, 26 (2007)).

φ (and ψ) are computed with :mod:`boltzflow.systems.geometry` (the one dihedral function), from
the positions that OpenMM returns, a window at a time.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import multiprocessing
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import openmm
import torch
from openmm import unit

from boltzflow.analysis.mbar import periodic_distance, wrap_angle
from boltzflow.constants import kt_kj_per_mol
from boltzflow.data.md import openmm_seed
from boltzflow.io.atomic import atomic_path
from boltzflow.systems import geometry
from boltzflow.systems.molecular import MolecularSystem
from boltzflow.systems.openmm_pool import resolve_platform

__all__ = [
    "UmbrellaWindow",
    "load_umbrella_windows",
    "phi_restraint_force",
    "run_umbrella_windows",
    "window_file",
    "window_order",
]

#: Global parameters of the restraint force (prefixed: a Context's parameter names are global).
CENTER_PARAMETER = "boltzflow_umbrella_phi0"
KAPPA_PARAMETER = "boltzflow_umbrella_k"
#: Settings that must agree for a saved window to be reused.
_IDENTITY_KEYS = (
    "system",
    "temperature",
    "center",
    "kappa",
    "n_samples",
    "stride",
    "burn_in",
    "timestep_fs",
    "friction_per_ps",
    "seed",
    "phi_atoms",
)


def phi_restraint_force(atoms: Sequence[int], kappa_kj: float, center: float) -> openmm.Force:
    """A periodic harmonic dihedral restraint as an OpenMM ``CustomTorsionForce``.

    Energy ½ k d(θ, θ0)² in kJ/mol with k = ``kappa_kj`` (kJ/mol/rad²) and the periodic distance
    d; θ0 and k are the global context parameters :data:`CENTER_PARAMETER` and
    :data:`KAPPA_PARAMETER` (change them with ``Context.setParameter``).

    Args:
        atoms: the four atom indices of the dihedral.
        kappa_kj: force constant in kJ/mol/rad².
        center: θ0 in radians (wrapped into (−π, π]).
    """
    force = openmm.CustomTorsionForce(
        f"0.5*{KAPPA_PARAMETER}*dtheta^2; "
        f"dtheta = min(adiff, 2*pi - adiff); adiff = abs(theta - {CENTER_PARAMETER}); "
        f"pi = {math.pi!r}"
    )
    force.addGlobalParameter(CENTER_PARAMETER, float(wrap_angle(center)))
    force.addGlobalParameter(KAPPA_PARAMETER, float(kappa_kj))
    force.addTorsion(*[int(i) for i in atoms], [])
    return force


@dataclass(frozen=True)
class UmbrellaWindow:
    """The samples of one umbrella window.

    Attributes:
        index: window index (position in the ``centers`` given to :func:`run_umbrella_windows`).
        center: restraint centre c in radians, in (−π, π].
        kappa: force constant in kT/rad².
        phi: ``(n_samples,)`` φ in radians, (−π, π].
        psi: ``(n_samples,)`` ψ in radians.
        u: ``(n_samples,)`` unbiased reduced potential energy U/kT (restraint excluded), or NaN
            where not recorded.
        last_positions: ``(3 * n_atoms,)`` positions in nm of the last frame (starts neighbours).
        positions: ``(n_samples, 3 * n_atoms)`` float32 positions in nm, or None if not kept.
        settings: the window's settings (JSON-friendly), including its start window and seed.
        seconds: wall time of the window's MD.
        reused: True if loaded from an existing file instead of run now.
    """

    index: int
    center: float
    kappa: float
    phi: np.ndarray
    psi: np.ndarray
    u: np.ndarray
    last_positions: np.ndarray
    positions: np.ndarray | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    reused: bool = False

    def save(self, path: str | Path) -> None:
        """Write the window to ``path`` (``.npz``) atomically."""
        arrays: dict[str, Any] = {
            "phi": self.phi,
            "psi": self.psi,
            "u": self.u,
            "last_positions": self.last_positions,
            "meta": np.asarray(
                json.dumps(
                    {
                        "index": self.index,
                        "center": self.center,
                        "kappa": self.kappa,
                        "settings": self.settings,
                        "seconds": self.seconds,
                    }
                )
            ),
        }
        if self.positions is not None:
            arrays["positions"] = self.positions
        with atomic_path(path, suffix=".npz") as tmp, tmp.open("wb") as fh:
            np.savez(fh, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> UmbrellaWindow:
        """Read a window written by :meth:`save` (``reused=True``)."""
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            return cls(
                index=int(meta["index"]),
                center=float(meta["center"]),
                kappa=float(meta["kappa"]),
                phi=data["phi"],
                psi=data["psi"],
                u=data["u"],
                last_positions=data["last_positions"],
                positions=data["positions"] if "positions" in data.files else None,
                settings=meta["settings"],
                seconds=float(meta["seconds"]),
                reused=True,
            )


def window_file(out_dir: str | Path, index: int) -> Path:
    """The file of window ``index`` under ``out_dir``."""
    return Path(out_dir) / f"window_{index:03d}.npz"


def window_order(
    centers: Sequence[float], start_phi: float
) -> tuple[int, list[list[tuple[int, int]]]]:
    """Pulling order: the first window and two chains of ``(window, parent)`` pairs.

    The first window is the centre nearest (periodically) to ``start_phi``. Going round the
    circle from it, the centres in increasing angle form the "up" chain and those in decreasing
    angle the "down" chain (each about half of the rest); every window starts from the last frame
    of its parent, its neighbour towards the first window.

    Returns:
        ``(first, [up_chain, down_chain])`` with window indices into ``centers``.
    """
    c = wrap_angle(np.asarray(centers, dtype=np.float64))
    order = [int(i) for i in np.argsort(c, kind="stable")]
    first = int(np.argmin(periodic_distance(start_phi, c)))
    pos = order.index(first)
    n = len(order)
    n_up = (n - 1) - (n - 1) // 2
    up, down = [], []
    prev = first
    for j in range(1, n_up + 1):
        i = order[(pos + j) % n]
        up.append((i, prev))
        prev = i
    prev = first
    for j in range(1, n - n_up):
        i = order[(pos - j) % n]
        down.append((i, prev))
        prev = i
    return first, [up, down]


def _log(message: str) -> None:
    print(f"[umbrella] {message}", file=sys.stderr, flush=True)


def _window_seed(seed: int, index: int) -> int:
    return openmm_seed(int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0]))


def _run_chain(
    system_xml: str,
    jobs: list[tuple[int, int]],
    start: np.ndarray | None,
    common: dict[str, Any],
) -> list[int]:
    """Run the windows of one chain in order (in this or a worker process); returns their indices.

    ``start`` holds the positions of the chain's first parent, or None to read them from the
    parent's file.
    """
    openmm_system = openmm.XmlSerializer.deserialize(system_xml)
    out_dir = Path(common["out_dir"])
    done = []
    for index, parent in jobs:
        path = window_file(out_dir, index)
        if path.exists():
            start = None
            continue
        if start is None:
            start = UmbrellaWindow.load(window_file(out_dir, parent)).last_positions
        window = _run_window(openmm_system, index, parent, start, common)
        window.save(path)
        start = window.last_positions
        done.append(index)
    return done


def _run_window(
    openmm_system: openmm.System,
    index: int,
    parent: int | None,
    start: np.ndarray,
    common: dict[str, Any],
) -> UmbrellaWindow:
    """MD of one window: minimise with the restraint, equilibrate, record every ``stride``."""
    t0 = time.perf_counter()
    temperature, kappa = common["temperature"], common["kappa"]
    center = float(common["centers"][index])
    kt = kt_kj_per_mol(temperature)
    system = copy.deepcopy(openmm_system)  # the restraint goes into this window's copy
    used = {system.getForce(i).getForceGroup() for i in range(system.getNumForces())}
    group = max(set(range(32)) - used)
    restraint = phi_restraint_force(common["phi_atoms"], kappa * kt, center)
    restraint.setForceGroup(group)
    system.addForce(restraint)
    seed = _window_seed(common["seed"], index)
    integrator = openmm.LangevinMiddleIntegrator(
        temperature * unit.kelvin,
        common["friction_per_ps"] / unit.picosecond,
        common["timestep_fs"] * unit.femtosecond,
    )
    integrator.setRandomNumberSeed(seed)
    platform = common["platform"]
    props: dict[str, str] = {}
    if platform == "CPU":
        props["DeterministicForces"] = "true"
        if common["threads"]:
            props["Threads"] = str(int(common["threads"]))
    context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName(platform), props)
    n_samples, stride = common["n_samples"], common["stride"]
    n_atoms = system.getNumParticles()
    frames = np.empty((n_samples, n_atoms, 3), dtype=np.float64)
    u = np.full(n_samples, np.nan)
    unbiased_groups = used  # every force group but the restraint's
    try:
        context.setPositions(np.asarray(start, dtype=np.float64).reshape(n_atoms, 3))
        if common["minimize"]:
            openmm.LocalEnergyMinimizer.minimize(context)
        context.setVelocitiesToTemperature(temperature * unit.kelvin, seed)
        integrator.step(common["burn_in"])
        for n in range(n_samples):
            integrator.step(stride)
            state = context.getState(getPositions=True)
            frames[n] = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
            if common["record_energy"]:
                e = context.getState(getEnergy=True, groups=unbiased_groups)
                u[n] = e.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) / kt
    except openmm.OpenMMException as err:
        raise RuntimeError(f"OpenMM failed in umbrella window {index}: {err}") from err
    finally:
        del context, integrator
    if common["record_energy"] and not np.isfinite(u).all():
        raise RuntimeError(f"umbrella window {index} blew up: non-finite energies")
    flat = torch.from_numpy(frames.reshape(n_samples, 3 * n_atoms))
    phi, psi = geometry.backbone_dihedrals(flat, common["phi_atoms"], common["psi_atoms"])
    phi_np, psi_np = phi.numpy().astype(np.float64), psi.numpy().astype(np.float64)
    seconds = time.perf_counter() - t0
    d = periodic_distance(phi_np, center)
    _log(
        f"window {index:3d} centre {center:+.3f} rad: {n_samples} samples in {seconds:.1f} s, "
        f"mean d(phi, centre) {d.mean():.3f} rad (max {d.max():.3f}), "
        + (f"from window {parent}" if parent is not None and parent >= 0 else "from the start")
    )
    settings = {k: common[k] for k in _IDENTITY_KEYS if k not in ("center",)}
    settings.update(
        center=center,
        start_window=None if parent is None or parent < 0 else parent,
        openmm_seed=seed,
        platform=platform,
        threads=common["threads"],
        minimize=common["minimize"],
        restraint_force_group=group,
        openmm_version=openmm.__version__,
    )
    return UmbrellaWindow(
        index=index,
        center=center,
        kappa=kappa,
        phi=phi_np,
        psi=psi_np,
        u=u,
        last_positions=frames[-1].reshape(-1).copy(),
        positions=frames.reshape(n_samples, -1).astype(np.float32)
        if common["keep_positions"]
        else None,
        settings=settings,
        seconds=seconds,
    )


def _check_saved(window: UmbrellaWindow, common: dict[str, Any], path: Path) -> None:
    want = {k: common[k] for k in _IDENTITY_KEYS if k != "center"}
    want["center"] = float(common["centers"][window.index])
    have = window.settings
    diff = [
        k
        for k in _IDENTITY_KEYS
        if json.loads(json.dumps(have.get(k))) != json.loads(json.dumps(want[k]))
    ]
    if diff:
        details = ", ".join(f"{k}: saved {have.get(k)!r}, asked {want[k]!r}" for k in diff)
        raise ValueError(
            f"{path} was run with other settings ({details}); use a new output folder or "
            "delete the old windows"
        )


def run_umbrella_windows(
    system: MolecularSystem,
    centers: Sequence[float],
    kappa: float,
    n_samples: int,
    stride: int,
    *,
    out_dir: str | Path,
    burn_in: int = 10_000,
    timestep_fs: float = 1.0,
    friction_per_ps: float = 1.0,
    seed: int = 0,
    start_positions: Any = None,
    minimize: bool = True,
    platform: str = "Reference",
    threads: int | None = 1,
    processes: int = 1,
    record_energy: bool = True,
    keep_positions: bool = False,
) -> list[UmbrellaWindow]:
    """Run (or resume) umbrella windows along the system's φ dihedral.

    Window k adds ½ κ d(φ, c_k)² (reduced units) to the potential, is minimised, equilibrated for
    ``burn_in`` steps and then records φ, ψ and the unbiased reduced energy every ``stride`` steps
    (Langevin middle integrator, no constraints). The first window starts from
    ``start_positions`` (default: the system's structure) and is the one whose centre is nearest
    to its φ; the others follow in two chains, up and down in φ, each from the last frame of its
    neighbour. Each window is saved to ``<out_dir>/window_XXX.npz`` as soon as it finishes; a
    window whose file exists is loaded instead (its settings must match, else ``ValueError``).
    Each window has its own seed (from ``seed`` and its index), so a resumed run reproduces an
    uninterrupted one on the Reference platform.

    Args:
        system: a molecular system (its ``openmm_system``, ``temperature``, ``phi_atoms``,
            ``psi_atoms``).
        centers: ``(K,)`` restraint centres in radians (wrapped into (−π, π]).
        kappa: force constant in kT/rad².
        n_samples: samples recorded per window.
        stride: integration steps between samples.
        out_dir: folder for the window files.
        burn_in: equilibration steps per window (after minimisation), not recorded.
        timestep_fs: time step in fs; friction_per_ps: Langevin friction in 1/ps.
        seed: run seed (each window derives its own).
        start_positions: ``(3 * n_atoms,)`` or ``(n_atoms, 3)`` nm; default the structure file's.
        minimize: minimise (with the restraint) at the start of every window.
        platform: OpenMM platform (for 22-atom ALDP, Reference is fastest on one core).
        threads: CPU-platform threads per process.
        processes: 1 (one chain after the other) or 2 (the up and down chains in parallel worker
            processes once the first window is done).
        record_energy: also record the unbiased reduced energy (one extra energy evaluation per
            sample).
        keep_positions: also store the positions (float32) of every sample.

    Returns:
        The K windows in the order of ``centers``.

    Raises:
        ValueError: bad arguments, or saved windows with other settings.
        RuntimeError: the MD failed or blew up.
    """
    if not isinstance(system, MolecularSystem):
        raise TypeError(f"system must be a MolecularSystem, got {type(system).__name__}")
    c = wrap_angle(np.asarray(centers, dtype=np.float64)).reshape(-1)
    if c.size == 0 or not np.isfinite(c).all():
        raise ValueError("centers must be a non-empty sequence of finite angles")
    if len(np.unique(np.round(c, 12))) != c.size:
        raise ValueError("centers must be distinct (modulo 2π)")
    if not (math.isfinite(kappa) and kappa > 0):
        raise ValueError(f"kappa must be positive (kT/rad²), got {kappa!r}")
    for name, value, low in (
        ("n_samples", n_samples, 1),
        ("stride", stride, 1),
        ("burn_in", burn_in, 0),
    ):
        if not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if processes not in (1, 2):
        raise ValueError(f"processes must be 1 or 2, got {processes!r}")
    if not (timestep_fs > 0 and friction_per_ps > 0):
        raise ValueError("timestep_fs and friction_per_ps must be positive")
    platform = resolve_platform(platform)
    if start_positions is None:
        start = system.reference_configuration().numpy().reshape(-1)
    else:
        start = np.asarray(
            start_positions.detach().cpu()
            if hasattr(start_positions, "detach")
            else start_positions,
            dtype=np.float64,
        ).reshape(-1)
        if start.size != system.dim:
            raise ValueError(
                f"start_positions must hold {system.dim} coordinates, got {start.size}"
            )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    common: dict[str, Any] = {
        "system": system.name,
        "temperature": float(system.temperature),
        "centers": [float(x) for x in c],
        "kappa": float(kappa),
        "n_samples": int(n_samples),
        "stride": int(stride),
        "burn_in": int(burn_in),
        "timestep_fs": float(timestep_fs),
        "friction_per_ps": float(friction_per_ps),
        "seed": int(seed),
        "phi_atoms": [int(i) for i in system.phi_atoms],
        "psi_atoms": [int(i) for i in system.psi_atoms],
        "platform": platform,
        "threads": threads,
        "minimize": bool(minimize),
        "record_energy": bool(record_energy),
        "keep_positions": bool(keep_positions),
        "out_dir": str(out),
    }
    # Saved windows with other settings: refuse before any MD runs.
    for k in range(c.size):
        path = window_file(out, k)
        if path.exists():
            _check_saved(UmbrellaWindow.load(path), common, path)
    start_phi = float(geometry.dihedral(torch.from_numpy(start[None]), system.phi_atoms)[0])
    first, chains = window_order(c, start_phi)
    todo = sum(not window_file(out, k).exists() for k in range(c.size))
    _log(f"{c.size} windows, {c.size - todo} already done, {todo} to run; out_dir {out}")
    xml = openmm.XmlSerializer.serialize(system.openmm_system)
    t0 = time.perf_counter()
    ran = set(_run_chain(xml, [(first, -1)], start, common))  # parent -1: never read
    if processes == 1 or todo <= 1:
        for chain in chains:
            ran.update(_run_chain(xml, chain, None, common))
    else:
        # Spawned workers: each creates its own Context (OpenMM issue 2602).
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=2, mp_context=ctx) as pool:
            futures = [pool.submit(_run_chain, xml, chain, None, common) for chain in chains]
            for fut in futures:
                ran.update(fut.result())
    if ran:
        _log(f"ran {len(ran)} windows in {time.perf_counter() - t0:.1f} s")
    windows = []
    for k in range(c.size):
        w = UmbrellaWindow.load(window_file(out, k))
        windows.append(dataclasses.replace(w, reused=False) if k in ran else w)
    return windows


def load_umbrella_windows(out_dir: str | Path) -> list[UmbrellaWindow]:
    """All ``window_XXX.npz`` files under ``out_dir``, sorted by index."""
    paths = sorted(Path(out_dir).glob("window_[0-9][0-9][0-9].npz"))
    return [UmbrellaWindow.load(p) for p in paths]
