"""Seeded MD: training data that covers metastable basins plain MD does not reach (ALDP φ > 0).

Plain 300 K MD of alanine dipeptide stays in φ < 0: 12 ns on this machine never visited
0 < φ < 2 (DESIGN.md). :func:`run_seeded_md` therefore

1. runs a *hot* Langevin trajectory (``hot_temperature``, 800 K by default) from the structure's
   minimised configuration and keeps ``hot_frames`` candidate frames ``hot_stride`` steps apart;
2. picks ``n_seeds`` seed frames stratified by φ (:func:`select_seeds`): a share
   ``basin_fraction`` from 0 < φ < 2, the rest from φ < 0, evenly spaced in time within each
   basin's candidates; φ comes from :func:`boltzflow.systems.geometry.dihedral` through
   ``MolecularSystem.backbone_dihedrals``;
3. from each seed runs one *segment* at the system temperature: Maxwell–Boltzmann velocities,
   ``burn_in`` steps of re-equilibration (not recorded), then one frame every ``stride`` steps.
   Segments run in ``workers`` spawned processes (``concurrent.futures.ProcessPoolExecutor``),
   each building its own OpenMM ``Context`` (OpenMM issue 2602) with one CPU thread; or, with
   ``engine = "torch"``, all at once as one batch of replicas through the system's torch force
   field (:mod:`boltzflow.data.torch_md`: OpenMM's ``LangevinMiddleIntegrator`` scheme, float64),
   for molecules whose OpenMM forces are slow on the CPU (``aldp_ff96_obc1``). The hot run is
   always OpenMM.

**The frames are not a Boltzmann sample across basins**: the seeds fix how many frames start in
each basin, and the populations only relax where transitions happen within a segment. Within a
basin they are ordinary 300 K MD. Flows trained on them are importance-reweighted to the target,
so this is fine for training data; a reference ΔF between basins must come from elsewhere (e.g.
umbrella sampling). The provenance says so (``"boltzmann_across_basins": false``).

Resumable: with ``segments_dir`` set (the CLI uses ``<output>.segments``), the plan
(``plan.json``), the hot run (``hot.npz``) and every finished segment (``seed-000.npz``, ...)
are written there atomically; a rerun with the same system, ``n``, seed and settings skips what
is there. Other settings with a folder that holds finished segments raise ``ValueError``.

Reproducible: each segment's random stream depends only on ``(seed, segment index)``, so on the
Reference platform (or CPU, which runs with one thread and deterministic forces here) the same
seed gives the same frames whatever the number of workers and however often a run was resumed.
The torch engine draws one stream for the batch from the seeds of the segments in it: the same
command gives the same frames, a resume after an interruption other ones (equally valid).

Progress: one line per finished segment on stderr (no terminal needed). Ctrl-C or an error stops
the workers at once (terminate, then kill) and keeps the finished segments for a resume.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch

from boltzflow.constants import kt_kj_per_mol
from boltzflow.io.atomic import atomic_path, atomic_write_text

__all__ = [
    "DEFAULTS",
    "ENGINES",
    "POSITIVE_PHI_BASIN",
    "default_segments_dir",
    "held_out_segments",
    "in_positive_basin",
    "remove_segments",
    "run_seeded_md",
    "segment_rows",
    "select_seeds",
]

#: Settings of :func:`run_seeded_md` with their defaults (also ``generate(method="md_seeded")``).
DEFAULTS: dict[str, Any] = {
    "n_seeds": 60,
    "basin_fraction": 0.3,
    "hot_temperature": 800.0,
    "hot_burn_in": 10_000,
    "hot_frames": 1000,
    "hot_stride": 1000,
    "burn_in": 20_000,
    "stride": 100,
    "timestep_fs": 1.0,
    "friction_per_ps": 1.0,
    "platform": None,
    "engine": "openmm",
    "workers": 2,
    "segments_dir": None,
    "keep_segments": False,
}
#: Settings that do not change the frames (ignored when a resume checks the plan).
_RUNTIME_SETTINGS = ("workers", "segments_dir", "keep_segments")
#: The metastable φ basin plain 300 K MD of ALDP does not visit, in radians (open interval).
POSITIVE_PHI_BASIN: tuple[float, float] = (0.0, 2.0)
#: Where the segments run: OpenMM worker processes, or one batch through the torch force field.
ENGINES = ("openmm", "torch")
# Integrator.step is called in chunks of this many steps; a worker checks its parent between them.
_CHUNK = 1000
_PLAN_VERSION = 1


def in_positive_basin(phi: np.ndarray | torch.Tensor) -> np.ndarray:
    """Boolean array, True where 0 < φ < 2 (radians); same shape as ``phi``."""
    phi = np.asarray(phi)
    low, high = POSITIVE_PHI_BASIN
    return (phi > low) & (phi < high)


def peptide_omega_atoms(topology: Any) -> list[tuple[int, int, int, int]]:
    """The ω torsions (X, C, N, Y) of every peptide bond C(=O)–N of an mdtraj topology.

    C is a carbon bonded to an oxygen and to the nitrogen N; X is C's other carbon neighbour and
    Y N's carbon neighbour other than C (for ALDP: ACE CH3–C–N–Cα and Cα–C–N–NME CH3).
    """
    neighbours: dict[int, set[int]] = {a.index: set() for a in topology.atoms}
    element = {a.index: a.element.symbol for a in topology.atoms}
    for a, b in topology.bonds:
        neighbours[a.index].add(b.index)
        neighbours[b.index].add(a.index)
    out = []
    for c, nbrs in neighbours.items():
        if element[c] != "C" or not any(element[o] == "O" for o in nbrs):
            continue
        for n in (k for k in nbrs if element[k] == "N"):
            xs = sorted(k for k in nbrs if element[k] == "C")
            ys = sorted(k for k in neighbours[n] if element[k] == "C" and k != c)
            if xs and ys:
                out.append((xs[0], c, n, ys[0]))
    return out


def eligible_seeds(system: Any, x: np.ndarray) -> np.ndarray:
    """Boolean ``(n_frames,)``: frames fit to seed 300 K runs: L-form at the chiral centre and
    every peptide bond trans (|ω| > π/2). A hot run can invert the chirality or flip a peptide
    bond to cis; a 300 K segment started there would stay in that (rare) state for its whole
    length and fill the data with it.

    Args:
        system: a molecular system (``mdtraj_topology``; ``chirality_atoms`` if it has one).
        x: ``(n_frames, 3 * n_atoms)`` positions in nm.
    """
    from boltzflow.systems.geometry import dihedral, is_l_form

    xt = torch.from_numpy(np.asarray(x, dtype=np.float64))
    ok = torch.ones(len(xt), dtype=torch.bool)
    if hasattr(system, "chirality_atoms"):
        ok &= is_l_form(xt, system.chirality_atoms, system.l_form_sign)
    for atoms in peptide_omega_atoms(system.mdtraj_topology):
        ok &= dihedral(xt, atoms).abs() > math.pi / 2
    return ok.numpy()


def select_seeds(
    phi: np.ndarray, n_seeds: int, basin_fraction: float, eligible: np.ndarray | None = None
) -> np.ndarray:
    """Choose seed frames stratified by φ: ``round(basin_fraction * n_seeds)`` from 0 < φ < 2.

    The other seeds come from φ < 0; candidates with φ ≥ 2 (the barrier region) are never
    chosen. Within each basin the seeds are spread evenly over the candidates in time order, so
    they are as far apart in the hot trajectory as possible. Deterministic (no random draw).

    Args:
        phi: ``(n_candidates,)`` φ of the candidate frames in radians, in time order.
        n_seeds: number of seeds (>= 1).
        basin_fraction: share of seeds in 0 < φ < 2, in [0, 1].
        eligible: optional ``(n_candidates,)`` mask of frames allowed as seeds
            (:func:`eligible_seeds`).

    Returns:
        ``(n_seeds,)`` sorted int64 indices into ``phi``.

    Raises:
        ValueError: bad arguments, or fewer candidates in a basin than seeds asked from it
            (the message says which knobs give more).
    """
    phi = np.asarray(phi, dtype=np.float64)
    if phi.ndim != 1:
        raise ValueError(f"phi must be 1-D (n_candidates,), got shape {phi.shape}")
    if isinstance(n_seeds, bool) or int(n_seeds) != n_seeds or n_seeds < 1:
        raise ValueError(f"n_seeds must be an integer >= 1, got {n_seeds!r}")
    if not 0.0 <= basin_fraction <= 1.0:
        raise ValueError(f"basin_fraction must lie in [0, 1], got {basin_fraction!r}")
    n_seeds = int(n_seeds)
    n_positive = round(basin_fraction * n_seeds)
    allowed = np.ones(len(phi), bool) if eligible is None else np.asarray(eligible, bool)
    if allowed.shape != phi.shape:
        raise ValueError(f"eligible must have shape {phi.shape}, got {allowed.shape}")
    chosen = []
    for label, mask, k in (
        ("0 < phi < 2", in_positive_basin(phi) & allowed, n_positive),
        ("phi < 0", (phi < 0) & allowed, n_seeds - n_positive),
    ):
        candidates = np.flatnonzero(mask)
        if len(candidates) < k:
            raise ValueError(
                f"the hot run has {len(candidates)} of {len(phi)} eligible candidate frames with "
                f"{label}, "
                f"but {k} seeds were asked from there: raise hot_frames, hot_stride or "
                "hot_temperature, or change basin_fraction / n_seeds"
            )
        if k:
            chosen.append(candidates[np.round(np.linspace(0, len(candidates) - 1, k)).astype(int)])
    return np.sort(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, np.int64)


def held_out_segments(seed_phi: Any, n_holdout: int) -> list[int]:
    """Indices of ``n_holdout`` segments to hold out, spread evenly within each starting basin.

    Frames within one segment are correlated in time, so a held-out set of whole segments
    measures generalisation honestly (a random frame split would leak neighbours of every
    held-out frame into training). The segments that started in 0 < φ < 2 and those that
    started elsewhere contribute in proportion to their counts.

    Args:
        seed_phi: ``(n_seeds,)`` φ of each segment's seed (``statistics["seed_phi"]``), radians.
        n_holdout: segments to hold out, in [0, n_seeds].

    Returns:
        sorted segment indices.
    """
    seed_phi = np.asarray(seed_phi, dtype=np.float64)
    if isinstance(n_holdout, bool) or int(n_holdout) != n_holdout:
        raise ValueError(f"n_holdout must be an integer, got {n_holdout!r}")
    if not 0 <= n_holdout <= len(seed_phi):
        raise ValueError(f"n_holdout must lie in [0, {len(seed_phi)}], got {n_holdout}")
    positive = np.flatnonzero(in_positive_basin(seed_phi))
    negative = np.flatnonzero(~in_positive_basin(seed_phi))
    k_pos = min(round(n_holdout * len(positive) / len(seed_phi)), len(positive))
    k_pos = max(k_pos, n_holdout - len(negative))
    picked: list[int] = []
    for group, k in ((positive, k_pos), (negative, n_holdout - k_pos)):
        if k:
            picked += group[np.round(np.linspace(0, len(group) - 1, k)).astype(int)].tolist()
    return sorted(int(i) for i in picked)


def segment_rows(frames_per_seed: Any, segments: Any) -> np.ndarray:
    """Boolean mask over the frames of a seeded-MD dataset (segments in seed order, as
    :func:`run_seeded_md` writes them), True on the rows of ``segments``."""
    counts = np.asarray(frames_per_seed, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    mask = np.zeros(int(starts[-1]), bool)
    for i in segments:
        mask[starts[i] : starts[i + 1]] = True
    return mask


def default_segments_dir(output: str | os.PathLike[str]) -> Path:
    """The sidecar folder of an output file: ``<output>.segments`` beside it."""
    output = Path(output)
    return output.with_name(output.name + ".segments")


def remove_segments(segments_dir: str | os.PathLike[str]) -> None:
    """Delete the files :func:`run_seeded_md` wrote in ``segments_dir``, then the folder if empty.

    Other files are left alone (a folder that still holds some is kept).
    """
    folder = Path(segments_dir)
    if not folder.is_dir():
        return
    for path in [folder / "plan.json", folder / "hot.npz", *folder.glob("seed-*.npz")]:
        path.unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass


# -- worker side ------------------------------------------------------------------------------


def _worker_init() -> None:
    """Workers ignore Ctrl-C: the parent handles it and terminates them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_segment(task: dict[str, Any]) -> dict[str, Any]:
    """One Langevin run in a fresh OpenMM context (called in a worker process, or in-process).

    ``task`` holds ``system_xml``, ``positions`` ``(n_atoms, 3)`` nm, ``temperature`` K,
    ``minimize``, ``burn_in``, ``n_frames``, ``stride``, ``timestep_fs``, ``friction_per_ps``,
    ``platform``, ``seed`` and ``parent_pid`` (None in-process). Returns ``positions``
    ``(n_frames, 3 * n_atoms)`` float64 nm, ``energies_kj`` ``(n_frames,)`` kJ/mol and
    ``seconds``.
    """
    import openmm
    from openmm import unit

    from boltzflow.data.md import openmm_seed

    start = time.perf_counter()
    parent_pid = task["parent_pid"]
    system = openmm.XmlSerializer.deserialize(task["system_xml"])
    temperature = float(task["temperature"]) * unit.kelvin
    integrator = openmm.LangevinMiddleIntegrator(
        temperature,
        float(task["friction_per_ps"]) / unit.picosecond,
        float(task["timestep_fs"]) * unit.femtosecond,
    )
    integrator.setRandomNumberSeed(openmm_seed(task["seed"]))
    platform = task["platform"]
    # One thread per worker: the workers are the parallelism; deterministic CPU forces keep
    # runs reproducible.
    properties = {"Threads": "1", "DeterministicForces": "true"} if platform == "CPU" else {}
    context = openmm.Context(
        system, integrator, openmm.Platform.getPlatformByName(platform), properties
    )

    def steps(integrator: Any, n: int) -> None:
        while n > 0:
            k = min(n, _CHUNK)
            integrator.step(k)
            n -= k
            if parent_pid is not None and os.getppid() != parent_pid:
                os._exit(1)  # orphaned: nobody will read the result

    n_frames = int(task["n_frames"])
    n_coords = 3 * system.getNumParticles()
    positions = np.empty((n_frames, n_coords))
    energies = np.empty(n_frames)
    try:
        context.setPositions(np.asarray(task["positions"], dtype=np.float64) * unit.nanometer)
        if task["minimize"]:
            openmm.LocalEnergyMinimizer.minimize(context)
        context.setVelocitiesToTemperature(temperature, openmm_seed(task["seed"]))
        steps(integrator, int(task["burn_in"]))
        for i in range(n_frames):
            steps(integrator, int(task["stride"]))
            state = context.getState(getPositions=True, getEnergy=True)
            energies[i] = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
            if not math.isfinite(energies[i]):
                raise RuntimeError(
                    f"MD blew up at {task['temperature']} K: non-finite energy at frame {i} "
                    f"(try a smaller timestep_fs than {task['timestep_fs']})"
                )
            positions[i] = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer).ravel()
    finally:
        del context, integrator
    return {
        "positions": positions,
        "energies_kj": energies,
        "seconds": time.perf_counter() - start,
    }


