"""``boltzflow run`` of the tiny quickstart on 2 ranks (torchrun, gloo), from scratch.

Rank 0 owns the folder, the manifest and the report; both ranks train the teacher and the
F2D2 and FALCON students (DDP; rank 0 makes the teacher trajectories) and draw the samples (one
shard each, merged by rank 0 into the stage's file). The keys of the stages whose inputs are the
same as those of a 1-process run (the data and, reading the same data, the teacher) equal that
run's, and a 1-process run in the 2-rank folder is up to date throughout.
"""

from __future__ import annotations

import json

import pytest
from dist_helpers import torchrun
from quickstart_tiny import TINY, set_args
from test_workflow_pipeline import QUICKSTART, ROOT, STAGES, _run

from boltzflow.io.samples import read_samples
from boltzflow.workflow.cache import MANIFEST_FILE


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_workflow_on_two_ranks(tmp_path):
    out = tmp_path / "two"
    cli = ROOT / "tests" / "cli" / "torchrun_cli.py"
    args = ["run", str(QUICKSTART), "-o", str(out), "--no-progress", *set_args(TINY)]
    run = torchrun([str(cli), *args], timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "| teacher |" in run.stdout  # the report table, printed once by rank 0
    assert run.stdout.count("[1/9] data: running") == 1
    samples = read_samples(out / "samples" / "teacher.h5")
    assert samples.n == TINY["sample.n"] and samples.provenance["world_size"] == 2
    assert not any(p.name.startswith(".") for p in (out / "samples").iterdir())  # shards gone
    two = json.loads((out / MANIFEST_FILE).read_text())["stages"]
    assert set(two) >= STAGES

    one_dir = tmp_path / "one"
    _run(one_dir)
    one = json.loads((one_dir / MANIFEST_FILE).read_text())["stages"]
    assert two["data"]["key"] == one["data"]["key"]
    assert two["teacher"]["key"] == one["teacher"]["key"]
    assert {r.status for r in _run(out).results} == {"cached"}
