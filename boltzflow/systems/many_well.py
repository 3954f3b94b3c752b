"""Many-Well: independent copies of a 2-D asymmetric double well (FAB's Many-Well-32).

u(x) = Σ_{k=1}^{n_wells} [a x1_k + b x1_k² + c x1_k⁴ + ½ x2_k²],  x = (x1_1, x2_1, x1_2, x2_2, ...),

dimensionless, dim = 2 · n_wells. With a = −0.5, b = −6, c = 1 and 16 wells (dim 32) the 1-D
integral ∫ exp(−a t − b t² − c t⁴) dt = 11784.50927, so log Z = 16 (log 11784.50927 + ½ log 2π)
= 164.696. Each x1 has a deep well at t ≈ 1.7525 and a shallower one at t ≈ −1.7108, so the
density has 2^16 modes. Both log Z and exact samples are available.

References:
    Midgley, Stimper, Simm, Schölkopf, Hernández-Lobato (2023), "Flow Annealed Importance
    Sampling Bootstrap", ICLR, arXiv:2208.01893 (Sec. 4, Many Well).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.integrate import quad
from torch import Tensor

from boltzflow.systems.base import System, SystemInfo
from boltzflow.systems.params import check_parameters, number

__all__ = ["DoubleWell1D", "ManyWellSystem", "build"]

_PARAMETERS = ("a", "b", "c", "n_wells")


class DoubleWell1D:
    """The 1-D quartic f(t) = a t + b t² + c t⁴ with exact normaliser and exact sampler.

    Args:
        a, b, c: coefficients, with c > 0 (else exp(−f) is not normalisable).

    Attributes:
        minima: local minima of f, ascending.
        log_z: log ∫ exp(−f(t)) dt, by adaptive quadrature (scipy ``quad``) split at the minima.
    """

    def __init__(self, a: float, b: float, c: float) -> None:
        if not c > 0:
            raise ValueError(f"the quartic coefficient c must be > 0, got {c!r}")
        self.a, self.b, self.c = a, b, c
        roots = np.roots([4 * c, 0.0, 2 * b, a])  # f'(t) = 4c t³ + 2b t + a
        stationary = np.sort(roots[np.abs(roots.imag) < 1e-9].real)
        self.minima = np.array([t for t in stationary if self.second_derivative(t) > 0])
        self._maxima = np.array([t for t in stationary if self.second_derivative(t) < 0])
        self._f_min = float(min(self.f(self.minima)))
        # Integration range: beyond it exp(-(f - f_min)) < exp(-800), below double precision.
        half = float(np.max(np.abs(self.minima))) + 1.0
        while self.f(half) - self._f_min < 800 or self.f(-half) - self._f_min < 800:
            half *= 1.5
        self._half_width = half
        value, _ = quad(
            lambda t: math.exp(self._f_min - self.f(t)),
            -half,
            half,
            points=list(self.minima),
            limit=500,
            epsabs=0.0,
            epsrel=1e-13,
        )
        self.log_z = math.log(value) - self._f_min
        self._envelope()

    def f(self, t: np.ndarray | float) -> np.ndarray | float:
        """f(t) = a t + b t² + c t⁴."""
        return self.a * t + self.b * t**2 + self.c * t**4

    def second_derivative(self, t: float) -> float:
        """f''(t) = 2b + 12c t²."""
        return 2 * self.b + 12 * self.c * t**2

    def log_density(self, t: np.ndarray) -> np.ndarray:
        """Normalised log-density −f(t) − log Z."""
        return -self.f(t) - self.log_z

    def _envelope(self) -> None:
        # Proposal for rejection sampling: a Gaussian mixture with one component per minimum,
        # weighted by the mass of its basin (split at the barrier), with standard deviations a
        # common multiple of the curvature widths 1/sqrt(f''(t_min)); the multiple that minimises
        # the bound M is picked on a coarse grid. M is the largest target/proposal ratio on a fine
        # grid times 1.05 (the ratio is smooth and falls like exp(-c t^4) in the tails); sample()
        # raises if a proposal ever exceeds it, so a wrong bound cannot pass silently.
        mins = self.minima
        if len(mins) == 2:
            barrier = float(self._maxima[0])
            left, _ = quad(
                lambda t: math.exp(self._f_min - self.f(t)),
                -self._half_width,
                barrier,
                points=[mins[0]],
                limit=500,
            )
            weights = np.array([left, math.exp(self.log_z + self._f_min) - left])
            weights /= weights.sum()
        else:
            weights = np.ones(1)
        base = np.array([1.0 / math.sqrt(self.second_derivative(t)) for t in mins])

        def log_bound(stds: np.ndarray, n_grid: int) -> float:
            grid = np.linspace(-self._half_width, self._half_width, n_grid)
            ratio = self.log_density(grid) - self._log_mixture(grid, mins, stds, weights)
            return float(np.max(ratio))

        factors = np.linspace(1.0, 4.0, 31)
        best = factors[np.argmin([log_bound(k * base, 20_001) for k in factors])]
        stds = best * base
        self.log_bound = log_bound(stds, 400_001) + math.log(1.05)
        self._means, self._weights, self._stds = mins, weights, stds

    @staticmethod
    def _log_mixture(
        t: np.ndarray, means: np.ndarray, stds: np.ndarray, weights: np.ndarray
    ) -> np.ndarray:
        z = (t[:, None] - means[None]) / stds[None]
        comp = np.log(weights)[None] - 0.5 * z**2 - np.log(stds)[None] - 0.5 * math.log(2 * math.pi)
        top = comp.max(axis=1, keepdims=True)
        return (top + np.log(np.exp(comp - top).sum(axis=1, keepdims=True)))[:, 0]

    @property
    def acceptance_rate(self) -> float:
        """Expected acceptance rate of :meth:`sample`, 1/M."""
        return math.exp(-self.log_bound)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` exact samples (float64) by rejection from the Gaussian-mixture envelope."""
        out = np.empty(0)
        while out.size < n:
            m = int((n - out.size) / self.acceptance_rate * 1.1) + 16
            comp = rng.choice(len(self._weights), size=m, p=self._weights)
            t = self._means[comp] + self._stds[comp] * rng.standard_normal(m)
            log_ratio = (
                self.log_density(t)
                - self._log_mixture(t, self._means, self._stds, self._weights)
                - self.log_bound
            )
            if np.any(log_ratio > 0):  # pragma: no cover - guards the bound's exactness
                raise RuntimeError("rejection-sampling bound violated; the sampler is not exact")
            keep = np.log(rng.random(m)) < log_ratio
            out = np.concatenate([out, t[keep]])
        return out[:n]


