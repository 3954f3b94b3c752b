"""Isotropic Gaussian mixture with equal weights (FAB's GMM-40).

p(x) = (1/K) Σ_k N(x; μ_k, σ² I),  u(x) = −log p(x)  (computed with logsumexp),

so Z = 1 and log Z = 0 exactly. GMM-40: K = 40 modes in 2-D, σ = softplus(1) = 1.3133, means
uniform in [−40, 40]² as drawn by FAB (shipped as constants in the built-in definition
``boltzflow/systems/definitions/gmm_40.toml``).

Mode masses: component k carries mass exactly 1/K. Several FAB means lie within one σ of each
other, so labelling a point by its nearest mean (:meth:`GMMSystem.mode_assignment`) mislabels a
noticeable fraction of samples; the soft labels :meth:`GMMSystem.responsibilities` (posterior
component probabilities) satisfy E_p[r_k(x)] = 1/K exactly, so an estimate of P(set S) =
E_p[Σ_{k∈S} r_k(x)] has the exact value :meth:`GMMSystem.exact_mode_mass` (|S|/K), and the free
energy between mode sets S, T is ΔF = −log(|S|/|T|).

References:
    Midgley, Stimper, Simm, Schölkopf, Hernández-Lobato (2023), "Flow Annealed Importance
    Sampling Bootstrap", ICLR, arXiv:2208.01893 (Sec. 4, GMM problem).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from boltzflow.systems.base import System, SystemInfo, check_coordinates
from boltzflow.systems.params import check_parameters, number

__all__ = ["GMMSystem", "build"]

_PARAMETERS = ("std", "means")


class GMMSystem(System):
    """Equal-weight mixture of isotropic Gaussians with a common standard deviation.

    Args:
        info: static description (``dim`` = length of each mean, ``log_z`` = 0).
        means: ``(K, dim)`` component means.
        std: common standard deviation σ > 0 of every component.
    """

    def __init__(self, info: SystemInfo, means: np.ndarray, std: float) -> None:
        super().__init__(info)
        if means.ndim != 2 or means.shape[1] != info.dim or len(means) < 1:
            raise ValueError(f"{info.name}: means must be (K, {info.dim}), got {means.shape}")
        if not std > 0:
            raise ValueError(f"{info.name}: std must be > 0, got {std!r}")
        self._means = torch.as_tensor(means, dtype=torch.float64)
        self.std = std
        self.n_modes = len(means)

    @property
    def means(self) -> Tensor:
        """``(K, dim)`` float64 component means (a copy)."""
        return self._means.clone()

    def component_log_probs(self, x: Tensor) -> Tensor:
        """log[(1/K) N(x; μ_k, σ² I)] for every component: ``(batch, K)`` in the dtype of ``x``.

        Their logsumexp over k is −u(x) (for finite ``x``).
        """
        x = check_coordinates(x, self.dim, self.name)
        mu = self._means.to(dtype=x.dtype, device=x.device)
        sq = (x[:, None, :] - mu[None]).pow(2).sum(-1)
        log_norm = 0.5 * self.dim * math.log(2 * math.pi * self.std**2) + math.log(self.n_modes)
        return -0.5 * sq / self.std**2 - log_norm

    def responsibilities(self, x: Tensor) -> Tensor:
        """Posterior component probabilities r_k(x) = p(k | x), ``(batch, K)``, rows sum to 1."""
        return torch.softmax(self.component_log_probs(x), dim=-1)

    def mode_assignment(self, x: Tensor) -> Tensor:
        """Index of the nearest mean (the most probable component), ``(batch,)`` int64.

        Not an exact label: neighbouring means closer than a few σ share probability mass.
        """
        return self.component_log_probs(x).argmax(dim=-1)

    def exact_mode_mass(self, indices: Iterable[int]) -> float:
        """Exact probability mass |S|/K of the set S of components ``indices`` (duplicates once).

        This is the expectation of Σ_{k∈S} r_k(x) (soft labels), not of nearest-mean labels.

        Raises:
            ValueError: an index outside ``[0, K)``.
        """
        s = {int(i) for i in indices}
        bad = sorted(i for i in s if not 0 <= i < self.n_modes)
        if bad:
            raise ValueError(f"{self.name}: mode indices {bad} outside [0, {self.n_modes})")
        return len(s) / self.n_modes

    def _energy(self, x: Tensor) -> Tensor:
        return -torch.logsumexp(self.component_log_probs(x), dim=-1)

    def sample_with_components(self, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
        """Exact samples and the component that generated each.

        Returns:
            ``(n, dim)`` float64 samples and ``(n,)`` int64 component indices (numpy
            ``default_rng(seed)``; the same seed gives the same samples).
        """
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = np.random.default_rng(seed)
        comp = rng.integers(0, self.n_modes, size=n)
        noise = rng.standard_normal((n, self.dim))
        x = self._means.numpy()[comp] + self.std * noise
        return torch.from_numpy(x), torch.from_numpy(comp)

    def sample_exact(self, n: int, seed: int = 0) -> Tensor:
        """Exact samples ``(n, dim)`` in float64 (see :meth:`sample_with_components`)."""
        return self.sample_with_components(n, seed)[0]

    def reference_configuration(self) -> Tensor:
        """The first mean, ``(1, dim)`` float64."""
        return self._means[:1].clone()


def build(spec: dict[str, Any], params: dict[str, Any], source_dir: Path) -> GMMSystem:
    """Registry builder for ``kind = "gmm"``: parameters ``std`` and ``means`` (list of K points).

    Raises:
        ValueError: missing/unknown parameters, malformed means, or a temperature.
        TypeError: a non-numeric std.
    """
    name = spec["name"]
    check_parameters(name, params, _PARAMETERS)
    if spec.get("temperature") is not None:
        raise ValueError(f"system {name!r} is dimensionless and has no temperature")
    std = number(name, "std", params["std"])
    try:
        means = np.asarray(params["means"], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"system {name!r}: means must be a list of equal-length number lists"
        ) from err
    if means.ndim != 2 or not np.isfinite(means).all():
        raise ValueError(f"system {name!r}: means must be a (K, dim) table of finite numbers")
    spec = {**spec, "dim": spec.get("dim", means.shape[1])}
    info = SystemInfo.from_spec(spec, params, log_z=0.0)
    return GMMSystem(info, means, std)
