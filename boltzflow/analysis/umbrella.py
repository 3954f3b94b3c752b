"""Umbrella sampling along a dihedral with OpenMM, and its MBAR free-energy profile.

A free-energy reference made with the field's own tools: K windows of Langevin MD, window k
biased by a periodic harmonic restraint on the dihedral φ (Torrie & Valleau, J. Comput. Phys. 23,
187 (1977)),

    w_k(φ) = ½ κ d(φ, c_k)²,   d(φ, c) = min(|φ − c|, 2π − |φ − c|)   (φ, c in (−π, π]),

or, for a 2-D grid of windows (``psi_centers``), restrained on φ and ψ together,

    w_k(φ, ψ) = ½ κ_φ d(φ, c_k^φ)² + ½ κ_ψ d(ψ, c_k^ψ)²,

which removes ψ's slow basin changes (hundreds of ps) from the windows: with both backbone
dihedrals held, what remains relaxes within picoseconds, so short windows suffice.

and the windows combined by MBAR (Shirts & Chodera, J. Chem. Phys. 129, 124105 (2008), with
``pymbar``): the unbiased density of every sample is p(x) ∝ 1 / Σ_k N_k exp(f_k − w_k(φ(x))),
from which F(φ) and ΔF follow.

Units: angles in radians; κ in kT/rad² (reduced, the restraint's reduced energy is ½ κ d²; OpenMM
gets κ·kT in kJ/mol/rad²); free energies in kT.

- :func:`run_umbrella_windows` runs the windows, each starting from the last frame of its
  neighbour towards the starting structure (pulling along φ in both directions; on a 2-D grid
  first along φ at the start's ψ, then along ψ from each of those windows, :func:`grid_order`),
  in one process or a pool of worker processes that takes any window whose neighbour is done, and
  writes each finished window to ``<out_dir>/window_XXX.npz`` atomically; a second call with the
  same settings reuses finished windows (resume).
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
import heapq
import json
import math
import multiprocessing
import sys
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
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
from boltzflow.progress import Progress
from boltzflow.systems import geometry
from boltzflow.systems.molecular import MolecularSystem
from boltzflow.systems.openmm_pool import resolve_platform
from boltzflow.validate import nonnegative_int, positive_float, positive_int

__all__ = [
    "UmbrellaWindow",
    "dihedral_restraint_force",
    "grid_order",
    "load_umbrella_windows",
    "phi_restraint_force",
    "run_umbrella_windows",
    "window_file",
    "window_order",
]

#: Global parameters of the restraint force (prefixed: a Context's parameter names are global).
CENTER_PARAMETER = "boltzflow_umbrella_phi0"
KAPPA_PARAMETER = "boltzflow_umbrella_k"
PSI_CENTER_PARAMETER = "boltzflow_umbrella_psi0"
PSI_KAPPA_PARAMETER = "boltzflow_umbrella_psi_k"
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
    # 2-D windows (None for windows restrained in φ alone, also in files written before)
    "center_psi",
    "kappa_psi",
    "psi_restraint_atoms",
)


def dihedral_restraint_force(
    atoms: Sequence[int],
    kappa_kj: float,
    center: float,
    *,
    center_parameter: str = CENTER_PARAMETER,
    kappa_parameter: str = KAPPA_PARAMETER,
) -> openmm.Force:
    """A periodic harmonic dihedral restraint as an OpenMM ``CustomTorsionForce``.

    Energy ½ k d(θ, θ0)² in kJ/mol with k = ``kappa_kj`` (kJ/mol/rad²) and the periodic distance
    d; θ0 and k are the global context parameters ``center_parameter`` and ``kappa_parameter``
    (change them with ``Context.setParameter``; a second restraint in the same system needs its
    own names, e.g. :data:`PSI_CENTER_PARAMETER` and :data:`PSI_KAPPA_PARAMETER`).

    Args:
        atoms: the four atom indices of the dihedral.
        kappa_kj: force constant in kJ/mol/rad².
        center: θ0 in radians (wrapped into (−π, π]).
        center_parameter: name of the global parameter holding θ0.
        kappa_parameter: name of the global parameter holding k.
    """
    force = openmm.CustomTorsionForce(
        f"0.5*{kappa_parameter}*dtheta^2; "
        f"dtheta = min(adiff, 2*pi - adiff); adiff = abs(theta - {center_parameter}); "
        f"pi = {math.pi!r}"
    )
    force.addGlobalParameter(center_parameter, float(wrap_angle(center)))
    force.addGlobalParameter(kappa_parameter, float(kappa_kj))
    force.addTorsion(*[int(i) for i in atoms], [])
    return force


def phi_restraint_force(atoms: Sequence[int], kappa_kj: float, center: float) -> openmm.Force:
    """:func:`dihedral_restraint_force` with the φ parameter names :data:`CENTER_PARAMETER` and
    :data:`KAPPA_PARAMETER`."""
    return dihedral_restraint_force(atoms, kappa_kj, center)


@dataclass(frozen=True)
class UmbrellaWindow:
    """The samples of one umbrella window.

    Attributes:
        index: window index (position in the ``centers`` given to :func:`run_umbrella_windows`).
        center: restraint centre c in radians, in (−π, π] (of φ).
        kappa: force constant in kT/rad² (of φ).
        phi: ``(n_samples,)`` φ in radians, (−π, π].
        psi: ``(n_samples,)`` ψ in radians.
        u: ``(n_samples,)`` unbiased reduced potential energy U/kT (restraint excluded), or NaN
            where not recorded.
        last_positions: ``(3 * n_atoms,)`` positions in nm of the last frame (starts neighbours).
        positions: ``(n_samples, 3 * n_atoms)`` float32 positions in nm, or None if not kept.
        settings: the window's settings (JSON-friendly), including its start window and seed.
        seconds: wall time of the window's MD.
        reused: True if loaded from an existing file instead of run now.
        center_psi: ψ restraint centre (radians) of a 2-D window, None if ψ is free.
        kappa_psi: ψ force constant (kT/rad²) of a 2-D window, None if ψ is free.
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
    center_psi: float | None = None
    kappa_psi: float | None = None

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
                        "center_psi": self.center_psi,
                        "kappa_psi": self.kappa_psi,
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
                center_psi=_float_or_none(meta.get("center_psi")),
                kappa_psi=_float_or_none(meta.get("kappa_psi")),
            )