class ManyWellSystem(System):
    """``n_wells`` independent 2-D double wells; not a particle system.

    Args:
        info: static description with ``dim = 2 * n_wells`` and the exact ``log_z``.
        well: the 1-D quartic in x1 (x2 is a standard normal).
    """

    def __init__(self, info: SystemInfo, well: DoubleWell1D) -> None:
        super().__init__(info)
        self.well = well
        self.n_wells = info.dim // 2

    def _energy(self, x: Tensor) -> Tensor:
        x1, x2 = x[:, 0::2], x[:, 1::2]
        w = self.well
        x1sq = x1 * x1
        return (w.a * x1 + w.b * x1sq + w.c * x1sq * x1sq + 0.5 * x2 * x2).sum(-1)

    def sample_exact(self, n: int, seed: int = 0) -> Tensor:
        """Exact samples ``(n, dim)`` in float64: x1 by rejection sampling, x2 ~ N(0, 1).

        Reproducible: the same ``seed`` gives the same samples (numpy ``default_rng``).
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = np.random.default_rng(seed)
        x = np.empty((n, self.n_wells, 2))
        x[..., 0] = self.well.sample(n * self.n_wells, rng).reshape(n, self.n_wells)
        x[..., 1] = rng.standard_normal((n, self.n_wells))
        return torch.from_numpy(x.reshape(n, self.dim))

    def reference_configuration(self) -> Tensor:
        """Every x1 at the deepest minimum of the quartic, every x2 at 0; ``(1, dim)`` float64."""
        deepest = float(self.well.minima[np.argmin(self.well.f(self.well.minima))])
        x = torch.zeros(1, self.n_wells, 2, dtype=torch.float64)
        x[..., 0] = deepest
        return x.reshape(1, self.dim)


def build(spec: dict[str, Any], params: dict[str, Any], source_dir: Path) -> ManyWellSystem:
    """Registry builder for ``kind = "many_well"``; computes the exact ``log_z`` by quadrature.

    ``dim`` follows ``n_wells`` (the file's own ``dim`` must equal 2 · its ``n_wells``).

    Raises:
        ValueError: missing/unknown parameters, c <= 0, inconsistent ``dim``, or a temperature.
        TypeError: a non-numeric parameter.
    """
    name = spec["name"]
    check_parameters(name, params, _PARAMETERS)
    if spec.get("temperature") is not None:
        raise ValueError(f"system {name!r} is dimensionless and has no temperature")
    n_wells = params["n_wells"]
    if isinstance(n_wells, bool) or not isinstance(n_wells, int) or n_wells < 1:
        raise ValueError(f"system {name!r}: n_wells must be a positive integer, got {n_wells!r}")
    file_wells = spec["parameters"].get("n_wells")
    if "dim" in spec and spec["dim"] != 2 * file_wells:
        raise ValueError(f"system {name!r}: dim = {spec['dim']} but 2 * n_wells = {2 * file_wells}")
    a, b, c = (number(name, k, params[k]) for k in ("a", "b", "c"))
    well = DoubleWell1D(a, b, c)
    log_z = n_wells * (well.log_z + 0.5 * math.log(2 * math.pi))
    spec = {**spec, "dim": 2 * n_wells}
    info = SystemInfo.from_spec(spec, params, log_z=log_z)
    return ManyWellSystem(info, well)
