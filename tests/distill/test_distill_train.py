"""End-to-end distillation on small problems: a 2-D toy teacher distilled into F2D2 and FALCON
(in seconds), the ``distill``/``sample`` commands on a tiny DW4-shaped teacher, configs."""

from __future__ import annotations

import importlib.util
import json
import math
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_teacher import dw4_like_teacher, smoke_f2d2

from boltzflow.cli import main
from boltzflow.distill import EulerBaseline, load_student
from boltzflow.distill.f2d2 import F2D2LossConfig
from boltzflow.distill.falcon import FALCONLossConfig
from boltzflow.distill.train_students import (
    StudentConfig,
    StudentOptions,
    TrajectoryConfig,
    _draw_pairs,
    build_student,
    load_student_config,
    student_loss,
    train_student,
)
from boltzflow.flows.cnf import TeacherCNF
from boltzflow.io.samples import read_samples
from boltzflow.train.config import FlowMatchingConfig, ModelConfig, TeacherConfig, TrainConfig
from boltzflow.train.teacher import SystemShape, train_teacher
from boltzflow.train.trainer import BatchedLoss

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "workflows" / "configs").glob("student_*.toml"))


def _toy_data(n: int = 2000) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[-2.0, 0.0], [2.0, 0.5]])
    return centres[torch.randint(0, 2, (n,), generator=g)] + 0.5 * torch.randn(n, 2, generator=g)


@pytest.fixture(scope="module")
def toy_teacher(tmp_path_factory: pytest.TempPathFactory) -> TeacherCNF:
    cfg = TeacherConfig(
        model=ModelConfig(backbone="mlp", hidden=32, layers=2),
        flow_matching=FlowMatchingConfig(coupling="ot"),
        train=TrainConfig(steps=300, batch_size=128, lr=3e-3, warmup_steps=10, log_every=100),
    )
    out = tmp_path_factory.mktemp("toy_teacher")
    return train_teacher(cfg, _toy_data(), out, SystemShape(dim=2), progress=False)


def _config(method: str, steps: int = 100, signed: bool = True) -> StudentConfig:
    return StudentConfig(
        method=method,
        student=StudentOptions(signed=signed),
        loss=F2D2LossConfig(semigroup=0.5) if method == "f2d2" else FALCONLossConfig(),
        trajectories=TrajectoryConfig(n=512, grid=4, atol=1e-4, rtol=1e-4, batch_size=512),
        train=TrainConfig(steps=steps, batch_size=128, lr=2e-3, warmup_steps=10, log_every=25),
    )


def _train(method: str, teacher: TeacherCNF, out: Path, steps: int, signed: bool = True) -> Any:
    return train_student(_config(method, steps, signed), teacher, out, progress=False)


def test_tiny_f2d2_distillation_beats_the_euler_rule(toy_teacher: TeacherCNF, tmp_path: Path):
    """After 200 steps the 2-step F2D2 log q is closer to the teacher's exact log q than the
    2-step Euler rule's, and its positions closer to the teacher's ODE solution."""
    _train("f2d2", toy_teacher, tmp_path, 200)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"], "training did not reduce the loss"
    loaded = load_student(tmp_path)
    x, log_q = loaded.sample(300, steps=2, seed=1)
    x_euler, log_q_euler = EulerBaseline(toy_teacher, logdet="euler").sample(300, steps=2, seed=1)
    x_ode, _ = toy_teacher.sample(300, seed=1, atol=1e-6, rtol=1e-6)
    ref = toy_teacher.log_prob(x, atol=1e-6, rtol=1e-6)
    ref_euler = toy_teacher.log_prob(x_euler, atol=1e-6, rtol=1e-6)
    err = float((log_q - ref).abs().median())
    err_euler = float((log_q_euler - ref_euler).abs().median())
    pos = float((x - x_ode).norm(dim=-1).median())
    pos_euler = float((x_euler - x_ode).norm(dim=-1).median())
    assert err < err_euler, f"F2D2 median |dlogq| {err:.4f} vs Euler rule {err_euler:.4f}"
    assert pos < pos_euler, f"F2D2 median position error {pos:.4f} vs Euler {pos_euler:.4f}"


