"""OpenMM worker pool: input order, failed rows, shutdown without hangs or leftover workers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openmm
import pytest
from openmm import app, unit

from boltzflow.systems import openmm_pool
from boltzflow.systems.openmm_pool import OpenMMPool
from boltzflow.systems.registry import BUILTIN_DIR

ALDP = BUILTIN_DIR / "aldp"
POOL_FILE = Path(openmm_pool.__file__).resolve()


@pytest.fixture(scope="module")
def system_xml() -> str:
    """Alanine dipeptide in vacuum (the cheapest of the shipped definitions)."""
    pdb = app.PDBFile(str(ALDP / "alanine-dipeptide.pdb"))
    system = app.ForceField("amber99sbildn.xml").createSystem(
        pdb.topology, nonbondedMethod=app.NoCutoff, constraints=None
    )
    return openmm.XmlSerializer.serialize(system)


@pytest.fixture(scope="module")
def ref() -> np.ndarray:
    pdb = app.PDBFile(str(ALDP / "alanine-dipeptide.pdb"))
    return np.asarray(pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer))


def _batch(ref: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    return ref + 0.01 * np.random.default_rng(seed).standard_normal((n, 22, 3))


def _gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (absent, or a zombie nobody has reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return True
    return fields[0] in ("Z", "X")


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if not _gone(p)]
        if not alive:
            return []
        time.sleep(0.05)
    return [p for p in pids if not _gone(p)]


def _busy(pool: OpenMMPool, ref: np.ndarray, n: int) -> tuple[threading.Thread, list]:
    """Keep ``pool.evaluate`` busy on batches of ``n`` rows in a thread, one call after another,
    until a call raises (at most 60 s); the list receives that error. A single batch could
    finish before the test acts on a fast machine; back-to-back calls are mid-batch whenever
    the test acts."""
    outcome: list = []
    batch = np.broadcast_to(ref, (n, 22, 3))

    def run() -> None:
        deadline = time.monotonic() + 60.0
        try:
            while time.monotonic() < deadline:
                pool.evaluate(batch, forces=False)
            outcome.append(TimeoutError("the pool kept answering for 60 s"))
        except BaseException as err:
            outcome.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    time.sleep(0.5)  # let the chunks reach the workers
    return thread, outcome


def test_results_in_input_order(system_xml: str, ref: np.ndarray):
    x = _batch(ref, 7)  # 7 rows over 2 workers: uneven chunks 4 + 3
    with OpenMMPool(system_xml, "Reference", n_workers=2, threads=1) as pool:
        assert len(pool.pids) == 2
        got = pool.evaluate(x)
        flat = pool.evaluate(x.reshape(7, 66), forces=False)
    local = OpenMMPool(system_xml, "Reference", n_workers=0).evaluate(x)
    # Same platform, same arithmetic: bit-identical, and distinct per row, so order is checked.
    assert np.array_equal(got.energies, local.energies)
    assert np.array_equal(got.forces, local.forces)
    assert len(np.unique(got.energies)) == 7
    assert np.array_equal(flat.energies, local.energies) and flat.forces is None
    assert got.n_failed == 0 and len(got) == 7


def test_nonfinite_and_overlapping_rows(system_xml: str, ref: np.ndarray):
    x = _batch(ref, 6)
    x[1, 3, 0] = np.nan
    x[2, 5, 2] = np.inf
    x[4] = ref * 0.0  # all atoms on one point: OpenMM returns NaN
    x[5, 1] = x[5, 0]  # two atoms on top of each other
    with OpenMMPool(system_xml, "Reference", n_workers=2, threads=1) as pool:
        got = pool.evaluate(x)
        assert got.n_failed == 4 and pool.n_failed == 4
        assert np.isinf(got.energies[[1, 2, 4, 5]]).all() and (got.energies[[1, 2, 4, 5]] > 0).all()
        assert np.isfinite(got.energies[[0, 3]]).all()
        assert not got.forces[[1, 2, 4, 5]].any()
        # Nearly overlapping (finite but enormous) is returned as is, and the pool still works.
        squeezed = (ref * 1e-3)[None]
        huge = pool.evaluate(squeezed)
        assert huge.energies[0] > 1e10 or np.isinf(huge.energies[0])
        again = pool.evaluate(x[[0, 3]])
        assert np.array_equal(again.energies, got.energies[[0, 3]])


def test_cpu_platform_rejects_nan_without_crashing(system_xml: str, ref: np.ndarray):
    # The CPU platform raises OpenMMException on NaN coordinates; the Reference one returns NaN.
    x = _batch(ref, 2)
    x[0, 0, 0] = np.nan
    got = OpenMMPool(system_xml, "CPU", n_workers=0, threads=1).evaluate(x)
    assert got.n_failed == 1 and np.isinf(got.energies[0]) and np.isfinite(got.energies[1])


def test_batch_of_one_and_empty_batch(system_xml: str, ref: np.ndarray):
    with OpenMMPool(system_xml, "Reference", n_workers=2, threads=1) as pool:
        one = pool.evaluate(ref[None])
        empty = pool.evaluate(np.zeros((0, 22, 3)))
    local = OpenMMPool(system_xml, "Reference", n_workers=0).evaluate(ref[None])
    assert one.energies.shape == (1,) and one.forces.shape == (1, 22, 3)
    assert np.array_equal(one.energies, local.energies)
    assert empty.energies.shape == (0,) and empty.forces.shape == (0, 22, 3) and empty.n_failed == 0


def test_argument_errors(system_xml: str, ref: np.ndarray):
    with pytest.raises(ValueError, match="not available"):
        OpenMMPool(system_xml, "NoSuchPlatform", n_workers=0)
    with pytest.raises(ValueError, match="n_workers"):
        OpenMMPool(system_xml, "Reference", n_workers=-1)
    with pytest.raises(TypeError, match=r"openmm\.System"):
        OpenMMPool(3, "Reference", n_workers=0)
    pool = OpenMMPool(system_xml, "Reference", n_workers=0)
    with pytest.raises(ValueError, match=r"\(batch, 22, 3\)"):
        pool.evaluate(np.zeros((2, 21, 3)))
    pool.close()
    pool.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        pool.evaluate(ref[None])
    assert openmm_pool.resolve_platform("auto") in openmm_pool.available_platforms()


def test_close_mid_batch_leaves_no_worker(system_xml: str, ref: np.ndarray):
    pool = OpenMMPool(system_xml, "Reference", n_workers=2, threads=1)
    pids = pool.pids
    thread, outcome = _busy(pool, ref, 60_000)
    start = time.monotonic()
    pool.close()
    thread.join(15.0)
    assert not thread.is_alive(), "evaluate() hung after close()"
    assert time.monotonic() - start < 10.0
    assert isinstance(outcome[0], RuntimeError) and "closed" in str(outcome[0]), outcome
    assert _wait_gone(pids, 5.0) == [], "workers still running after close()"
    assert all(not p.is_alive() for p in pool._processes)


def test_sigkilled_worker_gives_runtime_error(system_xml: str, ref: np.ndarray):
    pool = OpenMMPool(system_xml, "Reference", n_workers=2, threads=1)
    pids = pool.pids
    thread, outcome = _busy(pool, ref, 60_000)
    start = time.monotonic()
    os.kill(pids[0], signal.SIGKILL)
    thread.join(15.0)
    assert not thread.is_alive(), "evaluate() hung after a worker was killed"
    elapsed = time.monotonic() - start
    assert elapsed < 10.0, elapsed
    err = outcome[0]
    assert isinstance(err, RuntimeError) and "killed by signal 9" in str(err), err
    assert pool.closed and _wait_gone(pids, 5.0) == []
    with pytest.raises(RuntimeError, match="closed"):
        pool.evaluate(ref[None])


def test_timeout_shuts_the_pool_down(system_xml: str, ref: np.ndarray):
    pool = OpenMMPool(system_xml, "Reference", n_workers=1, timeout=0.3)
    pids = pool.pids
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="did not answer in time"):
        pool.evaluate(np.broadcast_to(ref, (100_000, 22, 3)), forces=False)
    assert time.monotonic() - start < 5.0
    assert pool.closed and _wait_gone(pids, 5.0) == []


# -- the parent process goes away ------------------------------------------------------------------
# The scripts load openmm_pool.py as a standalone module (it imports nothing from boltzflow), which
# keeps torch out of the subprocess and the test fast; run with -c, spawn re-imports no main file.
_PRELUDE = f"""
import importlib.util, signal, sys, time
import numpy as np, openmm
from openmm import app, unit
spec = importlib.util.spec_from_file_location("pool_standalone", {str(POOL_FILE)!r})
mod = importlib.util.module_from_spec(spec); sys.modules["pool_standalone"] = mod
spec.loader.exec_module(mod)
pdb = app.PDBFile({str(ALDP / "alanine-dipeptide.pdb")!r})
ff = app.ForceField("amber99sbildn.xml")
system = ff.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff)
ref = np.asarray(pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
pool = mod.OpenMMPool(system, "Reference", n_workers=2, threads=1)
print("PIDS", *pool.pids, flush=True)
"""


def _start_script(body: str) -> tuple[subprocess.Popen, list[int]]:
    code = _PRELUDE + textwrap.dedent(body)
    # Unbuffered bytes: readline() must not read ahead, or communicate() (which reads the raw
    # pipe) would miss what the buffer took.
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=0
    )
    line = proc.stdout.readline().decode()
    if not line.startswith("PIDS"):
        proc.kill()
        pytest.fail(f"script did not start: {line}{proc.stdout.read().decode()}")
    return proc, [int(p) for p in line.split()[1:]]


def _communicate(proc: subprocess.Popen, timeout: float) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out.decode()


@contextlib.contextmanager
def _script(body: str) -> Iterator[tuple[subprocess.Popen, list[int]]]:
    """Run a pool script; afterwards kill whatever of it (and its workers) a failure left."""
    proc, pids = _start_script(body)
    try:
        yield proc, pids
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in pids:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_workers_exit_when_parent_is_sigtermed():
    body = """
        print("BUSY", flush=True)
        while True:  # busy until the signal, however late it comes on a loaded machine
            pool.evaluate(np.broadcast_to(ref, (100_000, 22, 3)), forces=False)
        """
    with _script(body) as (proc, pids):
        assert proc.stdout.readline().startswith(b"BUSY")
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)  # default action: no atexit, no cleanup in the parent
        proc.wait(10.0)
        assert _wait_gone(pids, 10.0) == [], "orphaned workers survived their parent"


def test_keyboard_interrupt_stops_workers():
    # A shell starts background jobs with SIGINT ignored, and children inherit that: restore
    # Python's handler so the test does not depend on how the suite was launched.
    body = """
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("BUSY", flush=True)
        try:
            while True:  # busy until the signal, however late it comes on a loaded machine
                pool.evaluate(np.broadcast_to(ref, (100_000, 22, 3)), forces=False)
        except KeyboardInterrupt:
            alive = [p.is_alive() for p in pool._processes]
            print("INTERRUPTED closed=%s alive=%s" % (pool.closed, alive), flush=True)
        """
    with _script(body) as (proc, pids):
        assert proc.stdout.readline().startswith(b"BUSY")
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out = _communicate(proc, 15.0)
        assert "INTERRUPTED closed=True alive=[False, False]" in out, (proc.returncode, out)
        assert proc.returncode == 0
        assert _wait_gone(pids, 5.0) == []


def test_interpreter_exit_without_close_stops_workers():
    with _script("print(pool.evaluate(ref[None]).n_failed, flush=True)\n") as (proc, pids):
        out = _communicate(proc, 30.0)
        assert out.strip() == "0" and proc.returncode == 0, (out, proc.returncode)
        assert _wait_gone(pids, 5.0) == []
