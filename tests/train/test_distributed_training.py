"""DDP training of the teacher on 2 gloo ranks follows the one-process loss curve.

Both runs use the same global batch (16 rows; 8 per rank under DDP), seed and configuration
(:func:`tiny_teacher.tiny_config`, 8 steps). Under DDP each rank evaluates the flow-matching
loss on its half of the same global batch and the gradients are averaged, which is the
gradient of the global batch's mean loss, so the two runs differ only in float32 rounding:
summation order inside the smaller matrix products and in the all-reduce. A single float32
rounding is ~6e-8 relative; such differences pass through 8 AdamW steps, whose normalised
updates do not amplify them by more than a few orders of magnitude at this step count, so the
loss curves must agree to 1e-5 relative (measured: 6.9e-8, about one float32 rounding; the
weights differ by 3e-8). The training state is otherwise identical: rank 0 alone writes
the checkpoint and metrics, and a 2-rank run stopped at step 4 and resumed equals the
uninterrupted 2-rank run exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_helpers import spawn_ranks
from tiny_teacher import SHAPE, tiny_config, tiny_data

from boltzflow.io.checkpoint import load_checkpoint
from boltzflow.train.teacher import train_teacher

STEPS = 8


def _losses(folder: Path) -> list[float]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def _train(rank: int, root: str) -> None:
    cfg, data = tiny_config(STEPS), tiny_data()
    train_teacher(cfg, data, Path(root, "ddp"), SHAPE, progress=False)
    train_teacher(cfg, data, Path(root, "ddp_resumed"), SHAPE, progress=False, stop_at=4)
    train_teacher(cfg, data, Path(root, "ddp_resumed"), SHAPE, progress=False)


@pytest.mark.timeout(150)
def test_ddp_matches_one_process(tmp_path: Path) -> None:
    spawn_ranks(_train, str(tmp_path))
    one = train_teacher(tiny_config(STEPS), tiny_data(), tmp_path / "one", SHAPE, progress=False)
    single, ddp = _losses(tmp_path / "one"), _losses(tmp_path / "ddp")
    assert len(single) == len(ddp) == STEPS // 2
    rel = max(abs(a - b) / abs(b) for a, b in zip(ddp, single))
    assert rel < 1e-5, f"loss curves differ by {rel:.2e} (relative): {ddp} vs {single}"
    # rank 0 wrote one model file; its weights are the one-process weights up to rounding
    two = load_checkpoint(tmp_path / "ddp" / "teacher.pt")["state_dict"]
    for key, value in one.state_dict().items():
        torch.testing.assert_close(two[key], value, rtol=1e-4, atol=1e-6, msg=key)
    # stopped at step 4 and resumed on 2 ranks: exactly the uninterrupted 2-rank run
    assert _losses(tmp_path / "ddp_resumed") == ddp
    resumed = load_checkpoint(tmp_path / "ddp_resumed" / "teacher.pt")
    for key, value in resumed["state_dict"].items():
        assert torch.equal(value, two[key]), key
