"""Batched OpenMM energies and forces through a pool of worker processes.

OpenMM has no batch API: one ``Context`` evaluates one configuration at a time. :class:`OpenMMPool`
splits a batch into contiguous chunks, one per worker process, and returns energies (kJ/mol) and
forces (kJ/mol/nm) in the input order.

Design notes (why it looks like this):

- Workers are started with the ``spawn`` start method and build their ``Context`` *inside* the
  worker from the serialized ``System`` XML. A context created before a fork is unusable in the
  child (OpenMM issue 2602), and forking a process that holds CUDA or thread-pool state is unsafe.
- Each worker talks to the parent over its own pipe; the parent waits on the pipes *and* the
  process sentinels with a deadline, so a worker that dies (even by SIGKILL) or stops answering
  raises :class:`RuntimeError` instead of hanging (the hang of bgflow issue 35 came from waiting on
  results of a pool whose workers were gone).
- Shutdown (``close()``, context manager, garbage collection, interpreter exit through
  :func:`weakref.finalize`, any error or ``KeyboardInterrupt`` during an evaluation) asks workers
  to exit, then terminates and finally kills whatever is still alive, each step with a timeout.
  Workers ignore SIGINT (the parent handles Ctrl-C) and exit on their own when the parent dies:
  their pipe reaches EOF, and during long chunks they poll their parent's pid.
- Non-finite positions and configurations whose energy or forces come back non-finite (atoms on
  top of each other) never crash a worker: those rows get energy ``+inf`` and zero forces, and
  are counted in :attr:`EvaluationResult.n_failed` / :attr:`OpenMMPool.n_failed`.
- Workers run this file with :func:`runpy.run_path` rather than importing it as
  ``boltzflow.systems.openmm_pool``: importing the package would import torch (about 3 s and
  200 MB per worker) although a worker needs only numpy and openmm. This module therefore
  imports nothing from boltzflow.

With ``n_workers == 0``, or on a GPU platform (CUDA, OpenCL, HIP), a single context is created
lazily in the calling process instead.

Spawned workers re-import the caller's main script (standard ``multiprocessing`` behaviour):
scripts that create a pool must keep their top-level work under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import os
import runpy
import signal
import threading
import time
import traceback
import weakref
from dataclasses import dataclass
from multiprocessing import connection as mp_connection
from multiprocessing import get_context
from typing import Any

import numpy as np
import openmm
from openmm import unit

__all__ = [
    "GPU_PLATFORMS",
    "EvaluationResult",
    "OpenMMPool",
    "available_platforms",
    "evaluate_in_context",
    "resolve_platform",
]

#: Platforms that get one in-process context instead of a pool of worker processes.
GPU_PLATFORMS = frozenset({"CUDA", "OpenCL", "HIP"})

_KJ_PER_MOL = unit.kilojoule_per_mole
_KJ_PER_MOL_NM = unit.kilojoule_per_mole / unit.nanometer
# run_name under which a worker executes this file (see _start_worker).
_WORKER_RUN_NAME = "__boltzflow_openmm_worker__"
# A worker checks every this many rows whether its parent is still alive.
_PARENT_CHECK_EVERY = 64


@dataclass(frozen=True)
class EvaluationResult:
    """Energies and forces of a batch, in the input order.

    Attributes:
        energies: ``(batch,)`` float64 potential energies in kJ/mol; ``+inf`` for failed rows.
        forces: ``(batch, n_atoms, 3)`` float64 forces in kJ/mol/nm (zero for failed rows), or
            None when forces were not requested.
        n_failed: rows whose positions, energy or forces were not finite (or raised in OpenMM).
    """

    energies: np.ndarray
    forces: np.ndarray | None
    n_failed: int

    def __len__(self) -> int:
        return int(self.energies.shape[0])


def available_platforms() -> list[str]:
    """Names of the OpenMM platforms usable in this installation."""
    return [
        openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())
    ]


def resolve_platform(name: str) -> str:
    """Validate an OpenMM platform name; ``"auto"`` picks the fastest available one.

    "Fastest" is OpenMM's own ranking (``Platform.getSpeed``: CUDA > OpenCL > CPU > Reference).
    For very small systems such as alanine dipeptide the double-precision Reference platform is
    in fact faster per configuration than CPU (measured about 90 vs 210 us), so the system
    definitions name their platform explicitly.

    Raises:
        ValueError: if the platform is not available (the message lists those that are).
    """
    names = available_platforms()
    if name == "auto":
        return max(names, key=lambda n: openmm.Platform.getPlatformByName(n).getSpeed())
    if name not in names:
        raise ValueError(
            f"OpenMM platform {name!r} is not available; choose 'auto' or one of {names}"
        )
    return name


def _platform_properties(platform: str, threads: int | None) -> dict[str, str]:
    if platform == "CPU" and threads:
        return {"Threads": str(int(threads))}
    return {}


def _make_context(system_xml: str, platform: str, properties: dict[str, str]) -> openmm.Context:
    system = openmm.XmlSerializer.deserialize(system_xml)
    # The integrator is never stepped; a context just needs one.
    integrator = openmm.VerletIntegrator(0.001)
    return openmm.Context(
        system, integrator, openmm.Platform.getPlatformByName(platform), properties
    )


def evaluate_in_context(
    context: openmm.Context,
    positions: np.ndarray,
    forces: bool = True,
    parent_pid: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Evaluate configurations one by one in an existing context.

    Args:
        context: an OpenMM context of a system with ``n_atoms`` particles.
        positions: ``(batch, n_atoms, 3)`` float64 positions in nm.
        forces: also return forces.
        parent_pid: in a worker, the parent's pid; the worker exits if the parent is gone.

    Returns:
        ``(energies, forces, n_failed)``: ``(batch,)`` kJ/mol with ``+inf`` for failed rows,
        ``(batch, n_atoms, 3)`` kJ/mol/nm (zero rows where failed) or None, and the number of
        failed rows.
    """
    batch, n_atoms = positions.shape[0], positions.shape[1]
    energies = np.full(batch, np.inf)
    out_forces = np.zeros((batch, n_atoms, 3)) if forces else None
    finite_rows = np.isfinite(positions).all(axis=(1, 2))
    n_failed = 0
    for i in range(batch):
        if parent_pid is not None and i % _PARENT_CHECK_EVERY == 0 and os.getppid() != parent_pid:
            os._exit(1)  # orphaned: nobody will read the result
        if not finite_rows[i]:
            n_failed += 1
            continue
        try:
            context.setPositions(positions[i])
            state = context.getState(getEnergy=True, getForces=forces)
            energy = state.getPotentialEnergy().value_in_unit(_KJ_PER_MOL)
            force = state.getForces(asNumpy=True).value_in_unit(_KJ_PER_MOL_NM) if forces else None
        except Exception:  # OpenMMException on NaN coordinates (CPU platform), overflow, ...
            n_failed += 1
            continue
        if not np.isfinite(energy) or (force is not None and not np.isfinite(force).all()):
            n_failed += 1
            continue
        energies[i] = energy
        if out_forces is not None:
            out_forces[i] = force
    return energies, out_forces, n_failed


