"""Training the NF student: maximum likelihood, NF -> NF latent matching and CNF -> NF pair
regression, at tiny sizes through the shared Trainer."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from boltzflow.distill.base import load_student
from boltzflow.distill.nf import NFModelConfig, NFStudent
from boltzflow.distill.nf_losses import NFLossConfig, nf_distillation_terms
from boltzflow.distill.nf_run import distill_nf
from boltzflow.distill.nf_train import (
    cnf_pairs,
    default_train_config,
    distill_nf_from_nf,
    train_nf,
)
from boltzflow.flows.cnf import TeacherCNF
from boltzflow.flows.coupling import MeanFreeBasis

TINY_TRAIN = {"batch_size": 128, "warmup_steps": 10, "log_every": 25, "checkpoint_every": 1000}


def _gaussian_dw4_data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-free DW4-shaped data: a Gaussian with standard deviations ``sd`` in the Helmert
    coordinates of the subspace; exact entropy sum(log sd) + 3 log(2 pi e)."""
    sd = torch.tensor([0.5, 1.0, 2.0, 3.0, 0.7, 1.5], dtype=torch.float64)
    y = torch.randn(n, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return MeanFreeBasis(4, 2).from_subspace(y * sd).float(), sd


def test_train_nf_approaches_the_exact_entropy(tmp_path):
    data, sd = _gaussian_dw4_data(4000)
    val, _ = _gaussian_dw4_data(2000, seed=1)
    entropy = float(sd.log().sum()) + 3 * math.log(2 * math.pi * math.e)
    train = default_train_config(steps=250, lr=3e-3, **TINY_TRAIN)
    model = train_nf(
        data,
        tmp_path,
        system="dw4",
        model=NFModelConfig(blocks=1, hidden=16, transform="affine"),
        train=train,
        progress=False,
    )
    nll = -model.log_prob(val)
    mean, se = float(nll.mean()), float(nll.std() / math.sqrt(len(nll)))
    # init (identity at the RMS scale) is ~0.5 nats worse; the fit must reach the floor closely
    assert abs(mean - entropy) < 0.05 + 4 * se, (
        f"NLL {mean:.4f} +- {se:.4f}, exact entropy {entropy:.4f} (tolerance 0.05 + 4 se)"
    )
    assert (tmp_path / "student.pt").is_file() and (tmp_path / "metrics.jsonl").is_file()
    for source in (tmp_path, tmp_path / "checkpoint.pt"):  # finished model, training state
        loaded = load_student(source, system="dw4")
        torch.testing.assert_close(loaded.log_prob(val[:10]), model.log_prob(val[:10]))


def _random_teacher(blocks: int = 4, seed: int = 3) -> NFStudent:
    teacher = NFStudent.build(
        NFModelConfig(blocks=blocks, hidden=16, scale=1.0),
        dim=8,
        n_particles=4,
        spatial_dim=2,
        mean_free=True,
        system="dw4",
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in teacher.flow.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
    return teacher.eval()


def test_nf_to_nf_distillation_lowers_latent_matching_loss(tmp_path):
    teacher = _random_teacher()
    data, _ = teacher.sample(2000, seed=0)
    student_cfg = NFModelConfig(blocks=2, hidden=16)
    loss = NFLossConfig(nll_weight=0.0, latent_weight=1.0, final_weight=1.0, sample_weight=1.0)
    train = default_train_config(steps=150, lr=3e-3, **TINY_TRAIN)
    probe = teacher.to_flow_coords(data[:500])
    eps = torch.randn(500, 6, generator=torch.Generator().manual_seed(9))

    def terms(model: NFStudent) -> dict[str, float]:
        with torch.no_grad():
            return {
                k: float(v) for k, v in nf_distillation_terms(model, teacher, probe, eps).items()
            }

    fresh = NFStudent.build(
        NFModelConfig(blocks=2, hidden=16, scale=1.0),
        dim=8,
        n_particles=4,
        spatial_dim=2,
        mean_free=True,
    )
    before = terms(fresh)
    student = distill_nf_from_nf(
        teacher, data, tmp_path, model=student_cfg, train=train, loss=loss, progress=False
    )
    after = terms(student)
    assert student.scale == teacher.scale and student.system == "dw4"
    for key in ("latent", "final", "sample"):
        assert after[key] < 0.5 * before[key], (key, before[key], after[key])
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"nll", "latent", "final", "sample"} <= set(logged[-1])
    with pytest.raises(ValueError, match="differs from the teacher"):
        distill_nf_from_nf(teacher, data, tmp_path / "x", model=NFModelConfig(scale=2.0))
    with pytest.raises(ValueError, match="student blocks <= teacher blocks"):
        distill_nf_from_nf(teacher, data, tmp_path / "y", model=NFModelConfig(blocks=5))


def _tiny_cnf_dir(tmp_path):
    torch.manual_seed(0)
    teacher = TeacherCNF.build(
        "egnn",
        dim=8,
        n_particles=4,
        spatial_dim=2,
        mean_free=True,
        backbone_options={"hidden": 8, "layers": 1},
        scale=1.5,
    )
    folder = tmp_path / "teacher"
    folder.mkdir()
    teacher.save(folder / "teacher.pt")
    (folder / "run.json").write_text(json.dumps({"run": {"teacher": {"system": "dw4"}}}))
    return folder, teacher


def test_cnf_pairs_are_the_teacher_ode_map(tmp_path):
    _, teacher = _tiny_cnf_dir(tmp_path)
    z0, x1 = cnf_pairs(teacher, 20, seed=4, method="rk4", steps=4, batch_size=8)
    x_ref, _ = teacher.sample(20, seed=4, method="rk4", steps=4, divergence="none")
    torch.testing.assert_close(x1, x_ref, atol=1e-5, rtol=0)
    assert float(z0.reshape(20, 4, 2).mean(1).abs().max()) < 1e-6


def test_distill_nf_from_a_cnf_teacher_dir(tmp_path):
    folder, _ = _tiny_cnf_dir(tmp_path)
    out = tmp_path / "student"
    train = default_train_config(steps=100, lr=3e-3, **TINY_TRAIN)
    student = distill_nf(
        folder,
        out,
        n_pairs=512,
        pair_settings={"method": "rk4", "steps": 4},
        model=NFModelConfig(blocks=1, hidden=16, scale=1.0),  # must learn x1 ~ 1.5 z0
        train=train,
        progress=False,
    )
    assert isinstance(student, NFStudent) and student.system == "dw4"
    assert (out / "cnf_pairs.pt").is_file() and (out / "student.pt").is_file()
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first, last = logged[0], logged[-1]
    assert last["final"] < 0.5 * first["final"], (first["final"], last["final"])
    assert last["sample"] < 0.5 * first["sample"], (first["sample"], last["sample"])
    load_student(out, system="dw4")
    with pytest.raises(ValueError, match="trained for system 'dw4', not 'lj13'"):
        load_student(out, system="lj13")
    with pytest.raises(ValueError, match="trained for 'dw4', not 'lj13'"):
        distill_nf(folder, tmp_path / "other", system="lj13", train=train, progress=False)


def test_distill_nf_from_an_nf_teacher_dir(tmp_path):
    teacher = _random_teacher(blocks=2)
    teacher.save(tmp_path / "student.pt")
    data, _ = teacher.sample(500, seed=0)
    train = default_train_config(steps=20, **TINY_TRAIN)
    with pytest.raises(ValueError, match="needs training data"):
        distill_nf(tmp_path, tmp_path / "s", train=train, progress=False)
    student = distill_nf(
        tmp_path,
        tmp_path / "s",
        data=data.numpy(),
        model=NFModelConfig(blocks=1, hidden=8),
        train=train,
        progress=False,
    )
    assert student.n_blocks == 1 and student.scale == teacher.scale


def _kl_teacher_student(teacher: NFStudent, student: NFStudent, n: int = 2000) -> float:
    """Monte Carlo KL(q_T || q_S) on teacher samples (nats)."""
    x, log_q_t = teacher.sample(n, seed=11)
    return float((log_q_t - student.log_prob(x)).mean())


def test_synthetic_fraction_trains_on_fresh_teacher_samples(tmp_path):
    teacher = _random_teacher(blocks=2)
    wrong, _ = teacher.sample(1000, seed=0)
    wrong = 3.0 * wrong  # data the student must ignore when every point is a teacher sample
    fresh = NFStudent.build(
        NFModelConfig(blocks=2, hidden=16, scale=teacher.scale),
        dim=8,
        n_particles=4,
        spatial_dim=2,
        mean_free=True,
    )
    loss = NFLossConfig(latent_weight=0.0, final_weight=0.0, sample_weight=0.0)
    student = distill_nf_from_nf(
        teacher,
        wrong,
        tmp_path,
        model=NFModelConfig(blocks=2, hidden=16),
        train=default_train_config(steps=150, lr=3e-3, **TINY_TRAIN),
        loss=dataclasses.replace(loss, synthetic_fraction=1.0),
        progress=False,
    )
    before, after = _kl_teacher_student(teacher, fresh), _kl_teacher_student(teacher, student)
    assert after < 0.5 * before, f"KL(teacher || student) {before:.4f} -> {after:.4f}"
    with pytest.raises(ValueError, match="synthetic_fraction"):
        NFLossConfig(synthetic_fraction=1.5)


def test_latent_terms_can_be_skipped():
    teacher = _random_teacher()
    student = _random_teacher(blocks=2, seed=5)
    u = torch.randn(64, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = nf_distillation_terms(student, teacher, u, None)
        cheap = nf_distillation_terms(student, teacher, u, None, latents=False)
    torch.testing.assert_close(cheap["nll"], full["nll"])
    assert float(full["final"]) > 0 and float(full["latent"]) > 0
    assert float(cheap["final"]) == float(cheap["latent"]) == float(cheap["sample"]) == 0.0


def test_anneal_scales_distillation_terms_linearly_to_zero(tmp_path):
    teacher = _random_teacher()
    data, _ = teacher.sample(500, seed=0)
    steps = 40
    # nll weight 0 and lr ~0: the logged loss is the window mean of (1 - s / steps) * final
    train = default_train_config(
        steps=steps, lr=1e-9, batch_size=128, warmup_steps=1, log_every=steps
    )
    loss = NFLossConfig(
        nll_weight=0.0, latent_weight=0.0, final_weight=1.0, sample_weight=0.0, anneal=True
    )
    distill_nf_from_nf(
        teacher,
        data,
        tmp_path,
        model=NFModelConfig(blocks=2, hidden=16),
        train=train,
        loss=loss,
        progress=False,
    )
    (logged,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    expected = sum(1 - s / steps for s in range(steps)) / steps  # 0.5125
    ratio = logged["loss"] / logged["final"]
    assert abs(ratio - expected) < 0.03, f"loss / final {ratio:.4f}, expected {expected:.4f}"
