"""Scale-out on ``torch.distributed``: one process per rank, launched by ``torchrun``.

``torchrun --nproc_per_node=K`` (or SLURM through it) starts K copies of a command and sets
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in each. This
module turns that environment into a process group and offers the few collectives boltzflow
needs; everything above it asks :func:`info` who it is.

* Single process (no ``WORLD_SIZE``, or ``WORLD_SIZE=1``): nothing is initialised, :func:`info`
  says rank 0 of 1, the collectives return their input, and no code path changes (zero overhead).
* Several processes: :func:`init` creates the group with the ``gloo`` backend on CPU and
  ``nccl`` on CUDA (each rank on GPU ``LOCAL_RANK``), with a bounded timeout
  (``BOLTZFLOW_DIST_TIMEOUT`` seconds, default :data:`DEFAULT_TIMEOUT_S`): a collective that a
  failed or killed rank never joins raises after at most that long instead of hanging.
  :func:`session` also tears the group down on exceptions, and turns the launcher's SIGTERM
  (torchrun stops the surviving ranks when one fails) into :class:`Terminated`, a
  ``KeyboardInterrupt``, so writers close their files marked partial with every completed chunk.
* Errors that one rank finds while the others carry on (a missing file, a bad option) would
  leave the others waiting in the next collective; :func:`collective_check` and
  :func:`run_on_all` make every rank raise the same error instead.

Seeds: rank r of K > 1 draws with :func:`rank_seed` ``(seed, r)``, independent streams hashed by
numpy's ``SeedSequence``; a single process keeps ``seed`` itself, so one-process results do not
change.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "TIMEOUT_ENV",
    "DistInfo",
    "Terminated",
    "all_gather_arrays",
    "all_gather_concat",
    "all_gather_objects",
    "alone",
    "barrier",
    "broadcast_object",
    "collective_check",
    "info",
    "init",
    "is_communication_error",
    "is_main",
    "launched",
    "rank_seed",
    "run_on_all",
    "session",
    "shard_range",
    "shutdown",
    "single_process_only",
    "split_sizes",
    "sum_over_ranks",
    "timeout_s",
    "wait_group",
]

#: seconds a collective may wait for the other ranks before it raises (also the rendezvous)
DEFAULT_TIMEOUT_S = 600.0
#: environment variable overriding :data:`DEFAULT_TIMEOUT_S`
TIMEOUT_ENV = "BOLTZFLOW_DIST_TIMEOUT"

T = TypeVar("T")


class Terminated(KeyboardInterrupt):
    """SIGTERM stopped this process: the launcher stopping a rank (usually because another rank
    failed), ``kill``, or a batch scheduler's preemption."""


@dataclass(frozen=True)
class DistInfo:
    """Who this process is.

    Attributes:
        rank: global rank in ``[0, world_size)``.
        world_size: number of processes K.
        local_rank: rank on this node (the GPU index under torchrun).
        backend: ``"gloo"``, ``"nccl"``, or None for a single process.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes shared files and prints summaries."""
        return self.rank == 0

    def tag(self) -> str:
        """``"rank 1 of 4"`` (empty for a single process), for messages."""
        return f"rank {self.rank} of {self.world_size}" if self.distributed else ""


SINGLE = DistInfo()


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def launched() -> DistInfo:
    """What the launcher's environment says (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); a single
    process when ``WORLD_SIZE`` is unset. Nothing is initialised.

    Raises:
        ValueError: inconsistent variables (``RANK`` outside ``[0, WORLD_SIZE)``, ...).
    """
    world = _env_int("WORLD_SIZE")
    if world is None or world == 1:
        return SINGLE
    rank, local = _env_int("RANK"), _env_int("LOCAL_RANK")
    if world < 1 or rank is None or not 0 <= rank < world:
        raise ValueError(
            f"WORLD_SIZE={world} needs RANK in [0, {world}), got RANK={os.environ.get('RANK')!r}"
            " (launch with torchrun, which sets both)"
        )
    return DistInfo(rank, world, rank if local is None else local, None)


_ALONE = threading.local()


