"""F2D2 maximum-likelihood self-guidance: scale 0 is the unguided sampler, log q is the density
of the guided map (against closed forms and brute-force Jacobians in float64), bad scales are
refused, and ``boltzflow sample --guidance`` round-trips; ``exact_logdet`` weights the same
samples by the exact log-det of the map they went through.

The exact model: the autonomous field v(x) = c x^2 (per coordinate) has the flow map
X(x, s, t) = x / (1 - c (t - s) x), average velocity u = c x^2 / (1 - c h x) and integrated
divergence int_s^t div v = -2 sum log(1 - c h x) (h = t - s), so an F2D2 with these heads is
exact, semigroup included: its log q is the true density of its samples, guided or not.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_teacher import smoke_f2d2
from torch import Tensor, nn

from boltzflow.cli import main
from boltzflow.distill import F2D2, FALCON, load_student
from boltzflow.distill.f2d2_guidance import guidance_objective, likelihood_guidance
from boltzflow.distill.flowmap import subspace_basis
from boltzflow.flows.priors import MeanFreeGaussian, StandardGaussian
from boltzflow.io.samples import read_samples
from boltzflow.sampling.weights import ess_fraction
from boltzflow.systems import load_system

C = 0.12
A = torch.tensor([[-0.3, 0.8, 0.0], [-0.5, 0.2, 0.1], [0.0, 0.3, -0.4]], dtype=torch.float64)


class _Exact(F2D2):
    """An F2D2 whose two heads are exact for a known field (no network)."""

    def __init__(self, dim: int) -> None:
        # FlowMapStudent's constructor, skipping F2D2's feature tap and head: forward is exact
        super(F2D2, self).__init__(nn.Identity(), StandardGaussian(dim), model_config={})
        self.register_buffer("anchor", torch.zeros((), dtype=torch.float64))  # sets the dtype


class QuadraticF2D2(_Exact):
    """v(x) = C x^2 per coordinate (module docstring)."""

    def forward(self, x: Tensor, s: Tensor | float, t: Tensor | float) -> tuple[Tensor, Tensor]:
        h = torch.as_tensor(t, dtype=x.dtype) - torch.as_tensor(s, dtype=x.dtype)
        h = h.expand(len(x))[:, None]
        u = C * x**2 / (1 - C * h * x)
        small = h.abs() < 1e-12
        d = torch.where(small, 2 * C * x, -2 * torch.log1p(-C * h * x) / torch.where(small, 1, h))
        return u, d.sum(-1)


class LinearF2D2(_Exact):
    """v(x) = A x: X = expm(h A) x, D = tr A."""

    def forward(self, x: Tensor, s: Tensor | float, t: Tensor | float) -> tuple[Tensor, Tensor]:
        h = torch.as_tensor(t, dtype=x.dtype) - torch.as_tensor(s, dtype=x.dtype)
        h = h.expand(len(x))
        small = h.abs() < 1e-12
        mats = torch.linalg.matrix_exp(h[:, None, None] * A)
        jumped = torch.einsum("bij,bj->bi", mats, x)
        u = torch.where(small[:, None], x @ A.T, (jumped - x) / torch.where(small, 1, h)[:, None])
        return u, torch.full_like(h, float(torch.trace(A)))


def _egnn_f2d2() -> F2D2:
    """A float64 F2D2 on 3 particles in 2-D (EGNN 2 x 8), far from the identity map."""
    torch.manual_seed(1)
    model = F2D2.build(
        "egnn",
        prior=MeanFreeGaussian(3, 2),
        n_particles=3,
        spatial_dim=2,
        backbone_options={"hidden": 8, "layers": 2},
        system="dw3",
    ).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def _noise(model: F2D2, n: int, seed: int) -> Tensor:
    """The prior draw ``sample(n, seed=seed)`` starts from."""
    return model.prior.sample(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_zero_guidance_is_the_unguided_sampler_bit_for_bit() -> None:
    model = _egnn_f2d2()
    x, log_q = model.sample(9, steps=2, seed=3)
    x0, log_q0 = model.sample(9, steps=2, seed=3, guidance=0.0)
    assert torch.equal(x, x0) and torch.equal(log_q, log_q0)
    field = likelihood_guidance(model, _noise(model, 9, 3))
    x1, log_q1 = model.draw_guided(field, steps=2, guidance=0.0)
    torch.testing.assert_close(x1, x, rtol=0, atol=1e-14)
    torch.testing.assert_close(log_q1, log_q, rtol=0, atol=1e-12)
    xg, _ = model.sample(9, steps=2, seed=3, guidance=0.1)
    assert float((xg - x).abs().max()) > 1e-3, "guidance 0.1 left the samples unchanged"


def _guided_map(model: F2D2, guidance: float, steps: int) -> callable:
    """z (dim,) -> x (dim,): the guided step by autograd, then ``steps`` jumps (flow units)."""

    def fn(zi: Tensor) -> Tensor:
        y = zi[None]
        with torch.enable_grad():
            y_in = y if y.requires_grad else y.requires_grad_(True)
            (g,) = torch.autograd.grad(
                guidance_objective(model, y_in).sum(), y_in, create_graph=True
            )
        y = y + guidance * model._project(g)
        for k in range(steps):
            y, _, _ = model.jump(y, k / steps, (k + 1) / steps)
        return y[0]

    return fn


@pytest.mark.parametrize("steps", [1, 3])
def test_guided_log_q_is_the_density_of_the_exact_guided_map(steps: int) -> None:
    """Exact heads: log q of the guided sampler = log p(z) - log|det| of the brute-force
    autograd Jacobian of the whole map z -> z + lam grad l(z) -> K jumps."""
    model = QuadraticF2D2(3)
    lam = 0.3
    x, log_q = model.sample(6, steps=steps, seed=5, guidance=lam)
    z = _noise(model, 6, 5)
    fn = _guided_map(model, lam, steps)
    for i in range(6):
        jac = torch.autograd.functional.jacobian(fn, z[i])
        torch.testing.assert_close(fn(z[i]), x[i], rtol=0, atol=1e-12)
        expected = model.prior.log_prob(z[i : i + 1])[0] - torch.linalg.slogdet(jac)[1]
        assert abs(float(log_q[i] - expected)) < 1e-10, (
            f"sample {i}: guided log q {float(log_q[i]):.12f}, true density {float(expected):.12f}"
        )
    # the guidance term is not negligible here: the unguided log q of the same points differs
    _, log_q0 = model.sample(6, steps=steps, seed=5)
    assert float((log_q - log_q0).abs().min()) > 0.1


def test_guided_linear_map_gives_the_closed_form_gaussian() -> None:
    """v = A x: l(z) = log N(z) - tr A, so z' = (1 - lam) z and x = (1 - lam) expm(A) z, whose
    density is N(0, (1 - lam)^2 M M^T), M = expm(A)."""
    model = LinearF2D2(3)
    lam = 0.4
    x, log_q = model.sample(50, steps=2, seed=7, guidance=lam)
    m = (1 - lam) * torch.linalg.matrix_exp(A)
    own = torch.distributions.MultivariateNormal(torch.zeros(3, dtype=torch.float64), m @ m.T)
    torch.testing.assert_close(log_q, own.log_prob(x), rtol=0, atol=1e-10)
    field = likelihood_guidance(model, _noise(model, 50, 7))
    assert field.largest_scale() == pytest.approx(1.0)  # the Hessian is -I
    torch.testing.assert_close(field.scale_limits(), torch.ones(50, dtype=torch.float64))


def test_guidance_term_matches_brute_force_on_an_egnn_student() -> None:
    """A network student (mean-free, 4-dim subspace): the guided log q differs from the
    unguided log q at the guided noise by exactly -log det of the guided step's Jacobian on the
    subspace (brute force), and the samples are that noise pushed by the K jumps."""
    model = _egnn_f2d2()
    lam, steps = 0.15, 2
    x, log_q = model.sample(5, steps=steps, seed=2, guidance=lam)
    z = _noise(model, 5, 2)
    basis = subspace_basis(model.prior, z)
    step = _guided_map(model, lam, 0)
    for i in range(5):
        jac = basis.T @ torch.autograd.functional.jacobian(step, z[i]) @ basis
        zg = step(z[i])[None].detach()
        assert abs(float(zg.reshape(3, 2).mean(0).abs().max())) < 1e-12, "left the subspace"
        y, ladj = model.push(zg, steps)
        torch.testing.assert_close(y[0], x[i], rtol=0, atol=1e-12)
        expected = model.prior.log_prob(z[i : i + 1])[0] - torch.linalg.slogdet(jac)[1] - ladj[0]
        assert abs(float(log_q[i] - expected)) < 1e-10, (float(log_q[i]), float(expected))


def test_draw_guided_reuses_one_field_for_every_scale() -> None:
    model = _egnn_f2d2()
    field = likelihood_guidance(model, _noise(model, 12, 4), batch_rows=5)  # uneven chunks
    for lam, steps in [(0.05, 1), (0.1, 4)]:
        x, log_q = model.sample(12, steps=steps, seed=4, guidance=lam)
        x2, log_q2 = model.draw_guided(field, steps=steps, guidance=lam)
        torch.testing.assert_close(x2, x, rtol=0, atol=1e-12)
        torch.testing.assert_close(log_q2, log_q, rtol=0, atol=1e-10)


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf, "x"])
def test_invalid_guidance_is_refused_at_the_call(bad: object) -> None:
    model = _egnn_f2d2()
    with pytest.raises(ValueError, match="guidance must be a number >= 0"):
        model.sample(4, steps=1, guidance=bad)


def test_a_scale_that_folds_the_noise_map_is_refused() -> None:
    """The linear case has Hessian -I: I + lam H is indefinite beyond lam = 1."""
    model = LinearF2D2(3)
    for lam in (1.5, 2.5):
        with pytest.raises(ValueError, match=r"not invertible at 8 of 8 .* below 1, the largest"):
            model.sample(8, steps=1, guidance=lam)


def test_other_students_refuse_guidance() -> None:
    falcon = FALCON.build(
        "egnn",
        prior=MeanFreeGaussian(3, 2),
        n_particles=3,
        spatial_dim=2,
        backbone_options={"hidden": 8, "layers": 1},
    )
    with pytest.raises(TypeError, match=r"FALCON has no sampling settings \['guidance'\]"):
        falcon.sample(4, steps=1, guidance=0.1)


def _saved_dw4_student(cls: type, folder: Path) -> Any:
    """A small random EGNN student of ``cls`` for ``dw4`` saved as ``folder/student.pt``."""
    torch.manual_seed(0)
    folder.mkdir(exist_ok=True)
    student = cls.build(
        "egnn",
        prior=MeanFreeGaussian(4, 2),
        n_particles=4,
        spatial_dim=2,
        backbone_options={"hidden": 8, "layers": 1},
        system="dw4",
    )
    student.save(folder / "student.pt")
    return student


def test_sample_command_takes_guidance(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``boltzflow sample --guidance`` writes the guided sampler's samples and log q (the same
    as the library's for the same seed) and records the scale; refused for other models and
    for bad values."""
    student = _saved_dw4_student(F2D2, tmp_path)
    out = tmp_path / "s.h5"
    args = ["sample", str(tmp_path), "--steps", "2", "-n", "20", "--seed", "3", "-o", str(out)]
    assert main([*args, "--guidance", "0.1"]) == 0
    data = read_samples(out)
    x, log_q = student.sample(20, steps=2, seed=3, guidance=0.1)
    torch.testing.assert_close(torch.as_tensor(data.log_q), log_q.double(), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.as_tensor(data.x), x.double(), rtol=0, atol=1e-6)
    assert data.provenance["sampling"] == {"guidance": 0.1} and "ESS/N" in capsys.readouterr().out
    for bad_value in ("-1", "nan"):
        with pytest.raises(SystemExit) as stop:  # argparse's usage error
            main([*args, "--guidance", bad_value])
        assert stop.value.code == 2
        assert "--guidance must be a number >= 0" in capsys.readouterr().err
    other = tmp_path / "falcon"
    _saved_dw4_student(FALCON, other)
    bad = ["sample", str(other), "-n", "5", "-o", str(tmp_path / "f.h5")]
    assert main([*bad, "--guidance", "0.1"]) == 2
    assert "--guidance is a setting of F2D2 students" in capsys.readouterr().err