def _plain_int(value: Any) -> Any:
    """NumPy integers as Python ints (the shared checks accept only the latter)."""
    return int(value) if isinstance(value, np.integer) else value


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


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


def grid_order(
    phi_centers: Sequence[float],
    psi_centers: Sequence[float],
    start_phi: float,
    start_psi: float,
) -> tuple[int, list[list[tuple[int, int]]]]:
    """Pulling order on a 2-D set of windows: the first window and chains of ``(window, parent)``.

    First along φ: the windows whose ψ centre is the one nearest to ``start_psi`` form the row,
    ordered by :func:`window_order` from the one nearest to ``start_phi`` (an up and a down
    chain). Then along ψ: each φ column (the windows sharing a φ centre) grows up and down in ψ
    from its row window, again by :func:`window_order`. Every parent is a neighbour on the grid
    and comes earlier in the chains, so the chains can run in any order once their first parent
    is done.

    Returns:
        ``(first, chains)``: the row's two chains, then two per column, in increasing φ.

    Raises:
        ValueError: lengths differ, or some φ column has no window in the row (a full grid
            always has one).
    """
    pc = wrap_angle(np.asarray(phi_centers, dtype=np.float64)).reshape(-1)
    sc = wrap_angle(np.asarray(psi_centers, dtype=np.float64)).reshape(-1)
    if pc.size != sc.size or pc.size == 0:
        raise ValueError(f"need as many φ as ψ centres, got {pc.size} and {sc.size}")
    pkey, skey = np.round(pc, 9), np.round(sc, 9)
    psi_values = np.unique(skey)
    row_psi = psi_values[int(np.argmin(periodic_distance(start_psi, psi_values)))]
    row = np.flatnonzero(skey == row_psi)
    local_first, row_chains = window_order(pc[row], start_phi)
    first = int(row[local_first])
    chains = [[(int(row[i]), int(row[j])) for i, j in chain] for chain in row_chains]
    row_by_phi = {float(pkey[i]): int(i) for i in row}
    for phi in np.unique(pkey):
        column = np.flatnonzero(pkey == phi)
        if float(phi) not in row_by_phi:
            raise ValueError(
                f"the φ column at {phi:+.4f} rad has no window at ψ = {row_psi:+.4f} rad (the "
                "row nearest the start's ψ): a 2-D set of windows must be a grid"
            )
        root = row_by_phi[float(phi)]
        local_root, column_chains = window_order(sc[column], float(sc[root]))
        if int(column[local_root]) != root:  # two windows at the same (φ, ψ)
            raise ValueError(f"windows {root} and {int(column[local_root])} share a centre")
        chains += [[(int(column[i]), int(column[j])) for i, j in c] for c in column_chains]
    return first, [c for c in chains if c]


