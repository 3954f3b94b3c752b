"""Checkpoints (atomic, checksummed, clear errors) and exact resume of the shared training loop."""

from __future__ import annotations

import json
import math
import multiprocessing

import pytest
import torch
from tiny_teacher import SHAPE, tiny_config, tiny_data

from boltzflow.flows.cnf import TeacherCNF
from boltzflow.io.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model_checkpoint,
    save_checkpoint,
)
from boltzflow.train.config import TeacherConfig, TrainConfig
from boltzflow.train.teacher import SystemShape, train_teacher
from boltzflow.train.trainer import EMA, BatchedLoss, Trainer, lr_factor


def _payload() -> dict:
    return {"kind": "test", "weights": torch.arange(1000.0), "meta": {"a": [1, 2], "b": None}}


def test_round_trip_records_versions(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", _payload())
    out = load_checkpoint(path, kind="test")
    assert torch.equal(out["weights"], torch.arange(1000.0))
    assert out["meta"] == {"a": [1, 2], "b": None}
    assert out["package_version"] and out["torch_version"] and out["format_version"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary files left


def test_truncated_file_is_reported(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", _payload())
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


def test_corrupt_byte_is_reported(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", _payload())
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def test_model_checkpoint_from_file_folder_or_training_state(tmp_path):
    model_w, raw_w, ema_w = torch.zeros(2), torch.ones(2), torch.full((2,), 2.0)
    kw = {"kind": "toy", "files": ("toy.pt", "checkpoint.pt"), "label": "toy model"}
    with pytest.raises(FileNotFoundError, match=r"no toy.pt or checkpoint.pt in the folder"):
        load_model_checkpoint(tmp_path, **kw)
    save_checkpoint(
        tmp_path / "checkpoint.pt",
        {"kind": "training", "model_kind": "toy", "model": {"w": raw_w}, "ema": {"w": ema_w}},
    )
    path, payload, state = load_model_checkpoint(tmp_path, **kw)
    assert path == tmp_path / "checkpoint.pt" and payload["kind"] == "training"
    assert torch.equal(state["w"], ema_w)
    assert torch.equal(load_model_checkpoint(tmp_path, weights="raw", **kw)[2]["w"], raw_w)
    with pytest.raises(ValueError, match="weights must be 'ema' or 'raw', got 'best'"):
        load_model_checkpoint(tmp_path, weights="best", **kw)
    with pytest.raises(ValueError, match=r"checkpoint.pt: .* of a 'toy' model, not a other"):
        load_model_checkpoint(tmp_path, kind="other", files=kw["files"], label="other")
    save_checkpoint(tmp_path / "toy.pt", {"kind": "toy", "state_dict": {"w": model_w}})
    path, payload, state = load_model_checkpoint(tmp_path, **kw)  # the model file comes first
    assert path == tmp_path / "toy.pt" and torch.equal(state["w"], model_w)


def test_other_files_kinds_and_versions_are_rejected(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"x": 1}, plain)
    with pytest.raises(CheckpointError, match="not a boltzflow checkpoint"):
        load_checkpoint(plain)
    path = save_checkpoint(tmp_path / "c.pt", _payload())
    with pytest.raises(CheckpointError, match="kind 'test'"):
        load_checkpoint(path, kind="training")
    raw = path.read_bytes().replace(b"CHECKPOINT 1 ", b"CHECKPOINT 9 ", 1)
    path.write_bytes(raw)
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
    assert issubclass(CheckpointError, ValueError)  # the CLI prints it as a one-line error


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, cfg) == pytest.approx(0.1)


def test_ema_update_rule():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # decay_1 = min(0.9, 2/11)
    d = 2 / 11
    assert float(ema.shadow["weight"]) == pytest.approx(1 - d)


def _state(path):
    return load_checkpoint(path / "checkpoint.pt", kind="training")


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path):
    data, cfg = tiny_data(), tiny_config()
    train_teacher(cfg, data, tmp_path / "full", SHAPE, progress=False)
    train_teacher(cfg, data, tmp_path / "split", SHAPE, progress=False, stop_at=4)
    assert _state(tmp_path / "split")["step"] == 4
    assert not (tmp_path / "split" / "teacher.pt").exists()  # unfinished runs write no model
    train_teacher(cfg, data, tmp_path / "split", SHAPE, progress=False)  # resumes at step 4
    full, split = _state(tmp_path / "full"), _state(tmp_path / "split")
    assert full["step"] == split["step"] == 8
    for key in ("model", "ema"):
        for name, value in full[key].items():
            assert torch.equal(value, split[key][name]), f"{key}.{name} differs after resume"
    for a, b in zip(full["optimizer"]["state"].values(), split["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    metrics = [
        json.loads(line) for line in (tmp_path / "split/metrics.jsonl").read_text().splitlines()
    ]
    assert [m["step"] for m in metrics] == [2, 4, 6, 8]
    teacher = TeacherCNF.load(tmp_path / "split")
    assert teacher.sampling["method"] == "rk4"
    raw = TeacherCNF.load(tmp_path / "split" / "checkpoint.pt", weights="raw")
    assert torch.equal(
        raw.net.layers[0].edge_in.weight, split["model"]["net.layers.0.edge_in.weight"]
    )


def test_resume_with_changed_config_names_the_key(tmp_path):
    data = tiny_data()
    train_teacher(tiny_config(), data, tmp_path, SHAPE, progress=False, stop_at=2)
    changed = tiny_config()
    changed.train.lr = 1e-3
    with pytest.raises(ValueError, match=r"train\.lr"):
        train_teacher(changed, data, tmp_path, SHAPE, progress=False)


def test_corrupt_training_checkpoint_gives_a_clear_error(tmp_path):
    data = tiny_data()
    train_teacher(tiny_config(), data, tmp_path, SHAPE, progress=False, stop_at=2)
    ckpt = tmp_path / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        train_teacher(tiny_config(), data, tmp_path, SHAPE, progress=False)


def test_trainer_rejects_non_finite_loss(tmp_path):
    model = torch.nn.Linear(2, 2)

    def loss(m, gen, step):
        return m.weight.sum() * float("nan")

    trainer = Trainer(
        model, loss, TrainConfig(steps=3), tmp_path, model_kind="toy", model_config={}
    )
    with pytest.raises(FloatingPointError, match="step 0"):
        trainer.fit(resume=False)


def test_teacher_learns_a_gaussian(tmp_path):
    """End to end at toy size: an MLP teacher trained on N(mu, diag(s^2)) in 2D gets ESS/N > 0.9
    against the exact density, and its NLL exceeds the exact NLL by less than 0.05 nats."""
    mu, s = torch.tensor([1.5, -0.5]), torch.tensor([0.5, 1.2])
    data = mu + s * torch.randn(4000, 2, generator=torch.Generator().manual_seed(0))
    cfg = TeacherConfig.from_dict(
        {
            "model": {"backbone": "mlp", "hidden": 32, "layers": 2},
            "flow_matching": {"coupling": "ot"},
            "train": {
                "steps": 600,
                "batch_size": 128,
                "lr": 2e-3,
                "warmup_steps": 50,
                "log_every": 600,
                "checkpoint_every": 600,
                "ema_decay": 0.99,
            },
        }
    )
    teacher = train_teacher(cfg, data, tmp_path, SystemShape(dim=2), progress=False)
    x, log_q = teacher.sample(2000, seed=0, atol=1e-6, rtol=1e-6)
    target = torch.distributions.Normal(mu, s)
    log_w = target.log_prob(x).sum(-1) - log_q
    ess = float(torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0))) / 2000
    assert ess > 0.9, f"ESS/N {ess:.3f}"
    # NLL - exact NLL on the same points estimates KL(p || q) >= 0 with a small standard error
    diff = target.log_prob(data[:500]).sum(-1) - teacher.log_prob(data[:500], atol=1e-6, rtol=1e-6)
    kl, se = float(diff.mean()), float(diff.std() / math.sqrt(500))
    assert -4 * se < kl < 0.05, f"KL(p||q) estimate {kl:.4f} ± {se:.4f}, expected in [0, 0.05)"


