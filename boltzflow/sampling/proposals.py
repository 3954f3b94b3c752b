"""Simple proposals with exact log-densities, for importance sampling and tests.

Every proposal has ``dim``, ``sample(n, seed) -> (x, log_q)`` and ``log_prob(x) -> log_q``, with
``x`` of shape ``(n, dim)`` and ``log_q`` of shape ``(n,)``, float64 throughout. ``log_prob`` is
differentiable in ``x`` (SMC kernels need its gradient).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from boltzflow.systems.base import System, check_coordinates
from boltzflow.systems.particles import as_particles, remove_mean

__all__ = [
    "ExactProposal",
    "GaussianMixtureProposal",
    "GaussianProposal",
    "KernelDensityProposal",
    "ManyWellProposal",
    "MeanFreeGaussianProposal",
    "Proposal",
    "QuarticWell",
    "quartic_well",
]

_LOG_2PI = math.log(2 * math.pi)


@runtime_checkable
class Proposal(Protocol):
    """Anything that samples with its log-density and evaluates that log-density."""

    dim: int

    def sample(self, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
        """``(x (n, dim), log_q (n,))``."""
        ...

    def log_prob(self, x: Tensor) -> Tensor:
        """``log_q (batch,)`` at ``x (batch, dim)``."""
        ...


def _generator(seed: int) -> torch.Generator:
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return torch.Generator().manual_seed(seed)


def _check_n(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"number of samples must be a positive int, got {n!r}")


class GaussianProposal:
    """Diagonal Gaussian N(mean, diag(std^2)) in ``dim`` dimensions.

    Args:
        dim: dimension.
        mean: scalar or ``(dim,)`` mean.
        std: positive scalar or ``(dim,)`` standard deviations.
    """

    def __init__(self, dim: int, mean: float | Tensor = 0.0, std: float | Tensor = 1.0) -> None:
        self.dim = int(dim)
        self.mean = torch.as_tensor(mean, dtype=torch.float64).expand(self.dim).clone()
        self.std = torch.as_tensor(std, dtype=torch.float64).expand(self.dim).clone()
        if not bool((self.std > 0).all()):
            raise ValueError("std must be positive")

    def log_prob(self, x: Tensor) -> Tensor:
        x = check_coordinates(x, self.dim, "GaussianProposal")
        z = (x - self.mean.to(x)) / self.std.to(x)
        return -0.5 * (z**2).sum(-1) - self.std.to(x).log().sum() - 0.5 * self.dim * _LOG_2PI

    def sample(self, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
        _check_n(n)
        eps = torch.randn(n, self.dim, generator=_generator(seed), dtype=torch.float64)
        x = self.mean + self.std * eps
        return x, self.log_prob(x)


class MeanFreeGaussianProposal:
    """Isotropic Gaussian restricted to the mean-free subspace of n particles in d dimensions.

    Samples are N(0, std^2 I) projected onto the subspace sum_i x_i = 0; the density is w.r.t.
    Lebesgue measure on that (n-1)*d-dimensional subspace:
    log q(x) = -|x|^2 / (2 std^2) - (n-1) d / 2 * log(2 pi std^2) for mean-free x
    (Köhler, Klein, Noé 2020, arXiv:2006.02425, Sec. 4).
    """

    def __init__(self, n_particles: int, spatial_dim: int, std: float = 1.0) -> None:
        if n_particles < 2 or spatial_dim < 1:
            raise ValueError("need n_particles >= 2 and spatial_dim >= 1")
        if not std > 0:
            raise ValueError(f"std must be positive, got {std!r}")
        self.n_particles, self.spatial_dim, self.std = n_particles, spatial_dim, float(std)
        self.dim = n_particles * spatial_dim
        self.subspace_dim = (n_particles - 1) * spatial_dim

    def log_prob(self, x: Tensor) -> Tensor:
        x = check_coordinates(x, self.dim, "MeanFreeGaussianProposal")
        x = remove_mean(x, self.n_particles, self.spatial_dim)
        var = self.std**2
        return -0.5 * (x**2).sum(-1) / var - 0.5 * self.subspace_dim * (_LOG_2PI + math.log(var))

    def sample(self, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
        _check_n(n)
        eps = torch.randn(n, self.dim, generator=_generator(seed), dtype=torch.float64)
        x = remove_mean(self.std * eps, self.n_particles, self.spatial_dim)
        return x, self.log_prob(x)


class GaussianMixtureProposal:
    """Mixture of diagonal Gaussians sum_k pi_k N(mean_k, diag(std_k^2)).

    With equal weights and one component per configuration this is a Gaussian kernel density
    (e.g. MD frames perturbed by noise of width ``std``).

    Args:
        means: ``(K, dim)`` component means.
        stds: scalar, ``(K,)`` or ``(K, dim)`` standard deviations.
        weights: ``(K,)`` non-negative mixture weights (normalised here); default equal.
        chunk_size: rows per chunk in :meth:`log_prob` (memory ~ chunk * K * dim doubles).
    """

    def __init__(
        self,
        means: Tensor,
        stds: float | Tensor = 1.0,
        weights: Tensor | None = None,
        chunk_size: int = 1024,
    ) -> None:
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.ndim != 2:
            raise ValueError(f"means must be (K, dim), got shape {tuple(self.means.shape)}")
        k, self.dim = self.means.shape
        stds = torch.as_tensor(stds, dtype=torch.float64)
        if stds.ndim == 1:
            stds = stds[:, None]
        self.stds = stds.expand(k, self.dim).clone()
        if not bool((self.stds > 0).all()):
            raise ValueError("stds must be positive")
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights)
        w = w.to(torch.float64)
        if w.shape != (k,) or bool((w < 0).any()) or not float(w.sum()) > 0:
            raise ValueError(f"weights must be ({k},) non-negative with a positive sum")
        self.log_weights = (w / w.sum()).log()
        self.chunk_size = int(chunk_size)

    def log_prob(self, x: Tensor) -> Tensor:
        x = check_coordinates(x, self.dim, "GaussianMixtureProposal")
        means, stds, logw = (t.to(x) for t in (self.means, self.stds, self.log_weights))
        norm = -stds.log().sum(-1) - 0.5 * self.dim * _LOG_2PI + logw  # (K,)
        out = []
        for chunk in x.split(self.chunk_size):
            z = (chunk[:, None, :] - means[None]) / stds[None]
            out.append(torch.logsumexp(-0.5 * (z**2).sum(-1) + norm, dim=1))
        return torch.cat(out)

    def sample(self, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
        _check_n(n)
        g = _generator(seed)
        comp = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=g)
        eps = torch.randn(n, self.dim, generator=g, dtype=torch.float64)
        x = self.means[comp] + self.stds[comp] * eps
        return x, self.log_prob(x)


class KernelDensityProposal:
    """Equal-weight isotropic Gaussian kernels around given configurations (e.g. MD frames).

    q(x) = (1/K) sum_k N(x; c_k, std^2 I). With ``n_particles`` and ``spatial_dim`` the kernels
    live on the mean-free subspace (centres and noise are projected, and the density is w.r.t.
    that (n-1)*d-dimensional subspace, as for :class:`MeanFreeGaussianProposal`), which is what a
    translation-invariant target needs: a full-space density would add a spurious
    centre-of-mass factor to every weight.

    Args:
        centers: ``(K, dim)`` kernel centres.
        std: kernel width (coordinate units, nm for molecules).
        n_particles, spatial_dim: give both for a mean-free proposal.
        chunk_size: rows per chunk in :meth:`log_prob`.
    """

    def __init__(
        self,
        centers: Tensor,
        std: float,
        *,
        n_particles: int | None = None,
        spatial_dim: int | None = None,
        chunk_size: int = 512,
    ) -> None:
        c = torch.as_tensor(centers, dtype=torch.float64)
        if c.ndim != 2 or c.shape[0] < 1:
            raise ValueError(f"centers must be (K, dim), got shape {tuple(c.shape)}")
        if not std > 0:
            raise ValueError(f"std must be positive, got {std!r}")
        if (n_particles is None) != (spatial_dim is None):
            raise ValueError("give both n_particles and spatial_dim, or neither")
        self.dim = c.shape[1]
        self.std = float(std)
        self.particles = None if n_particles is None else (n_particles, spatial_dim)
        if self.particles is not None:
            if n_particles * spatial_dim != self.dim:
                raise ValueError(f"n_particles * spatial_dim != dim {self.dim}")
            c = remove_mean(c, *self.particles)
            self.event_dim = (n_particles - 1) * spatial_dim
        else:
            self.event_dim = self.dim
        self.centers = c
        self.chunk_size = int(chunk_size)

    def _project(self, x: Tensor) -> Tensor:
        return x if self.particles is None else remove_mean(x, *self.particles)

    def log_prob(self, x: Tensor) -> Tensor:
        x = self._project(check_coordinates(x, self.dim, "KernelDensityProposal"))
        c = self.centers.to(x)
        var = self.std**2
        norm = -0.5 * self.event_dim * (_LOG_2PI + math.log(var)) - math.log(c.shape[0])
        out = []
        for chunk in x.split(self.chunk_size):
            sq = (chunk[:, None, :] - c[None]).pow(2).sum(-1)
            out.append(torch.logsumexp(-0.5 * sq / var, dim=1) + norm)
        return torch.cat(out)

    def sample(self, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
        _check_n(n)
        g = _generator(seed)
        k = torch.randint(0, self.centers.shape[0], (n,), generator=g)
        eps = torch.randn(n, self.dim, generator=g, dtype=torch.float64)
        x = self.centers[k] + self._project(self.std * eps)
        return x, self.log_prob(x)


# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuarticWell:
    """Exact summary of the 1-D density exp(-(a x + b x^2 + c x^4)) by quadrature.

    Attributes:
        log_z: log of its integral.
        barrier: position of the barrier between the two wells.
        masses: ``(left, right)`` probability of each side of the barrier.
        means: ``(left, right)`` conditional means.
        stds: ``(left, right)`` conditional standard deviations.
    """

    log_z: float
    barrier: float
    masses: tuple[float, float]
    means: tuple[float, float]
    stds: tuple[float, float]


def quartic_well(a: float = -0.5, b: float = -6.0, c: float = 1.0) -> QuarticWell:
    """Quadrature summary of the Many-Well building block u(x) = a x + b x^2 + c x^4.

    Trapezoid rule on 400,001 points over the region where u < min u + 80 (the integrand is
    smooth and decays super-exponentially, so the error is far below float64 round-off of the
    result). For the FAB defaults log Z = log 11784.50927 (Midgley et al. 2023,
    arXiv:2208.01893).

    Raises:
        ValueError: unless c > 0 and the potential has two wells (b < 0 and a small enough).
    """
    if not c > 0:
        raise ValueError(f"c must be positive for a normalisable density, got {c!r}")
    roots = np.roots([4 * c, 0.0, 2 * b, a])
    real = np.sort(roots[np.abs(roots.imag) < 1e-9].real)
    if real.size != 3:
        raise ValueError(f"u(x) = {a} x + {b} x^2 + {c} x^4 has one well, not two")
    barrier = float(real[1])
    u_min = min(a * r + b * r**2 + c * r**4 for r in (real[0], real[2]))
    span = (abs(b) / c) ** 0.5 + (abs(a) / c) ** (1 / 3) + ((80 + abs(u_min)) / c) ** 0.25 + 1
    x = np.linspace(-span, span, 400_001)
    u = a * x + b * x**2 + c * x**4
    dens = np.exp(-(u - u_min))
    z = np.trapezoid(dens, x)
    masses, means, stds = [], [], []
    for side in (x < barrier, x >= barrier):
        d = np.where(side, dens, 0.0)
        m = np.trapezoid(d, x)
        mu = np.trapezoid(d * x, x) / m
        var = np.trapezoid(d * (x - mu) ** 2, x) / m
        masses.append(float(m / z))
        means.append(float(mu))
        stds.append(float(np.sqrt(var)))
    return QuarticWell(float(np.log(z) - u_min), barrier, tuple(masses), tuple(means), tuple(stds))


class ManyWellProposal:
    """Many-Well proposal: per pair (x1, x2), a two-Gaussian mixture in x1 times N(0, 1) in x2.

    Many-Well-D (Midgley et al. 2023, FAB) is a product of D/2 copies of
    u(x1, x2) = a x1 + b x1^2 + c x1^4 + x2^2 / 2 acting on consecutive coordinate pairs
    ``(x[2i], x[2i+1])``. The x2 factor is sampled exactly; each x1 well is matched by a Gaussian
    with the well's exact mass, mean and std (:func:`quartic_well`), which is close but not exact
    because the wells are not Gaussian.

    Args:
        dim: even dimension (32 for Many-Well-32).
        a, b, c: the double-well coefficients.
        std_scale: multiply the fitted well widths (> 1 gives a broader, worse proposal).
        masses: override the mixture weights ``(left, right)`` (to build a deliberately poor
            proposal); default the exact well masses.
    """

    def __init__(
        self,
        dim: int = 32,
        a: float = -0.5,
        b: float = -6.0,
        c: float = 1.0,
        *,
        std_scale: float = 1.0,
        masses: tuple[float, float] | None = None,
    ) -> None:
        if dim < 2 or dim % 2:
            raise ValueError(f"Many-Well dim must be a positive even number, got {dim}")
        if not std_scale > 0:
            raise ValueError(f"std_scale must be positive, got {std_scale!r}")
        self.dim, self.n_wells = dim, dim // 2
        self.well = quartic_well(a, b, c)
        m = self.well.masses if masses is None else masses
        if len(m) != 2 or min(m) < 0 or not sum(m) > 0:
            raise ValueError(f"masses must be two non-negative numbers, got {masses!r}")
        self.masses = torch.tensor(m, dtype=torch.float64) / sum(m)
        self.means = torch.tensor(self.well.means, dtype=torch.float64)
        self.stds = torch.tensor(self.well.stds, dtype=torch.float64) * std_scale

    @classmethod
    def from_system(cls, system: System, **kwargs: float | tuple[float, float]) -> ManyWellProposal:
        """Read ``a``, ``b``, ``c`` from the system's parameters (FAB defaults where absent)."""
        p = system.info.parameters
        return cls(system.dim, p.get("a", -0.5), p.get("b", -6.0), p.get("c", 1.0), **kwargs)

    @property
    def exact_log_z(self) -> float:
        """log Z of the Many-Well target exp(-u): n_wells * (log Z_1 + log(2 pi) / 2)."""
        return self.n_wells * (self.well.log_z + 0.5 * _LOG_2PI)

    def log_prob(self, x: Tensor) -> Tensor:
        x = check_coordinates(x, self.dim, "ManyWellProposal")
        pairs = as_particles(x, self.n_wells, 2)
        x1, x2 = pairs[..., 0:1], pairs[..., 1]
        mu, sd, lm = self.means.to(x), self.stds.to(x), self.masses.to(x).log()
        comp = lm - sd.log() - 0.5 * _LOG_2PI - 0.5 * ((x1 - mu) / sd) ** 2  # (batch, wells, 2)
        lq1 = torch.logsumexp(comp, dim=-1)
        lq2 = -0.5 * x2**2 - 0.5 * _LOG_2PI
        return (lq1 + lq2).sum(-1)

    def sample(self, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
        _check_n(n)
        g = _generator(seed)
        k = torch.multinomial(self.masses, n * self.n_wells, replacement=True, generator=g)
        k = k.reshape(n, self.n_wells)
        eps = torch.randn(n, self.n_wells, 2, generator=g, dtype=torch.float64)
        x1 = self.means[k] + self.stds[k] * eps[..., 0]
        x = torch.stack([x1, eps[..., 1]], dim=-1).reshape(n, self.dim)
        return x, self.log_prob(x)


class ExactProposal:
    """Exact target samples as a proposal: log q = -u(x) - log Z, so every weight is Z.

    For checks: with it, ESS/N = 1 and log Z is recovered exactly.

    Raises:
        ValueError: if the system has no exact sampler or no known log Z.
    """

    def __init__(self, system: System) -> None:
        if not system.has_exact_samples:
            raise ValueError(f"system {system.name!r} has no exact sampler")
        if system.log_z is None:
            raise ValueError(f"system {system.name!r} has no known log Z")
        self.system = system
        self.dim = system.dim

    def log_prob(self, x: Tensor) -> Tensor:
        return -self.system.energy(x) - self.system.log_z

    def sample(self, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
        _check_n(n)
        x = self.system.sample_exact(n, seed=seed).to(torch.float64)
        with torch.no_grad():
            return x, self.log_prob(x)