def _log(message: str) -> None:
    print(f"[umbrella] {message}", file=sys.stderr, flush=True)


def _window_seed(seed: int, index: int) -> int:
    return openmm_seed(int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0]))


#: The unrestrained OpenMM system of a worker process (set once by :func:`_init_worker`).
_WORKER_SYSTEM: openmm.System | None = None


def _init_worker(system_xml: str) -> None:
    """Worker start: deserialise the system once; each window then creates its own Context
    inside this process (OpenMM issue 2602)."""
    global _WORKER_SYSTEM
    _WORKER_SYSTEM = openmm.XmlSerializer.deserialize(system_xml)


def _window_job(
    index: int,
    parent: int,
    start: np.ndarray | None,
    common: dict[str, Any],
    openmm_system: openmm.System | None = None,
) -> tuple[int, float]:
    """Run window ``index`` and save it; returns ``(index, seconds)``.

    It starts from ``start`` (the first window, ``parent`` −1) or from the last frame saved in
    its parent's file.
    """
    system = openmm_system if openmm_system is not None else _WORKER_SYSTEM
    if system is None:
        raise RuntimeError("worker process without a system (_init_worker not run)")
    out_dir = Path(common["out_dir"])
    if start is None:
        start = UmbrellaWindow.load(window_file(out_dir, parent)).last_positions
    window = _run_window(system, index, parent, start, common)
    window.save(window_file(out_dir, index))
    return index, window.seconds


def _run_jobs(
    system_xml: str,
    jobs: list[tuple[int, int]],
    start: np.ndarray,
    common: dict[str, Any],
    processes: int,
    bar: Progress,
) -> set[int]:
    """Run the windows of ``jobs`` (``(window, parent)`` pairs, every parent before its children,
    parent −1 for the first) that have no file yet; returns the indices run.

    One process runs them in the order given. Several processes take them from a queue: a window
    becomes ready when its parent's file exists, the earliest ready window in ``jobs`` (the φ row
    before the ψ columns, the critical path) goes to the next free worker, and no more windows
    are handed out than there are workers, so a failure stops the run after the windows in
    flight.
    """
    out_dir = Path(common["out_dir"])
    todo = [(i, p) for i, p in jobs if not window_file(out_dir, i).exists()]
    ran: set[int] = set()
    if processes == 1:
        system = openmm.XmlSerializer.deserialize(system_xml)
        for index, parent in todo:
            _, seconds = _window_job(index, parent, start if parent < 0 else None, common, system)
            ran.add(index)
            bar.update(1, last=f"{seconds:.1f}s")
        return ran
    position = {i: n for n, (i, _) in enumerate(jobs)}
    waiting = {i for i, _ in todo}
    ready: list[tuple[int, int, int]] = []
    children: dict[int, list[tuple[int, int]]] = {}
    for index, parent in todo:
        if parent < 0 or parent not in waiting:
            heapq.heappush(ready, (position[index], index, parent))
        else:
            children.setdefault(parent, []).append((index, parent))
    # Spawned workers: each creates its own Contexts (OpenMM issue 2602).
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        max_workers=processes, mp_context=ctx, initializer=_init_worker, initargs=(system_xml,)
    ) as pool:
        running: dict[Future[tuple[int, float]], int] = {}
        while ready or running:
            while ready and len(running) < processes:
                _, index, parent = heapq.heappop(ready)
                fut = pool.submit(_window_job, index, parent, start if parent < 0 else None, common)
                running[fut] = index
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in done:
                index = running.pop(fut)
                _, seconds = fut.result()  # a worker's error stops the run here
                ran.add(index)
                bar.update(1, last=f"{seconds:.1f}s")
                for child in children.pop(index, []):
                    heapq.heappush(ready, (position[child[0]], *child))
    return ran