def test_background_workers_change_nothing_but_speed(tmp_path):
    """Batches built by worker processes are the batches the loop would build itself, also
    across a resume that changes the number of workers."""
    data, cfg = tiny_data(), tiny_config()
    train_teacher(cfg, data, tmp_path / "inline", SHAPE, progress=False)
    cfg.train.data_workers = 1
    train_teacher(cfg, data, tmp_path / "split", SHAPE, progress=False, stop_at=4)
    cfg.train.data_workers = 2
    train_teacher(cfg, data, tmp_path / "split", SHAPE, progress=False)
    inline, split = _state(tmp_path / "inline"), _state(tmp_path / "split")
    for key in ("model", "ema"):
        for name, value in inline[key].items():
            assert torch.equal(value, split[key][name]), f"{key}.{name} differs with workers"


class _FailsAtStep3:
    """A picklable batched loss whose loss evaluation raises at step 3."""

    def __init__(self) -> None:
        self.steps_seen: list[int] = []

    def make_batch(self, step: int) -> torch.Tensor:
        return torch.full((4, 2), float(step))

    def batch_loss(self, model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        step = int(batch[0, 0])
        self.steps_seen.append(step)
        if step == 3:
            raise RuntimeError("boom at step 3")
        return model(batch).pow(2).mean()


def test_workers_stop_when_the_loop_raises(tmp_path):
    loss = _FailsAtStep3()
    assert isinstance(loss, BatchedLoss)
    cfg = TrainConfig(steps=50, data_workers=2, log_every=1, checkpoint_every=1)
    trainer = Trainer(torch.nn.Linear(2, 2), loss, cfg, tmp_path, model_kind="toy", model_config={})
    with pytest.raises(RuntimeError, match="boom at step 3"):
        trainer.fit(resume=False)
    assert loss.steps_seen == [0, 1, 2, 3]  # in order, none skipped
    assert trainer.step == 3
    assert multiprocessing.active_children() == []


def test_negative_worker_count_is_rejected():
    with pytest.raises(ValueError, match=r"train\.data_workers must be an integer >= 0, got -1"):
        TrainConfig(data_workers=-1)
