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
model's dtype; x and log q come back in the model's dtype.

Training by maximum likelihood with early stopping: :mod:`boltzflow.distill.nf_internal_train`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from boltzflow.distill.base import Student, register_student
from boltzflow.flows.coupling import CouplingFlow
from boltzflow.flows.priors import TorusGaussian, finite_points
from boltzflow.models.protocol import (
    LOG_Q_KINDS,
    FlowOutput,
    check_batch_size,
    check_count,
)
from boltzflow.systems.internal_coords import InternalCoordinates
from boltzflow.validate import nonnegative_float

__all__ = ["ICNFModelConfig", "InternalNFStudent"]

#: extra per-sample column written beside log q (see the module docstring)
LOG_Q_INTERNAL = "log_q_internal"


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
    representation = "internal"
    #: what log q is a density of (recorded in sample files)
    log_q_convention = (
        "density per d^3N x / (d^3t dR): log q(z) - log J(z) - normalisation log-dets "
        "(internal coordinates; rigid motions integrated out)"
    )

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
        periodic = ic.periodic_mask().nonzero().flatten().tolist()
        if flow.dim != ic.dim or list(flow.periodic) != periodic:
            raise ValueError(
                f"flow (dim {flow.dim}, periodic {list(flow.periodic)}) does not match the "
                f"internal coordinates (dim {ic.dim}, dihedral columns {periodic})"
            )
        super().__init__(
            TorusGaussian(ic.dim, periodic),
            model_config=model_config,
            system=system,
            scale=1.0,
            default_steps=1,
        )
        self.flow = flow
        self.ic = ic
        self.dim = 3 * ic.n_atoms

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

    def to_internal(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Cartesian ``x (B, 3n)`` (nm, any rigid placement) -> ``z (B, 3n − 6)`` in the model's
        dtype and ``log J + Σ log σ (B,)`` (float64), so that log q(x) = log q(z) − that."""
        z, log_det = self.ic(x.to(torch.float64))
        return z.to(self._param().dtype), -log_det

    def from_internal(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``z (B, 3n − 6)`` -> Cartesian ``x (B, 3n)`` (nm, standard frame, float64) and
        ``log J + Σ log σ (B,)`` (float64)."""
        return self.ic.inverse(z.to(torch.float64))

    def push(self, z: Tensor, steps: int) -> tuple[Tensor, Tensor]:
        """Noise -> Cartesian x: ``(x (B, 3n), log|det dx/d eps| (B,))`` in the convention of
        the module docstring (flow log-det + log J + Σ log σ)."""
        u, ladj_flow = self.flow.decode(z)
        x, ladj_ic = self.from_internal(u)
        return x.to(z.dtype), ladj_flow + ladj_ic.to(z.dtype)

    def pull(self, x: Tensor, steps: int) -> tuple[Tensor, Tensor]:
        """Cartesian x -> noise; ``ladj`` of the noise -> data direction."""
        u, ladj_ic = self.to_internal(x)
        eps, ladj_enc = self.flow.encode(u)
        return eps, ladj_ic.to(eps.dtype) - ladj_enc

    def log_prob_internal(self, u: Tensor) -> Tensor:
        """``(B,)`` log density of normalised internal coordinates ``u (B, 3n − 6)``
        (differentiable; the training objective)."""
        eps, ladj = self.flow.encode(u)
        return self.prior.log_prob(eps) + ladj

    # -- the protocol -----------------------------------------------------------------------------
    def check_points(self, x: Tensor) -> Tensor:
        """``(N, 3n)`` finite Cartesian points, cast to the model's dtype.

        Raises:
            ValueError: wrong shape or non-finite values.
        """
        return finite_points(x, self.dim, self._param())

    def iter_samples(
        self,
        n: int,
        *,
        steps: int | None = None,
        seed: int = 0,
        batch_size: int | None = None,
        progress: bool = False,
    ) -> Iterator[FlowOutput]:
        """Yield ``n`` Cartesian samples (nm, standard frame) with log q, batch by batch.

        Args:
            n: number of samples.
            steps: checked and ignored (one exact pass).
            seed: seeds the base draw (all ``n`` first); the same seed gives the same output.
            batch_size: rows per batch (default :attr:`batch_size`).
            progress: unused (accepted for the protocol).

        Yields:
            :class:`FlowOutput` per batch: ``x (B, 3n)``, ``log_q (B,)`` (module docstring) and
            the column ``log_q_internal (B,)``, all in the model's dtype; one network pass.
        """
        check_count(n)
        batch_size = check_batch_size(batch_size) or self.batch_size
        self._steps(steps)
        p = self._param()
        gen = torch.Generator().manual_seed(seed)
        eps_all = self.prior.sample(n, generator=gen, dtype=p.dtype, device=p.device)
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                for start in range(0, n, batch_size):
                    t0, c0 = time.perf_counter(), time.process_time()
                    eps = eps_all[start : start + batch_size]
                    u, ladj_flow = self.flow.decode(eps)
                    x, ladj_ic = self.from_internal(u)
                    log_q_u = self.prior.log_prob(eps) - ladj_flow
                    log_q = log_q_u.double() - ladj_ic
                    # z off the valid range (r <= 0, theta outside (0, pi)): x is a molecule
                    # whose density is not q; weight 0 keeps E_q[w] unbiased (module text)
                    log_q = torch.where(torch.isfinite(ladj_ic), log_q, math.inf)
                    log_j = ladj_ic - self.ic._normalisation_log_det(ladj_ic)
                    columns = {LOG_Q_INTERNAL: (log_q + log_j).to(p.dtype)}
                    if x.is_cuda:
                        torch.cuda.synchronize(x.device)
                    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
                    yield FlowOutput(
                        x.to(p.dtype), log_q.to(p.dtype), 1, 1, 0, seconds, cpu, columns
                    )
        finally:
            self.train(was_training)

    def log_prob(
        self, x: Tensor, *, steps: int | None = None, batch_size: int | None = None
    ) -> Tensor:
        """``(N,)`` log q of Cartesian ``(N, 3n)`` points (nm, any rigid placement).

        Raises:
            ValueError: wrong shape, non-finite values, or a non-positive ``steps``/``batch_size``.
        """
        x = self.check_points(x)
        self._steps(steps)
        batch_size = check_batch_size(batch_size) or self.batch_size
        out = []
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(x), batch_size):
                    u, ladj_ic = self.to_internal(x[start : start + batch_size])
                    log_q = self.log_prob_internal(u).double() - ladj_ic
                    out.append(log_q.to(x.dtype))
        finally:
            self.train(was_training)
        return torch.cat(out) if out else x.new_zeros(0)