def info() -> DistInfo:
    """This process in the initialised process group (or a single process if there is none, or
    inside :func:`alone`)."""
    if getattr(_ALONE, "depth", 0) or not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    env = launched()
    local = env.local_rank if env.distributed else dist.get_rank()
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, dist.get_backend())


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Inside the block this process acts as a single process (:func:`info` says rank 0 of 1,
    the collectives are local): for work that rank 0 does by itself while the others wait, such
    as a workflow stage that is not spread over the ranks."""
    _ALONE.depth = getattr(_ALONE, "depth", 0) + 1
    try:
        yield
    finally:
        _ALONE.depth -= 1


def single_process_only(what: str, why: str) -> None:
    """Raise ``ValueError`` when several processes run: ``what`` (e.g. "training the nf
    student") does not run under torchrun, for the reason ``why``."""
    me = info()
    if me.distributed:
        raise ValueError(
            f"{what} does not run under torchrun ({me.world_size} ranks): {why}; "
            "run it as one process (without torchrun)"
        )


def is_main() -> bool:
    """True on rank 0 and in a single process."""
    return info().is_main


def timeout_s() -> float:
    """The collective timeout in seconds (``BOLTZFLOW_DIST_TIMEOUT`` or the default)."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or raw == "":
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} must be a positive number of seconds")
    return value


def init(*, timeout: float | None = None, device: str | None = None) -> DistInfo:
    """Initialise the process group torchrun asked for (no-op for a single process).

    Args:
        timeout: seconds a collective (and the rendezvous) waits (default :func:`timeout_s`).
        device: ``"cpu"`` forces gloo; None or ``"cuda"`` take nccl when CUDA is available.

    Returns:
        this process's :class:`DistInfo`.
    """
    if dist.is_available() and dist.is_initialized():
        return info()
    env = launched()
    if not env.distributed:
        return SINGLE
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    use_cuda = torch.cuda.is_available() and device != "cpu"
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    seconds = timeout_s() if timeout is None else float(timeout)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=seconds))
    return info()


def shutdown() -> None:
    """Destroy the process group if there is one (safe to call twice, and after a failure)."""
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"terminated by signal {signum}")


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While inside (main thread only; elsewhere a no-op), SIGTERM raises :class:`Terminated`,
    so that ``finally`` blocks and writers run as on Ctrl-C: a batch scheduler's SIGTERM before
    it kills a job (SLURM's preemption, ``kill``, a launcher stopping a rank) leaves closed
    files, marked partial, instead of an HDF5 file flagged open for writing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def session(*, timeout: float | None = None, device: str | None = None) -> Iterator[DistInfo]:
    """:func:`init` on entry, :func:`shutdown` on exit (also on exceptions).

    While several processes run, SIGTERM raises :class:`Terminated` in the main thread, so that
    the usual clean-up (writers closing their files marked partial) happens. A single process
    is left as it was (the command line wraps every command in :func:`sigterm_raises`).
    """
    own = not (dist.is_available() and dist.is_initialized())
    me = init(timeout=timeout, device=device)
    clean = False
    try:
        with sigterm_raises() if me.distributed else contextlib.nullcontext():
            yield me
        clean = True
    finally:
        if own:
            if clean and me.distributed:
                # every rank reaches this point before any tears the group down: a rank that
                # destroys gloo while a peer still talks to it aborts ("terminate called
                # without an active exception"); after a failure the peers are not waited for
                with contextlib.suppress(Exception):
                    dist.barrier()
            shutdown()


def is_communication_error(err: BaseException) -> bool:
    """Whether ``err`` is a failed or timed-out collective (a peer died, hung, or the store
    went away): torch's ``DistError`` family, or the ``RuntimeError`` s gloo raises."""
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    markers = ("gloo", "NCCL", "Connection closed by peer", "Connection reset", "Timed out")
    return isinstance(err, RuntimeError) and any(m in text for m in markers)


# -- collectives ---------------------------------------------------------------------------------
def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (no-op for a single process)."""
    if info().distributed:
        dist.barrier()


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over the ranks, on its own device (``tensor`` itself
    for a single process). No gradient: for counts and other detached values."""
    if not info().distributed:
        return tensor
    buf = tensor.detach().to(_device(), copy=True)
    dist.all_reduce(buf)
    return buf.to(tensor.device)


def all_gather_objects(obj: T) -> list[T]:
    """``[obj of rank 0, obj of rank 1, ...]`` (picklable objects; ``[obj]`` single process)."""
    me = info()
    if not me.distributed:
        return [obj]
    out: list[Any] = [None] * me.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0, *, group: Any = None) -> T:
    """Rank ``src``'s ``obj`` on every rank (``group``: a group from :func:`wait_group`)."""
    if not info().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


#: seconds the ranks wait for rank 0 in :func:`wait_group` (rank 0 may run long work alone)
WAIT_TIMEOUT_ENV = "BOLTZFLOW_DIST_WAIT_TIMEOUT"
_WAIT_GROUPS: dict[Any, Any] = {}


