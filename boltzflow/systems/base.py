"""The :class:`System` protocol: a target density exp(-u(x)) / Z over flat coordinates.

Subclasses implement ``_energy`` only; :meth:`System.energy` validates shapes, dtypes and
non-finite input, and :meth:`System.force` derives forces by autograd in one place.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from boltzflow.systems.particles import remove_mean

__all__ = [
    "System",
    "SystemInfo",
    "check_coordinates",
    "compute_energies",
    "describe_energy_provenance",
    "energy_provenance_of",
]


@dataclass(frozen=True)
class SystemInfo:
    """Static description of a system, as read from its ``<name>.toml`` definition."""

    name: str
    dim: int
    n_particles: int | None
    spatial_dim: int | None
    temperature: float | None
    description: str = ""
    force_field: str | None = None
    log_z: float | None = None
    mean_free: bool = False
    reference: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_spec(cls, spec: dict[str, Any], params: dict[str, Any], **extra: Any) -> SystemInfo:
        """Build from a parsed ``<name>.toml`` definition (see :mod:`boltzflow.systems.registry`).

        ``dim`` defaults to ``n_particles * spatial_dim``; ``extra`` (e.g. a computed ``log_z``)
        overrides the file.
        """
        n, d = spec.get("n_particles"), spec.get("spatial_dim")
        dim = spec.get("dim", n * d if n is not None and d is not None else None)
        fields = {
            "name": spec["name"],
            "dim": dim,
            "n_particles": n,
            "spatial_dim": d,
            "temperature": spec.get("temperature"),
            "description": spec.get("description", ""),
            "force_field": spec.get("force_field"),
            "mean_free": bool(spec.get("mean_free", False)),
            "reference": spec.get("reference", ""),
            "parameters": dict(params),
        }
        fields.update(extra)
        if fields["dim"] is None:
            raise ValueError(f"system {spec['name']!r}: give dim or n_particles and spatial_dim")
        return cls(**fields)


def check_coordinates(x: Tensor, dim: int, name: str) -> Tensor:
    """Validate a batch of flat coordinates and return it (promoted to floating point).

    Raises:
        TypeError: if ``x`` is not a tensor.
        ValueError: if ``x`` is not ``(batch, dim)``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: coordinates must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2 or x.shape[-1] != dim:
        raise ValueError(
            f"{name}: coordinates must have shape (batch, {dim}), got {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    return x


class System(abc.ABC):
    """A physical system with reduced energy u(x) = U(x)/kT (dimensionless).

    Attributes mirror :class:`SystemInfo`. Coordinates are flat, shape ``(batch, dim)``, with
    ``dim = n_particles * spatial_dim`` for particle systems (nm for molecules). Rows with NaN or
    infinite coordinates get energy ``+inf`` and are counted in :attr:`n_nonfinite`.
    """

    def __init__(self, info: SystemInfo) -> None:
        self.info = info
        self.n_nonfinite = 0

    # -- static description --------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.info.name

    @property
    def dim(self) -> int:
        return self.info.dim

    @property
    def n_particles(self) -> int | None:
        return self.info.n_particles

    @property
    def spatial_dim(self) -> int | None:
        return self.info.spatial_dim

    @property
    def temperature(self) -> float | None:
        """Temperature in kelvin, or None for dimensionless toy systems."""
        return self.info.temperature

    @property
    def log_z(self) -> float | None:
        """Exact log partition function of exp(-u), or None where unknown."""
        return self.info.log_z

    @property
    def mean_free(self) -> bool:
        """True if the density lives on the mean-free subspace (translation-invariant particles)."""
        return self.info.mean_free

    @property
    def has_exact_samples(self) -> bool:
        return type(self).sample_exact is not System.sample_exact

    # -- energies ------------------------------------------------------------------------------
    @abc.abstractmethod
    def _energy(self, x: Tensor) -> Tensor:
        """Reduced energy of finite, validated coordinates ``(batch, dim)`` -> ``(batch,)``."""

    def energy(self, x: Tensor) -> Tensor:
        """Reduced energy u(x), differentiable in ``x``.

        Args:
            x: ``(batch, dim)`` coordinates, float32 or float64, any device.

        Returns:
            ``(batch,)`` reduced energies in the dtype and device of ``x``; ``+inf`` for rows with
            non-finite coordinates (counted in :attr:`n_nonfinite`).
        """
        x = check_coordinates(x, self.dim, self.name)
        finite = torch.isfinite(x).all(dim=-1)
        if bool(finite.all()):
            return self._energy(x)
        self.n_nonfinite += int((~finite).sum())
        safe = torch.where(finite[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        u = self._energy(safe)
        return torch.where(finite, u, torch.full_like(u, float("inf")))

    def force(self, x: Tensor) -> Tensor:
        """Reduced force -du/dx, shape ``(batch, dim)`` (kT per coordinate unit)."""
        x = check_coordinates(x, self.dim, self.name)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            u = self.energy(xg)
            (grad,) = torch.autograd.grad(u.sum(), xg)
        return -grad

    def energy_provenance(self) -> dict[str, Any]:
        """What computes u(x), JSON-friendly: recorded beside stored energies (sample files).

        ``{"system", "temperature", "parameters", "backend"}``; the backend is ``"analytic"``
        for closed-form potentials (molecular systems name theirs, see
        :mod:`boltzflow.systems.molecular`).
        """
        return {
            "system": self.name,
            "temperature": self.temperature,
            "parameters": dict(self.info.parameters),
            "backend": "analytic",
        }

    # -- helpers ---------------------------------------------------------------------------------
    def remove_mean(self, x: Tensor) -> Tensor:
        """Centre particle coordinates (identity for non-particle systems)."""
        if self.n_particles is None or self.spatial_dim is None:
            return x
        return remove_mean(x, self.n_particles, self.spatial_dim)

    def sample_exact(self, n: int, seed: int = 0) -> Tensor:
        """Exact samples ``(n, dim)`` in float64, where the system supports them."""
        raise NotImplementedError(f"system {self.name!r} has no exact sampler")

    def reference_configuration(self) -> Tensor:
        """One representative configuration ``(1, dim)`` in float64 (a minimum or the PDB)."""
        raise NotImplementedError(f"system {self.name!r} has no reference configuration")

    def close(self) -> None:  # noqa: B027 - optional hook, a no-op unless overridden
        """Release resources such as worker pools (no-op for analytic systems)."""

    def __enter__(self) -> System:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim})"


def compute_energies(system: System, x: Tensor, batch_size: int = 4096) -> Tensor:
    """Reduced energies ``(N,)`` float64 of ``x`` in batches, without gradients."""
    x = torch.as_tensor(x, dtype=torch.float64)
    with torch.no_grad():
        parts = [system.energy(chunk).to(torch.float64) for chunk in x.split(batch_size)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def energy_provenance_of(system: Any) -> dict[str, Any] | None:
    """``system.energy_provenance()``, or None for a target without one (any object with an
    ``energy`` method can serve as a target) or no target."""
    method = getattr(system, "energy_provenance", None)
    return method() if callable(method) else None


def describe_energy_provenance(provenance: Any) -> str:
    """One line for reports from :meth:`System.energy_provenance`'s dict, e.g.
    ``"aldp, torch backend (float64, device input)"``; ``"not recorded"`` for None."""
    if not isinstance(provenance, dict):
        return "not recorded" if provenance is None else str(provenance)
    details = [
        f"{key} {provenance[key]}"
        for key in ("dtype", "device", "platform")
        if provenance.get(key) is not None
    ]
    if provenance.get("energy_cap") is not None:
        details.append(f"energy_cap {provenance['energy_cap']} kT")
    text = f"{provenance.get('system', '?')}, {provenance.get('backend', '?')} backend"
    return f"{text} ({', '.join(details)})" if details else text