def _run_window(
    openmm_system: openmm.System,
    index: int,
    parent: int | None,
    start: np.ndarray,
    common: dict[str, Any],
) -> UmbrellaWindow:
    """MD of one window: minimise with the restraint(s), equilibrate, record every ``stride``."""
    t0 = time.perf_counter()
    temperature, kappa = common["temperature"], common["kappa"]
    identity = _identity(common, index)
    center, center_psi, kappa_psi = identity["center"], identity["center_psi"], common["kappa_psi"]
    kt = kt_kj_per_mol(temperature)
    system = copy.deepcopy(openmm_system)  # the restraints go into this window's copy
    used = {system.getForce(i).getForceGroup() for i in range(system.getNumForces())}
    group = max(set(range(32)) - used)
    restraints = [phi_restraint_force(common["phi_atoms"], kappa * kt, center)]
    if center_psi is not None:
        restraints.append(
            dihedral_restraint_force(
                common["psi_restraint_atoms"],
                kappa_psi * kt,
                center_psi,
                center_parameter=PSI_CENTER_PARAMETER,
                kappa_parameter=PSI_KAPPA_PARAMETER,
            )
        )
    for restraint in restraints:
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
    unbiased_groups = used  # every force group but the restraints'
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
    if common["log_windows"]:
        d = periodic_distance(phi_np, center)
        where = f"centre {center:+.3f} rad"
        spread = f"mean d(phi, centre) {d.mean():.3f} rad (max {d.max():.3f})"
        if center_psi is not None:
            d_psi = periodic_distance(psi_np, center_psi)
            where = f"centre ({center:+.3f}, {center_psi:+.3f}) rad"
            spread += f", d(psi) {d_psi.mean():.3f} (max {d_psi.max():.3f})"
        _log(
            f"window {index:3d} {where}: {n_samples} samples in {seconds:.1f} s, {spread}, "
            + (f"from window {parent}" if parent is not None and parent >= 0 else "from the start")
        )
    settings = dict(identity)
    settings.update(
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
        center_psi=center_psi,
        kappa_psi=kappa_psi if center_psi is not None else None,
    )


def _identity(common: dict[str, Any], index: int) -> dict[str, Any]:
    """The settings of window ``index`` that a saved window must share to be reused."""
    out = {k: common[k] for k in _IDENTITY_KEYS if k not in ("center", "center_psi")}
    out["center"] = float(common["centers"][index])
    psi = common["psi_centers"]
    out["center_psi"] = None if psi is None else float(psi[index])
    return out