def _worker_main(
    conn: mp_connection.Connection, system_xml: str, platform: str, properties: dict[str, str]
) -> None:
    """Worker loop: build a context, then answer ``(tag, positions, forces)`` until ``None``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    parent_pid = os.getppid()
    try:
        context = _make_context(system_xml, platform, properties)
    except Exception as err:
        conn.send(("error", None, f"could not create the OpenMM context: {err}"))
        return
    conn.send(("ready", None, context.getPlatform().getName()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the parent closed the pipe or died
        if message is None:
            return
        tag, positions, want_forces = message
        try:
            reply: tuple[Any, ...] = (
                "ok",
                tag,
                evaluate_in_context(context, positions, want_forces, parent_pid),
            )
        except Exception:
            reply = ("error", tag, traceback.format_exc())
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return


def _start_worker(
    mp_context: Any, system_xml: str, platform: str, properties: dict[str, str]
) -> tuple[Any, mp_connection.Connection]:
    parent_conn, child_conn = mp_context.Pipe(duplex=True)
    worker_args = {
        "conn": child_conn,
        "system_xml": system_xml,
        "platform": platform,
        "properties": properties,
    }
    process = mp_context.Process(
        target=runpy.run_path,
        args=(os.path.abspath(__file__),),
        kwargs={"init_globals": {"_worker_args": worker_args}, "run_name": _WORKER_RUN_NAME},
        name="boltzflow-openmm-worker",
        daemon=True,
    )
    process.start()
    child_conn.close()  # the parent keeps only its end, so a dead child reads as EOF
    return process, parent_conn


def _shutdown(
    processes: list[Any],
    conns: list[mp_connection.Connection],
    timeout: float,
    polite: bool = True,
) -> None:
    """Ask workers to exit, then terminate, then kill; blocks at most about ``timeout + 2`` s."""
    if polite:
        for conn in conns:
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(1.0)
        if process.is_alive():
            process.kill()
            process.join(1.0)
    for conn in conns:
        try:
            conn.close()
        except OSError:
            pass


class OpenMMPool:
    """Evaluate batches of configurations of one OpenMM system in parallel processes.

    Args:
        system: the ``openmm.System`` or its XML (``openmm.XmlSerializer.serialize``).
        platform: an OpenMM platform name or ``"auto"`` (see :func:`resolve_platform`).
        n_workers: worker processes; 0 evaluates in this process. GPU platforms always use one
            in-process context.
        threads: CPU-platform threads per worker; None splits the usable cores evenly.
        timeout: seconds to wait for the results of one :meth:`evaluate` call; None means
            ``60 + 0.01 * (largest chunk size)``, about 100 times the measured cost of alanine
            dipeptide. A worker that dies is detected at once, without waiting for the timeout.
        startup_timeout: seconds to wait for each worker to build its context.

    Raises:
        ValueError: unknown platform, negative ``n_workers`` or ``threads``.
        RuntimeError: a worker could not start.

    Example:
        >>> with OpenMMPool(system, platform="Reference", n_workers=2) as pool:  # doctest: +SKIP
        ...     result = pool.evaluate(positions_nm)  # (batch, n_atoms, 3)
        ...     result.energies  # (batch,) kJ/mol
    """

    def __init__(
        self,
        system: openmm.System | str,
        platform: str = "Reference",
        n_workers: int = 1,
        *,
        threads: int | None = None,
        timeout: float | None = None,
        startup_timeout: float = 120.0,
    ) -> None:
        if isinstance(system, openmm.System):
            system = openmm.XmlSerializer.serialize(system)
        if not isinstance(system, str):
            raise TypeError(f"system must be an openmm.System or its XML, got {type(system)}")
        if not isinstance(n_workers, int) or n_workers < 0:
            raise ValueError(f"n_workers must be an integer >= 0, got {n_workers!r}")
        if threads is not None and (not isinstance(threads, int) or threads < 0):
            raise ValueError(f"threads must be an integer >= 0 or None, got {threads!r}")
        self._xml = system
        self.n_atoms = openmm.XmlSerializer.deserialize(system).getNumParticles()
        self.platform_name = resolve_platform(platform)
        self.n_workers = 0 if self.platform_name in GPU_PLATFORMS else n_workers
        self.timeout = timeout
        self.n_failed = 0
        self._lock = threading.Lock()
        self._closed = False
        self._local: openmm.Context | None = None
        self._processes: list[Any] = []
        self._conns: list[mp_connection.Connection] = []
        self._tag = 0
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        per_worker = threads or max(1, (cores or 1) // max(1, self.n_workers))
        self._properties = _platform_properties(self.platform_name, per_worker)
        # Closes the workers when the pool is garbage collected or the interpreter exits.
        self._finalizer = weakref.finalize(self, _shutdown, self._processes, self._conns, 5.0)
        if self.n_workers > 0:
            self._start(startup_timeout)

    # -- life cycle -------------------------------------------------------------------------------
    def _start(self, startup_timeout: float) -> None:
        mp_context = get_context("spawn")
        try:
            for _ in range(self.n_workers):
                process, conn = _start_worker(
                    mp_context, self._xml, self.platform_name, self._properties
                )
                self._processes.append(process)
                self._conns.append(conn)
            deadline = time.monotonic() + startup_timeout
            pending = {c: (p, None) for p, c in zip(self._processes, self._conns)}
            while pending:
                try:
                    answered = self._wait(pending, deadline)
                except RuntimeError as err:
                    raise RuntimeError(
                        f"{err} while starting (in a script, keep the top-level code under "
                        "`if __name__ == '__main__':`; spawned workers re-import the main script)"
                    ) from err
                for conn, (process, (kind, _, payload)) in answered.items():
                    if kind != "ready":
                        raise RuntimeError(f"OpenMM worker {process.pid}: {payload}")
                    del pending[conn]
        except BaseException:
            self._abort()
            raise

    @property
    def pids(self) -> list[int]:
        """Process ids of the workers (empty for the in-process path)."""
        return [p.pid for p in self._processes]

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, timeout: float = 5.0) -> None:
        """Stop the workers: ask, then terminate, then kill (each step bounded). Idempotent.

        Safe to call from another thread during :meth:`evaluate`, which then raises
        RuntimeError; the workers are terminated at once in that case.
        """
        self._closed = True
        self._local = None
        if not self._finalizer.alive:
            return
        self._finalizer.detach()
        # Writing "exit" into a pipe that another thread is writing a chunk into would interleave
        # the two messages: when an evaluation is running, terminate without asking.
        idle = self._lock.acquire(blocking=False)
        try:
            _shutdown(self._processes, self._conns, timeout if idle else 0.0, polite=idle)
        finally:
            if idle:
                self._lock.release()

    def _abort(self) -> None:
        """Shut down at once after an error: the workers' state is unknown."""
        self.close(timeout=0.0)

    def __enter__(self) -> OpenMMPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"pids={self.pids}"
        return f"OpenMMPool(platform={self.platform_name!r}, n_workers={self.n_workers}, {state})"

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate(self, positions: np.ndarray, forces: bool = True) -> EvaluationResult:
        """Energies (and forces) of a batch of configurations, in the input order.

        Args:
            positions: ``(batch, n_atoms, 3)`` or ``(batch, 3 * n_atoms)`` positions in nm.
            forces: also compute forces.

        Returns:
            An :class:`EvaluationResult` (kJ/mol, kJ/mol/nm).

        Raises:
            ValueError: wrong shape.
            RuntimeError: the pool is closed, a worker died or did not answer in time (the pool
                is then shut down).
        """
        pos = np.ascontiguousarray(positions, dtype=np.float64)
        if pos.ndim == 2 and pos.shape[1] == 3 * self.n_atoms:
            pos = pos.reshape(pos.shape[0], self.n_atoms, 3)
        if pos.ndim != 3 or pos.shape[1:] != (self.n_atoms, 3):
            raise ValueError(
                f"positions must have shape (batch, {self.n_atoms}, 3) or (batch, "
                f"{3 * self.n_atoms}), got {tuple(np.shape(positions))}"
            )
        if self._closed:
            raise RuntimeError("OpenMMPool is closed")
        with self._lock:
            if pos.shape[0] == 0:
                energies, out_forces, n_failed = np.zeros(0), np.zeros((0, self.n_atoms, 3)), 0
            elif self.n_workers == 0:
                energies, out_forces, n_failed = self._evaluate_local(pos, forces)
            else:
                try:
                    energies, out_forces, n_failed = self._evaluate_pool(pos, forces)
                except BaseException as err:  # KeyboardInterrupt too: never leave workers mid-chunk
                    closed_meanwhile = self._closed
                    self._abort()
                    if closed_meanwhile and isinstance(err, Exception):
                        # close() from another thread can pull a pipe from under a send/recv.
                        raise RuntimeError("OpenMMPool was closed during an evaluation") from err
                    if isinstance(err, RuntimeError):
                        raise RuntimeError(f"{err}; the pool was shut down") from err
                    raise
        self.n_failed += n_failed
        return EvaluationResult(energies, out_forces if forces else None, n_failed)

    def _evaluate_local(
        self, pos: np.ndarray, forces: bool
    ) -> tuple[np.ndarray, np.ndarray | None, int]:
        if self._local is None:
            self._local = _make_context(self._xml, self.platform_name, self._properties)
        return evaluate_in_context(self._local, pos, forces)

    def _evaluate_pool(
        self, pos: np.ndarray, forces: bool
    ) -> tuple[np.ndarray, np.ndarray | None, int]:
        chunks = [c for c in np.array_split(np.arange(pos.shape[0]), self.n_workers) if len(c)]
        timeout = self.timeout
        if timeout is None:
            timeout = 60.0 + 0.01 * max(len(c) for c in chunks)
        deadline = time.monotonic() + timeout
        self._tag += 1
        jobs = list(zip(self._processes, self._conns, chunks))
        for process, conn, idx in jobs:
            try:
                conn.send((self._tag, pos[idx[0] : idx[-1] + 1], forces))
            except (OSError, ValueError) as err:
                raise self._dead(process, f"could not send work ({err})") from err
        energies = np.empty(pos.shape[0])
        out_forces = np.empty(pos.shape) if forces else None
        n_failed = 0
        pending = {conn: (process, idx) for process, conn, idx in jobs}
        while pending:
            for conn, (process, message) in self._wait(pending, deadline).items():
                kind, tag, payload = message
                if kind != "ok" or tag != self._tag:
                    raise RuntimeError(f"OpenMM worker {process.pid} failed: {payload}")
                e, f, bad = payload
                idx = pending.pop(conn)[1]
                energies[idx] = e
                if out_forces is not None:
                    out_forces[idx] = f
                n_failed += bad
        return energies, out_forces, n_failed

    def _wait(
        self, pending: dict[mp_connection.Connection, tuple[Any, Any]], deadline: float
    ) -> dict:
        """Wait for messages from any of ``pending`` (conn -> (process, ...)).

        Returns ``{conn: (process, message)}`` for the workers that answered; raises
        RuntimeError when a worker dies, the pool is closed or the deadline passes.
        """
        by_sentinel = {pending[c][0].sentinel: c for c in pending}
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pids = [pending[c][0].pid for c in pending]
                raise RuntimeError(f"OpenMM workers {pids} did not answer in time")
            try:
                ready = mp_connection.wait([*pending, *by_sentinel], timeout=min(remaining, 1.0))
            except (OSError, ValueError) as err:
                raise self._dead(next(iter(pending.values()))[0], str(err)) from err
            if self._closed:
                raise RuntimeError("OpenMMPool was closed during an evaluation")
            answered = {}
            for obj in ready:
                conn = by_sentinel.get(obj, obj)
                process = pending[conn][0]
                if conn in answered:
                    continue
                try:
                    if obj is conn or conn.poll():
                        answered[conn] = (process, conn.recv())
                        continue
                except (EOFError, OSError, ValueError) as err:
                    raise self._dead(process, str(err) or type(err).__name__) from err
                raise self._dead(process, "process exited")
            if answered:
                return answered

    def _dead(self, process: Any, detail: str) -> RuntimeError:
        if self._closed:
            return RuntimeError("OpenMMPool was closed during an evaluation")
        process.join(1.0)  # reap it, for the exit code
        code = process.exitcode
        how = f"exit code {code}" if code is None or code >= 0 else f"killed by signal {-code}"
        return RuntimeError(f"OpenMM worker {process.pid} died ({how}; {detail})")


if __name__ == _WORKER_RUN_NAME:  # executed by runpy.run_path in a spawned worker
    _worker_main(**globals()["_worker_args"])