def test_tiny_falcon_distillation_learns_invertibility(
    toy_teacher: TeacherCNF, tmp_path: Path
) -> None:
    """100 steps lower the 2-step inversion error |z - X^-1(X(z))| of the teacher-initialised
    map, signed (u = sign(t - s) h, whose backward jumps start the wrong way) or not; the
    unsigned map, which starts as the Euler step both ways, ends lower."""
    z = torch.randn(200, 2, generator=torch.Generator().manual_seed(2))
    after = {}
    for signed in (True, False):
        init = build_student(_config("falcon", signed=signed), toy_teacher, system=None)
        student = _train("falcon", toy_teacher, tmp_path / str(signed), 100, signed=signed)
        before = float(init.inversion_error(z, 2).median())
        after[signed] = float(student.inversion_error(z, 2).median())
        assert after[signed] < before, f"signed={signed}: {before:.4g} -> {after[signed]:.4g}"
        x, log_q = student.sample(200, steps=2, seed=2)
        assert torch.isfinite(log_q).all() and x.shape == (200, 2)
    assert after[False] < after[True], f"inversion error signed/unsigned {after}"


def test_falcon_trains_from_data_alone(toy_teacher: TeacherCNF, tmp_path: Path) -> None:
    """``loss.target = "data"``: conditional flow matching + MeanFlow + invertibility on the
    interpolant, no teacher trajectories (the teacher only shapes the model)."""
    cfg = _config("falcon", steps=60)
    cfg.loss = FALCONLossConfig(pairs=0.0, target="data")
    student = train_student(cfg, toy_teacher, tmp_path, data=_toy_data(), progress=False)
    assert not (tmp_path / "trajectories.pt").exists()
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"fm", "meanflow", "inverse"} <= set(metrics[-1]) and "pair" not in metrics[-1]
    assert metrics[-1]["fm"] < metrics[0]["fm"], "flow matching loss did not decrease"
    _, log_q = student.sample(100, steps=2, seed=0)
    assert torch.isfinite(log_q).all()
    with pytest.raises(ValueError, match="pairs"):
        bad = _config("falcon", steps=1)
        bad.loss = FALCONLossConfig(target="data")
        train_student(bad, toy_teacher, tmp_path / "bad", data=_toy_data(), progress=False)
    with pytest.raises(ValueError, match="F2D2 needs the teacher"):
        StudentConfig(method="f2d2", loss={"pairs": 0.0, "target": "data"})


