"""``train.compile``: the teacher's flow-matching loss run through torch.compile."""

from __future__ import annotations

import pytest
import torch

from boltzflow.train.checkpoint import load_checkpoint
from boltzflow.train.config import TeacherConfig, TrainConfig
from boltzflow.train.teacher import SystemShape, TeacherLoss, build_teacher, train_teacher
from boltzflow.train.trainer import Trainer

SHAPE = SystemShape(dim=8, n_particles=4, spatial_dim=2, mean_free=True)


def _config(steps: int) -> TeacherConfig:
    return TeacherConfig.from_dict(
        {
            "model": {"backbone": "egnn", "hidden": 8, "layers": 1},
            "train": {
                "steps": steps,
                "batch_size": 16,
                "warmup_steps": 2,
                "log_every": 2,
                "checkpoint_every": steps,
                "seed": 3,
            },
        }
    )


def _data() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    base = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, -2.0]]).reshape(1, 8)
    return base + 0.3 * torch.randn(100, 8, generator=gen)


def test_compiled_loss_and_gradients_match_eager():
    cfg = _config(1)
    torch.manual_seed(0)
    teacher = build_teacher(cfg, SHAPE)
    loss = TeacherLoss(teacher, _data(), cfg, SHAPE)
    batch = loss.make_batch(0)
    results = []
    for fn in (loss.batch_loss, torch.compile(loss.batch_loss)):
        teacher.zero_grad()
        value = fn(teacher, batch)
        value.backward()
        grads = {n: p.grad.clone() for n, p in teacher.named_parameters() if p.grad is not None}
        results.append((value.detach(), grads))
    (eager, g_eager), (compiled, g_compiled) = results
    # float32 with reordered reductions: agreement to a few units in the last place
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=0)
    assert g_compiled.keys() == g_eager.keys() and g_eager
    for name, grad in g_eager.items():
        torch.testing.assert_close(g_compiled[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_training_runs_with_workers_and_resumes(tmp_path):
    cfg = _config(6)
    cfg.train.compile = True
    cfg.train.data_workers = 1
    train_teacher(cfg, _data(), tmp_path / "split", SHAPE, progress=False, stop_at=3)
    train_teacher(cfg, _data(), tmp_path / "split", SHAPE, progress=False)
    cfg.train.data_workers = 0
    train_teacher(cfg, _data(), tmp_path / "whole", SHAPE, progress=False)
    split = load_checkpoint(tmp_path / "split" / "checkpoint.pt", kind="training")
    whole = load_checkpoint(tmp_path / "whole" / "checkpoint.pt", kind="training")
    assert split["step"] == whole["step"] == 6
    for name, value in whole["model"].items():
        assert torch.equal(value, split["model"][name]), f"{name} differs"


def test_compile_needs_a_batched_loss(tmp_path):
    def loss(model, generator, step):
        return model.weight.sum()

    with pytest.raises(ValueError, match=r"train\.compile needs a loss whose batches"):
        Trainer(
            torch.nn.Linear(2, 2),
            loss,
            TrainConfig(compile=True),
            tmp_path,
            model_kind="toy",
            model_config={},
        )


def test_compile_on_cpu_without_a_compiler_is_refused_up_front(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++ / clang++ there
    monkeypatch.delenv("CXX", raising=False)
    cfg = _config(2)
    cfg.train.compile = True
    with pytest.raises(ValueError, match="needs a C\\+\\+ compiler on PATH"):
        train_teacher(cfg, _data(), tmp_path / "run", SHAPE, progress=False)
