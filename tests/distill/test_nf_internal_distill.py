"""A small internal-coordinate NF distilled from a larger one, or trained from scratch, in one
loop (:mod:`boltzflow.distill.nf_internal_distill`), and the latent-matching terms on flows with
periodic (dihedral) columns (:func:`boltzflow.distill.nf_losses.nf_distillation_terms`).

Tiny flows on the synthetic ALDP transform of :mod:`tests.tiny_internal` (7 periodic dihedrals).
"""

from __future__ import annotations

import math

import pytest
import torch

from boltzflow.distill.nf_internal import ICNFModelConfig, InternalNFStudent
from boltzflow.distill.nf_internal_distill import train_icnf_student
from boltzflow.distill.nf_losses import NFLossConfig, latent_pairs, nf_distillation_terms
from boltzflow.train.config import TrainConfig

pytest.importorskip("openmm")
from tiny_internal import SYSTEM, aldp_frames, aldp_transform

TEACHER = ICNFModelConfig(blocks=4, hidden=16, standardize_dihedrals=0.5)
STUDENT = ICNFModelConfig(blocks=2, hidden=8, standardize_dihedrals=0.5)
MLE = NFLossConfig(latent_weight=0.0, final_weight=0.0, sample_weight=0.0)


def _teacher(seed: int = 0) -> InternalNFStudent:
    """A teacher with non-trivial maps: random (not identity) output layers."""
    torch.manual_seed(seed)
    t = InternalNFStudent.build(TEACHER, aldp_transform(), system=SYSTEM)
    with torch.no_grad():
        for p in t.flow.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return t.eval()


def _train(steps: int = 6, seed: int = 0) -> TrainConfig:
    return TrainConfig(
        steps=steps, batch_size=32, lr=1e-3, warmup_steps=2, log_every=3, checkpoint_every=3,
        seed=seed, ema_decay=0.5,
    )  # fmt: skip


def _u(teacher: InternalNFStudent, n: int = 64) -> torch.Tensor:
    return teacher.ic(aldp_frames(n, seed=3))[0].float()


def test_nll_term_is_the_flow_density_on_the_torus():
    teacher = _teacher()
    u = _u(teacher)
    terms = nf_distillation_terms(teacher, teacher, u, teacher.prior.sample(16), latents=True)
    expected = -teacher.log_prob_internal(u).mean()
    assert torch.allclose(terms["nll"], expected, atol=1e-5)
    # a model against itself: every matching term vanishes
    for key in ("latent", "final", "sample"):
        assert float(terms[key].detach()) == 0.0, key


def test_latent_differences_are_taken_on_the_circle():
    teacher = _teacher()
    student = _teacher(seed=1)
    u = _u(teacher)
    with torch.no_grad():
        _, _, lat = teacher.flow.encode(u, return_latents=True)
    mask = teacher.flow.base.mask
    # the same angles written one turn away: the circle sees no difference
    shifted = [torch.where(mask, z + 2 * math.pi, z) for z in lat]
    a = nf_distillation_terms(student, teacher, u, None, teacher_latents=lat)
    b = nf_distillation_terms(student, teacher, u, None, teacher_latents=shifted)
    assert float(a["latent"].detach()) > 0 and float(a["final"].detach()) > 0
    assert torch.allclose(a["latent"], b["latent"], atol=1e-5)
    assert torch.allclose(a["final"], b["final"], atol=1e-5)
    # and the cached latents give what the teacher's own encode pass gives
    c = nf_distillation_terms(student, teacher, u, None)
    assert torch.allclose(a["latent"], c["latent"]) and torch.allclose(a["final"], c["final"])


def test_scratch_arm_is_the_distilled_loop_without_its_terms(tmp_path):
    """Teacher=None and a teacher with zero distillation weights train the same student, bit
    for bit (same init, minibatches, optimiser): the arms differ in the loss alone."""
    teacher = _teacher()
    frames = aldp_frames(200, seed=5)
    kw = {"model": STUDENT, "train": _train(), "progress": False}
    scratch = train_icnf_student(
        frames, tmp_path / "scratch", ic=teacher.ic, loss=MLE, system=SYSTEM, **kw
    )
    zero = train_icnf_student(frames, tmp_path / "zero", teacher=teacher, loss=MLE, **kw)
    distilled = train_icnf_student(frames, tmp_path / "kd", teacher=teacher, **kw)
    s, z, d = scratch.state_dict(), zero.state_dict(), distilled.state_dict()
    assert all(torch.equal(s[k], z[k]) for k in s)
    assert not all(torch.equal(s[k], d[k]) for k in s)
    assert (tmp_path / "kd" / "student.pt").is_file()
    assert distilled.n_parameters < teacher.n_parameters
    assert distilled.ic.to_dict() == teacher.ic.to_dict()
    x, log_q = distilled.sample(32, seed=0)
    assert torch.allclose(distilled.log_prob(x), log_q, atol=1e-3)


def test_distillation_lowers_the_latent_mismatch(tmp_path):
    teacher = _teacher()
    frames = aldp_frames(200, seed=5)
    u = _u(teacher)
    loss = NFLossConfig(nll_weight=0.0, latent_weight=1.0, final_weight=1.0, sample_weight=0.0)
    before = InternalNFStudent.build(STUDENT, teacher.ic, system=SYSTEM)
    after = train_icnf_student(
        frames, tmp_path, teacher=teacher, model=STUDENT, train=_train(40), loss=loss,
        progress=False,
    )  # fmt: skip
    with torch.no_grad():
        t0 = nf_distillation_terms(before, teacher, u, None)
        t1 = nf_distillation_terms(after, teacher, u, None)
    assert float(t1["final"]) < float(t0["final"])
    assert latent_pairs(STUDENT.blocks, TEACHER.blocks) == [(0, 1), (1, 3)]


def test_bad_arguments_are_refused(tmp_path):
    teacher = _teacher()
    frames = aldp_frames(50, seed=5)
    kw = {"model": STUDENT, "train": _train(2), "progress": False}
    with pytest.raises(ValueError, match="need a teacher"):
        train_icnf_student(frames, tmp_path / "a", ic=teacher.ic, **kw)
    with pytest.raises(ValueError, match=r"\(ic\) or a teacher"):
        train_icnf_student(frames, tmp_path / "b", loss=MLE, **kw)
    other = aldp_transform()
    other.bond_mean.add_(0.01)
    with pytest.raises(ValueError, match="differs from the teacher"):
        train_icnf_student(frames, tmp_path / "f", ic=other, teacher=teacher, **kw)
    big = ICNFModelConfig(blocks=8, hidden=8)
    with pytest.raises(ValueError, match="blocks"):
        train_icnf_student(frames, tmp_path / "c", teacher=teacher, model=big, train=_train(2))
    with pytest.raises(ValueError, match="augmentation"):
        train_icnf_student(
            frames, tmp_path / "d", teacher=teacher, loss=NFLossConfig(rotations=True), **kw
        )
    with pytest.raises(ValueError, match="frames must be"):
        train_icnf_student(frames[:, :30], tmp_path / "e", teacher=teacher, **kw)
