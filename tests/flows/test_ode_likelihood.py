"""ODE likelihoods against closed forms: a linear velocity field maps a Gaussian to a Gaussian."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from boltzflow.flows.cnf import TeacherCNF
from boltzflow.flows.ode import (
    exact_divergence,
    gauss_legendre,
    hutchinson_divergence,
    integrate,
)
from boltzflow.flows.priors import MeanFreeGaussian, StandardGaussian
from boltzflow.nn import EGNN
from boltzflow.systems.particles import remove_mean

F64 = torch.float64


class Linear(nn.Module):
    """v(t, x) = (a0 + a1 t) A x + b: all A(t) commute, so x(1) = expm(c A) x(0) + ..."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, a1: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.register_buffer("b", b)
        self.a1 = a1

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (1.0 + self.a1 * t) * (x @ self.a.T) + self.b


def _gaussian_logpdf(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    return torch.distributions.MultivariateNormal(mean, covariance_matrix=cov).log_prob(x)


@pytest.fixture
def linear_case():
    gen = torch.Generator().manual_seed(3)
    dim = 4
    a = 0.4 * torch.randn(dim, dim, generator=gen, dtype=F64)
    b = torch.randn(dim, generator=gen, dtype=F64)
    return a, b


def test_gauss_legendre_is_exact_for_degree_2n_minus_1():
    nodes, weights = gauss_legendre(5)
    for k in range(10):  # int_0^1 t^k dt = 1/(k+1)
        assert float((weights * nodes**k).sum()) == pytest.approx(1 / (k + 1), abs=1e-14)


@pytest.mark.parametrize("divergence", ["exact", "quadrature"])
def test_linear_field_forward_and_backward_match_closed_form(linear_case, divergence):
    """v = A x + b with x0 ~ N(0, I): x1 = M x0 + c, M = expm(A), c = A^-1 (M - I) b."""
    a, b = linear_case
    teacher = TeacherCNF(Linear(a, b), StandardGaussian(4))
    x1, log_q = teacher.sample(
        64, seed=0, method="dopri5", atol=1e-10, rtol=1e-10, divergence=divergence
    )
    x1, log_q = x1.double(), log_q.double()
    m = torch.linalg.matrix_exp(a)
    c = torch.linalg.solve(a, (m - torch.eye(4, dtype=F64)) @ b)
    expected = _gaussian_logpdf(x1, c, m @ m.T)
    err = (log_q - expected).abs().max()
    assert err < 1e-4, f"forward log q off the closed form by {err:.2e}"
    # backward: the likelihood of the same points through the reverse solve
    back = teacher.log_prob(x1, atol=1e-10, rtol=1e-10, divergence=divergence)
    err = (back - expected).abs().max()
    assert err < 1e-4, f"backward log q off the closed form by {err:.2e}"


def test_time_dependent_linear_field_closed_form(linear_case):
    """v = (1 + t) A x: x1 = expm(1.5 A) x0 and log q1 = log p0(x0) - 1.5 tr A."""
    a, _ = linear_case
    field = Linear(a, torch.zeros(4, dtype=F64), a1=1.0)
    x0 = torch.randn(32, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    res = integrate(field, x0, atol=1e-10, rtol=1e-10)
    m = torch.linalg.matrix_exp(1.5 * a)
    assert (res.x - x0 @ m.T).abs().max() < 1e-8
    assert (res.delta_logp + 1.5 * torch.trace(a)).abs().max() < 1e-8


def test_forward_then_backward_returns_start_point_and_log_density(linear_case):
    a, b = linear_case
    field = Linear(a, b)
    x0 = torch.randn(50, 4, dtype=F64, generator=torch.Generator().manual_seed(2))
    fwd = integrate(field, x0, t0=0.0, t1=1.0, atol=1e-10, rtol=1e-10)
    bwd = integrate(field, fwd.x, t0=1.0, t1=0.0, atol=1e-10, rtol=1e-10)
    assert (bwd.x - x0).abs().max() < 1e-5
    assert (fwd.delta_logp + bwd.delta_logp).abs().max() < 1e-5


def test_mean_free_linear_field_density_on_the_subspace():
    """A translation-invariant, mean-free linear field P K P: the full-coordinate trace equals the
    divergence on the (n-1)d subspace, and log q is the subspace density of M x0."""
    n, d = 3, 2
    gen = torch.Generator().manual_seed(5)
    k = 0.3 * torch.randn(n * d, n * d, generator=gen, dtype=F64)
    eye = torch.eye(n, dtype=F64)
    p = torch.kron(eye - torch.full((n, n), 1 / n, dtype=F64), torch.eye(d, dtype=F64))
    a = p @ k @ p
    prior = MeanFreeGaussian(n, d)
    teacher = TeacherCNF(Linear(a, torch.zeros(n * d, dtype=F64)), prior)
    x1, log_q = teacher.sample(40, seed=1, atol=1e-10, rtol=1e-10)
    x1 = x1.double()
    assert remove_mean(x1, n, d).sub(x1).abs().max() < 1e-10
    x0 = x1 @ torch.linalg.matrix_exp(-a).T  # expm(-A) inverts the map on the subspace
    expected = -0.5 * x0.pow(2).sum(-1) - 0.5 * (n - 1) * d * math.log(2 * math.pi)
    expected = expected - torch.trace(a)
    assert (log_q.double() - expected).abs().max() < 1e-4
    back = teacher.log_prob(x1, atol=1e-10, rtol=1e-10)
    assert (back.double() - expected).abs().max() < 1e-4


def _perturbed_egnn(std: float) -> EGNN:
    """A small float64 EGNN whose field is far from the near-zero initialisation."""
    torch.manual_seed(0)
    net = EGNN(4, 2, hidden=16, layers=2).double()
    for layer in net.layers:
        nn.init.normal_(layer.coord_mlp[-1].weight, std=std)
    return net


@pytest.mark.parametrize("batch_rows", [None, 2])
@pytest.mark.parametrize("mode", ["vjp", "jvp", "loop"])
def test_exact_divergence_equals_autograd_jacobian_trace(mode, batch_rows):
    net = _perturbed_egnn(0.05)
    x = remove_mean(torch.randn(5, 8, dtype=F64), 4, 2)
    t = torch.tensor(0.3, dtype=F64)
    v, div = exact_divergence(net, t, x, mode=mode, batch_rows=batch_rows)  # 2: uneven chunks
    for i in range(5):
        jac = torch.autograd.functional.jacobian(lambda y: net(t, y[None])[0], x[i])
        assert float(div[i]) == pytest.approx(float(torch.trace(jac.detach())), abs=1e-10)
    assert torch.allclose(v, net(t, x))


def test_exact_divergence_chunks_per_sample_times_with_their_rows():
    net = _perturbed_egnn(0.05)
    x = remove_mean(torch.randn(7, 8, dtype=F64), 4, 2)
    t = torch.linspace(0.0, 1.0, 7, dtype=F64)
    v, div = exact_divergence(net, t, x, batch_rows=3)
    v_all, div_all = exact_divergence(net, t, x, batch_rows=7)
    assert torch.allclose(v, v_all, atol=1e-12) and torch.allclose(div, div_all, atol=1e-12)
    with pytest.raises(ValueError, match="batch_rows"):
        exact_divergence(net, t, x, batch_rows=0)


def test_hutchinson_is_unbiased():
    """Mean of eps^T J eps over Rademacher probes -> tr J, within 5 standard errors."""
    torch.manual_seed(1)
    a = torch.randn(6, 6, dtype=F64)
    field = Linear(a, torch.zeros(6, dtype=F64))
    x = torch.zeros(4000, 6, dtype=F64)
    eps = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(0)).double() * 2 - 1
    _, est = hutchinson_divergence(field, torch.tensor(0.0, dtype=F64), x, eps)
    mean, se = float(est.mean()), float(est.std() / math.sqrt(len(est)))
    exact = float(torch.trace(a))
    assert abs(mean - exact) < 5 * se, f"observed {mean:.4f} ± {se:.4f}, expected {exact:.4f}"


@pytest.mark.parametrize(
    ("method", "steps", "nfe"), [("euler", 10, 10), ("midpoint", 10, 20), ("rk4", 10, 40)]
)
def test_fixed_step_methods_count_evaluations(linear_case, method, steps, nfe):
    a, b = linear_case
    x0 = torch.randn(8, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    res = integrate(Linear(a, b), x0, method=method, steps=steps)
    assert res.nfe == nfe and res.trace_evals == nfe
    # the trace of a linear field is constant: every fixed-step rule integrates it exactly
    assert (res.delta_logp + torch.trace(a)).abs().max() < 1e-10


def test_rk4_converges_to_the_closed_form(linear_case):
    a, b = linear_case
    x0 = torch.randn(8, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    res = integrate(Linear(a, b), x0, method="rk4", steps=200)
    m = torch.linalg.matrix_exp(a)
    c = torch.linalg.solve(a, (m - torch.eye(4, dtype=F64)) @ b)
    assert (res.x - (x0 @ m.T + c)).abs().max() < 1e-8


def test_quadrature_trace_matches_exact_trace_on_a_nonlinear_field():
    net = _perturbed_egnn(0.02)
    x0 = remove_mean(torch.randn(8, 8, dtype=F64), 4, 2)
    exact = integrate(net, x0, atol=1e-8, rtol=1e-8)
    quad = integrate(net, x0, atol=1e-8, rtol=1e-8, divergence="quadrature", quadrature_points=12)
    assert quad.trace_evals == 12 and exact.trace_evals == exact.nfe
    assert (quad.x - exact.x).abs().max() < 1e-6
    assert exact.delta_logp.abs().max() > 0.5  # a field with a real volume change
    err = (quad.delta_logp - exact.delta_logp).abs().max()
    assert err < 2e-3, f"12-point Gauss-Legendre trace off by {err:.2e}"


def test_errors_name_the_valid_choices(linear_case):
    a, b = linear_case
    x = torch.zeros(2, 4, dtype=F64)
    with pytest.raises(ValueError, match="dopri5"):
        integrate(Linear(a, b), x, method="dopri55")
    with pytest.raises(ValueError, match="hutchinson"):
        integrate(Linear(a, b), x, divergence="approx")
    with pytest.raises(ValueError, match="needs steps"):
        integrate(Linear(a, b), x, method="euler")
    with pytest.raises(ValueError, match="adaptive"):
        integrate(Linear(a, b), x, method="dopri5", steps=4)
    for atol, rtol in ((0.0, 0.0), (-1.0, 1e-5), (1e-5, float("nan"))):
        with pytest.raises(ValueError, match="atol and rtol must be positive"):
            integrate(Linear(a, b), x, atol=atol, rtol=rtol)  # not torchdiffeq's AssertionError
    with pytest.raises(TypeError):
        integrate(Linear(a, b), x, atols=1e-3)  # keyword-only options: a typo raises
    with pytest.raises(ValueError, match="times"):
        integrate(Linear(a, b), x, times=torch.zeros(1, dtype=F64))
    with pytest.raises(ValueError, match="times"):
        integrate(Linear(a, b), x, divergence="quadrature", times=torch.linspace(0, 1, 3))


@pytest.mark.parametrize("divergence", ["exact", "none"])
def test_output_times_give_the_path_of_the_same_solve(linear_case, divergence):
    a, b = linear_case
    x0 = torch.randn(3, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    times = torch.linspace(0.0, 1.0, 5, dtype=F64)
    res = integrate(Linear(a, b), x0, divergence=divergence, atol=1e-10, rtol=1e-10, times=times)
    mid = integrate(Linear(a, b), x0, t1=0.5, divergence=divergence, atol=1e-10, rtol=1e-10)
    assert res.path.shape == (5, 3, 4) and torch.equal(res.path[-1], res.x)
    torch.testing.assert_close(res.path[2], mid.x, atol=1e-8, rtol=0)
    if divergence == "none":
        assert res.delta_logp_path is None
    else:
        torch.testing.assert_close(res.delta_logp_path[2], mid.delta_logp, atol=1e-8, rtol=0)
    assert integrate(Linear(a, b), x0, divergence=divergence).path is None