def _check_saved(window: UmbrellaWindow, common: dict[str, Any], path: Path) -> None:
    want = _identity(common, window.index)
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
    psi_centers: Sequence[float] | None = None,
    kappa_psi: float | None = None,
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
    log_windows: bool = True,
    progress: bool = True,
) -> list[UmbrellaWindow]:
    """Run (or resume) umbrella windows along the system's φ dihedral, or on a (φ, ψ) grid.

    Window k adds ½ κ d(φ, c_k)² (reduced units) to the potential, and with ``psi_centers``
    also ½ κ_ψ d(ψ, c_k^ψ)²; it is minimised, equilibrated for ``burn_in`` steps and then
    records φ, ψ and the unbiased reduced energy every ``stride`` steps (Langevin middle
    integrator, no constraints). The first window starts from ``start_positions`` (default: the
    system's structure) and is the one whose centre is nearest to its φ (and ψ); every other
    window starts from the last frame of a neighbour, in the order of :func:`window_order` (1-D:
    up and down in φ) or :func:`grid_order` (2-D: along φ at the start's ψ, then along ψ from
    each of those). Each window is saved to ``<out_dir>/window_XXX.npz`` as soon as it finishes;
    a window whose file exists is loaded instead (its settings must match, else ``ValueError``).
    Each window has its own seed (from ``seed`` and its index) and starts from its parent's
    saved frame, so a resumed run, or one with another number of processes, reproduces an
    uninterrupted one on the Reference platform.

    Args:
        system: a molecular system (its ``openmm_system``, ``temperature``, ``phi_atoms``,
            ``psi_atoms``).
        centers: ``(K,)`` φ restraint centres in radians (wrapped into (−π, π]).
        kappa: φ force constant in kT/rad².
        n_samples: samples recorded per window.
        stride: integration steps between samples.
        out_dir: folder for the window files.
        psi_centers: ``(K,)`` ψ restraint centres, one per window (the pairs form a grid; see
            :func:`grid_order`), or None to leave ψ free.
        kappa_psi: ψ force constant in kT/rad² (default ``kappa``); only with ``psi_centers``.
        burn_in: equilibration steps per window (after minimisation), not recorded.
        timestep_fs: time step in fs; friction_per_ps: Langevin friction in 1/ps.
        seed: run seed (each window derives its own).
        start_positions: ``(3 * n_atoms,)`` or ``(n_atoms, 3)`` nm; default the structure file's.
        minimize: minimise (with the restraints) at the start of every window.
        platform: OpenMM platform (for 22-atom ALDP, Reference is fastest on one core).
        threads: CPU-platform threads per process.
        processes: 1 (windows one after another) or more (spawned worker processes, each taking
            the next window whose starting neighbour is done; a 1-D run has two chains, so more
            than 2 processes do not help there).
        record_energy: also record the unbiased reduced energy (one extra energy evaluation per
            sample).
        keep_positions: also store the positions (float32) of every sample.
        log_windows: one line per finished window on stderr (φ, ψ spread, time).
        progress: progress lines (a bar on a terminal) counting windows, with an ETA.

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
    kappa = positive_float(kappa, "kappa (kT/rad²)")
    psi_c = None
    if psi_centers is not None:
        psi_c = wrap_angle(np.asarray(psi_centers, dtype=np.float64)).reshape(-1)
        if psi_c.size != c.size or not np.isfinite(psi_c).all():
            raise ValueError(
                f"psi_centers must hold one finite angle per window ({c.size}), got {psi_c.size}"
            )
        kappa_psi = kappa if kappa_psi is None else positive_float(kappa_psi, "kappa_psi")
        keys = np.round(np.stack([c, psi_c], axis=1), 12)
        if len(np.unique(keys, axis=0)) != c.size:
            raise ValueError("the (φ, ψ) centres must be distinct (modulo 2π)")
    else:
        if kappa_psi is not None:
            raise ValueError("kappa_psi needs psi_centers (ψ is free without them)")
        if len(np.unique(np.round(c, 12))) != c.size:
            raise ValueError("centers must be distinct (modulo 2π)")
    n_samples = positive_int(_plain_int(n_samples), "n_samples")
    stride = positive_int(_plain_int(stride), "stride")
    burn_in = nonnegative_int(_plain_int(burn_in), "burn_in")
    processes = positive_int(_plain_int(processes), "processes")
    positive_float(timestep_fs, "timestep_fs")
    positive_float(friction_per_ps, "friction_per_ps")
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
        "psi_centers": None if psi_c is None else [float(x) for x in psi_c],
        "kappa_psi": None if psi_c is None else float(kappa_psi),
        "psi_restraint_atoms": None if psi_c is None else [int(i) for i in system.psi_atoms],
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
        "log_windows": bool(log_windows),
        "out_dir": str(out),
    }
    # Saved windows with other settings: refuse before any MD runs.
    for k in range(c.size):
        path = window_file(out, k)
        if path.exists():
            _check_saved(UmbrellaWindow.load(path), common, path)
    x0 = torch.from_numpy(start[None])
    start_phi = float(geometry.dihedral(x0, system.phi_atoms)[0])
    if psi_c is None:
        first, chains = window_order(c, start_phi)
    else:
        start_psi = float(geometry.dihedral(x0, system.psi_atoms)[0])
        first, chains = grid_order(c, psi_c, start_phi, start_psi)
    jobs = [(first, -1)] + [job for chain in chains for job in chain]  # parent -1: the start
    todo = sum(not window_file(out, k).exists() for k in range(c.size))
    _log(f"{c.size} windows, {c.size - todo} already done, {todo} to run; out_dir {out}")
    xml = openmm.XmlSerializer.serialize(system.openmm_system)
    t0 = time.perf_counter()
    with Progress(todo, desc="umbrella", unit="window", enabled=progress and todo > 0) as bar:
        ran = _run_jobs(xml, jobs, start, common, min(processes, max(todo, 1)), bar)
    if ran:
        _log(f"ran {len(ran)} windows in {time.perf_counter() - t0:.1f} s")
    windows = []
    for k in range(c.size):
        w = UmbrellaWindow.load(window_file(out, k))
        windows.append(dataclasses.replace(w, reused=False) if k in ran else w)
    return windows


def load_umbrella_windows(out_dir: str | Path) -> list[UmbrellaWindow]:
    """All ``window_XXX.npz`` files under ``out_dir`` (three or more digits), sorted by index."""
    paths = [
        p
        for p in Path(out_dir).glob("window_*.npz")
        if p.stem[len("window_") :].isdigit() and len(p.stem) >= len("window_000")
    ]
    return [UmbrellaWindow.load(p) for p in sorted(paths, key=lambda p: int(p.stem[7:]))]
