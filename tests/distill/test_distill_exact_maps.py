"""Student losses against exact flow maps of a linear field, and log q against brute force.

For v(t, x) = A x the flow map is X(x, s, t) = expm((t - s) A) x, the average velocity is
u = (expm((t - s) A) - I) x / (t - s) and the average divergence is D = tr A for every step.
Every self-consistency loss must vanish on this map (to float64 round-off) and must not vanish
when the map is perturbed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from boltzflow.distill import F2D2, FALCON, EulerBaseline
from boltzflow.distill.f2d2 import f2d2_diagonal_loss, f2d2_pair_loss, f2d2_semigroup_loss
from boltzflow.distill.falcon import (
    falcon_diagonal_loss,
    falcon_energy_loss,
    falcon_inverse_loss,
    falcon_likelihood_loss,
    falcon_logdet_pair_loss,
    falcon_meanflow_loss,
)
from boltzflow.distill.flowmap import newton_inverse
from boltzflow.flows.cnf import TeacherCNF
from boltzflow.flows.priors import MeanFreeGaussian, StandardGaussian

A = torch.tensor([[-0.3, 0.8], [-0.5, 0.2]], dtype=torch.float64)


def _expm_step(x: Tensor, s: Tensor, t: Tensor, a: Tensor = A) -> Tensor:
    mats = torch.linalg.matrix_exp((t - s)[:, None, None] * a)
    return torch.einsum("bij,bj->bi", mats, x)


class LinearFlowMap(nn.Module):
    """Exact average velocity of v = A x, with the backbone signature ``net(t, x, s=s)``."""

    def __init__(self, perturb: float = 0.0) -> None:
        super().__init__()
        self.perturb = perturb

    def forward(self, t: Tensor, x: Tensor, s: Tensor | None = None) -> Tensor:
        s = torch.as_tensor(s, dtype=x.dtype).expand(len(x))
        t = torch.as_tensor(t, dtype=x.dtype).expand(len(x))
        h = t - s
        small = h.abs() < 1e-12
        hs = torch.where(small, torch.ones_like(h), h)
        u = (_expm_step(x, s, t) - x) / hs[:, None]
        u = torch.where(small[:, None], x @ A.T, u)
        return u + self.perturb * (t * s)[:, None] * x.flip(-1)


class LinearF2D2(nn.Module):
    """F2D2-shaped exact joint map: u as above and D = tr A (+ optional perturbation)."""

    jump = F2D2.jump

    def __init__(self, perturb: float = 0.0) -> None:
        super().__init__()
        self.net = LinearFlowMap(perturb)
        self.perturb = perturb

    def forward(self, x: Tensor, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        d = torch.full((len(x),), float(torch.trace(A)), dtype=x.dtype)
        return self.net(t, x, s=s), d + self.perturb * (t - s)


def _points(n: int = 64) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    s = torch.rand(n, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64)
    m = s + torch.rand(n, generator=g, dtype=torch.float64) * (t - s)
    return x, s, t, m


def test_f2d2_losses_vanish_on_exact_linear_flow_map() -> None:
    x, s, t, m = _points()
    exact = LinearF2D2()
    semi, _ = f2d2_semigroup_loss(exact, x, s, t, m)
    diag, _ = f2d2_diagonal_loss(exact, x, t, x @ A.T, torch.full_like(t, float(torch.trace(A))))
    x_t = _expm_step(x, s, t)
    pair, _ = f2d2_pair_loss(exact, x, s, x_t, t, -(t - s) * torch.trace(A))
    for name, val in {"semigroup": semi, "diagonal": diag, "pairs": pair}.items():
        assert float(val) < 1e-20, f"{name} loss {float(val):.3e} on the exact map, expected 0"
    _, parts = f2d2_semigroup_loss(LinearF2D2(perturb=0.3), x, s, t, m)
    assert parts["semi_u"] > 1e-4 and parts["semi_div"] > 1e-4, f"perturbed map: {parts}"


def test_falcon_losses_vanish_on_exact_linear_flow_map() -> None:
    x, s, t, _ = _points()
    model = FALCON(LinearFlowMap(), StandardGaussian(2), signed=False, model_config={})
    v = x @ A.T
    losses = {
        "flow matching": falcon_diagonal_loss(model, x, s, v),
        "meanflow": falcon_meanflow_loss(model, x, s, t, v),
        "inverse": falcon_inverse_loss(model, x, s, t),
        # log p_t(X) - log p_s(x) = -(t - s) tr A along the linear flow
        "logdet": falcon_logdet_pair_loss(model, x, s, t, -(t - s) * torch.trace(A)),
    }
    for name, val in losses.items():
        assert float(val) < 1e-20, f"FALCON {name} loss {float(val):.3e} on the exact map"
    bad = FALCON(LinearFlowMap(0.3), StandardGaussian(2), signed=False, model_config={})
    assert float(falcon_meanflow_loss(bad, x, s, t, v)) > 1e-4
    assert float(falcon_inverse_loss(bad, x, s, t)) > 1e-6
    assert float(falcon_logdet_pair_loss(bad, x, s, t, -(t - s) * torch.trace(A))) > 1e-8


def _small_egnn_falcon() -> FALCON:
    """A float64 FALCON on 3 particles in 2-D (EGNN 2 x 8, mean-free prior)."""
    return FALCON.build(
        "egnn",
        prior=MeanFreeGaussian(3, 2),
        n_particles=3,
        spatial_dim=2,
        backbone_options={"hidden": 8, "layers": 2},
    ).double()


def _check_gradient(model: nn.Module, loss: Callable[[], Tensor], name: str) -> None:
    """The autograd gradient of ``loss()`` along a random direction of the first weight matrix
    matches a central finite difference (float64 model)."""
    model.zero_grad()
    loss().backward()
    param = next(p for p in model.parameters() if p.ndim == 2)
    direction = torch.randn_like(param)
    analytic = float((param.grad * direction).sum())
    eps = 1e-6
    with torch.no_grad():
        param.add_(eps * direction)
        up = float(loss())
        param.sub_(2 * eps * direction)
        down = float(loss())
        param.add_(eps * direction)
    numeric = (up - down) / (2 * eps)
    assert abs(analytic) > 1e-6, f"the {name} loss gives no gradient"
    assert abs(analytic - numeric) < 1e-6 * max(1.0, abs(numeric)), (analytic, numeric)


def test_falcon_logdet_loss_gradient_matches_finite_differences() -> None:
    # the loss differentiates through vmapped reverse-mode Jacobian rows and slogdet
    torch.manual_seed(4)
    model = _small_egnn_falcon()
    x = model.prior.sample(6, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    s = torch.zeros(6, dtype=torch.float64)
    t = torch.full((6,), 0.5, dtype=torch.float64)
    target = torch.linspace(-0.5, 0.5, 6, dtype=torch.float64)
    _check_gradient(model, lambda: falcon_logdet_pair_loss(model, x, s, t, target), "log-det")


def test_falcon_energy_loss_is_zero_when_the_target_is_the_maps_own_density() -> None:
    """The 2-step push of N(0, I) by the exact linear map is N(0, M M^T), M = expm(A); with
    u = -log N(0, M M^T) (normalised) every sample has log q + u = 0, so the reverse KL is 0.
    Any other target gives a positive value (here the average KL, up to sampling error)."""
    model = FALCON(LinearFlowMap(), StandardGaussian(2), signed=False, model_config={})
    m = torch.linalg.matrix_exp(A)
    own = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=torch.float64), m @ m.T)
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    matched = falcon_energy_loss(model, z, 2, lambda x: -own.log_prob(x))
    assert abs(float(matched)) < 1e-12, float(matched)

    def standard(x: Tensor) -> Tensor:
        return 0.5 * x.pow(2).sum(-1) + math.log(2 * math.pi)

    cov = m @ m.T  # KL(N(0, C) || N(0, I)) = (tr C - 2 - log det C) / 2
    kl = 0.5 * (float(torch.trace(cov)) - 2 - float(torch.logdet(cov)))
    val = float(falcon_energy_loss(model, z, 2, standard))
    assert kl > 0.05 and abs(val - kl) < 0.1 * kl, (val, kl)

    def half_broken(x: Tensor) -> Tensor:  # non-finite energies are left out, not propagated
        u = -own.log_prob(x)
        return torch.where(torch.arange(len(x)) % 2 == 0, u, torch.full_like(u, math.inf))

    assert abs(float(falcon_energy_loss(model, z, 2, half_broken))) < 1e-12


def test_falcon_energy_loss_gradient_matches_finite_differences() -> None:
    # gradients flow through every step's map and its exact log-determinant
    torch.manual_seed(6)
    model = _small_egnn_falcon()
    z = model.prior.sample(5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def energy(x: Tensor) -> Tensor:
        return 0.5 * x.pow(2).sum(-1) + 0.3 * x[:, 0] ** 4

    def loss() -> Tensor:
        return falcon_energy_loss(model, z, 2, energy)

    _check_gradient(model, loss, "energy")


def test_falcon_exact_pull_inverts_the_linear_map_and_gives_its_density() -> None:
    """The 2-step push of N(0, I) by the exact linear map is N(0, M M^T), M = expm(A): the
    Newton preimage of x is M^-1 x and log q(x) is that Gaussian's log density; the likelihood
    loss is its negative mean."""
    model = FALCON(LinearFlowMap(), StandardGaussian(2), signed=False, model_config={})
    m = torch.linalg.matrix_exp(A)
    own = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=torch.float64), m @ m.T)
    x = 2.0 * torch.randn(200, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    z, ladj, res = model.exact_pull(x, 2, tol=1e-12)
    assert float(res.max()) < 1e-12
    torch.testing.assert_close(z, x @ torch.linalg.inv(m).T, rtol=0, atol=1e-10)
    torch.testing.assert_close(model.prior.log_prob(z) - ladj, own.log_prob(x), rtol=0, atol=1e-10)
    nll, dropped = falcon_likelihood_loss(model, x, 2, tol=1e-12)
    assert dropped == 0.0
    assert abs(float(nll) + float(own.log_prob(x).mean())) < 1e-10


def test_falcon_exact_pull_round_trips_an_egnn_push() -> None:
    """On a small EGNN FALCON the Newton preimages of its own 2-step samples are their noise and
    the log-determinants equal those of the push (unlike the learned backward map)."""
    torch.manual_seed(8)
    model = _small_egnn_falcon()
    z = model.prior.sample(32, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    with torch.no_grad():
        x, ladj = model.push(z, 2)
    back, ladj_back, res = model.exact_pull(x, 2, tol=1e-11)
    assert float(res.max()) < 1e-11
    torch.testing.assert_close(back, z, rtol=0, atol=1e-8)
    torch.testing.assert_close(ladj_back, ladj, rtol=0, atol=1e-8)
    # log_prob scores points with the sampler's own density (preimages to its tolerance, 1e-5)
    torch.testing.assert_close(
        model.log_prob(x, steps=2), model.prior.log_prob(z) - ladj, rtol=0, atol=1e-4
    )
    learned, _ = model.learned_pull(x, 2)
    assert float((learned - z).norm(dim=-1).median()) > 1e-4, "untrained backward map is exact?"


class TanhJump(nn.Module):
    """One jump 0 -> 1 is X(x) = tanh(x): its image is the open square (-1, 1)^2."""

    def forward(self, t: Tensor, x: Tensor, s: Tensor | None = None) -> Tensor:
        h = torch.as_tensor(t - s, dtype=x.dtype).expand(len(x))
        return (torch.tanh(x) - x) / torch.where(h == 0, 1.0, h)[:, None]


def test_falcon_log_prob_is_nan_with_a_warning_off_the_maps_image() -> None:
    model = FALCON(TanhJump(), StandardGaussian(2), signed=False, model_config={})
    x = torch.tensor([[0.5, -0.3], [2.0, 0.1]], dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="1 of 2 points were not inverted"):
        logq = model.log_prob(x, steps=1)
    z = torch.atanh(x[0])
    exact = model.prior.log_prob(z[None]) - torch.log1p(-(x[0] ** 2)).sum()
    torch.testing.assert_close(logq[:1].double(), exact, rtol=0, atol=1e-4)
    assert torch.isnan(logq[1])


def test_falcon_likelihood_loss_gradient_matches_finite_differences() -> None:
    # implicit-function gradients of the Newton preimages plus the log-determinants' own
    torch.manual_seed(10)
    model = _small_egnn_falcon()
    x = model.prior.sample(5, generator=torch.Generator().manual_seed(11), dtype=torch.float64)

    def loss() -> Tensor:
        return falcon_likelihood_loss(model, x, 2, tol=1e-12)[0]

    _check_gradient(model, loss, "likelihood")


def test_newton_inverse_reports_points_off_the_image() -> None:
    """tanh maps onto (-1, 1): the target 0.5 is solved to tolerance, the target 2 is not; its
    residual stays above tol (finite, not NaN), and the search stops instead of diverging."""
    y = torch.tensor([[0.5, -0.3], [2.0, 0.1]], dtype=torch.float64)
    x, jac, res = newton_inverse(
        torch.tanh, y, torch.zeros_like(y), torch.eye(2, dtype=torch.float64), tol=1e-10
    )
    assert torch.isfinite(x).all() and torch.isfinite(res).all()
    torch.testing.assert_close(torch.tanh(x[0]), y[0], rtol=0, atol=1e-10)
    assert float(res[0]) <= 1e-10 and float(res[1]) > 0.99
    torch.testing.assert_close(jac[0], torch.diag(1 - torch.tanh(x[0]) ** 2), rtol=0, atol=1e-12)


def _subspace_basis(n: int, d: int) -> Tensor:
    """Orthonormal ``(n d, (n - 1) d)`` basis of the mean-free subspace."""
    centre = torch.eye(n, dtype=torch.float64) - 1.0 / n
    q, _ = torch.linalg.qr(torch.kron(centre, torch.eye(d, dtype=torch.float64)))
    return q[:, : (n - 1) * d]


@pytest.mark.parametrize("cpu_rows", [256, 2])
@pytest.mark.parametrize("steps", [1, 3])
def test_falcon_log_q_equals_brute_force_jacobian_of_its_composed_map(
    steps: int, cpu_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # cpu_rows = 2: the step Jacobians go through in uneven chunks of 2 sample rows
    monkeypatch.setattr("boltzflow.flows.ode.CPU_JACOBIAN_ROWS", cpu_rows)
    torch.manual_seed(1)
    model = _small_egnn_falcon()
    with torch.no_grad():  # make the map far from the identity
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, log_q = model.sample(5, steps=steps, seed=2)
    z = model.prior.sample(5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    basis = _subspace_basis(3, 2)

    def composed(zi: Tensor) -> Tensor:
        y = zi[None]
        for k in range(steps):
            y = model.flow_map(y, k / steps, (k + 1) / steps)
        return y[0]

    for i in range(5):
        jac = torch.autograd.functional.jacobian(composed, z[i])
        assert torch.allclose(composed(z[i]), x[i], atol=1e-10)
        jac_sub = basis.T @ jac @ basis  # the map's Jacobian on the 4-dim mean-free subspace
        expected = model.prior.log_prob(z[i : i + 1])[0] - torch.linalg.slogdet(jac_sub)[1]
        assert abs(float(log_q[i] - expected)) < 1e-9, (
            f"sample {i}: FALCON log q {float(log_q[i]):.12f}, brute force {float(expected):.12f}"
        )


def _linear_teacher(a: Tensor) -> TeacherCNF:
    class Linear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("a", a.clone())

        def forward(self, t: Tensor, x: Tensor) -> Tensor:
            return x @ self.a.T

    return TeacherCNF(Linear(), StandardGaussian(a.shape[0]), model_config={}).double()


def test_euler_baselines_match_closed_forms_for_a_linear_field() -> None:
    teacher = _linear_teacher(A)
    steps, h = 4, 0.25
    step = torch.eye(2, dtype=torch.float64) + h * A
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 2, generator=g, dtype=torch.float64)
    log_p = StandardGaussian(2).log_prob(z)
    exact = EulerBaseline(teacher, logdet="exact")
    x, lq = exact.sample(6, steps=steps, seed=0)
    assert torch.allclose(x, z @ torch.linalg.matrix_power(step, steps).T, atol=1e-12)
    expected = log_p - steps * torch.linalg.slogdet(step)[1]
    assert torch.allclose(lq, expected, atol=1e-10), (lq, expected)
    euler = EulerBaseline(teacher, logdet="euler")
    _, lq_e = euler.sample(6, steps=steps, seed=0)
    assert torch.allclose(lq_e, log_p - float(torch.trace(A)), atol=1e-10)
    # backward: K Euler steps of -v from x: ladj = -sum log|det(I - h A)|
    back = exact.log_prob(x, steps=steps)
    z_back = x @ torch.linalg.matrix_power(torch.eye(2, dtype=torch.float64) - h * A, steps).T
    expected_back = StandardGaussian(2).log_prob(z_back) + steps * math.log(
        abs(float(torch.linalg.det(torch.eye(2, dtype=torch.float64) - h * A)))
    )
    assert torch.allclose(back, expected_back, atol=1e-10)