# -- parent side ------------------------------------------------------------------------------


def _stop(executor: ProcessPoolExecutor) -> None:
    """Terminate, then kill the workers (each step bounded), and drop queued tasks.

    ``ProcessPoolExecutor.shutdown`` lets running tasks finish (a segment takes minutes), so
    the processes are terminated directly; ``_processes`` is the executor's pid -> Process map.
    """
    processes = list((getattr(executor, "_processes", None) or {}).values())
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(2.0)
        if process.is_alive():
            process.kill()
            process.join(1.0)
    executor.shutdown(wait=False, cancel_futures=True)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT while worker processes are started.

    Spawned children inherit an ignored SIGINT through exec, so a Ctrl-C (sent by the terminal to
    the whole process group) cannot interrupt a worker while it is still importing, before
    :func:`_worker_init` runs (that printed a KeyboardInterrupt traceback per worker).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class _Workers:
    """Runs :func:`_run_segment` tasks in ``workers`` spawned processes (0: in this process).

    The processes start on the first :meth:`run` (a full resume starts none) and are reused by
    later calls; :meth:`close` stops them. Any error or Ctrl-C during :meth:`run` stops them at
    once (terminate, then kill) before it propagates.
    """

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None

    def run(
        self,
        tasks: Iterable[tuple[int, dict[str, Any]]],
        on_done: Callable[[int, dict[str, Any]], None],
    ) -> None:
        """Run ``(key, task)`` pairs, calling ``on_done(key, result)`` as each one finishes."""
        tasks = list(tasks)
        if not tasks:
            return
        if self.workers == 0:
            for key, task in tasks:
                on_done(key, _run_segment({**task, "parent_pid": None}))
            return
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=get_context("spawn"),
                initializer=_worker_init,
            )
        parent = os.getpid()
        try:
            with _sigint_ignored():  # workers start during submit(); see _sigint_ignored
                futures = {
                    self._executor.submit(_run_segment, {**task, "parent_pid": parent}): key
                    for key, task in tasks
                }
            for future in as_completed(futures):
                on_done(futures[future], future.result())
        except BaseException:
            self.close(abort=True)
            raise

    def close(self, abort: bool = False) -> None:
        """Stop the workers: wait for them (idle) or, with ``abort``, terminate them."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        if abort:
            _stop(executor)
        else:
            executor.shutdown(wait=True)


class _TorchSegments:
    """Runs segment tasks (same temperature and step settings) as one batch of replicas through
    the system's torch force field (:func:`boltzflow.data.torch_md.run_langevin`), with the
    interface of :class:`_Workers`. Progress: a line about every 5 % of the steps."""

    def __init__(self, system: Any, progress: bool) -> None:
        self.system = system
        self.progress = progress

    def run(
        self,
        tasks: Iterable[tuple[int, dict[str, Any]]],
        on_done: Callable[[int, dict[str, Any]], None],
    ) -> None:
        """Integrate every task's seed at once, then call ``on_done(key, result)`` per task."""
        from boltzflow.data.torch_md import particle_masses, run_langevin
        from boltzflow.systems.torch_ff import compile_openmm_system

        tasks = list(tasks)
        if not tasks:
            return
        first = tasks[0][1]
        shared = ("temperature", "burn_in", "stride", "timestep_fs", "friction_per_ps")
        if any(task[k] != first[k] for _, task in tasks for k in shared) or any(
            task["minimize"] for _, task in tasks
        ):
            raise ValueError("torch engine: segments of one batch must share their MD settings")
        omm = self.system.openmm_system
        masses = particle_masses(omm)
        # compiled: fuses the elementwise work of a step, several times faster for large batches
        # on the CPU; not worth its start-up time for a handful of segments
        ff = compile_openmm_system(omm, dtype=torch.float64, compiled=len(tasks) >= 16)
        x0 = torch.from_numpy(np.stack([np.asarray(t["positions"]).reshape(-1) for _, t in tasks]))
        frames = [int(t["n_frames"]) for _, t in tasks]
        seed = int(np.random.SeedSequence([t["seed"] for _, t in tasks]).generate_state(1)[0])
        every = max(1, (first["burn_in"] + max(frames) * first["stride"]) // 20)

        def report(step: int, total: int, seconds: float) -> None:
            rate = step / max(seconds, 1e-9)
            eta = _eta((total - step) / rate)
            _say(
                self.progress,
                f"torch MD: step {step:,}/{total:,} of {len(tasks)} segments at "
                f"{first['temperature']:g} K ({rate:,.0f} steps/s); ETA {eta}",
            )

        run = run_langevin(
            ff.energy_and_forces,
            masses,
            x0,
            temperature=float(first["temperature"]),
            n_frames=max(frames),
            stride=int(first["stride"]),
            burn_in=int(first["burn_in"]),
            timestep_fs=float(first["timestep_fs"]),
            friction_per_ps=float(first["friction_per_ps"]),
            seed=seed,
            progress=report,
            progress_every=every,
        )
        for r, (key, _) in enumerate(tasks):
            on_done(
                key,
                {
                    "positions": run.positions[r, : frames[r]],
                    "energies_kj": run.energies_kj[r, : frames[r]],
                    "seconds": run.seconds / len(tasks),
                },
            )

    def close(self, abort: bool = False) -> None:
        """Nothing to stop (the batch runs in this process)."""


def _check_settings(s: dict[str, Any], n: int) -> None:
    for name in ("n_seeds", "hot_frames", "hot_stride", "stride"):
        value = s[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    for name in ("hot_burn_in", "burn_in", "workers"):
        value = s[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    for name in ("hot_temperature", "timestep_fs", "friction_per_ps"):
        value = s[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    fraction = s["basin_fraction"]
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise ValueError(f"basin_fraction must be a number in [0, 1], got {fraction!r}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"basin_fraction must lie in [0, 1], got {fraction!r}")
    if s["n_seeds"] > n:
        raise ValueError(f"n_seeds ({s['n_seeds']}) must not exceed the number of frames ({n})")
    if s["engine"] not in ENGINES:
        raise ValueError(f"engine must be one of {list(ENGINES)}, got {s['engine']!r}")
    if not isinstance(s["keep_segments"], bool):
        raise ValueError(f"keep_segments must be true or false, got {s['keep_segments']!r}")


def _task_seed(seed: int, index: int) -> int:
    """Random seed of task ``index`` (-1: the hot run), a function of ``(seed, index)`` only."""
    return int(np.random.SeedSequence([int(seed) % 2**63, index + 1]).generate_state(1)[0])


def _save_npz(path: Path, **arrays: Any) -> None:
    with atomic_path(path, suffix=".npz") as tmp, tmp.open("wb") as fh:
        np.savez(fh, **arrays)


def _load_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """The arrays of a finished file, or None when it is missing or unreadable."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: np.asarray(data[k]) for k in keys}
    except (OSError, ValueError, KeyError, EOFError):
        return None


def _flat(plan: Any) -> dict[str, Any]:
    if not isinstance(plan, dict):
        return {}
    return {**{k: v for k, v in plan.items() if k != "settings"}, **plan.get("settings", {})}


def _check_plan(folder: Path, plan: dict[str, Any]) -> None:
    """Write ``plan.json``, or check that an existing one matches ``plan``.

    A folder without finished segments is simply restarted with the new plan (a hot run that
    had too few candidates in a basin can be redone with other settings).
    """
    path = folder / "plan.json"
    text = json.dumps(plan, sort_keys=True, indent=1)
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            old = None
        if old == json.loads(text):
            return
        if any(folder.glob("seed-*.npz")):
            new, before = _flat(json.loads(text)), _flat(old)
            diff = sorted(k for k in {*new, *before} if new.get(k) != before.get(k))
            raise ValueError(
                f"{folder} holds segments of a different run (differs in "
                f"{diff or ['(unreadable plan.json)']}); rerun with the same settings to "
                "resume, or delete the folder (or choose another output) to start afresh"
            )
        (folder / "hot.npz").unlink(missing_ok=True)
    atomic_write_text(path, text)


def _eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, sec = divmod(round(seconds), 60)
    return f"{minutes}m{sec:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"


def _say(progress: bool, text: str) -> None:
    if progress:
        print(f"md_seeded: {text}", file=sys.stderr, flush=True)


def run_seeded_md(
    system: Any,
    n: int,
    *,
    seed: int,
    settings: dict[str, Any],
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Frames of a molecule at its temperature from MD segments seeded by a hot run.

    See the module docstring for the procedure and why the frames are **not** Boltzmann
    distributed across basins.

    Args:
        system: a :class:`~boltzflow.systems.molecular.MolecularSystem` (ALDP or any system with
            ``phi_atoms``); its temperature is the production temperature.
        n: total frames (>= ``n_seeds``); split as evenly as possible over the seeds, the first
            ``n % n_seeds`` segments get one frame more.
        seed: seed of the hot run and, with the segment index, of every segment.
        settings: all keys of :data:`DEFAULTS` (``generate`` fills them in): ``n_seeds``,
            ``basin_fraction`` (share of seeds in 0 < φ < 2), ``hot_temperature`` (K),
            ``hot_burn_in`` (steps after minimisation), ``hot_frames`` (candidates),
            ``hot_stride`` (steps between candidates), ``burn_in`` (re-equilibration steps per
            segment), ``stride`` (steps between frames), ``timestep_fs``, ``friction_per_ps``,
            ``platform`` (OpenMM name; None: the system's; the hot run's, and the segments' with
            ``engine = "openmm"``), ``engine`` (segments: ``"openmm"`` worker processes or
            ``"torch"``, one batch; module docstring), ``workers`` (processes; 0 runs in
            this process), ``segments_dir`` (resumable sidecar folder; None: a temporary one),
            ``keep_segments`` (only used by the CLI, which removes the folder after writing).
        progress: one line per finished segment (and for the hot run) on stderr.

    Returns:
        ``positions`` ``(n, 3 * n_atoms)`` float64 nm, centred (segment after segment, in seed
        order), ``energies`` ``(n,)`` reduced energies U/kT at the system temperature, and
        ``statistics`` (JSON-friendly; see the keys in the code: seeds, their φ, per-seed frame
        counts, basin fractions, wall time, ``boltzmann_across_basins: False``).

    Raises:
        ValueError: bad settings, a platform OpenMM does not have, too few hot candidates in a
            basin, or a ``segments_dir`` holding a different run.
        RuntimeError: MD blew up or a worker died.
        KeyboardInterrupt: Ctrl-C (workers stopped; finished segments kept for a resume).
    """
    import openmm

    from boltzflow.systems.openmm_pool import resolve_platform

    s = {**DEFAULTS, **settings}
    unknown = sorted(set(settings) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"md_seeded has no setting(s) {unknown}; valid: {sorted(DEFAULTS)}")
    _check_settings(s, n)
    s["platform"] = resolve_platform(s["platform"] or getattr(system, "platform_name", "CPU"))
    start = time.perf_counter()
    n_seeds = s["n_seeds"]
    counts = np.full(n_seeds, n // n_seeds) + (np.arange(n_seeds) < n % n_seeds)
    temperature = float(system.temperature)
    kt = kt_kj_per_mol(temperature)
    xml = openmm.XmlSerializer.serialize(system.openmm_system)
    common = {
        "system_xml": xml,
        "timestep_fs": float(s["timestep_fs"]),
        "friction_per_ps": float(s["friction_per_ps"]),
        "platform": s["platform"],
    }
    temporary = None
    pool = _Workers(s["workers"])
    if s["segments_dir"] is None:
        temporary = tempfile.TemporaryDirectory(prefix="boltzflow-md-seeded-")
        folder = Path(temporary.name)
    else:
        folder = Path(s["segments_dir"])
        folder.mkdir(parents=True, exist_ok=True)
    try:
        plan = {
            "version": _PLAN_VERSION,
            "system": system.name,
            "n": int(n),
            "seed": int(seed),
            "settings": {k: v for k, v in s.items() if k not in _RUNTIME_SETTINGS},
        }
        _check_plan(folder, plan)

        # 1. Hot run -> candidates -> seeds (cached in hot.npz).
        hot_keys = ("positions", "phi", "energies_kj")
        hot = _load_npz(folder / "hot.npz", hot_keys)
        hot_seconds = 0.0
        if hot is None:
            hot_steps = s["hot_burn_in"] + s["hot_frames"] * s["hot_stride"]
            _say(progress, f"hot run: {hot_steps:,} steps at {s['hot_temperature']} K ...")
            task = {
                **common,
                "positions": system.reference_configuration().numpy().reshape(-1, 3),
                "temperature": float(s["hot_temperature"]),
                "minimize": True,
                "burn_in": s["hot_burn_in"],
                "n_frames": s["hot_frames"],
                "stride": s["hot_stride"],
                "seed": _task_seed(seed, -1),
            }
            results: dict[int, dict[str, Any]] = {}
            pool.run([(-1, task)], results.__setitem__)
            x_hot = results[-1]["positions"]
            hot_seconds = results[-1]["seconds"]
            phi_hot = system.backbone_dihedrals(torch.from_numpy(x_hot))[0].numpy()
            hot = {"positions": x_hot, "phi": phi_hot, "energies_kj": results[-1]["energies_kj"]}
            _save_npz(folder / "hot.npz", **hot)
        phi_hot = hot["phi"]
        eligible = eligible_seeds(system, hot["positions"])
        seed_frames = select_seeds(phi_hot, n_seeds, float(s["basin_fraction"]), eligible)
        _say(
            progress,
            f"hot run: {int(eligible.sum())} of {len(eligible)} candidates are L-form with trans "
            "peptide bonds (the others are never seeds)",
        )
        n_hot_positive = int(in_positive_basin(phi_hot).sum())
        _say(
            progress,
            f"hot run: {n_hot_positive} of {len(phi_hot)} candidates with 0 < phi < 2; seeds: "
            f"{int(in_positive_basin(phi_hot[seed_frames]).sum())} there, "
            f"{int((phi_hot[seed_frames] < 0).sum())} with phi < 0",
        )

        # 2. Segments, one per seed (finished ones are read back).
        seg_keys = ("positions", "energies", "seconds")
        segments: dict[int, dict[str, np.ndarray]] = {}
        for i in range(n_seeds):
            found = _load_npz(folder / f"seed-{i:03d}.npz", seg_keys)
            if found is not None and found["positions"].shape == (counts[i], system.dim):
                segments[i] = found
        if segments:
            _say(progress, f"resuming: {len(segments)}/{n_seeds} segments found in {folder}")
        tasks = [
            (
                i,
                {
                    **common,
                    "positions": hot["positions"][seed_frames[i]].reshape(-1, 3),
                    "temperature": temperature,
                    "minimize": False,
                    "burn_in": s["burn_in"],
                    "n_frames": int(counts[i]),
                    "stride": s["stride"],
                    "seed": _task_seed(seed, i),
                },
            )
            for i in range(n_seeds)
            if i not in segments
        ]
        todo_frames = int(sum(counts[i] for i, _ in tasks))
        batched = _TorchSegments(system, progress) if s["engine"] == "torch" else None
        run_start = time.perf_counter()
        done_frames = 0
        positive: dict[int, int] = {}  # frames in 0 < φ < 2 per finished segment (progress)

        def finished(i: int, result: dict[str, Any]) -> None:
            nonlocal done_frames
            segment = {
                "positions": result["positions"],
                "energies": result["energies_kj"] / kt,
                "seconds": np.float64(result["seconds"]),
            }
            _save_npz(folder / f"seed-{i:03d}.npz", **segment)
            segments[i] = segment
            done_frames += int(counts[i])
            if progress:
                for j in segments.keys() - positive.keys():  # φ of each segment once
                    phi_j = system.backbone_dihedrals(torch.from_numpy(segments[j]["positions"]))
                    positive[j] = int(in_positive_basin(phi_j[0]).sum())
                frames = sum(len(v["energies"]) for v in segments.values())
                rate = done_frames / max(time.perf_counter() - run_start, 1e-9)
                # the torch engine finishes every segment at once: no time left to estimate
                eta = "" if batched else f"; ETA {_eta((todo_frames - done_frames) / rate)}"
                _say(
                    progress,
                    f"segment {len(segments)}/{n_seeds} done (seed {i}, start phi "
                    f"{phi_hot[seed_frames[i]]:+.2f}, {counts[i]} frames, "
                    f"{positive[i] / counts[i]:.0%} in 0<phi<2, {result['seconds']:.1f} s); "
                    f"frames {frames:,}/{n:,}, 0<phi<2 so far "
                    f"{sum(positive.values()) / frames:.3f}{eta}",
                )

        try:
            (batched or pool).run(tasks, finished)
        except KeyboardInterrupt:
            where = "(temporary folder, not resumable)" if temporary else f"in {folder}"
            _say(
                True,
                f"interrupted: {len(segments)}/{n_seeds} segments saved {where}; rerun the same "
                "command to resume",
            )
            raise

        # 3. Assemble in seed order.
        x = np.concatenate([segments[i]["positions"] for i in range(n_seeds)])
        u = np.concatenate([segments[i]["energies"] for i in range(n_seeds)])
        seg_seconds = [float(segments[i]["seconds"]) for i in range(n_seeds)]
    finally:
        pool.close()
        if temporary is not None:
            temporary.cleanup()
    x_t = torch.from_numpy(x)
    if system.mean_free:  # translation invariant energy: store centred frames
        x_t = system.remove_mean(x_t)
    phi = system.backbone_dihedrals(x_t)[0].numpy()
    bounds = np.concatenate([[0], np.cumsum(counts)])
    per_seed_positive = [
        round(float(in_positive_basin(phi[a:b]).mean()), 4) for a, b in itertools.pairwise(bounds)
    ]
    l_form = None
    if hasattr(system, "chirality_atoms"):
        from boltzflow.systems.geometry import is_l_form

        l_form = float(is_l_form(x_t, system.chirality_atoms, system.l_form_sign).double().mean())
    stats = {
        "n_frames": len(x),
        "boltzmann_across_basins": False,
        "note": "seeded MD: the seeds fix the basin populations until transitions happen; "
        "Boltzmann within a basin, not across basins (reweight, do not use for a reference dF)",
        "hot_temperature": float(s["hot_temperature"]),
        "hot_candidates": len(phi_hot),
        "hot_candidates_positive_phi": n_hot_positive,
        "hot_candidates_eligible": int(eligible.sum()),  # L-form, trans peptide bonds
        "seed_candidate_index": seed_frames.tolist(),
        "seed_hot_time_ps": [
            round((s["hot_burn_in"] + (j + 1) * s["hot_stride"]) * s["timestep_fs"] / 1000, 3)
            for j in seed_frames
        ],
        "seed_phi": [round(float(phi_hot[j]), 4) for j in seed_frames],
        "seed_random_seeds": [_task_seed(seed, i) for i in range(n_seeds)],
        "frames_per_seed": counts.tolist(),
        "positive_phi_fraction": round(float(in_positive_basin(phi).mean()), 5),
        "positive_phi_fraction_per_seed": per_seed_positive,
        "positive_phi_basin": list(POSITIVE_PHI_BASIN),
        "l_form_fraction": l_form,
        "mean_energy_kT": round(float(u.mean()), 4),
        "stride": int(s["stride"]),
        "frame_spacing_fs": float(s["stride"] * s["timestep_fs"]),
        "timestep_fs": float(s["timestep_fs"]),
        "platform": s["platform"],
        "integrator": "LangevinMiddleIntegrator"
        if s["engine"] == "openmm"
        else "boltzflow.data.torch_md (LangevinMiddleIntegrator scheme)",
        "engine": s["engine"],
        "openmm_version": openmm.__version__,
        "segment_seconds": [round(t, 2) for t in seg_seconds],
        "segment_seconds_total": round(sum(seg_seconds), 2),
        "hot_seconds_this_run": round(hot_seconds, 2),
        "seconds": round(time.perf_counter() - start, 2),
        "interrupted": False,
    }
    return x_t.numpy(), u, stats
