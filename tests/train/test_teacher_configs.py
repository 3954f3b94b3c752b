"""TOML configs: every workflow config/profile loads; unknown keys and bad values are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from boltzflow.train.config import (
    TeacherConfig,
    TrainConfig,
    dataclass_from_dict,
    load_teacher_config,
)

CONFIGS = sorted(
    (Path(__file__).resolve().parents[2] / "workflows" / "configs").glob("teacher_*.toml")
)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
@pytest.mark.parametrize("profile", [None, "smoke", "gpu"])
def test_workflow_configs_load(path, profile):
    cfg = load_teacher_config(path, profile)
    # the internal-coordinate config names no system: it fits either ALDP force field
    assert cfg.system in ({None} if path.stem.endswith("_internal") else {"dw4", "lj13", "aldp"})
    if profile == "gpu":
        assert cfg.train.device == "cuda"
    if profile == "smoke":
        assert cfg.train.steps <= 10


def test_all_three_teacher_configs_exist():
    assert {p.stem for p in CONFIGS} >= {"teacher_dw4", "teacher_lj13", "teacher_aldp"}


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_unknown_keys_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"train: unknown key 'lrr'"):
        load_teacher_config(_write(tmp_path, "[train]\nlrr = 1e-3\n"))
    with pytest.raises(ValueError, match="unknown key 'modle'"):
        load_teacher_config(_write(tmp_path, "[modle]\nhidden = 3\n"))
    with pytest.raises(ValueError, match=r"'heads'.*not used by backbone 'egnn'"):
        load_teacher_config(_write(tmp_path, "[model]\nbackbone = 'egnn'\nheads = 2\n"))


def test_bad_values_and_profiles_are_named(tmp_path):
    with pytest.raises(TypeError, match=r"train\.steps: expected integer"):
        load_teacher_config(_write(tmp_path, "[train]\nsteps = 'many'\n"))
    with pytest.raises(ValueError, match=r"sample\.method 'rk5'"):
        load_teacher_config(_write(tmp_path, "[sample]\nmethod = 'rk5'\n"))
    with pytest.raises(ValueError, match=r"needs sample\.steps"):
        load_teacher_config(_write(tmp_path, "[sample]\nmethod = 'euler'\n"))
    with pytest.raises(ValueError, match="coupling"):
        load_teacher_config(_write(tmp_path, "[flow_matching]\ncoupling = 'sinkhorn'\n"))
    path = _write(tmp_path, "[train]\nsteps = 5\n[profiles.fast.train]\nsteps = 2\n")
    assert load_teacher_config(path, "fast").train.steps == 2
    with pytest.raises(ValueError, match=r"no profile 'slow'; defined: \['fast'\]"):
        load_teacher_config(path, "slow")
    with pytest.raises(ValueError, match="invalid TOML"):
        load_teacher_config(_write(tmp_path, "[train\n"))
    with pytest.raises(FileNotFoundError):
        load_teacher_config(tmp_path / "missing.toml")


def test_dict_round_trip_and_int_to_float():
    cfg = TeacherConfig.from_dict({"train": {"lr": 1, "steps": 3}})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert TeacherConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"train\.steps must be a positive integer, got 0"):
        dataclass_from_dict(TrainConfig, {"steps": 0}, "train")


def test_train_config_set_given_skips_unset_options():
    cfg = TrainConfig(steps=7, seed=3)
    cfg.set_given(steps=None, seed=5, device="cuda")
    assert (cfg.steps, cfg.seed, cfg.device) == (7, 5, "cuda")
    with pytest.raises(TypeError, match="no field 'stepz'"):
        cfg.set_given(stepz=1)
    with pytest.raises(ValueError, match=r"train\.steps must be a positive integer, got 0"):
        cfg.set_given(steps=0)  # as a config file's steps = 0: never an untrained model
