r"""A coupling normalizing flow in internal coordinates of a molecule (registry name
``"nf_internal"``), with circular splines for the dihedrals.

The model composes three exact maps (noise -> data):

    eps ~ TorusGaussian  --flow^-1-->  z (normalised internal coordinates)
        --InternalCoordinates.inverse-->  x (Cartesian, nm, standard frame)

The flow is a :class:`~boltzflow.flows.coupling.CouplingFlow` whose dihedral columns are
transformed by circular rational-quadratic splines (Rezende et al. 2020, arXiv:2002.02428), so the
density lives on R^(bonds + angles) x T^(dihedrals) and never breaks at ±pi; the base is
normal on bonds and angles and uniform on the dihedrals (:class:`~boltzflow.flows.priors.
TorusGaussian`). The same construction as the coupling-flow baselines of FAB (Midgley et al. 2023,
arXiv:2208.01893) and bgflow (Noé et al. 2019).

**Density convention** (DESIGN.md, "Molecules in internal coordinates"): for a Cartesian x,

    log q(x) = log q(z) − log J(z) − Σ log σ,

the density per d³ᴺx / (d³t dR) with rigid motions integrated out, so that
``log w = −u(x) − log q(x)`` holds unchanged. :meth:`log_prob` accepts any rigidly moved x (the
internal coordinates do not see translations or proper rotations). Beside it the model reports
``log_q_internal`` = log q(x) + log J(z): the density of the physical internal coordinates
(bonds in nm, angles and dihedrals in rad), independent of the normalisation.

Bonds and angles have a normal base, so a sample may fall at r ≤ 0 or θ outside (0, π) (about
30 standard deviations away for ALDP's standardised bonds and angles: never in practice). Such a
z still decodes to a molecule, but not one whose density is q; its log q is reported as +inf
(weight 0), which keeps importance weights unbiased: E_q[w · 1(valid)] = ∫ p over valid z.

The internal-coordinate transform runs in float64 (22 atoms cost nothing), the flow in the
model's dtype; x and log q come back in the model's dtype. The Cartesian side (sampling, scoring,
this bookkeeping) is the one internal-coordinate path of :class:`~boltzflow.distill.base.Student`
(:meth:`~boltzflow.systems.internal_coords.InternalCoordinates.cartesian_density`), shared with
the flow-map students and Euler baselines of an internal-coordinate teacher; this class supplies
the flow on z (``push``/``pull``).

Training by maximum likelihood with early stopping: :mod:`boltzflow.distill.nf_internal_train`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from boltzflow.distill.base import Student, register_student
from boltzflow.flows.coupling import CouplingFlow, check_fits_internal
from boltzflow.flows.priors import TorusGaussian
from boltzflow.models.protocol import LOG_Q_KINDS
from boltzflow.systems.internal_coords import InternalCoordinates
from boltzflow.validate import nonnegative_float

__all__ = ["ICNFModelConfig", "InternalNFStudent"]


@dataclass
class ICNFModelConfig:
    """Architecture of the internal-coordinate NF (defaults: CPU-sized for ALDP's 60 features).

    Attributes:
        blocks: coupling blocks (each transforms both halves of a random split).
        couplings_per_block: coupling layers per block.
        hidden, depth: conditioner MLP width and number of hidden layers.
        bins: spline bins (real-line and circular splines).
        bound: interval ``[-B, B]`` of the real-line splines (standardised bonds and angles).
        rotate: learned rotation of every circular spline.
        mask_seed: seeds the random splits.
        shift_cuts: move each dihedral's cut to its least populated angle when fitting the
            transform (harmless on the torus; the splines then rarely need to wrap).
        standardize_dihedrals: rad; dihedrals whose circular spread in the data is below it are
            standardised and take real-line splines (``InternalCoordinates.fit``); 0: none.
    """

    blocks: int = 8
    couplings_per_block: int = 2
    hidden: int = 256
    depth: int = 2
    bins: int = 8
    bound: float = 5.0
    rotate: bool = True
    mask_seed: int = 0
    shift_cuts: bool = True
    standardize_dihedrals: float = 0.0

    def __post_init__(self) -> None:
        for name in ("blocks", "couplings_per_block", "hidden", "depth"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.bins < 2 or not self.bound > 0:
            raise ValueError(
                f"model.bins must be >= 2 and bound > 0, got {self.bins}, {self.bound}"
            )
        nonnegative_float(self.standardize_dihedrals, "model.standardize_dihedrals")

    def flow_options(self) -> dict[str, Any]:
        """Keywords for :class:`CouplingFlow` (all but the transform's ``shift_cuts`` and
        ``standardize_dihedrals``)."""
        out = dataclasses.asdict(self)
        out.pop("shift_cuts")
        out.pop("standardize_dihedrals")
        return out


@register_student("nf_internal")
class InternalNFStudent(Student):
    """Coupling NF on the internal coordinates of one molecule (module docstring).

    Args:
        flow: coupling flow on the ``3n − 6`` normalised internal coordinates, its periodic
            columns the dihedrals of ``ic``.
        ic: the fitted :class:`InternalCoordinates` (periodic mode: dihedrals in [−π, π)).
        model_config: description for :meth:`from_config`.
        system: system name, checked on load.

    ``dim`` is the Cartesian dimension ``3n``; ``event_dim`` the ``3n − 6`` internal degrees of
    freedom log q is a density over (rigid motions integrated out).
    """

    log_q_kind = LOG_Q_KINDS["one_pass"]
    uses_steps = False

    def __init__(
        self,
        flow: CouplingFlow,
        ic: InternalCoordinates,
        *,
        model_config: dict[str, Any],
        system: str | None = None,
    ) -> None:
        if not ic.periodic:
            raise ValueError("the internal coordinates must be periodic (dihedrals in [-pi, pi))")
        check_fits_internal(flow, ic)
        periodic = ic.periodic_mask().nonzero().flatten().tolist()
        super().__init__(
            TorusGaussian(ic.dim, periodic),
            model_config=model_config,
            system=system,
            scale=1.0,
            default_steps=1,
            transform=ic,
        )
        self.flow = flow
        self.ic = ic  # also a submodule: its buffers are in the state_dict of shipped models

    @classmethod
    def build(
        cls,
        config: ICNFModelConfig | None,
        ic: InternalCoordinates,
        *,
        system: str | None = None,
    ) -> InternalNFStudent:
        """A fresh (identity) flow on the fitted transform ``ic`` (periodic mode)."""
        config = config or ICNFModelConfig()
        periodic = ic.periodic_mask().nonzero().flatten().tolist()
        flow = CouplingFlow(ic.dim, periodic=periodic, **config.flow_options())
        model_config = {
            "internal_coordinates": ic.to_dict(),
            "flow": flow.config(),
            "model": dataclasses.asdict(config),
        }
        return cls(flow, ic, model_config=model_config, system=system)

    @classmethod
    def from_config(cls, config: dict[str, Any], *, system: str | None = None) -> InternalNFStudent:
        ic = InternalCoordinates.from_dict(config["internal_coordinates"])
        return cls(CouplingFlow(**config["flow"]), ic, model_config=config, system=system)

    # -- maps -----------------------------------------------------------------------------------
    @property
    def n_parameters(self) -> int:
        """Trainable parameters."""
        return self.flow.n_parameters

    def push(self, z: Tensor, steps: int) -> tuple[Tensor, Tensor]:
        """Noise -> normalised internal coordinates u: ``(u (B, 3n − 6), log|det du/d eps|
        (B,))``; the base class turns u into Cartesian x with the transform's log-det
        (:meth:`~boltzflow.distill.base.Student.iter_samples`); differentiable in z."""
        return self.flow.decode(z)

    def pull(self, x: Tensor, steps: int) -> tuple[Tensor, Tensor]:
        """Normalised internal coordinates u -> noise; ``ladj`` of the noise -> u direction
        (:meth:`~boltzflow.distill.base.Student.log_prob` maps Cartesian x to u first)."""
        with torch.no_grad():
            eps, ladj_enc = self.flow.encode(x)
        return eps, -ladj_enc

    def log_prob_internal(self, u: Tensor) -> Tensor:
        """``(B,)`` log density of normalised internal coordinates ``u (B, 3n − 6)``
        (differentiable; the training objective)."""
        eps, ladj = self.flow.encode(u)
        return self.prior.log_prob(eps) + ladj

    # -- the protocol -----------------------------------------------------------------------------
    # sample, iter_samples, log_prob and check_points are the base class's internal-coordinate
    # path: one network pass (push/pull above, steps checked and ignored), Cartesian x in the
    # standard frame, log q and the column log_q_internal from
    # InternalCoordinates.cartesian_density (module docstring).
