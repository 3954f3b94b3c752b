"""HDF5 sample store: round trip, validation, resume, and a writer killed mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from boltzflow.errors import PartialFileError
from boltzflow.io.samples import SampleWriter, read_samples


def test_round_trip_with_teacher_style_call(tmp_path):
    path = tmp_path / "s.h5"
    x = torch.randn(7, 4, dtype=torch.float64)
    with SampleWriter(path, dim=4, provenance={"model": "teacher", "path": Path("/ckpt")}) as w:
        assert w.append(x[:5], log_q=torch.zeros(5), nfe=np.full(5, 94)) == 5
        assert w.append(x[5:], log_q=torch.ones(2), nfe=np.full(2, 90)) == 7
        assert w.n_complete == 7
    s = read_samples(path)
    assert s.n == 7 and np.array_equal(s.x, x.numpy())
    assert s.log_q.tolist() == [0.0] * 5 + [1.0] * 2
    assert s.u is None and s.log_w is None
    assert s.columns["nfe"].tolist() == [94] * 5 + [90] * 2
    assert s.provenance == {"model": "teacher", "path": "/ckpt"}
    assert s.attrs["format"] == "boltzflow-samples" and s.attrs["n_complete"] == 7
    part = read_samples(path, start=2, stop=4)
    assert np.array_equal(part.x, x[2:4].numpy())


def test_validation(tmp_path):
    path = tmp_path / "s.h5"
    with SampleWriter(path, dim=3, provenance={}) as w:
        w.append(np.zeros((2, 3)), u=np.zeros(2))
        with pytest.raises(ValueError, match="differ from this store's columns"):
            w.append(np.zeros((2, 3)), log_q=np.zeros(2))
        with pytest.raises(ValueError, match=r"x must be \(n, 3\)"):
            w.append(np.zeros((2, 4)), u=np.zeros(2))
        with pytest.raises(ValueError, match="shape"):
            w.append(np.zeros((2, 3)), u=np.zeros(3))
    with pytest.raises(ValueError, match="never overwrites"):
        SampleWriter(path, dim=3, provenance={}, mode="x")
    with pytest.raises(ValueError, match="stored dim"):
        SampleWriter(path, dim=5, provenance={}, mode="a")
    with pytest.raises(FileNotFoundError):
        read_samples(tmp_path / "missing.h5")
    empty = tmp_path / "empty.h5"
    SampleWriter(empty, dim=2, provenance={}).close()
    assert read_samples(empty).n == 0


def test_resume_appends(tmp_path):
    path = tmp_path / "s.h5"
    with SampleWriter(path, dim=2, provenance={"run": 1}) as w:
        w.append(np.ones((3, 2)), log_q=np.zeros(3))
    with SampleWriter(path, dim=2, provenance={"ignored": True}, mode="a") as w:
        w.append(2 * np.ones((2, 2)), log_q=np.zeros(2))
    s = read_samples(path)
    assert s.n == 5 and s.x[:, 0].tolist() == [1, 1, 1, 2, 2] and s.provenance == {"run": 1}


_WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from boltzflow.io.samples import SampleWriter

    w = SampleWriter(sys.argv[1], dim=66, provenance={"test": "kill"})
    i = 0
    while True:
        rows = 500
        w.append(np.full((rows, 66), float(i)), log_q=np.full(rows, float(i)), nfe=np.full(rows, i))
        i += 1
        if i == 3:
            print("ready", flush=True)
    """
)


def test_killed_writer_leaves_readable_file_with_complete_chunks(tmp_path):
    path = tmp_path / "killed.h5"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3)  # let it write more chunks, then kill it mid-stream
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    with pytest.raises(PartialFileError, match="partial file"):
        read_samples(path)
    s = read_samples(path, allow_partial=True)
    assert not s.complete
    n_chunks = s.n // 500
    assert s.n % 500 == 0 and n_chunks >= 3
    expected = np.repeat(np.arange(n_chunks, dtype=float), 500)
    assert np.array_equal(s.x[:, 0], expected) and np.array_equal(s.x[:, -1], expected)
    assert np.array_equal(s.log_q, expected)
    assert np.array_equal(s.columns["nfe"], expected.astype(int))
    # the interrupted store can be continued
    with SampleWriter(path, dim=66, provenance={}, mode="a") as w:
        w.append(np.zeros((10, 66)), log_q=np.zeros(10), nfe=np.zeros(10, dtype=int))
    resumed = read_samples(path)
    assert resumed.n == s.n + 10 and resumed.complete


def test_atomic_write_uses_default_permissions(tmp_path):
    import os

    from boltzflow.io.atomic import atomic_write_text

    umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
