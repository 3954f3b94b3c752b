"""Compiled sampling paths (``set_compiled``): a teacher's exact divergence (both the trace at
every solver stage and the quadrature after the path) and the exact log-det jumps of FALCON and
F2D2 ``exact_logdet`` give the eager samples and log q, short last chunks included; gradients
still run eagerly; a CPU without a C++ compiler is refused up front; copies drop the compiled
graph; ``boltzflow sample --compile`` records it.

The FALCON check also guards against a torch 2.13 inductor bug found here: the reverse-mode
product of ``index_select`` under ``vmap`` compiled to wrong Jacobian rows (log-det errors of
0.1 nats), which :func:`boltzflow.nn.egnn.neighbours` avoids under ``torch.compile``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from tiny_teacher import dw4_like
from torch.func import vjp, vmap

from boltzflow.cli import main
from boltzflow.distill import F2D2, FALCON, flowmap
from boltzflow.flows import ode
from boltzflow.flows.cnf import TeacherCNF
from boltzflow.flows.priors import MeanFreeGaussian
from boltzflow.io.samples import read_samples
from boltzflow.nn import compile as compile_module
from boltzflow.nn.compile import cpp_compiler
from boltzflow.nn.egnn import neighbour_index, neighbours

needs_compiler = pytest.mark.skipif(cpp_compiler() is None, reason="no C++ compiler")


def _student(cls: type, hidden: int = 16, layers: int = 2, push: float = 0.2) -> FALCON | F2D2:
    """A random float64 EGNN ``layers x hidden`` student on DW4's 4 particles in 2-D, its
    weights pushed by ``push`` away from the identity map (float64: compiled and eager then
    agree to rounding, far below the bug's 1e-2)."""
    torch.manual_seed(0)
    model = cls.build(
        "egnn",
        prior=MeanFreeGaussian(4, 2),
        n_particles=4,
        spatial_dim=2,
        backbone_options={"hidden": hidden, "layers": layers},
        system="dw4",
    ).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(push * torch.randn_like(p))
    return model


@needs_compiler
@pytest.mark.parametrize("cls", [FALCON, F2D2])
def test_compiled_jumps_match_eager(cls: type, monkeypatch: pytest.MonkeyPatch) -> None:
    # 40 rows in chunks of 16: two full chunks and a padded one of 8
    monkeypatch.setattr(flowmap, "jacobian_rows", lambda x, rows=None: 16)
    model = _student(cls)
    settings = {"exact_logdet": True} if cls is F2D2 else {}
    x0, log_q0 = model.sample(40, steps=3, seed=5, **settings)
    model.set_compiled(True)
    x1, log_q1 = model.sample(40, steps=3, seed=5, **settings)
    assert "exact_jump" in model._compiled_fns, "the compiled path was not taken"
    torch.testing.assert_close(x1, x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(log_q1, log_q0, rtol=0, atol=1e-10)
    assert float(log_q0.std()) > 0.1  # the log-dets are far from constant
    # with gradients on (training) the eager path runs and the graph reaches the parameters
    z = model.prior.sample(8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, log_q = model.sample_from(z, steps=2)
    log_q.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@needs_compiler
def test_compiled_vmap_vjp_of_neighbours_is_exact() -> None:
    """The Jacobian rows of a gather over neighbours, compiled, equal the eager ones."""
    nbr = neighbour_index(4)
    x = torch.randn(32, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def jac(x: torch.Tensor) -> torch.Tensor:
        _, pullback = vjp(lambda y: neighbours(y, nbr).sum(2) * y, x)
        cot = torch.eye(8, dtype=x.dtype).reshape(8, 1, 4, 2).expand(8, len(x), 4, 2)
        return vmap(pullback)(cot)[0]

    torch.testing.assert_close(torch.compile(jac)(x), jac(x), rtol=0, atol=1e-12)


def _teacher(divergence: str) -> TeacherCNF:
    """A random float64 DW4-shaped EGNN 1 x 16 teacher, dopri5 at 1e-6."""
    sampling = {"atol": 1e-6, "rtol": 1e-6, "divergence": divergence, "trace_mode": "loop"}
    teacher = dw4_like(sampling, hidden=16, seed=3).double()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return teacher


@needs_compiler
@pytest.mark.parametrize("divergence", ["exact", "quadrature"])
def test_compiled_teacher_matches_eager(divergence: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # 40 rows in chunks of 16; the eager side runs the model's own trace mode ("loop")
    monkeypatch.setattr(ode, "CPU_JACOBIAN_ROWS", 16)
    teacher = _teacher(divergence)
    x0, log_q0 = teacher.sample(40, seed=2, batch_size=40)
    x_val = x0[:10] * 1.1  # other points than the samples, still mean-free
    lp0 = teacher.log_prob(x_val)
    teacher.set_compiled(True)
    x1, log_q1 = teacher.sample(40, seed=2, batch_size=40)
    assert "trace" in teacher._compiled_fns, "the compiled path was not taken"
    torch.testing.assert_close(x1, x0, rtol=0, atol=1e-10)
    torch.testing.assert_close(log_q1, log_q0, rtol=0, atol=1e-9)
    torch.testing.assert_close(teacher.log_prob(x_val), lp0, rtol=0, atol=1e-9)
    assert float(log_q0.std()) > 0.1


def test_compiled_needs_a_cpp_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compile_module, "cpp_compiler", lambda: None)
    for model in (_student(FALCON), _teacher("exact")):
        with pytest.raises(ValueError, match="needs a C\\+\\+ compiler"):
            model.set_compiled(True)
        assert not model.compiled
        model.set_compiled(False)  # turning it off needs nothing


def test_copies_and_moves_drop_the_compiled_graph() -> None:
    model = _student(FALCON)
    model.compiled, model._compiled_fns = True, {"exact_jump": len}  # as after a first draw
    twin = copy.deepcopy(model)
    assert twin.compiled and twin._compiled_fns == {}
    assert model._compiled_fns
    model.float()
    assert model._compiled_fns == {}


@needs_compiler
def test_sample_command_compile(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``boltzflow sample --compile``: the eager samples to float32 rounding, recorded in the
    provenance; refused for F2D2 without ``--exact-logdet``."""
    monkeypatch.delenv("BOLTZFLOW_QUIET", raising=False)
    model = _student(FALCON, hidden=8, layers=1, push=0.0).float()
    model.save(tmp_path / "student.pt")
    out = tmp_path / "s.h5"
    args = ["sample", str(tmp_path), "--steps", "2", "-n", "20", "-o", str(out), "--compile"]
    assert main(args) == 0
    data = read_samples(out)
    x, log_q = model.sample(20, steps=2, seed=0)
    torch.testing.assert_close(torch.as_tensor(data.x), x.double(), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.as_tensor(data.log_q), log_q.double(), rtol=0, atol=1e-4)
    assert data.provenance["compiled"] is True
    assert "compiles the exact log q" in capsys.readouterr().err  # the one-off wait is announced
    f2d2 = tmp_path / "f2d2"
    f2d2.mkdir()
    _student(F2D2, hidden=8, layers=1, push=0.0).float().save(f2d2 / "student.pt")
    capsys.readouterr()
    bad = ["sample", str(f2d2), "-n", "5", "-o", str(tmp_path / "f.h5"), "--compile"]
    assert main(bad) == 2
    assert "--exact-logdet" in capsys.readouterr().err
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    _teacher("exact").float().save(teacher / "teacher.pt", extra={"run": {"system": "dw4"}})
    out = tmp_path / "t.h5"
    args = ["sample", str(teacher), "-n", "6", "-o", str(out), "--compile"]
    assert main(args) == 0
    assert read_samples(out).provenance["compiled"] is True
    bad = [*args[:-1], "--divergence", "hutchinson", "--compile"]
    assert main(bad) == 2
    assert "'hutchinson'" in capsys.readouterr().err
