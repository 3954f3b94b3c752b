"""``workflows/nf_distillation_aldp.py`` end to end on a tiny configuration: the shipped ALDP NF as
the teacher, a 2-block width-16 student, a few steps on 300 frames, two seeds (seconds).

The frames are samples of the shipped NF itself (training and held-out sets from different
sampling seeds) written as ``.npy``: the script's own data loading, training of both arms,
held-out NLL, ESS/N with the torch energy, paired differences and JSON are the real ones.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("openmm")

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "workflows" / "nf_distillation_aldp.py"


def _module():
    spec = importlib.util.spec_from_file_location("nf_distillation_aldp", WORKFLOW)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_paired_results(tmp_path):
    from boltzflow.registry.loading import load_model

    teacher = load_model(ROOT / "models" / "aldp-nf-internal", system="aldp")
    for name, seed, n in (("train", 11, 300), ("heldout", 12, 100)):
        x, _ = teacher.sample(n, seed=seed)
        np.save(tmp_path / f"{name}.npy", x.double().numpy())
    args = ["--data", str(tmp_path / "train.npy"), "--heldout", str(tmp_path / "heldout.npy")]
    args += ["-o", str(tmp_path / "run"), "--seeds", "0", "1", "--blocks", "2", "--hidden", "16"]
    args += ["--steps", "4", "--batch-size", "32", "--n-samples", "200"]
    args += ["--threads", str(torch.get_num_threads())]  # leave the process's setting as it is
    result = _module().main(args)

    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["parameter_ratio"] >= 4
    assert saved["n_heldout_frames"] == 100 and saved["n_train_frames"] == 300
    assert "torch backend" in saved["energy"]
    seeds = saved["per_seed"]
    assert set(seeds) == {"0", "1"}
    for s in seeds.values():
        rows = s["rows"]
        assert set(rows) == {"teacher", "distilled", "scratch"}
        for r in rows.values():
            assert math.isfinite(r["nll"]) and 0 < r["ess_fraction"] <= 1
            assert r["n_samples"] == 200
        assert s["nll_diff"] == pytest.approx(rows["distilled"]["nll"] - rows["scratch"]["nll"])
        # the distillation terms change the student (the arms share everything else)
        assert rows["distilled"]["nll"] != rows["scratch"]["nll"]
        # a few steps from the identity: the students sit far above the teacher
        assert rows["teacher"]["nll"] < min(rows["distilled"]["nll"], rows["scratch"]["nll"])
    # the teacher's held-out NLL does not depend on the seed; its ESS/N does (sampling seed)
    assert seeds["0"]["rows"]["teacher"]["nll"] == seeds["1"]["rows"]["teacher"]["nll"]
    diffs = [s["nll_diff"] for s in seeds.values()]
    summary = result["summary"]["nll_distilled_minus_scratch"]
    assert summary["mean"] == pytest.approx(float(np.mean(diffs)))
    assert summary["se"] == pytest.approx(float(np.std(diffs, ddof=1) / math.sqrt(2)))

    # a second call resumes: the finished students are loaded, not retrained
    again = _module().main(args)
    for s in ("0", "1"):
        for arm in ("distilled", "scratch"):
            row = again["per_seed"][s]["rows"][arm]
            assert math.isnan(row["train_wall_s"])
            assert row["nll"] == pytest.approx(seeds[s]["rows"][arm]["nll"], abs=1e-6)
