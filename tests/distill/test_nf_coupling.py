"""Coupling flows: exact log-determinants, invertibility, block latents, the spline itself and
the mean-free basis."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from boltzflow.flows.coupling import (
    CouplingFlow,
    MeanFreeBasis,
    _spline_knots,
    helmert_basis,
    rational_quadratic_spline,
)


def _randomise(module: torch.nn.Module, std: float = 0.2, seed: int = 1) -> None:
    """Non-trivial weights (a fresh flow is the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_helmert_basis_is_orthonormal_and_mean_free(n):
    h = helmert_basis(n)
    assert h.shape == (n, n - 1)
    torch.testing.assert_close(h.T @ h, torch.eye(n - 1, dtype=h.dtype), atol=1e-14, rtol=0)
    torch.testing.assert_close(h.sum(0), torch.zeros(n - 1, dtype=h.dtype), atol=1e-14, rtol=0)


def test_mean_free_basis_round_trip():
    basis = MeanFreeBasis(4, 2)
    x = torch.randn(6, 8, dtype=torch.float64)
    x = (x.reshape(6, 4, 2) - x.reshape(6, 4, 2).mean(1, keepdim=True)).reshape(6, 8)
    y = basis.to_subspace(x)
    assert y.shape == (6, 6)
    torch.testing.assert_close(basis.from_subspace(y), x, atol=1e-12, rtol=0)
    # an isometry: norms are kept, so densities on the subspace carry over unchanged
    torch.testing.assert_close(y.norm(dim=1), x.norm(dim=1), atol=1e-12, rtol=0)
    back = basis.from_subspace(torch.randn(3, 6, dtype=torch.float64)).reshape(3, 4, 2)
    assert float(back.mean(1).abs().max()) < 1e-12


def test_spline_inverse_and_derivative():
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(500, 3 * 6 - 1, generator=gen, dtype=torch.float64) * 1.5
    kx, ky, kd = _spline_knots(raw, 6, 3.0)
    x = torch.randn(500, generator=gen, dtype=torch.float64) * 2.5  # some points in the tails
    y, ladj = rational_quadratic_spline(x, kx, ky, kd)
    xr, ladj_inv = rational_quadratic_spline(y, kx, ky, kd, inverse=True)
    torch.testing.assert_close(xr, x, atol=1e-9, rtol=0)
    torch.testing.assert_close(ladj_inv, -ladj, atol=1e-9, rtol=0)
    # log dy/dx against a central finite difference
    h = 1e-6
    yp, _ = rational_quadratic_spline(x + h, kx, ky, kd)
    ym, _ = rational_quadratic_spline(x - h, kx, ky, kd)
    fd = torch.log((yp - ym) / (2 * h))
    torch.testing.assert_close(ladj, fd, atol=1e-5, rtol=0)
    tails = x.abs() > 3.0
    assert bool(tails.any())
    torch.testing.assert_close(y[tails], x[tails], atol=0, rtol=0)


def test_spline_matches_zuko_given_the_same_knots():
    """Independent reference: zuko's MonotonicRQSTransform, run in a subprocess because importing
    zuko changes torch.distributions defaults for the whole process."""
    pytest.importorskip("zuko")
    code = textwrap.dedent(
        """
        import json, torch
        from zuko.transforms import MonotonicRQSTransform
        g = torch.Generator().manual_seed(0)
        w, h, d = (torch.randn(64, k, generator=g, dtype=torch.float64) for k in (5, 5, 4))
        t = MonotonicRQSTransform(w, h, d, bound=3.0)
        x = torch.randn(64, generator=g, dtype=torch.float64) * 2
        y, ladj = t.call_and_ladj(x)
        print(json.dumps({k: v.tolist() for k, v in dict(
            kx=t.horizontal, ky=t.vertical, kd=t.derivatives, x=x, y=y, ladj=ladj).items()}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    ref = {k: torch.tensor(v, dtype=torch.float64) for k, v in json.loads(out.stdout).items()}
    y, ladj = rational_quadratic_spline(ref["x"], ref["kx"], ref["ky"], ref["kd"])
    torch.testing.assert_close(y, ref["y"], atol=1e-10, rtol=0)
    torch.testing.assert_close(ladj, ref["ladj"], atol=1e-8, rtol=0)


@pytest.mark.parametrize("transform", ["affine", "spline"])
@pytest.mark.parametrize("dim", [2, 5])
def test_log_det_matches_autograd_jacobian(transform, dim):
    flow = CouplingFlow(dim, blocks=2, hidden=8, transform=transform, bound=3.0).double()
    _randomise(flow)
    x = torch.randn(4, dim, dtype=torch.float64) * 1.5
    with torch.no_grad():
        z, ladj = flow.encode(x)
        x_back, ladj_dec = flow.decode(z)
    for i in range(len(x)):
        jac = torch.autograd.functional.jacobian(lambda v: flow.encode(v[None])[0][0], x[i])
        expected = torch.linalg.slogdet(jac).logabsdet
        assert abs(float(ladj[i] - expected)) < 1e-8, (transform, i, float(ladj[i]), expected)
        jac_dec = torch.autograd.functional.jacobian(lambda v: flow.decode(v[None])[0][0], z[i])
        expected_dec = torch.linalg.slogdet(jac_dec).logabsdet
        assert abs(float(ladj_dec[i] - expected_dec)) < 1e-8
    torch.testing.assert_close(x_back, x, atol=1e-9, rtol=0)
    torch.testing.assert_close(ladj_dec, -ladj, atol=1e-9, rtol=0)


@pytest.mark.parametrize("transform", ["affine", "spline"])
def test_density_integrates_to_one_in_2d(transform):
    """Exact normalisation: a 2-D grid sum of exp(log q) over [-9, 9]^2."""
    flow = CouplingFlow(2, blocks=2, hidden=8, transform=transform, bound=3.0).double()
    _randomise(flow, std=0.3)
    g = torch.linspace(-9, 9, 361, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    with torch.no_grad():
        lq = flow.log_prob(torch.stack([xx.reshape(-1), yy.reshape(-1)], 1))
    mass = float(lq.exp().sum()) * float(g[1] - g[0]) ** 2
    assert abs(mass - 1) < 2e-3, f"grid mass {mass:.5f}, expected 1 (tolerance 2e-3)"


def test_block_latents_count_shape_and_identity_init():
    flow = CouplingFlow(6, blocks=3, couplings_per_block=2, hidden=8)
    x = torch.randn(7, 6)
    z, ladj, latents = flow.encode(x, return_latents=True)
    assert len(latents) == 3 and all(t.shape == (7, 6) for t in latents)
    assert latents[-1] is z
    # zero-initialised conditioner outputs: the fresh flow is the identity
    torch.testing.assert_close(z, x, atol=1e-6, rtol=0)
    torch.testing.assert_close(ladj, torch.zeros(7), atol=1e-5, rtol=0)
    _randomise(flow)
    _, _, latents = flow.encode(x, return_latents=True)
    assert not torch.allclose(latents[0], latents[1])


def test_sample_log_prob_consistent_and_seeded():
    flow = CouplingFlow(3, blocks=2, hidden=8).double()
    _randomise(flow)
    x, lq = flow.sample(50, generator=torch.Generator().manual_seed(3))
    x2, _ = flow.sample(50, generator=torch.Generator().manual_seed(3))
    assert torch.equal(x, x2)
    torch.testing.assert_close(flow.log_prob(x), lq, atol=1e-8, rtol=0)


def test_rebuild_from_config_and_validation():
    flow = CouplingFlow(4, blocks=2, hidden=8, transform="affine", mask_seed=5)
    clone = CouplingFlow(**flow.config())
    clone.load_state_dict(flow.state_dict())
    assert [b[0].idx_a.tolist() for b in clone.blocks] == [b[0].idx_a.tolist() for b in flow.blocks]
    with pytest.raises(ValueError, match="unknown transform"):
        CouplingFlow(4, transform="glow")
    with pytest.raises(ValueError, match="dim >= 2"):
        CouplingFlow(1)
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        flow.encode(torch.zeros(3, 5))
    assert math.isfinite(flow.n_parameters) and flow.n_parameters > 0
