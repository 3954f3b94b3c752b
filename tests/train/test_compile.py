"""``train.compile``: the teacher's flow-matching loss run through torch.compile."""

from __future__ import annotations

import pytest
import torch
from tiny_teacher import SHAPE, tiny_config, tiny_data

from boltzflow.io.checkpoint import load_checkpoint
from boltzflow.train.config import TrainConfig
from boltzflow.train.teacher import TeacherLoss, build_teacher, train_teacher
from boltzflow.train.trainer import Trainer


def test_compiled_loss_and_gradients_match_eager():
    cfg = tiny_config(1)
    torch.manual_seed(0)
    teacher = build_teacher(cfg, SHAPE)
    loss = TeacherLoss(teacher, tiny_data(), cfg, SHAPE)
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
    cfg = tiny_config(6)
    cfg.train.compile = True
    cfg.train.data_workers = 1
    train_teacher(cfg, tiny_data(), tmp_path / "split", SHAPE, progress=False, stop_at=3)
    train_teacher(cfg, tiny_data(), tmp_path / "split", SHAPE, progress=False)
    cfg.train.data_workers = 0
    train_teacher(cfg, tiny_data(), tmp_path / "whole", SHAPE, progress=False)
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
    cfg = tiny_config(2)
    cfg.train.compile = True
    with pytest.raises(ValueError, match="needs a C\\+\\+ compiler on PATH"):
        train_teacher(cfg, tiny_data(), tmp_path / "run", SHAPE, progress=False)
