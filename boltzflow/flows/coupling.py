"""Coupling normalizing flows (affine and rational-quadratic spline) with access to the latent
after every block, plus the fixed orthonormal basis of the mean-free subspace.

A :class:`CouplingFlow` is a bijection ``f: R^D -> R^D`` (data -> latent, the *encode*
direction) built from ``blocks`` blocks of ``couplings_per_block`` coupling layers each. Every
coupling layer splits the coordinates by a fixed random partition ``(a, b)``, leaves ``x_a``
unchanged and transforms ``x_b`` elementwise by a monotone map whose parameters an MLP computes
from ``x_a`` (Dinh et al. 2017, arXiv:1605.08803):

- ``"affine"``: ``y_b = x_b exp(s) + t`` with the log-scale soft-clamped to ``(-c, c)``,
  ``s = c tanh(s_raw / c)``, a common stabiliser (e.g. Glow, Kingma & Dhariwal 2018,
  arXiv:1807.03039, uses a sigmoid gate for the same purpose);
- ``"spline"``: a monotone rational-quadratic spline on ``[-B, B]`` with ``K`` bins and the
  identity outside (Durkan et al. 2019, "Neural Spline Flows", arXiv:1906.04032, eqs. 4-6 for
  the forward map and its derivative, Appendix A.3 for the analytic inverse).

Angles (``periodic`` columns, e.g. dihedrals in internal coordinates) are transformed by a
*circular* rational-quadratic spline on ``[-pi, pi)`` (:func:`circular_spline`; Rezende et al.
2020, "Normalizing flows on tori and spheres", arXiv:2002.02428, sec. 3.2; as in FAB, Midgley et
al. 2023, arXiv:2208.01893): knots pinned at ``(-pi, -pi)`` and ``(pi, pi)`` and one learned
derivative shared by both ends, so the map and its derivative agree at ``-pi`` and ``pi`` and it is
a diffeomorphism of the circle (no mass lost, a density continuous across the cut), followed by a
learned rotation ``y -> wrap(y + shift)`` (a circle isometry, log-det 0). The conditioner sees a
periodic input ``phi`` as ``(cos phi, sin phi)``, so it is a smooth function on the circle too.

Blocks write their output in the *same* coordinate order as their input (masks, not
permutations), so the latent after block ``k`` of one flow and after block ``k'`` of another
flow of the same dimension are directly comparable; this is what latent-matching distillation
(:mod:`boltzflow.distill.nf_losses`) needs. The conditioner's last layer is zero-initialised, so a
fresh flow is the identity.

The transforms are written here in plain torch rather than taken from ``zuko``: importing zuko
switches off argument validation for every ``torch.distributions.Distribution`` in the process
and patches ``torch.distributions.Transform`` (zuko 1.6, ``zuko/distributions.py`` and
``zuko/transforms.py``), and importing boltzflow must not change torch's behaviour. The spline
is cross-checked against zuko's ``MonotonicRQSTransform`` in a test subprocess.

Mean-free particle systems: :class:`MeanFreeBasis` holds the fixed matrix ``Q = H ⊗ I_d`` of
shape ``(n d, (n - 1) d)`` whose columns are an orthonormal basis of the mean-free subspace
(``H`` is the ``n x (n - 1)`` Helmert contrast matrix). A mean-free ``x`` has coordinates
``y = Q^T x`` in ``R^{(n-1)d}`` and ``x = Q y``; because ``Q`` is orthonormal the density of
``y`` w.r.t. Lebesgue measure on ``R^{(n-1)d}`` *is* the density of ``x`` w.r.t. the
``(n - 1) d``-dimensional Lebesgue measure of the subspace, the convention of
:mod:`boltzflow.flows.priors`, and a standard normal ``y`` is the mean-free Gaussian.

Example:
    >>> import torch
    >>> from boltzflow.flows.coupling import CouplingFlow
    >>> flow = CouplingFlow(6, blocks=2, hidden=16)
    >>> z, ladj, latents = flow.encode(torch.randn(5, 6), return_latents=True)
    >>> z.shape, ladj.shape, len(latents)
    (torch.Size([5, 6]), torch.Size([5]), 2)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from boltzflow.flows.priors import TorusGaussian, standard_normal_log_prob

if TYPE_CHECKING:
    from boltzflow.systems.internal_coords import InternalCoordinates

__all__ = [
    "TRANSFORMS",
    "CouplingFlow",
    "CouplingLayer",
    "MeanFreeBasis",
    "check_fits_internal",
    "circular_spline",
    "helmert_basis",
    "rational_quadratic_spline",
    "wrap_to_circle",
]

#: elementwise transforms a coupling layer can use
TRANSFORMS = ("affine", "spline")

_MIN_BIN = 1e-3  # smallest bin width/height as a fraction of 2B (as in Durkan et al.'s code)
_MIN_DERIVATIVE = 1e-3


# -- mean-free subspace -----------------------------------------------------------------------
def helmert_basis(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """Orthonormal basis of ``{v in R^n : sum(v) = 0}`` as the columns of an ``(n, n - 1)``
    matrix (Helmert contrasts): column ``k`` is ``(1, ..., 1, -k, 0, ..., 0) / sqrt(k (k + 1))``
    with ``k`` leading ones."""
    if n < 2:
        raise ValueError(f"helmert_basis needs n >= 2, got {n}")
    h = torch.zeros(n, n - 1, dtype=torch.float64)
    for k in range(1, n):
        h[:k, k - 1] = 1.0
        h[k, k - 1] = -float(k)
        h[:, k - 1] /= math.sqrt(k * (k + 1))
    return h.to(dtype)


class MeanFreeBasis(nn.Module):
    """The fixed isometry between the mean-free subspace of ``R^{n d}`` and ``R^{(n-1) d}``.

    Args:
        n_particles: ``n``.
        spatial_dim: ``d``.

    ``to_subspace`` maps flat ``(B, n d)`` coordinates to ``(B, (n - 1) d)`` (it discards any
    centre-of-mass component); ``from_subspace`` maps back to mean-free ``(B, n d)`` points.
    """

    def __init__(self, n_particles: int, spatial_dim: int) -> None:
        super().__init__()
        if spatial_dim < 1:
            raise ValueError(f"spatial_dim must be >= 1, got {spatial_dim}")
        self.n_particles = n_particles
        self.spatial_dim = spatial_dim
        # Kept in float64 outside the module's buffers (so .float()/.double() do not round it)
        # and cast per call: the basis is exact to float64 round-off in every dtype.
        self._q64 = torch.kron(
            helmert_basis(n_particles), torch.eye(spatial_dim, dtype=torch.float64)
        )
        self._cache: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def matrix(self, like: Tensor) -> Tensor:
        """``Q`` of shape ``(n d, (n - 1) d)`` in the dtype and device of ``like``."""
        key = (like.dtype, like.device)
        if key not in self._cache:
            self._cache[key] = self._q64.to(dtype=like.dtype, device=like.device)
        return self._cache[key]

    @property
    def dim(self) -> int:
        return self.n_particles * self.spatial_dim

    @property
    def sub_dim(self) -> int:
        return (self.n_particles - 1) * self.spatial_dim

    def to_subspace(self, x: Tensor) -> Tensor:
        """``(B, n d) -> (B, (n - 1) d)``: ``y = Q^T x``."""
        return x @ self.matrix(x)

    def from_subspace(self, y: Tensor) -> Tensor:
        """``(B, (n - 1) d) -> (B, n d)``: ``x = Q y`` (mean-free)."""
        return y @ self.matrix(y).T


# -- elementwise monotone transforms ----------------------------------------------------------
def rational_quadratic_spline(
    x: Tensor, knot_x: Tensor, knot_y: Tensor, knot_d: Tensor, *, inverse: bool = False
) -> tuple[Tensor, Tensor]:
    """Monotone rational-quadratic spline with identity tails (Durkan et al. 2019).

    Args:
        x: ``(...)`` inputs (outputs ``y`` when ``inverse``).
        knot_x: ``(..., K + 1)`` increasing knot abscissae from ``-B`` to ``B``.
        knot_y: ``(..., K + 1)`` increasing knot ordinates from ``-B`` to ``B``.
        knot_d: ``(..., K + 1)`` positive derivatives at the knots (1 at both ends makes the
            map C^1 with the identity tails).
        inverse: evaluate the inverse map (analytic root of a quadratic, Appendix A.3).

    Returns:
        ``(y, log|dy/dx|)`` for the forward map, ``(x, log|dx/dy|)`` for the inverse, each of
        the shape of ``x``. Outside ``[-B, B]`` the map is the identity with zero log-derivative.
    """
    src = knot_y if inverse else knot_x  # the knots on the input side
    lo, hi = src[..., 0], src[..., -1]
    inside = (x >= lo) & (x <= hi)
    xc = torch.minimum(torch.maximum(x, lo), hi)  # keep the unused branch finite
    k = torch.searchsorted(src.contiguous(), xc[..., None].contiguous()) - 1
    k = k.clamp(0, src.shape[-1] - 2)
    k1 = k + 1
    x0, x1 = knot_x.gather(-1, k)[..., 0], knot_x.gather(-1, k1)[..., 0]
    y0, y1 = knot_y.gather(-1, k)[..., 0], knot_y.gather(-1, k1)[..., 0]
    d0, d1 = knot_d.gather(-1, k)[..., 0], knot_d.gather(-1, k1)[..., 0]
    w, h = x1 - x0, y1 - y0
    s = h / w
    if not inverse:
        xi = ((xc - x0) / w).clamp(0.0, 1.0)
        xi1 = xi * (1 - xi)
        denom = s + (d1 + d0 - 2 * s) * xi1
        out = y0 + h * (s * xi.square() + d0 * xi1) / denom
        deriv = s.square() * (d1 * xi.square() + 2 * s * xi1 + d0 * (1 - xi).square())
        ladj = torch.log(deriv) - 2 * torch.log(denom)
    else:
        dy = xc - y0
        a = h * (s - d0) + dy * (d1 + d0 - 2 * s)
        b = h * d0 - dy * (d1 + d0 - 2 * s)
        c = -s * dy
        disc = (b.square() - 4 * a * c).clamp_min(0.0)
        xi = ((2 * c) / (-b - disc.sqrt())).clamp(0.0, 1.0)
        out = x0 + xi * w
        xi1 = xi * (1 - xi)
        denom = s + (d1 + d0 - 2 * s) * xi1
        deriv = s.square() * (d1 * xi.square() + 2 * s * xi1 + d0 * (1 - xi).square())
        ladj = -(torch.log(deriv) - 2 * torch.log(denom))
    out = torch.where(inside, out, x)
    ladj = torch.where(inside, ladj, torch.zeros_like(ladj))
    return out, ladj


def _spline_knots(raw: Tensor, bins: int, bound: float) -> tuple[Tensor, Tensor, Tensor]:
    """Knots from unconstrained parameters ``raw (..., 3K - 1)``: softmax bin widths and
    heights (each at least ``_MIN_BIN`` of the interval) and softplus interior derivatives,
    shifted so that ``raw = 0`` gives uniform bins and unit derivatives (the identity)."""
    raw_w, raw_h, raw_d = raw[..., :bins], raw[..., bins : 2 * bins], raw[..., 2 * bins :]

    def knots(r: Tensor) -> Tensor:
        frac = _MIN_BIN + (1 - _MIN_BIN * bins) * torch.softmax(r, dim=-1)
        cum = F.pad(torch.cumsum(frac, dim=-1), (1, 0))
        cum = torch.cat([cum[..., :-1], torch.ones_like(cum[..., -1:])], dim=-1)
        return bound * (2 * cum - 1)

    shift = math.log(math.expm1(1 - _MIN_DERIVATIVE))  # softplus(shift) + min = 1
    inner = _MIN_DERIVATIVE + F.softplus(raw_d + shift)
    ones = torch.ones_like(inner[..., :1])
    return knots(raw_w), knots(raw_h), torch.cat([ones, inner, ones], dim=-1)


def wrap_to_circle(angle: Tensor) -> Tensor:
    """Angles reduced modulo 2 pi to ``[-pi, pi)`` (same shape)."""
    out = torch.remainder(angle + math.pi, 2 * math.pi) - math.pi
    return torch.where(out >= math.pi, out - 2 * math.pi, out)


def _circular_knots(raw: Tensor, bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Knots of a circular spline from ``raw (..., 3K)``: widths and heights as
    :func:`_spline_knots` on ``[-pi, pi]``, ``K - 1`` interior derivatives and one boundary
    derivative shared by both ends (``raw = 0``: the identity)."""
    kx, ky, _ = _spline_knots(raw[..., : 3 * bins - 1], bins, math.pi)
    shift = math.log(math.expm1(1 - _MIN_DERIVATIVE))
    d = _MIN_DERIVATIVE + F.softplus(raw[..., 2 * bins : 3 * bins] + shift)  # (..., K)
    return kx, ky, torch.cat([d[..., -1:], d[..., :-1], d[..., -1:]], dim=-1)


