"""Circular rational-quadratic splines and coupling flows with periodic columns.

A circular spline must be a diffeomorphism of the circle (Rezende et al. 2020,
arXiv:2002.02428): invertible, values kept in [-pi, pi), and the same derivative at -pi and pi,
so a density pushed through it is continuous across the cut. The log-determinants are checked
against autograd Jacobians, and a flow with angle columns against the exact change of
variables.
"""

from __future__ import annotations

import math

import pytest
import torch

from boltzflow.flows.coupling import CouplingFlow, circular_spline, wrap_to_circle

F64 = torch.float64
BINS = 6


def _raw(n: int, scale: float, seed: int, dtype: torch.dtype, rotate: bool = True) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, 3 * BINS + int(rotate), generator=gen, dtype=F64).to(dtype)


def _circ_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return wrap_to_circle(a - b).abs()


@pytest.mark.parametrize("rotate", [True, False])
def test_identity_at_zero_parameters(rotate: bool) -> None:
    x = torch.linspace(-math.pi, math.pi, 101, dtype=F64)[:-1]
    raw = torch.zeros(100, 3 * BINS + int(rotate), dtype=F64)
    y, ladj = circular_spline(x, raw, BINS, rotate=rotate)
    assert torch.allclose(y, x, atol=1e-12) and ladj.abs().max() < 1e-12


@pytest.mark.parametrize(
    ("dtype", "tol", "ladj_tol"), [(torch.float32, 1e-5, 1e-3), (F64, 1e-13, 1e-10)]
)
@pytest.mark.parametrize("rotate", [True, False])
def test_invertible_and_in_range(
    dtype: torch.dtype, tol: float, ladj_tol: float, rotate: bool
) -> None:
    """Round trip x -> y -> x within ``tol`` times the conditioning max(1, |dx/dy|): steep
    random splines (derivatives down to ~1e-5) amplify round-off by exactly that factor."""
    n = 4000
    raw = _raw(n, 1.5, 0, dtype, rotate)
    gen = torch.Generator().manual_seed(1)
    x = ((2 * torch.rand(n, generator=gen, dtype=F64) - 1) * math.pi).to(dtype)
    x[:4] = torch.tensor([-math.pi, math.pi - 1e-6, 0.0, -math.pi + 1e-7], dtype=dtype)
    x = wrap_to_circle(x)
    y, ladj = circular_spline(x, raw, BINS, rotate=rotate)
    assert (y >= -math.pi).all() and (y < math.pi).all()
    x2, ladj_inv = circular_spline(y, raw, BINS, inverse=True, rotate=rotate)
    assert (x2 >= -math.pi).all() and (x2 < math.pi).all()
    cond = torch.exp(-ladj).clamp_min(1.0)
    assert (_circ_diff(x2, x) / cond).max() < tol
    assert ((ladj + ladj_inv).abs() / cond).max() < ladj_tol


def test_invertible_to_1e_6_for_moderate_splines() -> None:
    """Absolute round-trip error in float32 (2e-6, 8 ulp at pi) and float64 (1e-14)."""
    for dtype, tol in ((torch.float32, 2e-6), (F64, 1e-14)):
        raw = _raw(4000, 0.2, 6, dtype)
        x = wrap_to_circle(torch.linspace(-math.pi, math.pi, 4000, dtype=F64)).to(dtype)
        y, ladj = circular_spline(x, raw, BINS)
        x2, ladj_inv = circular_spline(y, raw, BINS, inverse=True)
        assert _circ_diff(x2, x).max() < tol and (ladj + ladj_inv).abs().max() < 10 * tol


def test_log_det_matches_autograd() -> None:
    raw = _raw(64, 1.5, 2, F64)
    x = torch.linspace(-math.pi + 0.01, math.pi - 0.01, 64, dtype=F64).requires_grad_(True)
    y, ladj = circular_spline(x, raw, BINS)
    (grad,) = torch.autograd.grad(y.sum(), x)  # elementwise map: the diagonal Jacobian
    assert torch.allclose(grad.log(), ladj, atol=1e-10)


def test_derivative_equal_at_both_ends() -> None:
    """The map is C^1 on the circle: f'(-pi) = f'(pi), and f(pi) - f(-pi) = 2 pi (mod wrap)."""
    raw = _raw(32, 2.0, 3, F64).repeat_interleave(2, 0)
    ends = torch.tensor([-math.pi, math.pi], dtype=F64).repeat(32)
    _, ladj = circular_spline(ends, raw, BINS, rotate=True)
    left, right = ladj[0::2], ladj[1::2]
    assert torch.allclose(left, right, atol=1e-12)
    # one-sided finite differences just inside either end agree with it: a continuous density
    h = 1e-9
    inside = torch.tensor([-math.pi + h, math.pi - h], dtype=F64).repeat(32)
    _, ladj_in = circular_spline(inside, raw, BINS, rotate=True)
    assert torch.allclose(ladj_in[0::2], ladj_in[1::2], atol=1e-4)
    # and the image is continuous across the cut (as a point on the circle)
    y_lo, _ = circular_spline(torch.full((32,), -math.pi, dtype=F64), raw[0::2], BINS)
    y_hi, _ = circular_spline(torch.full((32,), math.pi - 1e-9, dtype=F64), raw[0::2], BINS)
    assert _circ_diff(y_lo, y_hi).max() < 1e-7


