"""Base densities of the flows: a standard Gaussian, a mean-free Gaussian for particle systems,
and a Gaussian x uniform-angle product for internal coordinates (:class:`TorusGaussian`).

Mean-free convention (DESIGN.md): for ``n`` particles in ``d`` dimensions the translation-invariant
configurations live in the ``(n - 1) * d``-dimensional subspace of zero particle mean. The
mean-free Gaussian is the standard normal density *on that subspace*,

    log p(x) = -|x|^2 / 2 - ((n - 1) d / 2) log(2 pi),    for mean-free x,

so its log density, every flow's log q and every NLL in boltzflow are densities with respect to
the (n - 1) d-dimensional Lebesgue measure of the subspace (Köhler et al. 2020,
arXiv:2006.02425; Satorras et al. 2021, arXiv:2105.09016, use the same normalisation). Sampling
draws a full standard normal and removes the mean: the orthogonal projection of an isotropic
Gaussian onto a subspace is the isotropic Gaussian of that subspace.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from boltzflow.systems.particles import remove_mean

__all__ = [
    "MeanFreeGaussian",
    "Prior",
    "PriorFlowMixin",
    "StandardGaussian",
    "TorusGaussian",
    "build_prior",
    "check_points",
    "finite_points",
    "gaussian_prior",
    "standard_normal_log_prob",
]

_LOG_2PI = math.log(2 * math.pi)


def standard_normal_log_prob(z: Tensor, event_dim: int) -> Tensor:
    """Log density ``-|z|^2 / 2 - (event_dim / 2) log(2 pi)`` of the standard normal on
    ``R^event_dim``: ``(...,)`` from ``z (..., D)``.

    ``event_dim`` may differ from ``D``: for mean-free ``z`` in full coordinates it is the
    subspace dimension ``(n - 1) d`` (module docstring).
    """
    return -0.5 * z.square().sum(-1) - 0.5 * event_dim * _LOG_2PI


class Prior:
    """Base class: ``sample(n, generator=...)`` and ``log_prob(x)`` on flat ``(n, dim)`` tensors."""

    dim: int
    #: dimension of the space the density lives on (``dim`` or ``(n - 1) * d``)
    event_dim: int

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """Draw ``(n, dim)`` samples."""
        raise NotImplementedError

    def log_prob(self, x: Tensor) -> Tensor:
        """Log density ``(n,)`` of ``(n, dim)`` points."""
        raise NotImplementedError

    def config(self) -> dict[str, object]:
        """JSON-able description for checkpoints."""
        raise NotImplementedError


class StandardGaussian(Prior):
    """N(0, I_dim): ``log p(x) = -|x|^2/2 - (dim/2) log 2 pi``."""

    def __init__(self, dim: int) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = dim
        self.event_dim = dim

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """Draw ``(n, dim)`` samples (drawn on CPU from ``generator``, then moved to ``device``)."""
        return torch.randn(n, self.dim, generator=generator, dtype=dtype).to(device)

    def log_prob(self, x: Tensor) -> Tensor:
        """``(n,)`` log density."""
        return standard_normal_log_prob(x, self.event_dim)

    def config(self) -> dict[str, object]:
        return {"kind": "standard", "dim": self.dim}

    def __repr__(self) -> str:
        return f"StandardGaussian(dim={self.dim})"


class MeanFreeGaussian(StandardGaussian):
    """Standard normal on the mean-free subspace of ``n_particles`` particles in ``spatial_dim`` D.

    ``log_prob`` expects mean-free input (it does not project: a density on the subspace is
    undefined off it); :class:`boltzflow.flows.cnf.TeacherCNF` checks this at its boundary.
    """

    def __init__(self, n_particles: int, spatial_dim: int) -> None:
        if n_particles < 2 or spatial_dim < 1:
            raise ValueError(
                f"mean-free prior needs n_particles >= 2 and spatial_dim >= 1, got "
                f"{n_particles}, {spatial_dim}"
            )
        super().__init__(n_particles * spatial_dim)
        self.n_particles = n_particles
        self.spatial_dim = spatial_dim
        self.event_dim = (n_particles - 1) * spatial_dim

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """Draw ``(n, dim)`` mean-free samples."""
        x = super().sample(n, generator=generator, dtype=dtype, device=device)
        return remove_mean(x, self.n_particles, self.spatial_dim)

    def config(self) -> dict[str, object]:
        return {
            "kind": "mean_free",
            "n_particles": self.n_particles,
            "spatial_dim": self.spatial_dim,
        }

    def __repr__(self) -> str:
        return f"MeanFreeGaussian(n_particles={self.n_particles}, spatial_dim={self.spatial_dim})"


class TorusGaussian(Prior):
    """Product density for internal coordinates: standard normal on the non-periodic columns,
    uniform on [-pi, pi) for the ``periodic`` columns (dihedrals on the torus).

    ``log p(z) = -|z_nonper|^2/2 - (n_nonper/2) log 2 pi - n_per log 2 pi`` for periodic columns
    inside [-pi, pi); points with a periodic column outside that range get ``-inf`` (wrap them
    first, e.g. ``boltzflow.systems.internal_coords.wrap_angle``).
    """

    def __init__(self, dim: int, periodic: list[int] | tuple[int, ...]) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        periodic = sorted({int(i) for i in periodic})
        if periodic and (periodic[0] < 0 or periodic[-1] >= dim):
            raise ValueError(f"periodic columns must lie in [0, {dim}), got {periodic}")
        self.dim = dim
        self.event_dim = dim
        self.periodic = tuple(periodic)
        mask = torch.zeros(dim, dtype=torch.bool)
        mask[list(self.periodic)] = True
        self.mask = mask

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Tensor:
        """Draw ``(n, dim)`` samples: normal columns, then uniform angles in [-pi, pi)."""
        z = torch.randn(n, self.dim, generator=generator, dtype=dtype)
        k = len(self.periodic)
        if k:
            u = torch.rand(n, k, generator=generator, dtype=dtype)
            z[:, self.mask] = (2 * u - 1) * math.pi
        return z.to(device)

    def log_prob(self, x: Tensor) -> Tensor:
        """``(n,)`` log density (``-inf`` where a periodic column lies outside [-pi, pi))."""
        mask = self.mask.to(x.device)
        gauss = standard_normal_log_prob(x[:, ~mask], self.dim - len(self.periodic))
        angles = x[:, mask]
        inside = ((angles >= -math.pi) & (angles < math.pi)).all(-1)
        out = gauss - len(self.periodic) * _LOG_2PI
        return torch.where(inside, out, torch.full_like(out, -math.inf))

    def config(self) -> dict[str, object]:
        return {"kind": "torus_gaussian", "dim": self.dim, "periodic": list(self.periodic)}

    def __repr__(self) -> str:
        return f"TorusGaussian(dim={self.dim}, periodic={len(self.periodic)} columns)"


def build_prior(config: dict[str, object]) -> Prior:
    """Inverse of :meth:`Prior.config`.

    Raises:
        ValueError: unknown prior kind.
    """
    kind = config.get("kind")
    if kind == "standard":
        return StandardGaussian(int(config["dim"]))
    if kind == "mean_free":
        return MeanFreeGaussian(int(config["n_particles"]), int(config["spatial_dim"]))
    if kind == "torus_gaussian":
        return TorusGaussian(int(config["dim"]), list(config["periodic"]))  # type: ignore[arg-type]
    valid = ["mean_free", "standard", "torus_gaussian"]
    raise ValueError(f"unknown prior kind {kind!r}; valid: {valid}")


def gaussian_prior(
    dim: int,
    *,
    n_particles: int | None = None,
    spatial_dim: int | None = None,
    mean_free: bool = False,
) -> Prior:
    """The flows' base density: mean-free Gaussian for translation-invariant particle systems
    (``mean_free``), else the standard Gaussian of dimension ``dim``.

    Raises:
        ValueError: ``mean_free`` without ``n_particles`` and ``spatial_dim``.
    """
    if not mean_free:
        return StandardGaussian(dim)
    if n_particles is None or spatial_dim is None:
        raise ValueError("mean_free=True needs n_particles and spatial_dim")
    return MeanFreeGaussian(n_particles, spatial_dim)


class PriorFlowMixin:
    """Shared properties of a flow that maps the base density ``self.prior`` (a :class:`Prior`)
    to data in units of ``self.scale``: the teacher CNF and every student. Mix in before
    ``nn.Module``."""

    prior: Prior
    scale: float

    @property
    def mean_free(self) -> bool:
        return isinstance(self.prior, MeanFreeGaussian)

    @property
    def event_dim(self) -> int:
        """Dimension of the space log q is a density on ((n - 1) d for mean-free systems)."""
        return self.prior.event_dim

    def _param(self) -> Tensor:
        """A tensor carrying the model's dtype and device (first parameter or buffer)."""
        for tensor in (*self.parameters(), *self.buffers()):  # type: ignore[attr-defined]
            if tensor.is_floating_point():
                return tensor
        return torch.zeros(())

    def _log_scale(self) -> float:
        """log |det| of the map from flow units to data units, x = scale * y."""
        return self.event_dim * math.log(self.scale)


