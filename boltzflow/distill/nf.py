"""Small coupling normalizing flows as students: the model and its architecture.

:class:`NFStudent` wraps a :class:`~boltzflow.flows.coupling.CouplingFlow` in the
:class:`~boltzflow.distill.base.Student` interface (registry name ``"nf"``). One pass through
all blocks maps noise to data exactly, so ``steps`` is accepted and ignored and log q is exact.
For mean-free particle systems the flow acts on the ``(n - 1) d`` coordinates of the mean-free
subspace in the fixed orthonormal basis of :class:`~boltzflow.flows.coupling.MeanFreeBasis`;
log q is the density on that subspace (the convention of :mod:`boltzflow.flows.priors`), and the
latent is the mean-free Gaussian noise of the teacher CNF.

Training (maximum likelihood, NF -> NF and CNF -> NF distillation):
:mod:`boltzflow.distill.nf_train`, with the loss terms in :mod:`boltzflow.distill.nf_losses` and
the ``boltzflow distill --method nf`` entry in :mod:`boltzflow.distill.nf_run`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from boltzflow.distill.base import Student, register_student
from boltzflow.flows.coupling import TRANSFORMS, CouplingFlow, MeanFreeBasis
from boltzflow.flows.priors import (
    MeanFreeGaussian,
    Prior,
    build_prior,
    gaussian_prior,
    standard_normal_log_prob,
)
from boltzflow.models.protocol import LOG_Q_KINDS

__all__ = ["NFModelConfig", "NFStudent"]


@dataclass
class NFModelConfig:
    """Architecture of a coupling flow (see :class:`~boltzflow.flows.coupling.CouplingFlow`).

    ``scale``: the flow works on ``x / scale``; None picks the RMS of the (mean-free) training
    coordinates, or the teacher's scale when distilling from an NF (latents must share units).
    """

    blocks: int = 4
    couplings_per_block: int = 2
    hidden: int = 64
    depth: int = 2
    transform: str = "spline"
    bins: int = 8
    bound: float = 5.0
    mask_seed: int = 0
    scale: float | None = None

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise ValueError(f"nf.transform {self.transform!r} is not one of {list(TRANSFORMS)}")
        for name in ("blocks", "couplings_per_block", "hidden", "depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"nf.{name} must be >= 1, got {getattr(self, name)}")
        if self.bins < 2 or not self.bound > 0:
            raise ValueError(
                f"nf.bins must be >= 2 and nf.bound > 0, got {self.bins}, {self.bound}"
            )
        if self.scale is not None and not self.scale > 0:
            raise ValueError(f"nf.scale must be positive, got {self.scale}")

    def flow_options(self) -> dict[str, Any]:
        """Keywords for :class:`CouplingFlow` (all but ``scale``)."""
        out = dataclasses.asdict(self)
        out.pop("scale")
        return out


@register_student("nf")
class NFStudent(Student):
    """A coupling normalizing flow with the :class:`Student` interface.

    Args:
        flow: the coupling flow on ``R^{event_dim}``.
        prior: mean-free Gaussian (particle systems) or standard Gaussian.
        model_config: description for :meth:`from_config` (see :meth:`build`).
        system: system name, checked on load.
        scale: coordinate unit of the flow.
    """

    log_q_kind = LOG_Q_KINDS["one_pass"]
    uses_steps = False

    def __init__(
        self,
        flow: CouplingFlow,
        prior: Prior,
        *,
        model_config: dict[str, Any],
        system: str | None = None,
        scale: float = 1.0,
    ) -> None:
        super().__init__(
            prior, model_config=model_config, system=system, scale=scale, default_steps=1
        )
        if flow.dim != prior.event_dim:
            raise ValueError(f"flow dim {flow.dim} != prior event_dim {prior.event_dim}")
        self.flow = flow
        self.basis = (
            MeanFreeBasis(prior.n_particles, prior.spatial_dim)
            if isinstance(prior, MeanFreeGaussian)
            else None
        )

    @classmethod
    def build(
        cls,
        config: NFModelConfig | None = None,
        *,
        dim: int,
        n_particles: int | None = None,
        spatial_dim: int | None = None,
        mean_free: bool = False,
        system: str | None = None,
    ) -> NFStudent:
        """A fresh (identity) flow for a system of flat dimension ``dim``.

        Args:
            config: architecture (``config.scale`` None means 1.0 here).
            dim: flat coordinate dimension.
            n_particles, spatial_dim: particle structure (needed when ``mean_free``).
            mean_free: work on the mean-free subspace.
            system: system name recorded for load-time checks.
        """
        config = config or NFModelConfig()
        prior = gaussian_prior(
            dim, n_particles=n_particles, spatial_dim=spatial_dim, mean_free=mean_free
        )
        flow = CouplingFlow(prior.event_dim, **config.flow_options())
        scale = 1.0 if config.scale is None else float(config.scale)
        model_config = {
            "dim": dim,
            "n_particles": n_particles,
            "spatial_dim": spatial_dim,
            "mean_free": mean_free,
            "prior": prior.config(),
            "flow": flow.config(),
            "scale": scale,
        }
        return cls(flow, prior, model_config=model_config, system=system, scale=scale)

    @classmethod
    def from_config(cls, config: dict[str, Any], *, system: str | None = None) -> NFStudent:
        prior = build_prior(config["prior"])
        flow = CouplingFlow(**config["flow"])
        return cls(
            flow, prior, model_config=config, system=system, scale=float(config.get("scale", 1))
        )

    # -- maps (flow units) ----------------------------------------------------------------------
    @property
    def n_parameters(self) -> int:
        """Trainable parameters."""
        return self.flow.n_parameters

    @property
    def n_blocks(self) -> int:
        return self.flow.n_blocks

    def to_flow_coords(self, x: Tensor) -> Tensor:
        """``(B, dim)`` flow-unit points -> ``(B, event_dim)`` coordinates the flow acts on."""
        return self.basis.to_subspace(x) if self.basis is not None else x

    def from_flow_coords(self, u: Tensor) -> Tensor:
        """Inverse of :meth:`to_flow_coords` (mean-free output)."""
        return self.basis.from_subspace(u) if self.basis is not None else u

    def push(self, z: Tensor, steps: int) -> tuple[Tensor, Tensor]:
        """Noise -> data (flow units); ``steps`` is ignored (one exact pass)."""
        x, ladj = self.flow.decode(self.to_flow_coords(z))
        return self.from_flow_coords(x), ladj

    def pull(self, x: Tensor, steps: int) -> tuple[Tensor, Tensor]:
        """Data -> noise (flow units); ``ladj`` of the noise -> data direction."""
        z, ladj = self.flow.encode(self.to_flow_coords(x))
        return self.from_flow_coords(z), -ladj

    def log_prob_flow(self, u: Tensor) -> Tensor:
        """``(B,)`` log density of flow coordinates ``u (B, event_dim)`` (no unit constant)."""
        z, ladj = self.flow.encode(u)
        return standard_normal_log_prob(z, self.flow.dim) + ladj