def circular_spline(
    x: Tensor, raw: Tensor, bins: int, *, inverse: bool = False, rotate: bool = True
) -> tuple[Tensor, Tensor]:
    """Circular rational-quadratic spline on ``[-pi, pi)`` with an optional learned rotation.

    The forward map is ``y = wrap(f(x) + shift)`` where ``f`` is the monotone RQ spline of
    :func:`rational_quadratic_spline` with knots from ``(-pi, -pi)`` to ``(pi, pi)`` and equal
    derivatives at both ends (Rezende et al. 2020, arXiv:2002.02428, sec. 3.2), so ``f`` extends
    to a diffeomorphism of the circle; ``shift`` is a rotation (log-det 0).

    Args:
        x: ``(...)`` angles in ``[-pi, pi)`` (values outside are wrapped first).
        raw: ``(..., 3K + 1)`` unconstrained parameters (``3K`` without ``rotate``): ``K``
            widths, ``K`` heights, ``K - 1`` interior derivatives, the boundary derivative and
            the rotation angle (rad). All zero gives the identity.
        bins: number of bins ``K``.
        inverse: evaluate the inverse map.
        rotate: whether ``raw`` ends with the rotation parameter.

    Returns:
        ``(y, log|dy/dx|)`` (forward) or ``(x, log|dx/dy|)`` (inverse), each of the shape of
        ``x``; ``y`` in ``[-pi, pi)``.
    """
    kx, ky, kd = _circular_knots(raw, bins)
    shift = raw[..., 3 * bins] if rotate else None
    if inverse:
        if shift is not None:
            x = x - shift
        out, ladj = rational_quadratic_spline(wrap_to_circle(x), kx, ky, kd, inverse=True)
        return wrap_to_circle(out), ladj
    out, ladj = rational_quadratic_spline(wrap_to_circle(x), kx, ky, kd)
    if shift is not None:
        out = out + shift
    return wrap_to_circle(out), ladj