def finite_points(x: Tensor, dim: int, like: Tensor) -> Tensor:
    """``x`` as ``(N, dim)`` finite points with the dtype and device of ``like``.

    Raises:
        ValueError: wrong shape, or rows with NaN or infinite values (counted).
    """
    x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"expected points of shape (N, {dim}), got {tuple(x.shape)}")
    x = x.to(dtype=like.dtype, device=like.device)
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).any(1).sum())
        raise ValueError(f"{bad} of {len(x)} points contain NaN or infinite coordinates")
    return x


def check_points(prior: Prior, x: Tensor, like: Tensor) -> Tensor:
    """Validate ``(N, dim)`` points for a flow with base density ``prior``.

    Points of a mean-free prior must be mean-free up to round-off (largest particle-mean
    component at most 1e-4 (1 + max |x|)); they are then projected exactly.

    Args:
        prior: the flow's base density.
        x: ``(N, prior.dim)`` points (anything ``torch.as_tensor`` takes).
        like: tensor whose dtype and device the points are cast to.

    Returns:
        ``(N, dim)`` points (mean-free for a mean-free prior).

    Raises:
        ValueError: wrong shape, non-finite values, or points off the mean-free subspace.
    """
    x = finite_points(x, prior.dim, like)
    if not isinstance(prior, MeanFreeGaussian):
        return x
    n, d = prior.n_particles, prior.spatial_dim
    if len(x):
        com = float(x.reshape(len(x), n, d).mean(1).abs().max())
        if com > 1e-4 * (1.0 + float(x.abs().max())):
            raise ValueError(
                f"points are not mean-free (largest particle-mean component {com:.3g}); log q "
                "is a density on the mean-free subspace: remove the centre of mass first "
                "(boltzflow.data.load_positions does so for mean-free systems)"
            )
    return remove_mean(x, n, d)