def test_distill_and_sample_commands(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    teacher, out = smoke_f2d2(tmp_path)
    assert (out / "student.pt").is_file() and (out / "trajectories.pt").is_file()
    assert not (out / "trajectories.partial.pt").exists()  # removed once the cache is written
    samples = tmp_path / "s.h5"
    assert main(["sample", str(out), "--steps", "2", "-n", "50", "-o", str(samples)]) == 0
    data = read_samples(samples)
    assert data.x.shape == (50, 8) and data.log_w is not None
    assert "ESS/N" in capsys.readouterr().out
    assert main(["sample", str(out), "-n", "5", "-o", str(samples), "--system", "lj13"]) == 2
    assert "trained for system 'dw4', not 'lj13'" in capsys.readouterr().err
    wrong = ["distill", str(teacher), "--method", "falcon", "-o", str(tmp_path / "x")]
    assert main([*wrong, "--system", "lj13"]) == 2
    assert "trained for 'dw4', not 'lj13'" in capsys.readouterr().err


def test_student_accuracy_script(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``workflows/student_accuracy.py``: ESS/N over seeds and the log q error with its CI."""
    teacher, out = smoke_f2d2(tmp_path)
    spec = importlib.util.spec_from_file_location(
        "student_accuracy", ROOT / "workflows/student_accuracy.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = tmp_path / "acc.json"
    common = ["--teacher", str(teacher), "--student", f"s={out}", "--steps", "2", "--n", "64"]
    module.main([*common, "--seeds", "3", "--dlogq", "40", "--json", str(report)])
    rows = json.loads(report.read_text())["rows"]
    assert set(rows) == {"teacher", "s"}
    for r in rows.values():
        assert len(r["ess_fraction"]) == 3 and r["seeds"] == [500, 537, 574]
        assert r["lowest"] <= r["mean"] and 0 < r["pooled"] <= 1 and r["se"] >= 0
    for key in ("dlogq", "dlogq_scored"):
        ci = rows["s"][key]
        assert ci["lo"] <= ci["median"] <= ci["hi"], ci
    assert "| s |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        module.main([*common, "--student", "no-equals-sign"])


def test_falcon_energy_loss_trains_on_the_system_energy(
    toy_teacher: TeacherCNF, tmp_path: Path
) -> None:
    """``loss.energy`` adds the reverse KL of the student's samples to the system's Boltzmann
    density (here DW4 on a tiny DW4-shaped teacher); it needs FALCON and a known system."""
    teacher = TeacherCNF.load(dw4_like_teacher(tmp_path / "teacher") / "teacher.pt")
    cfg = StudentConfig(
        method="falcon",
        loss=FALCONLossConfig(energy=1.0, energy_steps=2),
        trajectories=TrajectoryConfig(n=64, grid=4, atol=1e-3, rtol=1e-3, batch_size=64),
        train=TrainConfig(steps=60, batch_size=32, lr=3e-3, warmup_steps=5, log_every=20),
    )
    train_student(cfg, teacher, tmp_path / "student", system="dw4", progress=False)
    metrics = [
        json.loads(line)
        for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()
    ]
    assert all(math.isfinite(m["energy"]) for m in metrics), metrics
    assert metrics[-1]["energy"] < metrics[0]["energy"], "reverse KL did not decrease"

    with pytest.raises(ValueError, match=r"loss: unknown key 'energy'"):
        StudentConfig(method="f2d2", loss={"energy": 1.0})
    with pytest.raises(ValueError, match=r"loss\.energy_steps must be"):
        FALCONLossConfig(energy=1.0, energy_steps=0)
    with pytest.raises(ValueError, match="needs the student's system"):
        train_student(cfg, toy_teacher, tmp_path / "no_system", progress=False)
    with pytest.raises(ValueError, match="needs target"):
        from_data = StudentConfig(
            method="falcon", loss=FALCONLossConfig(energy=1.0, pairs=0.0, target="data")
        )
        student = build_student(from_data, teacher, system="dw4")
        student_loss(student, from_data, data=torch.zeros(4, 8))


def test_falcon_likelihood_loss_trains_on_data_or_teacher_samples(
    toy_teacher: TeacherCNF, tmp_path: Path
) -> None:
    """``loss.likelihood`` maximises the likelihood of the given data (or, without data, of the
    teacher's samples) under the student's own few-step density; both lower it, with every point
    inverted."""
    cfg = _config("falcon", steps=60)
    cfg.loss.likelihood, cfg.loss.likelihood_steps = 1.0, 2
    cfg.train.log_every = 20
    for name, data in (("data", _toy_data()), ("teacher", None)):
        train_student(cfg, toy_teacher, tmp_path / name, data=data, progress=False)
        metrics = [
            json.loads(line)
            for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        ]
        assert all(math.isfinite(m["nll"]) and m["nll_dropped"] == 0 for m in metrics), metrics
        assert metrics[-1]["nll"] < metrics[0]["nll"], f"{name}: likelihood did not improve"

    with pytest.raises(ValueError, match=r"loss: unknown key 'likelihood'"):
        StudentConfig(method="f2d2", loss={"likelihood": 1.0})
    with pytest.raises(ValueError, match=r"loss\.likelihood_steps must be"):
        FALCONLossConfig(likelihood=1.0, likelihood_steps=0)
    with pytest.raises(ValueError, match="this run uses neither"):
        train_student(_config("falcon"), toy_teacher, tmp_path / "unused", data=_toy_data())


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_student_configs_load(path: Path) -> None:
    for profile in (None, "smoke"):
        cfg = load_student_config(path, profile)
        assert cfg.system == path.stem.split("_")[2]  # student_<method>_<system>[_...]
        assert cfg.method in ("f2d2", "falcon") and cfg.method in path.stem
    with pytest.raises(ValueError, match="unknown key"):
        from boltzflow.train.config import dataclass_from_dict

        dataclass_from_dict(StudentConfig, {"loss": {"semigrup": 1.0}})


def test_student_backbone_options_replace_the_teachers(toy_teacher: TeacherCNF) -> None:
    """``[student.backbone]`` builds a student of another size (not from the teacher's weights);
    asking for both is refused with the reason."""
    small = StudentOptions(init_from_teacher=False, backbone={"hidden": 8})
    student = build_student(StudentConfig(method="falcon", student=small), toy_teacher, system=None)
    assert student.model_config["backbone_options"]["hidden"] == 8
    n_student = sum(p.numel() for p in student.parameters())
    assert n_student < sum(p.numel() for p in toy_teacher.parameters())
    with pytest.raises(ValueError, match="init_from_teacher = false"):
        StudentOptions(backbone={"hidden": 8})


def test_falcon_logdet_loss_and_aligned_steps(toy_teacher: TeacherCNF, tmp_path: Path) -> None:
    """``loss.logdet`` trains the map's exact step log-determinants against the teacher's
    log-density change; ``loss.aligned_steps`` restricts the aligned jumps to those step counts."""
    cfg = _config("falcon", steps=120)
    cfg.loss = FALCONLossConfig(logdet=1.0, aligned_steps=[2], dyadic_fraction=1.0)
    train_student(cfg, toy_teacher, tmp_path, progress=False)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["logdet"] < metrics[0]["logdet"], "log-determinant loss did not decrease"

    g = torch.Generator().manual_seed(0)
    i0, i1 = _draw_pairs(g, 4000, 16, 1.0, [4])
    assert ((i1 - i0).abs() == 4).all() and (i0 % 4 == 0).all() and (i1 % 4 == 0).all()
    assert 0.45 < float((i1 > i0).float().mean()) < 0.55  # both directions

    with pytest.raises(ValueError, match="powers of 2"):
        F2D2LossConfig(aligned_steps=[3])
    with pytest.raises(TypeError, match="list of step counts"):
        FALCONLossConfig(aligned_steps=4)
    with pytest.raises(ValueError, match="beyond the trajectory grid"):
        StudentConfig(
            method="falcon",
            loss=FALCONLossConfig(aligned_steps=[8]),
            trajectories=TrajectoryConfig(grid=4),
        )
    with pytest.raises(ValueError, match=r"loss: unknown key 'logdet'"):
        StudentConfig(method="f2d2", loss={"logdet": 1.0})
    with pytest.raises(ValueError, match=r"loss\.logdet needs teacher trajectories"):
        bad = _config("falcon", steps=1)
        bad.loss = FALCONLossConfig(pairs=0.0, logdet=1.0, target="data")
        train_student(bad, toy_teacher, tmp_path / "bad", data=_toy_data(), progress=False)


def test_student_batches_depend_on_the_step_alone(toy_teacher: TeacherCNF) -> None:
    """A student's loss is a BatchedLoss: the batch of a step, its likelihood points included,
    is the same whenever (and in whichever process) it is built, and every key has a row per
    sample (what the trainer's background workers and DDP's row shares rely on)."""
    loss_cfg = FALCONLossConfig(pairs=0.0, target="data", likelihood=1.0)
    cfg = StudentConfig(method="falcon", loss=loss_cfg, train=TrainConfig(batch_size=12, seed=4))
    student = build_student(cfg, toy_teacher, system=None)
    loss = student_loss(student, cfg, data=_toy_data())
    assert isinstance(loss, BatchedLoss)
    batch = loss.make_batch(3)
    assert {"x_s", "x_ml"} <= set(batch) and {len(v) for v in batch.values()} == {12}
    again = pickle.loads(pickle.dumps(loss.batches)).make_batch(3)
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    assert not torch.equal(loss.make_batch(4)["x_ml"], batch["x_ml"])
    value, parts = loss.batch_loss(student, batch)
    assert torch.isfinite(value) and {"fm", "nll"} <= set(parts)
    cfg.train.compile = True  # the students' losses are not compiled
    with pytest.raises(ValueError, match=r"train\.compile is for the teacher's loss"):
        train_student(cfg, toy_teacher, "unused", data=_toy_data())
