"""Conditional flow matching with minibatch (equivariant) optimal-transport couplings.

Linear interpolant x_t = (1 - t) x0 + t x1 (+ sigma * eps) with target velocity u = x1 - x0
(Lipman et al. 2023, arXiv:2210.02747; Liu et al. 2023, arXiv:2209.03003). Prior and data
samples are re-paired within each minibatch by exact optimal transport (Tong et al. 2024,
arXiv:2302.00482; Pooladian et al. 2023, arXiv:2304.14772). For particle systems each pair is
further aligned over particle permutations (Hungarian algorithm) and rotations (Kabsch), so the
flow learns short, nearly straight paths between symmetry-equivalent configurations: equivariant
flow matching, Klein, Krämer, Noé (2023), arXiv:2306.15030. Aligning x0 by a symmetry g of the
(invariant) prior keeps its marginal the prior when the data are invariant too.

Internal coordinates live on R^k x T^m (bonds and angles flat, dihedrals on the circle). With a
``periodic`` column mask the interpolant of those columns is the geodesic of the flat torus,
x_t = wrap(x0 + t wrap(x1 - x0)), with the constant target velocity wrap(x1 - x0): the shortest
way round the circle (Riemannian flow matching, Chen & Lipman 2023, arXiv:2302.03660, Sec. 3.2
and their torus experiments); ``wrap`` maps to [-pi, pi). Minibatch OT then uses the wrapped
(geodesic) squared distance.

Path ``"trig"``: on the flat columns the trigonometric interpolant x_t = cos(pi t / 2) x0 +
sin(pi t / 2) x1 with u = (pi / 2)(cos(pi t / 2) x1 - sin(pi t / 2) x0) (Albergo &
Vanden-Eijnden 2023, arXiv:2209.15571, the variance-preserving choice). For independent x0, x1
with the same standard normal law, x_t is standard normal at every t and E[u | x_t] = 0: a flow
whose data are already close to the prior (the latent of a trained NF, the teacher's NF base)
only has to learn the correction, where the linear path's marginal velocity is
x (2t - 1) / ((1 - t)^2 + t^2) even for identical laws. Periodic columns keep the geodesic; for
uniform x0, x1 on the circle its marginal velocity is zero as well.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from boltzflow.systems.internal_coords import wrap_angle

__all__ = [
    "COUPLINGS",
    "PATHS",
    "couple",
    "equivariant_align",
    "flow_matching_loss",
    "interpolant_draws",
    "interpolate",
    "kabsch_align",
    "orbit_distance_2d",
    "ot_pairing",
    "permutation_align",
    "random_rotations",
    "rotate",
    "wrap_columns",
]

#: coupling names accepted by :func:`couple`
COUPLINGS = ("independent", "ot", "equivariant_ot")
#: interpolant paths accepted by :func:`interpolate` (module docstring)
PATHS = ("linear", "trig")

# Up to this many particles the permutation is found by trying all of them jointly with the
# rotation (exact); beyond it Hungarian + Kabsch alternate (a local optimum).
_EXHAUSTIVE_MAX_PARTICLES = 5


def wrap_columns(x: Tensor, periodic: Tensor) -> Tensor:
    """``x (B, dim)`` with the columns of the boolean ``periodic (dim,)`` mask wrapped into
    [-pi, pi) (:func:`~boltzflow.systems.internal_coords.wrap_angle`); a new tensor."""
    mask = periodic.to(x.device)
    return torch.where(mask, wrap_angle(x, periodic=True), x)


def interpolate(
    x0: Tensor,
    x1: Tensor,
    t: Tensor,
    *,
    sigma: float = 0.0,
    noise: Tensor | None = None,
    periodic: Tensor | None = None,
    path: str = "linear",
) -> tuple[Tensor, Tensor]:
    """Linear (or, on periodic columns, geodesic) interpolant and its conditional velocity.

    Args:
        x0, x1: ``(B, dim)`` prior and data samples (paired row by row).
        t: ``(B,)`` times in [0, 1].
        sigma: constant noise level added to x_t (needs ``noise``).
        noise: ``(B, dim)`` standard noise (mean-free for particle systems).
        periodic: boolean ``(dim,)`` mask of angle columns (rad) on the circle, or None.
        path: ``"linear"`` or ``"trig"`` (the flat columns' interpolant, module docstring).

    Returns:
        ``x_t = (1 - t) x0 + t x1 + sigma * noise`` and ``u = x1 - x0``, both ``(B, dim)``
        (``"trig"``: ``x_t = cos(pi t/2) x0 + sin(pi t/2) x1 + sigma * noise``, u its time
        derivative). On periodic columns (module docstring): ``u = wrap(x1 - x0)`` and
        ``x_t = wrap(x0 + t u + sigma * noise)``, the shortest arc (Chen & Lipman 2023).
    """
    if path not in PATHS:
        raise ValueError(f"unknown interpolant path {path!r}; valid: {list(PATHS)}")
    tt = t[:, None]
    if path == "trig":
        a = 0.5 * torch.pi * tt
        flat_x = torch.cos(a) * x0 + torch.sin(a) * x1
        flat_u = 0.5 * torch.pi * (torch.cos(a) * x1 - torch.sin(a) * x0)
    else:
        flat_x, flat_u = (1 - tt) * x0 + tt * x1, x1 - x0
    if periodic is not None:
        mask = periodic.to(x0.device)
        ut = torch.where(mask, wrap_angle(x1 - x0, periodic=True), flat_u)
        xt = torch.where(mask, x0 + tt * ut, flat_x)
    else:
        xt = flat_x
    if sigma:
        if noise is None:
            raise ValueError("sigma > 0 needs a noise tensor")
        xt = xt + sigma * noise
    if periodic is not None:
        return wrap_columns(xt, mask), ut
    return xt, flat_u


def ot_pairing(x0: Tensor, x1: Tensor, *, periodic: Tensor | None = None) -> Tensor:
    """Exact minibatch OT (squared Euclidean cost, uniform weights) as a permutation.

    For equal uniform marginals the optimal plan is a permutation (Birkhoff), found exactly by
    ``scipy.optimize.linear_sum_assignment``. With a boolean ``periodic (dim,)`` mask the cost of
    those columns is the squared geodesic distance on the circle, wrap(a - b)^2.

    Returns:
        ``(B,)`` long indices ``perm`` such that ``x0[perm]`` is paired with ``x1``.
    """
    a, b = x1.detach().double(), x0.detach().double()
    if periodic is None or not bool(periodic.any()):
        cost_t = torch.cdist(a, b).pow(2)
    else:
        mask = periodic.to(x0.device)
        cost_t = torch.cdist(a[:, ~mask], b[:, ~mask]).pow(2)
        diff = a[:, None, mask] - b[None, :, mask]  # (B1, B0, m)
        cost_t = cost_t + wrap_angle(diff, periodic=True).square().sum(-1)
    _, cols = linear_sum_assignment(cost_t.cpu().numpy())
    return torch.as_tensor(cols, dtype=torch.long, device=x0.device)


def _as_particles(x: Tensor, n: int, d: int) -> Tensor:
    if x.shape[-1] != n * d:
        raise ValueError(f"expected (B, {n * d}) coordinates for {n} particles in {d}D")
    return x.reshape(x.shape[0], n, d)


def _kabsch_rotation(px: Tensor, py: Tensor, reflections: bool) -> Tensor:
    """Optimal orthogonal ``(B, d, d)`` maps M with ``px @ M ~ py`` (row-vector convention)."""
    if px.shape[-1] == 2 and not reflections:
        # 2D closed form: the angle maximising sum_i y_i . R x_i is atan2(S, C) with
        # C = sum x . y and S = sum x ^ y; no SVD needed.
        c = (px * py).sum((-2, -1))
        s = (px[..., 0] * py[..., 1] - px[..., 1] * py[..., 0]).sum(-1)
        r = torch.sqrt(c * c + s * s)
        safe = r > 0
        cos = torch.where(safe, c / torch.where(safe, r, 1.0), 1.0)
        sin = torch.where(safe, s / torch.where(safe, r, 1.0), 0.0)
        return torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)
    h = px.transpose(1, 2) @ py  # (B, d, d)
    u, _, vt = torch.linalg.svd(h)
    if not reflections:
        sign = torch.sign(torch.linalg.det(u @ vt))
        sign = torch.where(sign == 0, torch.ones_like(sign), sign)
        u = torch.cat([u[..., :-1], u[..., -1:] * sign[:, None, None]], dim=-1)
    return u @ vt


def kabsch_align(
    x: Tensor, y: Tensor, n_particles: int, spatial_dim: int, *, reflections: bool = False
) -> Tensor:
    """Rotate each (mean-free) ``x[b]`` about the origin onto ``y[b]`` (Kabsch 1976).

    Solves min_R sum_i |R x_i - y_i|^2 over rotations (orthogonal maps if ``reflections``) by the
    SVD of the covariance H = X^T Y: with H = U S V^T the optimal map on row vectors is
    U diag(1, ..., det) V^T (closed form in 2D).

    Returns:
        ``(B, dim)`` rotated copy of ``x``.
    """
    px = _as_particles(x, n_particles, spatial_dim)
    py = _as_particles(y, n_particles, spatial_dim)
    return (px @ _kabsch_rotation(px, py, reflections)).reshape(x.shape)


def permutation_align(x: Tensor, y: Tensor, n_particles: int, spatial_dim: int) -> Tensor:
    """Permute the particles of each ``x[b]`` to minimise ``|x[b] - y[b]|^2`` (Hungarian).

    Returns:
        ``(B, dim)`` permuted copy of ``x``.
    """
    px = _as_particles(x, n_particles, spatial_dim)
    py = _as_particles(y, n_particles, spatial_dim)
    cost = torch.cdist(py.detach().double(), px.detach().double()).pow(2).cpu().numpy()
    idx = np.stack([linear_sum_assignment(c)[1] for c in cost])
    idx_t = torch.as_tensor(idx, dtype=torch.long, device=x.device)
    return torch.gather(px, 1, idx_t[..., None].expand(-1, -1, spatial_dim)).reshape(x.shape)


def equivariant_align(
    x0: Tensor,
    x1: Tensor,
    n_particles: int,
    spatial_dim: int,
    *,
    permutations: bool = True,
    rotations: bool = True,
    reflections: bool = False,
) -> Tensor:
    """Move each prior sample ``x0[b]`` by the symmetry that brings it closest to ``x1[b]``.

    With ``permutations`` and ``rotations``: for at most 5 particles all permutations are tried,
    each followed by its optimal rotation (exact joint optimum); for more particles Hungarian
    matching and Kabsch alternate twice, started from each principal-axis superposition, and the
    closest result is kept (a heuristic, like the alternation in Klein et al. 2023). Both inputs
    must be mean-free.

    Returns:
        ``(B, dim)`` aligned copy of ``x0``.
    """
    if not (permutations or rotations):
        return x0
    if not permutations:
        return kabsch_align(x0, x1, n_particles, spatial_dim, reflections=reflections)
    if not rotations:
        return permutation_align(x0, x1, n_particles, spatial_dim)
    if n_particles <= _EXHAUSTIVE_MAX_PARTICLES:
        perms = torch.tensor(list(itertools.permutations(range(n_particles))), device=x0.device)
        b, n_perm = x0.shape[0], perms.shape[0]
        px = _as_particles(x0, n_particles, spatial_dim)[:, perms]  # (B, P, n, d)
        cand = px.reshape(b * n_perm, n_particles * spatial_dim)
        target = x1.repeat_interleave(n_perm, dim=0)
        cand = kabsch_align(cand, target, n_particles, spatial_dim, reflections=reflections)
        cost = (cand - target).pow(2).sum(-1).reshape(b, n_perm)
        best = cost.argmin(dim=1)
        return cand.reshape(b, n_perm, -1)[torch.arange(b, device=x0.device), best]
    # Hungarian + Kabsch alternation is local: start it from every proper map between the two
    # configurations' principal axes (2^(d-1) sign choices), keep the closest result.
    best, best_cost = x0, (x0 - x1).pow(2).sum(-1)
    for start in _principal_axis_starts(x0, x1, n_particles, spatial_dim, reflections):
        x = start
        for _ in range(2):
            x = permutation_align(x, x1, n_particles, spatial_dim)
            x = kabsch_align(x, x1, n_particles, spatial_dim, reflections=reflections)
        cost = (x - x1).pow(2).sum(-1)
        better = cost < best_cost
        best = torch.where(better[:, None], x, best)
        best_cost = torch.where(better, cost, best_cost)
    return best


def _principal_axis_starts(
    x0: Tensor, x1: Tensor, n: int, d: int, reflections: bool
) -> list[Tensor]:
    """Copies of ``x0`` rotated so its principal axes lie on those of ``x1``, one per sign choice
    of the axes that gives a proper rotation (all sign choices if ``reflections``)."""
    px, py = _as_particles(x0, n, d), _as_particles(x1, n, d)
    ux = torch.linalg.eigh(px.transpose(1, 2) @ px)[1]  # (B, d, d), columns = axes
    uy = torch.linalg.eigh(py.transpose(1, 2) @ py)[1]
    det = torch.linalg.det(ux) * torch.linalg.det(uy)  # +-1 per sample
    starts = []
    for signs in itertools.product((1.0, -1.0), repeat=d - 1 if not reflections else d):
        s = torch.tensor(signs, dtype=x0.dtype, device=x0.device).expand(len(x0), -1)
        if not reflections:  # last sign makes det(M) = +1
            s = torch.cat([s, (det * torch.prod(s, dim=1))[:, None]], dim=1)
        m = ux @ torch.diag_embed(s) @ uy.transpose(1, 2)
        starts.append((px @ m).reshape(x0.shape))
    return starts


def couple(
    x0: Tensor,
    x1: Tensor,
    mode: str,
    *,
    n_particles: int | None = None,
    spatial_dim: int | None = None,
    reflections: bool = False,
    permutations: bool = True,
    periodic: Tensor | None = None,
) -> Tensor:
    """Re-pair a minibatch of prior samples with data samples.

    Args:
        x0, x1: ``(B, dim)`` prior and data minibatches.
        mode: ``"independent"`` (keep the pairing), ``"ot"`` (exact minibatch OT) or
            ``"equivariant_ot"`` (minibatch OT, then each pair aligned by
            :func:`equivariant_align`; particle systems only). For 2D systems of at most 5
            particles the OT cost is the exact orbit distance (:func:`orbit_distance_2d`);
            otherwise the Euclidean cost, with the alignment applied after the pairing.
        permutations: include particle permutations in the alignment (False for molecules).
        periodic: boolean ``(dim,)`` mask of angle columns: ``"ot"`` then uses the wrapped
            distance on them (:func:`ot_pairing`); not with ``"equivariant_ot"``.

    Returns:
        ``(B, dim)`` prior samples, row b paired with ``x1[b]``.
    """
    if mode not in COUPLINGS:
        raise ValueError(f"unknown coupling {mode!r}; valid: {list(COUPLINGS)}")
    if mode == "independent":
        return x0
    if mode == "ot":
        if periodic is not None:
            return x0[ot_pairing(x0, x1, periodic=periodic)]
        return x0[ot_pairing(x0, x1)]
    if periodic is not None:
        raise ValueError("equivariant_ot coupling is for Cartesian particles, not periodic columns")
    if n_particles is None or spatial_dim is None:
        raise ValueError("equivariant_ot coupling needs n_particles and spatial_dim")
    exact = (
        spatial_dim == 2
        and permutations
        and not reflections
        and n_particles <= _EXHAUSTIVE_MAX_PARTICLES
    )
    if exact:  # OT on the orbit distance itself, as in Klein et al. (2023)
        cost = orbit_distance_2d(x0, x1, n_particles)
        x0 = x0[torch.as_tensor(linear_sum_assignment(cost.T.cpu().numpy())[1], device=x0.device)]
    else:  # Euclidean OT, then each pair aligned (cheap approximation for larger systems)
        x0 = x0[ot_pairing(x0, x1)]
    return equivariant_align(
        x0, x1, n_particles, spatial_dim, permutations=permutations, reflections=reflections
    )


def orbit_distance_2d(x0: Tensor, x1: Tensor, n_particles: int) -> Tensor:
    """All-pairs squared distance between orbits under permutations x rotations, in 2D.

    ``cost[i, j] = min_{P, R} |R P x0[i] - x1[j]|^2`` for mean-free inputs, by enumerating the
    n! permutations and the closed-form optimal angle: with C = <P x0, x1> and S = <P x0, J x1>
    (J: rotation by 90 degrees) the minimum over R is |x0|^2 + |x1|^2 - 2 sqrt(C^2 + S^2).
    For each permutation, C and S for all B0 x B1 pairs are one matrix product.

    Returns:
        ``(B0, B1)`` float64 costs (the products are computed in float32).
    """
    perms = itertools.permutations(range(n_particles))
    b0, b1 = x0.shape[0], x1.shape[0]
    # float32 products: 2.5x faster than float64 on CPU (inner dimension 2n is too small for
    # BLAS to pay), and the cost's round-off (~1e-6 relative) only reorders near-ties
    p0 = _as_particles(x0.float(), n_particles, 2)
    p1 = _as_particles(x1.float(), n_particles, 2)
    j1 = torch.stack([p1[..., 1], -p1[..., 0]], dim=-1).reshape(b1, -1)
    rhs = torch.cat([p1.reshape(b1, -1), j1]).T.contiguous()  # (2n, 2 B1): x1 and J x1
    # one permutation at a time with a running maximum: the (B0, 2 B1) blocks stay in cache
    # (4x faster on CPU than one product over all n! permutations stacked)
    best = None
    for perm in perms:
        both = p0[:, list(perm)].reshape(b0, -1) @ rhs  # (B0, 2 B1): C and S side by side
        both.square_()
        r2 = both[:, :b1] + both[:, b1:]
        best = r2 if best is None else torch.maximum(best, r2, out=best)
    sq0 = x0.double().pow(2).sum(-1)[:, None]
    sq1 = x1.double().pow(2).sum(-1)[None, :]
    return (sq0 + sq1 - 2 * best.sqrt().double()).clamp_min(0.0)


def random_rotations(
    n: int,
    spatial_dim: int,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``(n, d, d)`` Haar-distributed rotations (det +1): QR with Mezzadri's (2007) sign fix."""
    z = torch.randn(n, spatial_dim, spatial_dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(z)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
    det = torch.linalg.det(q)
    q = torch.cat([q[..., :-1], q[..., -1:] * det[:, None, None]], dim=-1)
    return q.to(dtype)


def rotate(x: Tensor, rot: Tensor, n_particles: int, spatial_dim: int) -> Tensor:
    """Apply ``rot (B, d, d)`` to every particle of ``x (B, n*d)``: ``x_i -> rot @ x_i``."""
    p = _as_particles(x, n_particles, spatial_dim)
    return (p @ rot.transpose(1, 2).to(x.dtype)).reshape(x.shape)


def interpolant_draws(
    batch: int,
    dim: int,
    *,
    generator: torch.Generator | None = None,
    sigma: float = 0.0,
    n_particles: int | None = None,
    spatial_dim: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor | None]:
    """The random parts of one flow-matching step, drawn on CPU.

    Returns:
        ``t (batch,)`` uniform on [0, 1) and, if ``sigma > 0``, ``noise (batch, dim)`` standard
        normal (mean-free over particles when ``n_particles``/``spatial_dim`` are given), else None.
    """
    t = torch.rand(batch, generator=generator, dtype=dtype)
    if not sigma:
        return t, None
    noise = torch.randn(batch, dim, generator=generator, dtype=dtype)
    if n_particles is not None and spatial_dim is not None:
        p = noise.reshape(batch, n_particles, spatial_dim)
        noise = (p - p.mean(1, keepdim=True)).reshape(batch, dim)
    return t, noise


def flow_matching_loss(
    net: nn.Module,
    x0: Tensor,
    x1: Tensor,
    *,
    generator: torch.Generator | None = None,
    sigma: float = 0.0,
    n_particles: int | None = None,
    spatial_dim: int | None = None,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    periodic: Tensor | None = None,
    path: str = "linear",
) -> Tensor:
    """Mean squared error between ``net(t, x_t)`` and ``x1 - x0`` at t ~ U(0, 1).

    Args:
        net: velocity field ``net(t (B,), x (B, dim)) -> (B, dim)``.
        x0, x1: ``(B, dim)`` already-coupled prior and data samples.
        generator: source of t (and noise) on CPU, for reproducible training.
        sigma: interpolant noise; for particle systems the noise is made mean-free.
        t, noise: ``(B,)`` times and ``(B, dim)`` noise drawn beforehand
            (:func:`interpolant_draws`); ``generator`` is then not used.
        periodic: boolean ``(dim,)`` mask of angle columns: geodesic interpolant and target
            ``wrap(x1 - x0)`` there (:func:`interpolate`).
        path: ``"linear"`` or ``"trig"`` (:func:`interpolate`).

    Returns:
        scalar loss, averaged over batch and coordinates.
    """
    if t is None:
        t, noise = interpolant_draws(
            x0.shape[0],
            x0.shape[1],
            generator=generator,
            sigma=sigma,
            n_particles=n_particles,
            spatial_dim=spatial_dim,
            dtype=x0.dtype,
        )
    t = t.to(device=x0.device, dtype=x0.dtype)
    if noise is not None:
        noise = noise.to(device=x0.device, dtype=x0.dtype)
    xt, ut = interpolate(x0, x1, t, sigma=sigma, noise=noise, periodic=periodic, path=path)
    return (net(t, xt) - ut).pow(2).mean()