def test_mass_conserved_on_the_circle() -> None:
    """A uniform density pushed through the map integrates to one (no mass leaves [-pi, pi))."""
    raw = _raw(1, 1.5, 4, F64).expand(20001, -1)
    y = torch.linspace(-math.pi, math.pi, 20001, dtype=F64)
    _, ladj_inv = circular_spline(y, raw, BINS, inverse=True)
    density = torch.exp(ladj_inv) / (2 * math.pi)  # q(y) = u(f^-1(y)) |d f^-1 / dy|
    assert abs(float(torch.trapezoid(density, y)) - 1.0) < 1e-5


def _nudged_flow(
    dim: int, periodic: list[int], dtype: torch.dtype, nudge: float = 0.3
) -> CouplingFlow:
    torch.manual_seed(0)
    flow = CouplingFlow(dim, blocks=2, hidden=16, bins=BINS, periodic=periodic).to(dtype)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(nudge * torch.randn(p.shape, generator=gen, dtype=F64).to(dtype))
    return flow


def _mixed_points(n: int, dim: int, periodic: list[int], dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, dim, generator=gen, dtype=F64)
    x[:, periodic] = (2 * torch.rand(n, len(periodic), generator=gen, dtype=F64) - 1) * math.pi
    return (
        wrap_to_circle(x).where(torch.isin(torch.arange(dim), torch.tensor(periodic)), x).to(dtype)
    )


@pytest.mark.parametrize(("dtype", "tol", "nudge"), [(torch.float32, 1e-4, 0.1), (F64, 1e-9, 0.3)])
def test_flow_with_angles_invertible(dtype: torch.dtype, tol: float, nudge: float) -> None:
    periodic = [0, 3, 4]
    flow = _nudged_flow(7, periodic, dtype, nudge)
    x = _mixed_points(500, 7, periodic, dtype)
    z, ladj = flow.encode(x)
    assert (z[:, periodic] >= -math.pi).all() and (z[:, periodic] < math.pi).all()
    x2, ladj_inv = flow.decode(z)
    diff = (x2 - x).abs()
    diff[:, periodic] = _circ_diff(x2[:, periodic], x[:, periodic])
    assert diff.max() < tol
    assert (ladj + ladj_inv).abs().max() < 10 * tol


def test_flow_log_det_matches_autograd_jacobian() -> None:
    periodic = [1, 2]
    flow = _nudged_flow(5, periodic, F64)
    x = _mixed_points(4, 5, periodic, F64)
    _, ladj = flow.encode(x)
    for i in range(len(x)):
        jac = torch.autograd.functional.jacobian(lambda v: flow.encode(v[None])[0][0], x[i])
        assert torch.allclose(torch.linalg.slogdet(jac)[1], ladj[i], atol=1e-10)


def test_flow_density_continuous_across_the_cut_and_normalised() -> None:
    """log q of a 2-D flow (one angle, one real column) at phi = -pi and phi -> pi agrees, and
    q integrates to one over [-pi, pi) x R (trapezoid rule)."""
    flow = _nudged_flow(2, [0], F64, 0.15)
    r = torch.linspace(-9, 9, 361, dtype=F64)
    for val in (-1.0, 0.3, 2.0):
        lo = flow.log_prob(torch.tensor([[-math.pi, val]], dtype=F64))
        hi = flow.log_prob(torch.tensor([[math.pi - 1e-9, val]], dtype=F64))
        assert torch.allclose(lo, hi, atol=1e-6)
    phi = torch.linspace(-math.pi, math.pi, 361, dtype=F64)[:-1]
    grid = torch.stack(torch.meshgrid(phi, r, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        q = flow.log_prob(grid).exp().reshape(len(phi), len(r))
    mass = torch.trapezoid(q, r, dim=1).sum() * (2 * math.pi / len(phi))  # periodic: rectangle
    assert abs(float(mass) - 1.0) < 1e-4


def test_sample_log_prob_consistent_and_config_round_trip() -> None:
    flow = _nudged_flow(6, [2, 5], F64)
    x, log_q = flow.sample(200, generator=torch.Generator().manual_seed(0))
    assert (x[:, [2, 5]] >= -math.pi).all() and (x[:, [2, 5]] < math.pi).all()
    assert torch.allclose(flow.log_prob(x), log_q, atol=1e-10)
    cfg = flow.config()
    assert cfg["periodic"] == [2, 5] and cfg["rotate"] is True
    clone = CouplingFlow(**cfg).double()
    clone.load_state_dict(flow.state_dict())
    assert torch.allclose(clone.log_prob(x), log_q, atol=1e-12)
    assert "periodic" not in CouplingFlow(6).config()  # configs without angles unchanged
