"""Launch a function or a command on 2 CPU processes (gloo), with a hard timeout.

``spawn_ranks`` starts ``fn(rank, *args)`` in fresh processes (``torch.multiprocessing``, spawn)
with the environment torchrun would set, inside :func:`boltzflow.distributed.session`;
``torchrun`` runs a command line through the real launcher (``python -m torch.distributed.run
--standalone``). Both fail the test instead of hanging.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
#: collective timeout inside the test processes (seconds). A rank that dies ends the others'
#: collectives at once (its connections close), so this only bounds a rank that hangs; it is
#: generous because a busy 2-core machine can starve a starting process for a minute
DIST_TIMEOUT_S = "120"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(
    rank: int, fn: Callable[..., Any], world: int, port: int, dist_timeout: str, args: tuple
) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        BOLTZFLOW_DIST_TIMEOUT=dist_timeout,
    )
    import torch

    torch.set_num_threads(1)
    from boltzflow import distributed

    with distributed.session():
        fn(rank, *args)


def spawn_ranks(
    fn: Callable[..., Any],
    *args: Any,
    world: int = 2,
    timeout: float = 90,
    dist_timeout: str = DIST_TIMEOUT_S,
) -> None:
    """Run ``fn(rank, *args)`` on ``world`` gloo ranks (collective timeout ``dist_timeout``
    seconds); fail if any raises or ``timeout`` seconds pass."""
    ctx = mp.start_processes(
        _entry,
        args=(fn, world, free_port(), dist_timeout, args),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=0.5):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed test did not finish within {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def torchrun(
    argv: Sequence[str], *, nproc: int = 2, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node=nproc argv...`` (``argv[0]`` a script or
    ``-m module``); returns the finished process (stdout, stderr, returncode)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={nproc}", "--monitor-interval=0.2", *argv]
    full_env = dict(os.environ)
    full_env.update(
        OMP_NUM_THREADS="1",
        BOLTZFLOW_DIST_TIMEOUT=DIST_TIMEOUT_S,
        BOLTZFLOW_QUIET="1",
        PYTHONPATH=os.pathsep.join(
            [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
        ),
    )
    full_env.update(env or {})
    # a session of its own, so that a timeout kills the launcher and every rank it started
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=full_env,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish within {timeout} s; stderr:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
