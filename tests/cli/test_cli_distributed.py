"""``boltzflow sample`` and ``reweight`` unchanged under ``torchrun --nproc_per_node=2`` (gloo).

Sampling writes one shard per rank and a manifest; reweighting the shards on 2 ranks gives the
report of one process on their union (N, ESS, log Z with delta and bootstrap intervals, mean
energy; to 1e-10). A rank that raises or is killed ends the job with a clear error within the
bounded timeout, and every shard written so far stays readable.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from dist_helpers import torchrun
from tiny_teacher import dw4_like_teacher

from boltzflow.cli import main
from boltzflow.io.samples import read_samples
from boltzflow.io.shards import read_manifest, resolve_sample_files


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained DW4-shaped teacher (EGNN 1 x 8, RK4 with 2 steps)."""
    return dw4_like_teacher(
        tmp_path_factory.mktemp("dist") / "teacher", {"method": "rk4", "steps": 2}
    )


CLI = Path(__file__).with_name("torchrun_cli.py")


def _close(a: object, b: object, path: str = "") -> None:
    if isinstance(a, dict):
        for k in a.keys() & b.keys():
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, float) and isinstance(b, float):
        assert abs(a - b) <= 1e-10 * max(1.0, abs(b)), f"{path}: {a} vs {b}"
    elif not isinstance(a, (list, str)):
        assert a == b, f"{path}: {a!r} vs {b!r}"


@pytest.mark.timeout(200)
def test_sample_and_reweight_on_two_ranks(teacher: Path, tmp_path: Path) -> None:
    out = tmp_path / "s.h5"
    opts = ["--system", "dw4", "--n-bootstrap", "20", "--seed", "2"]
    sample = ["sample", str(teacher), "-n", "61", "-o", str(out), "--batch-size", "16"]
    reweight = ["reweight", str(out), "-o", str(tmp_path / "r2"), *opts]
    run = torchrun([str(CLI), *sample, ":::", *reweight])  # one job, one start-up
    assert run.returncode == 0, run.stderr[-3000:]
    assert "wrote 61 samples to 2 shards" in run.stdout and "ESS/N" in run.stdout
    manifest = read_manifest(tmp_path / "s.shards.json")
    assert manifest["complete"] and manifest["world_size"] == 2 and manifest["n"] == 61
    shards = [read_samples(s["file"]) for s in manifest["shards"]]
    assert [s.n for s in shards] == [31, 30]
    assert [s.provenance["rank"] for s in shards] == [0, 1]
    assert shards[0].provenance["seed"] != shards[1].provenance["seed"]  # rank-derived seeds
    assert not np.allclose(shards[0].x[:10], shards[1].x[:10])
    assert resolve_sample_files(out) == [s.path.absolute() for s in shards]

    files = [str(s.path) for s in shards]
    assert main(["reweight", *files, "-o", str(tmp_path / "r1"), *opts]) == 0
    two = json.loads((tmp_path / "r2" / "report.json").read_text())["results"]
    one = json.loads((tmp_path / "r1" / "report.json").read_text())["results"]
    assert two["weights"]["N"] == one["weights"]["N"] == 61
    _close(two["weights"], one["weights"], "weights")
    _close(two["energy"], one["energy"], "energy")


FAILING = Path(__file__).with_name("failing_sampler.py")


@pytest.mark.timeout(200)
@pytest.mark.parametrize("how", ["raise", pytest.param("kill", marks=pytest.mark.slow)])
def test_a_failing_rank_ends_the_job(teacher: Path, tmp_path: Path, how: str) -> None:
    out = tmp_path / "s.h5"
    start = time.monotonic()
    run = torchrun([str(FAILING), how, str(teacher), str(out)])
    seconds = time.monotonic() - start
    assert run.returncode != 0
    assert seconds < 60, f"the job took {seconds:.0f} s to end"
    if how == "raise":
        assert "boltzflow sample (rank 1 of 2): error: injected failure" in run.stderr
    else:
        assert "Signal 9" in run.stderr or "SIGKILL" in run.stderr
    manifest = read_manifest(tmp_path / "s.shards.json")
    assert not manifest["complete"]
    # what was written so far stays readable: rank 1 its two batches, rank 0 whatever it had
    first, second = (read_samples(s["file"], allow_partial=True) for s in manifest["shards"])
    assert second.n == 2 * 25 and not second.complete
    assert first.n >= 25 and first.n % 25 == 0 and np.isfinite(first.log_w).all()


STUDENT_CONFIG = Path(__file__).resolve().parents[2] / "workflows/configs/student_f2d2_dw4.toml"


@pytest.mark.timeout(200)
def test_distill_on_two_ranks(teacher: Path, tmp_path: Path) -> None:
    """``boltzflow distill --method f2d2`` trains with DDP (rank 0 prints and writes; the loss
    curve is the one-process one, see tests/distill/test_distributed_students.py for the
    tolerance); ``--method nf`` refuses torchrun and says why."""
    common = ["--config", str(STUDENT_CONFIG), "--profile", "smoke"]
    f2d2 = ["distill", str(teacher), "--method", "f2d2", "-o", str(tmp_path / "two"), *common]
    nf = ["distill", str(teacher), "--method", "nf", "-o", str(tmp_path / "nf")]
    run = torchrun([str(CLI), *f2d2, ":::", *nf])
    assert run.returncode != 0
    assert run.stdout.count("distilled f2d2 student") == 1, run.stderr[-3000:]
    assert "--method nf does not run under torchrun (2 ranks)" in run.stderr
    assert not (tmp_path / "nf").exists()
    one = tmp_path / "one"
    assert main(["distill", str(teacher), "--method", "f2d2", "-o", str(one), *common]) == 0
    curves = []
    for folder in (tmp_path / "two", one):
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        curves.append([json.loads(line)["loss"] for line in lines])
    assert len(curves[0]) == len(curves[1]) == 3
    assert max(abs(a - b) / abs(b) for a, b in zip(*curves)) < 1e-5, curves
