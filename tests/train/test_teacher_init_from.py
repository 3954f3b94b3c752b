"""``model.init_from``: a finished teacher's weights start a new run (another schedule)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from tiny_teacher import SHAPE, tiny_config, tiny_data

from boltzflow.flows.cnf import TeacherCNF
from boltzflow.train.teacher import train_teacher


def _with(cfg, **model):
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model))


def test_a_run_starts_from_a_finished_teachers_weights(tmp_path: Path) -> None:
    moved = tiny_config(8)  # large steps, no EMA: the weights move away from initialisation
    moved = dataclasses.replace(moved, train=dataclasses.replace(moved.train, lr=1e-2, ema_decay=0))
    first = train_teacher(moved, tiny_data(), tmp_path / "a", SHAPE, progress=False)
    cfg = _with(tiny_config(2), init_from=str(tmp_path / "a"))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=1e-12))
    second = train_teacher(cfg, tiny_data(), tmp_path / "b", SHAPE, progress=False)
    fresh = train_teacher(
        dataclasses.replace(tiny_config(2), train=cfg.train),
        tiny_data(),
        tmp_path / "c",
        SHAPE,
        progress=False,
    )
    differ = 0
    for (name, a), b, c in zip(
        first.state_dict().items(),
        second.state_dict().values(),
        fresh.state_dict().values(),
        strict=True,
    ):
        torch.testing.assert_close(b, a, atol=1e-9, rtol=0, msg=name)  # lr ~ 0: unchanged
        differ += int(not torch.allclose(c, a))
    assert differ > 10  # without init_from the weights are others (a few get no gradient)
    run = TeacherCNF.load(tmp_path / "b" / "teacher.pt")
    assert run.model_config == first.model_config


def test_a_teacher_of_another_architecture_is_refused(tmp_path: Path) -> None:
    train_teacher(tiny_config(2), tiny_data(), tmp_path / "a", SHAPE, progress=False)
    wider = _with(tiny_config(2), hidden=16, init_from=str(tmp_path / "a"))
    with pytest.raises(ValueError, match="backbone_options"):
        train_teacher(wider, tiny_data(), tmp_path / "b", SHAPE, progress=False)
    missing = _with(tiny_config(2), init_from=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError):
        train_teacher(missing, tiny_data(), tmp_path / "c", SHAPE, progress=False)
    with pytest.raises(ValueError, match="init_from must be a path"):
        _with(tiny_config(2), init_from=3)


def test_init_from_survives_the_config_round_trip() -> None:
    from boltzflow.train.config import TeacherConfig, load_teacher_config

    cfg = TeacherConfig.from_dict({"model": {"backbone": "egnn", "init_from": "runs/t"}})
    assert cfg.model.init_from == "runs/t" and TeacherConfig.from_dict(cfg.to_dict()) == cfg
    assert "init_from" not in TeacherConfig().to_dict()["model"]  # older runs' records unchanged
    lj13 = Path(__file__).resolve().parents[2] / "workflows/configs/teacher_lj13.toml"
    assert load_teacher_config(lj13, "cpu2h_more").model.init_from == "runs/lj13_teacher_5x64"
