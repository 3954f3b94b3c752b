"""Student interface: save/load, wrong-system errors, seeds, shapes, teacher initialisation,
and the F2D2 divergence head against the exact divergence after a short fit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from boltzflow.distill import F2D2, FALCON, EulerBaseline, Student, load_student
from boltzflow.distill.f2d2 import f2d2_diagonal_loss
from boltzflow.distill.flowmap import init_from_teacher
from boltzflow.flows.cnf import TeacherCNF
from boltzflow.flows.ode import exact_divergence
from boltzflow.flows.priors import MeanFreeGaussian, StandardGaussian
from boltzflow.io.checkpoint import CheckpointError

OPTS = {"hidden": 8, "layers": 1}


def _teacher() -> TeacherCNF:
    torch.manual_seed(0)
    return TeacherCNF.build(
        "egnn", dim=6, n_particles=3, spatial_dim=2, mean_free=True, backbone_options=OPTS
    )


def _students() -> dict[str, Student]:
    prior = MeanFreeGaussian(3, 2)
    kw = {"prior": prior, "n_particles": 3, "spatial_dim": 2, "backbone_options": OPTS}
    return {
        "f2d2": F2D2.build("egnn", system="dw3", **kw),
        "falcon": FALCON.build("egnn", system="dw3", **kw),
        "euler": EulerBaseline(_teacher(), logdet="exact", system="dw3"),
    }


@pytest.mark.parametrize("kind", ["f2d2", "falcon", "euler"])
def test_save_load_roundtrip_and_wrong_system(kind: str, tmp_path: Path) -> None:
    student = _students()[kind]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, log_q = student.sample(7, steps=2, seed=4)
    assert x.shape == (7, 6) and log_q.shape == (7,) and torch.isfinite(log_q).all()
    assert x.reshape(7, 3, 2).mean(1).abs().max() < 1e-6, "samples must be mean-free"
    x2, log_q2 = student.sample(7, steps=2, seed=4)
    assert torch.equal(x, x2) and torch.equal(log_q, log_q2), "same seed, same output"
    path = student.save(tmp_path / "student.pt")
    loaded = load_student(tmp_path, system="dw3")
    assert type(loaded) is type(student) and loaded.system == "dw3"
    x3, log_q3 = loaded.sample(7, steps=2, seed=4)
    assert torch.equal(x, x3) and torch.equal(log_q, log_q3)
    assert torch.allclose(loaded.log_prob(x, steps=2), student.log_prob(x, steps=2))
    with pytest.raises(ValueError, match="trained for system 'dw3', not 'lj13'"):
        load_student(path, system="lj13")
    with pytest.raises(ValueError, match="not a"):
        (F2D2 if kind != "f2d2" else FALCON).load(path)
    with pytest.raises(FileNotFoundError):
        load_student(tmp_path / "missing")


def test_load_rejects_corrupt_and_foreign_files(tmp_path: Path) -> None:
    _teacher().save(tmp_path / "teacher.pt")
    with pytest.raises(CheckpointError, match="kind"):
        load_student(tmp_path / "teacher.pt")
    path = _students()["f2d2"].save(tmp_path / "s.pt")
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        load_student(path)


def test_log_prob_checks_points() -> None:
    student = _students()["f2d2"]
    with pytest.raises(ValueError, match="shape"):
        student.log_prob(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="mean-free"):
        student.log_prob(torch.ones(3, 6))
    with pytest.raises(ValueError, match="steps"):
        student.sample(3, steps=0)


def test_teacher_initialisation_makes_the_student_an_euler_step() -> None:
    teacher = _teacher()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    students = _students()
    x = teacher.prior.sample(5, generator=torch.Generator().manual_seed(1))
    s, t = torch.full((5,), 0.3), torch.full((5,), 0.8)
    for kind in ("f2d2", "falcon"):
        init_from_teacher(students[kind].net, teacher.net)
        u = students[kind].net(t, x, s=s)
        assert torch.allclose(u, teacher.net(s, x), atol=1e-6), kind
    # so a 1-step student sample equals the 1-step Euler baseline's sample
    xs, _ = students["falcon"].sample(4, steps=1, seed=0)
    xe, _ = EulerBaseline(teacher).sample(4, steps=1, seed=0)
    assert torch.allclose(xs, xe, atol=1e-5)
    with pytest.raises(ValueError, match="backbone"):
        init_from_teacher(
            students["f2d2"].net,
            TeacherCNF.build("mlp", dim=6, backbone_options={"hidden": 8, "layers": 1}).net,
        )


class _ToyField(nn.Module):
    """A 2-D velocity with a position- and time-dependent divergence."""

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype)
        return torch.stack([torch.tanh(x[:, 1]) - t * x[:, 0], torch.sin(x[:, 0]) * x[:, 1]], -1)


def test_f2d2_divergence_head_on_the_diagonal_matches_exact_divergence() -> None:
    """A small F2D2 fitted on the diagonal for 300 steps reproduces the exact divergence
    div v = -t + sin(x_0) (values spread over about [-2, 1]) on fresh points."""
    torch.manual_seed(0)
    field = _ToyField()
    model = F2D2.build(
        "mlp", prior=StandardGaussian(2), backbone_options={"hidden": 64, "layers": 2}
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        x = torch.randn(256, 2, generator=gen)
        t = torch.rand(256, generator=gen)
        v, div = exact_divergence(field, t, x)
        loss, _ = f2d2_diagonal_loss(model, x, t, v.detach(), div.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = torch.randn(2000, 2, generator=gen)
    t = torch.rand(2000, generator=gen)
    _, div = exact_divergence(field, t, x)
    with torch.no_grad():
        _, d = model(x, t, t)
    err = (d - div).abs()
    spread = float(div.std())
    assert float(err.mean()) < 0.1 * spread, (
        f"mean |D - div| = {float(err.mean()):.3f}, exact divergence std {spread:.3f}"
    )
    # and one step of length h reproduces the Euler rule to first order: (t - s) D
    with torch.no_grad():
        _, inc, _ = model.jump(x, t, t + 1e-3)
    assert float((inc - 1e-3 * div).abs().mean()) < 0.1 * 1e-3 * spread