# -- layers -----------------------------------------------------------------------------------
class CouplingLayer(nn.Module):
    """One coupling layer: ``x_a`` conditions an elementwise monotone map of ``x_b``.

    Args:
        dim: number of coordinates ``D`` (>= 2).
        condition: indices of ``x_a`` (the rest is ``x_b``); both parts non-empty.
        transform: ``"affine"`` or ``"spline"`` for the non-periodic columns of ``x_b``.
        hidden: conditioner MLP width.
        depth: conditioner hidden layers (>= 1).
        bins: spline bins ``K`` (also of the circular splines).
        bound: spline interval ``[-B, B]`` (identity outside).
        clamp: soft bound ``c`` of the affine log-scale.
        periodic: optional boolean ``(D,)`` mask of angle columns (values in ``[-pi, pi)``):
            transformed by :func:`circular_spline`, fed to the conditioner as ``(cos, sin)``.
        rotate: give every circular spline a learned rotation.
    """

    def __init__(
        self,
        dim: int,
        condition: Tensor,
        *,
        transform: str = "spline",
        hidden: int = 64,
        depth: int = 2,
        bins: int = 8,
        bound: float = 5.0,
        clamp: float = 3.0,
        periodic: Tensor | None = None,
        rotate: bool = True,
    ) -> None:
        super().__init__()
        if transform not in TRANSFORMS:
            raise ValueError(f"unknown transform {transform!r}; valid: {list(TRANSFORMS)}")
        if depth < 1 or hidden < 1:
            raise ValueError(f"conditioner needs depth >= 1 and hidden >= 1, got {depth}, {hidden}")
        if bins < 2 or not bound > 0 or not clamp > 0:
            raise ValueError(f"need bins >= 2, bound > 0, clamp > 0; got {bins}, {bound}, {clamp}")
        cond = torch.as_tensor(condition, dtype=torch.long).sort().values
        mask = torch.zeros(dim, dtype=torch.bool)
        mask[cond] = True
        if not 0 < int(mask.sum()) < dim:
            raise ValueError(f"coupling split must leave both parts non-empty (dim {dim})")
        per = torch.zeros(dim, dtype=torch.bool)
        if periodic is not None:
            per = torch.as_tensor(periodic, dtype=torch.bool)
            if per.shape != (dim,):
                raise ValueError(f"periodic must be a boolean mask of shape ({dim},)")
        self.register_buffer("idx_a", mask.nonzero().squeeze(-1))
        self.register_buffer("idx_b", (~mask).nonzero().squeeze(-1))
        # positions inside x_a / x_b of the periodic and the real-line columns
        # (not persistent: checkpoints written before periodic columns existed still load)
        for name, sel in (("a", per[mask]), ("b", per[~mask])):
            self.register_buffer(f"{name}_per", sel.nonzero().squeeze(-1), persistent=False)
            self.register_buffer(f"{name}_lin", (~sel).nonzero().squeeze(-1), persistent=False)
        self.transform = transform
        self.bins = bins
        self.bound = float(bound)
        self.clamp = float(clamp)
        self.rotate = bool(rotate)
        n_a = len(self.idx_a) + len(self.a_per)  # periodic inputs enter as (cos, sin)
        self.n_params = 2 if transform == "affine" else 3 * bins - 1
        self.n_circ_params = 3 * bins + int(self.rotate)
        n_out = len(self.b_lin) * self.n_params + len(self.b_per) * self.n_circ_params
        mods: list[nn.Module] = [nn.Linear(n_a, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            mods += [nn.Linear(hidden, hidden), nn.SiLU()]
        out = nn.Linear(hidden, n_out)
        nn.init.zeros_(out.weight)  # identity at initialisation
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(*mods, out)

    def _features(self, x_a: Tensor) -> Tensor:
        """Conditioner input: real-line columns as they are, angles as ``(cos, sin)``."""
        if not len(self.a_per):
            return x_a
        ang = x_a[:, self.a_per]
        return torch.cat([x_a[:, self.a_lin], torch.cos(ang), torch.sin(ang)], dim=-1)

    def _map_lin(self, x_b: Tensor, raw: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        raw = raw.unflatten(-1, (x_b.shape[1], self.n_params))
        if self.transform == "affine":
            log_s = self.clamp * torch.tanh(raw[..., 0] / self.clamp)
            shift = raw[..., 1]
            if inverse:
                return (x_b - shift) * torch.exp(-log_s), -log_s
            return x_b * torch.exp(log_s) + shift, log_s
        kx, ky, kd = _spline_knots(raw, self.bins, self.bound)
        return rational_quadratic_spline(x_b, kx, ky, kd, inverse=inverse)

    def _map(self, x: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        x_a, x_b = x[:, self.idx_a], x[:, self.idx_b]
        raw = self.net(self._features(x_a))
        if not len(self.b_per):
            y_b, ladj = self._map_lin(x_b, raw, inverse)
            return x.index_copy(1, self.idx_b, y_b), ladj.sum(-1)
        split = len(self.b_lin) * self.n_params
        y_b = torch.empty_like(x_b)
        ladj = x.new_zeros(len(x))
        if len(self.b_lin):
            y_lin, l_lin = self._map_lin(x_b[:, self.b_lin], raw[:, :split], inverse)
            y_b = y_b.index_copy(1, self.b_lin, y_lin)
            ladj = ladj + l_lin.sum(-1)
        raw_c = raw[:, split:].unflatten(-1, (len(self.b_per), self.n_circ_params))
        y_per, l_per = circular_spline(
            x_b[:, self.b_per], raw_c, self.bins, inverse=inverse, rotate=self.rotate
        )
        y_b = y_b.index_copy(1, self.b_per, y_per)
        return x.index_copy(1, self.idx_b, y_b), ladj + l_per.sum(-1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Encode direction: ``(y (B, D), log|det dy/dx| (B,))``."""
        return self._map(x, inverse=False)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Decode direction: ``(x (B, D), log|det dx/dy| (B,))``."""
        return self._map(y, inverse=True)


class CouplingFlow(nn.Module):
    """A stack of coupling blocks on ``R^D`` (or ``R^m x`` a torus) with a standard normal latent
    (normal x uniform angles with ``periodic`` columns, :class:`~boltzflow.flows.priors.
    TorusGaussian`).

    Args:
        dim: ``D`` (>= 2).
        blocks: number of blocks (latents are exposed after each).
        couplings_per_block: coupling layers per block; with 2 (default) each block transforms
            both halves of a random split.
        hidden, depth: conditioner MLP width and number of hidden layers.
        transform: ``"affine"`` or ``"spline"``.
        bins, bound: spline settings (see :class:`CouplingLayer`).
        mask_seed: seeds the random splits (a fixed, reproducible architecture).
        periodic: column indices of angles in ``[-pi, pi)`` (circular splines; see
            :class:`CouplingLayer`); they stay in ``[-pi, pi)`` in both directions.
        rotate: learned rotation in every circular spline.

    The encode direction maps data to latent; ``log q(x) = log p(f(x)) + log|det df/dx|`` with
    ``p`` the standard normal, or the :class:`TorusGaussian` when there are periodic columns.
    """

    def __init__(
        self,
        dim: int,
        *,
        blocks: int = 4,
        couplings_per_block: int = 2,
        hidden: int = 64,
        depth: int = 2,
        transform: str = "spline",
        bins: int = 8,
        bound: float = 5.0,
        mask_seed: int = 0,
        periodic: list[int] | tuple[int, ...] | None = None,
        rotate: bool = True,
    ) -> None:
        super().__init__()
        if dim < 2:
            raise ValueError(f"a coupling flow needs dim >= 2, got {dim}")
        if blocks < 1 or couplings_per_block < 1:
            raise ValueError(
                f"need blocks >= 1 and couplings_per_block >= 1, got {blocks}, "
                f"{couplings_per_block}"
            )
        self.dim = dim
        self._config = {
            "dim": dim,
            "blocks": blocks,
            "couplings_per_block": couplings_per_block,
            "hidden": hidden,
            "depth": depth,
            "transform": transform,
            "bins": bins,
            "bound": float(bound),
            "mask_seed": mask_seed,
        }
        periodic = sorted({int(i) for i in periodic or ()})
        self.base = TorusGaussian(dim, periodic) if periodic else None
        per_mask = self.base.mask if self.base is not None else None
        if periodic:  # only then, so that configs of flows without angles stay as they were
            self._config.update(periodic=periodic, rotate=bool(rotate))
        self.periodic = tuple(periodic)
        gen = torch.Generator().manual_seed(mask_seed)
        half = dim // 2
        self.blocks = nn.ModuleList()
        for _ in range(blocks):
            perm = torch.randperm(dim, generator=gen)
            layers = []
            for j in range(couplings_per_block):
                cond = perm[:half] if j % 2 == 0 else perm[half:]
                layers.append(
                    CouplingLayer(
                        dim,
                        cond,
                        transform=transform,
                        hidden=hidden,
                        depth=depth,
                        bins=bins,
                        bound=bound,
                        periodic=per_mask,
                        rotate=rotate,
                    )
                )
            self.blocks.append(nn.ModuleList(layers))

    def config(self) -> dict[str, Any]:
        """Constructor keywords (JSON-able); ``CouplingFlow(**flow.config())`` rebuilds it."""
        return dict(self._config)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def n_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def _check(self, x: Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected (B, {self.dim}) input, got {tuple(x.shape)}")

    def encode(
        self, x: Tensor, *, return_latents: bool = False
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, list[Tensor]]:
        """Data -> latent.

        Args:
            x: ``(B, D)`` points.
            return_latents: also return the output of every block.

        Returns:
            ``z (B, D)``, ``log|det dz/dx| (B,)`` and, if asked, the list of ``n_blocks``
            block outputs ``(B, D)`` (the last one is ``z``).
        """
        self._check(x)
        ladj = x.new_zeros(len(x))
        latents = []
        for block in self.blocks:
            for layer in block:
                x, l_ = layer(x)
                ladj = ladj + l_
            latents.append(x)
        return (x, ladj, latents) if return_latents else (x, ladj)

    def decode(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Latent -> data: ``x (B, D)`` and ``log|det dx/dz| (B,)``."""
        self._check(z)
        ladj = z.new_zeros(len(z))
        for block in reversed(self.blocks):
            for layer in reversed(block):
                z, l_ = layer.inverse(z)
                ladj = ladj + l_
        return z, ladj

    def base_log_prob(self, z: Tensor) -> Tensor:
        """``(B,)`` log density of the latent: standard normal, or the :class:`TorusGaussian`."""
        if self.base is not None:
            return self.base.log_prob(z)
        return standard_normal_log_prob(z, self.dim)

    def log_prob(self, x: Tensor) -> Tensor:
        """``(B,)`` log density (module docstring); angles must lie in ``[-pi, pi)``."""
        z, ladj = self.encode(x)
        return self.base_log_prob(z) + ladj

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``n`` samples ``(n, D)`` with their log density ``(n,)`` (noise drawn on CPU)."""
        p = next(self.parameters())
        if self.base is not None:
            z = self.base.sample(n, generator=generator, dtype=p.dtype, device=p.device)
        else:
            z = torch.randn(n, self.dim, generator=generator, dtype=p.dtype).to(p.device)
        x, ladj = self.decode(z)
        return x, self.base_log_prob(z) - ladj


def check_fits_internal(flow: CouplingFlow, ic: InternalCoordinates, label: str = "flow") -> None:
    """Raise unless ``flow`` lives on the coordinates of ``ic``: the same dimension, and circular
    splines exactly on its periodic (dihedral) columns.

    Raises:
        ValueError: a mismatch (the message names both sides, starting with ``label``).
    """
    periodic = ic.periodic_mask().nonzero().flatten().tolist()
    if flow.dim != ic.dim or list(flow.periodic) != periodic:
        raise ValueError(
            f"{label} (dim {flow.dim}, periodic {list(flow.periodic)}) does not match the "
            f"internal coordinates (dim {ic.dim}, dihedral columns {periodic})"
        )