def test_guidance_script_on_a_smoke_trained_student(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """``workflows/f2d2_guidance.py`` end to end: every (K, lam) cell of the same draws, the
    lam = 0 column equal to the unguided sampler's ESS/N, the JSON written."""
    _, student = smoke_f2d2(tmp_path)
    spec = importlib.util.spec_from_file_location(
        "f2d2_guidance_script", Path(__file__).resolve().parents[2] / "workflows/f2d2_guidance.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = tmp_path / "g.json"
    args = ["--student", str(student), "--n", "40", "--steps", "1", "2", "--batch-size", "16"]
    out = module.main([*args, "--guidance", "0", "0.01", "0.02", "--json", str(report)])
    cells = {(c["steps"], c["guidance"]): c for c in json.loads(report.read_text())["cells"]}
    assert set(cells) == {(k, lam) for k in (1, 2) for lam in (0.0, 0.01, 0.02)}
    model = load_student(student)
    system = load_system("dw4")
    for k in (1, 2):
        x, log_q = model.sample(40, steps=k, seed=0)
        lw = -system.energy(x.double()).detach() - log_q.double()
        assert cells[k, 0.0]["ess_fraction"] == pytest.approx(ess_fraction(lw), abs=1e-9)
        for lam in (0.01, 0.02):
            assert cells[k, lam]["invertible"] and 0 < cells[k, lam]["ess_fraction"] <= 1
    assert out["largest_scale"] > 0.02 and "| K | lam = 0 |" in capsys.readouterr().out
    q = out["scale_limit_quantiles"]
    assert out["largest_scale"] <= q["q0.1"] <= q["q1"] <= q["q10"] <= q["q50"]
    with pytest.raises(SystemExit):
        module.main([*args, "--guidance", "-0.1"])


# -- exact_logdet: the same samples weighted by the exact log-det of the map they went through --


def _k_step_map(model: F2D2, steps: int) -> callable:
    """z (dim,) -> x (dim,): ``steps`` jumps of the student (flow units), projected."""

    def fn(zi: Tensor) -> Tensor:
        y = zi[None]
        for k in range(steps):
            y = model._project(model.jump(y, k / steps, (k + 1) / steps)[0])
        return y[0]

    return fn


@pytest.mark.parametrize("steps", [1, 3])
def test_exact_logdet_is_the_density_of_the_k_step_map(steps: int) -> None:
    """On a random mean-free EGNN F2D2 (head untrained): same samples as the head sampler, and
    log q = log p(z) - log|det B^T J B| of the brute-force Jacobian of the whole K-step map on
    the mean-free subspace; the head's log q is far from it."""
    model = _egnn_f2d2()
    x_head, log_q_head = model.sample(5, steps=steps, seed=2)
    x, log_q = model.sample(5, steps=steps, seed=2, exact_logdet=True)
    torch.testing.assert_close(x, x_head, rtol=0, atol=1e-12)
    z = _noise(model, 5, 2)
    basis = subspace_basis(model.prior, z)
    fn = _k_step_map(model, steps)
    for i in range(5):
        jac = basis.T @ torch.autograd.functional.jacobian(fn, z[i]) @ basis
        expected = model.prior.log_prob(z[i : i + 1])[0] - torch.linalg.slogdet(jac)[1]
        assert abs(float(log_q[i] - expected)) < 1e-9, f"sample {i}"
    assert float((log_q - log_q_head).abs().max()) > 0.1, "an untrained head matched exactly"


def test_exact_logdet_equals_exact_heads_with_and_without_guidance() -> None:
    """Exact heads (v = C x^2): the head's log q is already the density, so both agree."""
    model = QuadraticF2D2(3)
    for guidance in (0.0, 0.3):
        _, log_q = model.sample(6, steps=2, seed=4, guidance=guidance)
        _, log_q_exact = model.sample(6, steps=2, seed=4, guidance=guidance, exact_logdet=True)
        torch.testing.assert_close(log_q_exact, log_q, rtol=0, atol=1e-10)


def test_sample_command_takes_exact_logdet(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``boltzflow sample --exact-logdet`` writes the library's exact log q and records how
    log q was obtained; refused for another kind of student."""
    student = _saved_dw4_student(F2D2, tmp_path)
    out = tmp_path / "s.h5"
    args = ["sample", str(tmp_path), "--steps", "2", "-n", "12", "--seed", "1", "-o", str(out)]
    assert main([*args, "--exact-logdet"]) == 0
    data = read_samples(out)
    _, log_q = student.sample(12, steps=2, seed=1, exact_logdet=True)
    torch.testing.assert_close(torch.as_tensor(data.log_q), log_q.double(), rtol=0, atol=1e-6)
    assert data.provenance["sampling"] == {"exact_logdet": True}
    assert data.provenance["log_q_kind"] == "exact step log-det"
    assert main(args) == 0
    assert read_samples(out).provenance["log_q_kind"] == "divergence head"
    other = tmp_path / "falcon"
    _saved_dw4_student(FALCON, other)
    capsys.readouterr()
    bad = ["sample", str(other), "-n", "5", "-o", str(tmp_path / "f.h5"), "--exact-logdet"]
    assert main(bad) == 2
    assert "--exact-logdet is a setting of F2D2 students" in capsys.readouterr().err