def wait_group() -> Any:
    """A gloo group of all ranks whose collectives wait up to ``BOLTZFLOW_DIST_WAIT_TIMEOUT``
    seconds (default 7 days): for ranks that wait while rank 0 works alone (a workflow stage
    that is not spread). A rank that dies still ends the wait at once (its connections close).
    Created on first use; every rank must call this the same number of times."""
    group = dist.group.WORLD
    if group not in _WAIT_GROUPS:
        raw = os.environ.get(WAIT_TIMEOUT_ENV) or str(7 * 24 * 3600)
        seconds = datetime.timedelta(seconds=float(raw))
        _WAIT_GROUPS.clear()  # a group of an earlier process group is gone with it
        _WAIT_GROUPS[group] = dist.new_group(backend="gloo", timeout=seconds)
    return _WAIT_GROUPS[group]


def all_gather_arrays(array: np.ndarray) -> list[np.ndarray]:
    """Every rank's array, in rank order. Arrays may differ in their first dimension (N_r, ...)
    but must agree in trailing shape and dtype; sent as tensors (padded to the largest N_r).

    Raises:
        ValueError: on every rank, when the ranks' trailing shapes or dtypes differ.
    """
    a = np.ascontiguousarray(array)
    me = info()
    if not me.distributed:
        return [a]
    meta = all_gather_objects((a.shape, a.dtype.str))
    rest = {(tuple(shape[1:]), dtype) for shape, dtype in meta}
    if len(rest) != 1 or any(len(shape) == 0 for shape, _ in meta):
        raise ValueError(f"cannot gather arrays of shapes/dtypes {meta} across ranks")
    counts = [shape[0] for shape, _ in meta]
    longest = max(counts)
    padded = np.zeros((longest, *a.shape[1:]), dtype=a.dtype)
    padded[: a.shape[0]] = a
    # bytes travel as uint8 so that any numeric dtype (bool included) goes through every backend
    flat = torch.from_numpy(padded.view(np.uint8).reshape(-1)).to(_device())
    parts = [torch.empty_like(flat) for _ in range(me.world_size)]
    dist.all_gather(parts, flat)
    out = []
    for part, n in zip(parts, counts):
        arr = part.cpu().numpy().view(a.dtype).reshape(longest, *a.shape[1:])
        out.append(arr[:n].copy())
    return out


def all_gather_concat(array: np.ndarray) -> np.ndarray:
    """The union of every rank's rows, concatenated in rank order (``array`` single process)."""
    parts = all_gather_arrays(array)
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def collective_check(error: str | None) -> None:
    """Raise ``ValueError`` on every rank if any rank passes an error message.

    Call it where each rank validates its own part, before the next collective, so a rank that
    found a problem does not leave the others waiting. The message names the first failing rank.
    """
    errors = all_gather_objects(error)
    for rank, err in enumerate(errors):
        if err is not None:
            me = info()
            where = f"rank {rank} of {me.world_size}: " if me.distributed else ""
            raise ValueError(where + err)


def run_on_all(fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank; if it raises ``ValueError``, ``TypeError`` or ``OSError`` (or a
    subclass, such as ``FileNotFoundError``) on any rank, raise on every rank: the original
    exception where it happened, a ``ValueError`` naming that rank elsewhere."""
    me = info()
    if not me.distributed:
        return fn()
    try:
        result, error, exc = fn(), None, None
    except (ValueError, TypeError, OSError) as err:
        result, error, exc = None, f"{err}", err
    errors = all_gather_objects(error)
    if exc is not None:
        raise exc
    for rank, err in enumerate(errors):
        if err is not None:
            raise ValueError(f"rank {rank} of {me.world_size}: {err}")
    return result  # type: ignore[return-value]


# -- splitting work ------------------------------------------------------------------------------
def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of rank ``rank`` when ``n`` rows are split into ``world_size``
    contiguous parts whose sizes differ by at most one (the first ``n mod K`` get one more)."""
    if world_size < 1 or not 0 <= rank < world_size or n < 0:
        raise ValueError(f"cannot split {n} rows for rank {rank} of {world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def rank_seed(seed: int, rank: int, world_size: int) -> int:
    """The sampling seed of rank ``rank``: ``seed`` itself for a single process, else a 62-bit
    seed hashed from ``(seed, rank)`` by ``numpy.random.SeedSequence`` (independent streams;
    rank r's stream does not depend on K)."""
    if world_size == 1:
        return int(seed)
    state = np.random.SeedSequence([int(seed), int(rank)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 30) ^ int(state[1])


def split_sizes(n: int, world_size: int) -> Sequence[int]:
    """The row count of every rank under :func:`shard_range`."""
    return [b - a for a, b in (shard_range(n, r, world_size) for r in range(world_size))]
