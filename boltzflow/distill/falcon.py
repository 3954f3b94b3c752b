"""FALCON: a few-step flow map with exact change-of-variables likelihoods (Rehman,
Akhound-Sadegh, Gazizov, Bengio, Tong 2025, "FALCON: Few-step Accurate Likelihoods for Continuous
Flows", arXiv:2512.09914).

The map is X(x, s, t) = x + (t - s) u(x, s, t) with the signed parameterisation
u = sign(t - s) h(x, s, t) (``signed=True``; sign(0) = +1). Its density is the exact change of
variables of the map it actually applies: every step's full Jacobian dX/dx is built with
``torch.func`` (one forward pass and event_dim reverse-mode products under ``vmap``,
:func:`boltzflow.distill.flowmap.map_and_logdet`) and
log q(x) = log p(z) - sum_k log|det dX_k/dx|. Nothing is estimated: if the map is injective
this is the density of its samples, whatever the training left behind; training makes it
close to the teacher's flow and invertible.

Mean-free particle systems: u is translation invariant with mean-free output, so dX/dx is the
identity on the centre-of-mass directions and block diagonal, hence the full-coordinate
determinant equals the determinant on the (n - 1) d subspace, which is what is computed (the
argument of :mod:`boltzflow.flows.ode` for traces).

Losses (weighted by :func:`falcon_loss` with a :class:`FALCONLossConfig`):

- flow matching on the diagonal: u(x, t, t) = v(t, x), with v the teacher velocity or, from data
  alone, the conditional velocity x1 - x0 at the interpolant (Lipman et al. 2023,
  arXiv:2210.02747);
- MeanFlow-style average-velocity loss with one JVP (Geng et al. 2025, arXiv:2505.13447, eq. 8,
  written for the start point): X(x_s, s, t) does not change along the flow in s, which gives
  u(x, s, t) = v(s, x) + (t - s) (d/ds) u(x_s, s, t), d/ds = dt_s + v . grad_x, the right side a
  stop-gradient target from one forward-mode product;
- invertibility: |x - X(X(x, s, t), t, s)|^2;
- optional, beyond the paper's recipe (``loss.logdet``, off by default): on exact teacher jumps,
  the map's own log|det dX/dx| against the teacher's log-density change, the likelihood
  supervision that F2D2 gives its divergence head, applied here to the exact Jacobian;
- optional, beyond the paper's recipe (``loss.energy``, off by default): the reverse
  Kullback-Leibler divergence to the target, E_z[log q(X(z)) + u(X(z))] = KL(q || p) - log Z over
  the few-step samples, differentiated through the steps and their exact log-determinants
  ("training by energy" of Boltzmann generators, Noe, Olsson, Koehler, Wu 2019, Science 365,
  eaaw1147). Only FALCON's log q is exact for its own map, so only FALCON gets this term.
- optional, beyond the paper's recipe (``loss.likelihood``, off by default): maximum likelihood
  of data (or of the teacher's samples) under the density of the K-step sampler itself, with the
  exact preimages of the push found by Newton iterations and implicit-function gradients
  (:func:`falcon_likelihood_loss`). The forward KL covers the target's mass, which importance
  weights need and the reverse KL above does not give.

:meth:`FALCON.log_prob` scores given points through the same Newton preimages, so it is the
density of the sampler; :meth:`FALCON.learned_pull` applies the learned backward map instead.

Internal coordinates (:mod:`boltzflow.distill.flowmap`): each jump is wrapped into [-pi, pi) on
the periodic columns, which leaves its Jacobian and log-determinant unchanged. The map commutes
with 2π shifts of a periodic column (X(z + 2π e_k) = X(z) + 2π e_k on the flat chart), so a
jump's preimage is found by Newton iterations on the unwrapped map towards the representative
of the target nearest to the image of the starting point (every representative has a preimage,
a shifted copy of the same point of the torus), and the preimage is then wrapped.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import jvp

from boltzflow.distill.base import register_student
from boltzflow.distill.flowmap import (
    FlowMapStudent,
    newton_inverse,
    subspace_basis,
    time_grid,
)
from boltzflow.distill.flowmap_loss import FlowMapLossConfig, LossContext
from boltzflow.models.protocol import LOG_Q_KINDS

__all__ = [
    "FALCON",
    "FALCONLossConfig",
    "Preimage",
    "falcon_diagonal_loss",
    "falcon_energy_loss",
    "falcon_inverse_loss",
    "falcon_likelihood_loss",
    "falcon_logdet_pair_loss",
    "falcon_loss",
    "falcon_meanflow_loss",
    "falcon_pair_loss",
]


#: residual (flow units) below which a Newton preimage counts as found
NEWTON_TOL = 1e-5


def _times(t: Tensor | float, like: Tensor) -> Tensor:
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.expand(like.shape[0]) if t.ndim == 0 else t


class Preimage(NamedTuple):
    """One inverted jump ``s -> t`` (times ``(B,)``): preimage ``x (B, dim)``, the restricted
    Jacobian there ``(B, m, m)`` on the subspace of ``basis (dim, m)``, and the residual
    ``(B,)``."""

    s: Tensor
    t: Tensor
    x: Tensor
    jac: Tensor
    res: Tensor
    basis: Tensor


@register_student("falcon")
class FALCON(FlowMapStudent):
    """Invertible-by-training flow map with exact per-step log-determinants.

    Args:
        net: two-time backbone ``net(t, x, s=s) -> h (B, dim)``.
        prior: base density.
        signed: ``u = sign(t - s) h`` (FALCON's parameterisation) instead of ``u = h``; also an
            option of :meth:`~boltzflow.distill.flowmap.FlowMapStudent.build`.
        model_config, system, scale, default_steps: see
            :class:`~boltzflow.distill.base.Student`.
    """

    log_q_kind = LOG_Q_KINDS["step_logdet"]

    options: ClassVar[dict[str, Any]] = {"signed": True}

    def __init__(self, net: nn.Module, prior: Any, *, signed: bool = True, **kwargs: Any) -> None:
        super().__init__(net, prior, **kwargs)
        self.signed = bool(signed)

    def forward(self, x: Tensor, s: Tensor | float, t: Tensor | float) -> Tensor:
        """Average velocity ``u (B, dim)`` over [s, t]."""
        s, t = _times(s, x), _times(t, x)
        h = self.net(t, x, s=s)
        if self.signed:
            sign = torch.where(t >= s, 1.0, -1.0).to(x.dtype)
            h = sign[:, None] * h
        return h

    def flow_map(self, x: Tensor, s: Tensor | float, t: Tensor | float) -> Tensor:
        """``X(x, s, t) = x + (t - s) u(x, s, t)``: ``(B, dim)``."""
        s, t = _times(s, x), _times(t, x)
        return x + (t - s)[:, None] * self(x, s, t)

    def jump_with_logdet(
        self, x: Tensor, s: Tensor | float, t: Tensor | float
    ) -> tuple[Tensor, Tensor]:
        """``X(x, s, t) (B, dim)`` and ``log|det dX/dx| (B,)`` from the full Jacobian on the
        space the flow lives on (:func:`~boltzflow.distill.flowmap.map_and_logdet`)."""
        return self.exact_jump(x, _times(s, x), _times(t, x))

    def _exact_map(self, x: Tensor, s: Tensor, t: Tensor) -> Tensor:
        return self.flow_map(x, s, t)

    def _jump_ladj(self, x: Tensor, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        # push: ladj = sum of the steps' log|det|; pull (the learned backward map):
        # ladj = -sum log|det dX_back/dx|, negated by FlowMapStudent.pull
        return self.jump_with_logdet(x, s, t)

    def pull(self, x: Tensor, steps: int) -> tuple[Tensor, Tensor]:
        """Data -> noise through the exact preimages of the push (:meth:`exact_pull`), so that
        :meth:`log_prob` is the density of the sampler itself. A point whose preimage is not
        found to :data:`NEWTON_TOL` gets ``ladj = NaN`` (log q unknown), with a warning."""
        z, ladj, res = self.exact_pull(x, steps)
        bad = res > NEWTON_TOL
        if bad.any():
            warnings.warn(
                f"FALCON log q: {int(bad.sum())} of {len(x)} points were not inverted to "
                f"{NEWTON_TOL:g} "
                f"(largest residual {float(res.max()):.2e}); their log q is NaN",
                RuntimeWarning,
                stacklevel=3,
            )
        return z, torch.where(bad, torch.nan, ladj)

    def learned_pull(self, x: Tensor, steps: int) -> tuple[Tensor, Tensor]:
        """Data -> noise by the learned backward jumps X(x, t, s) as they are (FALCON's inverse;
        fast, but its log q is not the sampler's density where the map is not exactly
        invertible)."""
        return super().pull(x, steps)

    def exact_pull(
        self, x: Tensor, steps: int | None = None, *, iters: int = 20, tol: float = NEWTON_TOL
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The preimage under the ``steps``-step push of flow-unit points ``x (B, dim)``, found
        step by step (last jump first) by damped Newton iterations (:meth:`preimages`), unlike
        :meth:`learned_pull`, which applies the learned backward map as it is.

        Returns:
            noise ``z (B, dim)``, ``ladj (B,)`` the sum of the push jumps' log|det| at the
            preimages, so that ``log q(x) = prior.log_prob(z) - ladj`` is the density of the
            sampler itself at ``x``, and the largest per-jump residual ``(B,)`` (above ``tol``:
            ``x`` is not, to that tolerance, in the image of the map). No gradients.
        """
        z = self._project(x.detach())
        ladj = x.new_zeros(len(x))
        worst = x.new_zeros(len(x))
        for jump in self.preimages(x, steps, iters=iters, tol=tol):
            z = jump.x
            ladj = ladj + torch.linalg.slogdet(jump.jac)[1]
            worst = torch.maximum(worst, jump.res)
        return z, ladj, worst

    def preimages(
        self, x: Tensor, steps: int | None = None, *, iters: int = 20, tol: float = NEWTON_TOL
    ) -> list[Preimage]:
        """The jumps of the ``steps``-step push inverted one by one, last first, from flow-unit
        points ``x (B, dim)`` (:meth:`invert_jump`); each entry's target is the previous
        entry's preimage (the first's is ``x``). No gradients."""
        steps = self._steps(steps)
        grid = time_grid(steps, like=x)
        basis = subspace_basis(self.prior, x)
        y = self._project(x.detach())
        out = []
        for k in reversed(range(steps)):
            s, t = _times(grid[k], y), _times(grid[k + 1], y)
            pre, jac, res = self.invert_jump(y, s, t, basis, iters=iters, tol=tol)
            out.append(Preimage(s, t, pre, jac, res, basis))
            y = pre
        return out

    def invert_jump(
        self,
        y: Tensor,
        s: Tensor,
        t: Tensor,
        basis: Tensor,
        *,
        iters: int = 20,
        tol: float = NEWTON_TOL,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Preimage ``x (B, dim)`` of ``y`` under the jump ``s -> t`` (times ``(B,)``), its
        restricted Jacobian ``(B, m, m)`` and residual ``(B,)``, without gradients: Newton
        iterations from the learned backward jump, and for the points where they stall (they
        can end on a fold of the map, where the Jacobian is nearly singular) again from ``y``
        itself; each point keeps the smaller residual. In internal coordinates the iterations
        run on the unwrapped map towards the representative of ``y`` nearest to the starting
        point's image, and the preimage comes back wrapped (module docstring)."""
        with torch.no_grad():
            y = y.detach()
            x, jac, res = self._newton(y, self.flow_map(y, t, s), s, t, basis, iters, tol)
            idx = torch.nonzero(res > tol)[:, 0]
            if len(idx):
                x2, jac2, res2 = self._newton(y[idx], y[idx], s[idx], t[idx], basis, iters, tol)
                take = res2 < res[idx]
                x[idx[take]], jac[idx[take]], res[idx[take]] = x2[take], jac2[take], res2[take]
        return self._wrap(x), jac, res

    def _newton(
        self,
        y: Tensor,
        init: Tensor,
        s: Tensor,
        t: Tensor,
        basis: Tensor,
        iters: int,
        tol: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:func:`~boltzflow.distill.flowmap.newton_inverse` of the jump ``s -> t`` from
        ``init``, aimed at the representative of ``y`` nearest to ``X(init)`` (``y`` itself
        without periodic columns)."""
        target = y
        if self.transform is not None:
            near = self.flow_map(init, s, t)
            target = near + self.wrap_difference(y - near)
        return newton_inverse(
            self.flow_map, target, init, basis, extra=(s, t), iters=iters, tol=tol
        )

    def inversion_error(self, x: Tensor, steps: int | None = None) -> Tensor:
        """``|z - learned_pull(push(z))|`` per point ``(B,)`` for flow-unit noise ``z`` (or
        data side ``x`` with the directions swapped: the same composition on given points)."""
        steps = self._steps(steps)
        with torch.no_grad():
            y, _ = self._run(x, time_grid(steps, like=x))
            back, _ = self._run(y, time_grid(steps, reverse=True, like=x))
        return self.wrap_difference(back - x).norm(dim=-1)


# -- losses -----------------------------------------------------------------------------------
def falcon_diagonal_loss(model: FALCON, x: Tensor, t: Tensor, v: Tensor) -> Tensor:
    """Flow matching on the diagonal: ``|u(x, t, t) - v|^2`` (summed over coordinates)."""
    return (model(x, t, t) - v).pow(2).sum(-1).mean()


def falcon_meanflow_loss(
    model: FALCON,
    x: Tensor,
    s: Tensor,
    t: Tensor,
    v: Tensor,
    *,
    adaptive_power: float = 0.0,
    adaptive_eps: float = 1e-3,
) -> Tensor:
    """Average-velocity loss with one JVP (see the module docstring).

    Args:
        x: ``(B, dim)`` points at times ``s (B,)``; ``t (B,)`` end times; ``v (B, dim)`` the
            velocity at ``(s, x)`` (teacher, or the conditional velocity when training from data).
        adaptive_power: MeanFlow's adaptive loss weighting (Geng et al. 2025, Sec. 4.3): each
            sample's squared error e is weighted by sg(1 / (e + adaptive_eps)^p); p = 0 is plain
            MSE, p = 1 behaves like log(e) and keeps the self-referential target from running
            away.
    """

    def u_of(xx: Tensor, ss: Tensor) -> Tensor:
        return model(xx, ss, t)

    with torch.no_grad():
        _, du_ds = jvp(u_of, (x, s), (v, torch.ones_like(s)))
        target = v + (t - s)[:, None] * du_ds
    err = (model(x, s, t) - target).pow(2).sum(-1)
    if adaptive_power:
        err = err / (err.detach() + adaptive_eps).pow(adaptive_power)
    return err.mean()


def falcon_inverse_loss(model: FALCON, x: Tensor, s: Tensor, t: Tensor) -> Tensor:
    """Invertibility: ``|x - X(X(x, s, t), t, s)|^2`` (summed over coordinates)."""
    y = model.flow_map(x, s, t)
    back = model.flow_map(y, t, s)
    return (back - x).pow(2).sum(-1).mean()


def falcon_pair_loss(model: FALCON, x_s: Tensor, s: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
    """Exact jumps read off teacher trajectories: ``|u(x_s, s, t) - (x_t - x_s)/(t - s)|^2``."""
    target = (x_t - x_s) / (t - s)[:, None]
    return (model(x_s, s, t) - target).pow(2).sum(-1).mean()


def falcon_logdet_pair_loss(
    model: FALCON, x_s: Tensor, s: Tensor, t: Tensor, delta_logp: Tensor
) -> Tensor:
    """Exact teacher jumps in log density: ``(log|det dX(x_s, s, t)/dx| + delta_logp)^2`` in
    nats^2, with ``delta_logp (B,) = log p_t(x_t) - log p_s(x_s)`` along the teacher's flow (a
    flow map moves log density by minus its log-determinant). Differentiates through the full
    Jacobian of every sample (``event_dim`` reverse-mode products)."""
    _, ladj = model.jump_with_logdet(x_s, s, t)
    return (ladj + delta_logp).pow(2).mean()


def _energy_kl(
    model: FALCON, z: Tensor, steps: int, energy: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Tensor]:
    """Per sample ``log q(x) + u(x) (B,)`` of the ``steps``-step samples ``x`` of noise ``z``,
    and the summed log-determinants (a finite tensor on the graph)."""
    x, ladj = model._run(z, time_grid(steps, like=z))
    x = model._project(x)
    return model.prior.log_prob(z) - ladj + energy(x).to(x.dtype), ladj


def falcon_energy_loss(
    model: FALCON,
    z: Tensor,
    steps: int,
    energy: Callable[[Tensor], Tensor],
    *,
    context: LossContext | None = None,
) -> Tensor:
    """Reverse KL to exp(-u) up to its log Z: ``mean(log q(x) + u(x))`` in nats over the
    ``steps``-step samples ``x`` of noise ``z (B, dim)`` (flow units), with gradients through
    every step and its exact log-determinant. ``energy`` maps flow-unit ``(B, dim)`` points to
    reduced energies ``(B,)`` (the caller applies the model's scale). Samples with a non-finite
    energy are left out (a sampler far from the target must not stop training); if all are
    non-finite the loss is zero. ``context``: the mean is over the samples kept in the global
    batch (:meth:`~boltzflow.distill.flowmap_loss.LossContext.kept_mean`; default: ``z`` is
    the whole batch)."""
    kl, ladj = _energy_kl(model, z, steps, energy)
    return (context or LossContext()).kept_mean(kl, torch.isfinite(kl), ladj.sum() * 0.0)


def falcon_likelihood_loss(
    model: FALCON,
    x: Tensor,
    steps: int,
    *,
    iters: int = 20,
    tol: float = NEWTON_TOL,
    context: LossContext | None = None,
) -> tuple[Tensor, float]:
    """Maximum likelihood of points ``x (B, dim)`` (flow units) under the density of the
    ``steps``-step sampler: ``-mean log q(x)`` in nats, with log q by exact change of variables
    at the preimages that :meth:`FALCON.preimages` finds.

    Gradients follow the implicit function theorem: at a preimage x* of y = X(x*) (found without
    gradients), x* - J^-1 (X_theta(x*) - y) equals x* in value and has the derivative of the
    exact inverse in theta and y (J the step's Jacobian at x*, held fixed); each jump's
    log-determinant is then taken there with gradients (in internal coordinates the residual is
    taken the short way round on the periodic columns and the point wrapped, both piecewise
    translations). Points whose preimage did not converge
    (residual above ``tol``: off the map's image, or a fold the iterations did not escape) are
    left out; ``context`` as for :func:`falcon_energy_loss`.

    Returns:
        the loss and the fraction of these points left out.
    """
    y = model._project(x.detach())
    ladj = x.new_zeros(len(x))
    ok = torch.ones(len(x), dtype=torch.bool, device=x.device)
    for jump in model.preimages(x, steps, iters=iters, tol=tol):
        ok = ok & (jump.res <= tol)
        residual = model.wrap_difference(model.flow_map(jump.x, jump.s, jump.t) - y) @ jump.basis
        corr, info = torch.linalg.solve_ex(jump.jac, residual[..., None])
        ok = ok & (info == 0)
        y = model._wrap(jump.x - torch.where(ok[:, None], corr[..., 0], 0.0) @ jump.basis.T)
        _, inc = model.jump_with_logdet(y, jump.s, jump.t)
        ladj = ladj + inc
    nll = ladj - model.prior.log_prob(y)
    ok = ok & torch.isfinite(nll)
    dropped = 1.0 - float(ok.float().mean())
    return (context or LossContext()).kept_mean(nll, ok, ladj.sum() * 0.0), dropped


@dataclass
class FALCONLossConfig(FlowMapLossConfig):
    """FALCON's ``[loss]``: weights ``diagonal`` (flow matching), ``pairs``, ``meanflow`` and
    ``inverse``, with MeanFlow's adaptive weighting power ``meanflow_adaptive_power`` (0: plain
    MSE), and optionally ``logdet`` (its exact step log-determinants against the teacher's
    log-density change on the same jumps as ``pairs``; 0, off, by default) and ``energy`` (the
    reverse KL to the system's Boltzmann density of its ``energy_steps``-step samples, default
    the student's ``default_steps``; needs the system's energy; 0, off, by default) and
    ``likelihood`` (maximum likelihood under its ``likelihood_steps``-step sampling density of
    the training data, or of the teacher's samples, the ends of its trajectories, when no data
    are given; 0, off, by default). The pair and target options are those of
    :class:`~boltzflow.distill.flowmap_loss.FlowMapLossConfig`; with ``target = "data"``
    ``pairs`` and ``logdet`` must be 0 (they read teacher jumps)."""

    meanflow: float = 1.0
    inverse: float = 1.0
    logdet: float = 0.0
    energy: float = 0.0
    energy_steps: int | None = None
    likelihood: float = 0.0
    likelihood_steps: int | None = None
    meanflow_adaptive_power: float = 1.0

    nonnegative: ClassVar[tuple[str, ...]] = (
        "diagonal",
        "pairs",
        "meanflow",
        "inverse",
        "logdet",
        "energy",
        "likelihood",
        "meanflow_adaptive_power",
    )
    teacher_terms: ClassVar[tuple[str, ...]] = ("pairs", "logdet")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("energy_steps", "likelihood_steps"):
            k = getattr(self, name)
            if k is not None and (not isinstance(k, int) or k < 1):
                raise ValueError(f"loss.{name} must be an integer >= 1, got {k}")

    @property
    def uses_energy(self) -> bool:
        return self.energy > 0

    @property
    def uses_ml_points(self) -> bool:
        return self.likelihood > 0

    @property
    def uses_data(self) -> bool:
        return self.target == "data" or self.likelihood > 0


def falcon_loss(
    model: FALCON, batch: dict[str, Tensor], cfg: FALCONLossConfig, context: LossContext
) -> tuple[Tensor, dict[str, float]]:
    """FALCON's loss of one step: the weighted sum of the terms above on a teacher or data
    batch (keys in :mod:`boltzflow.distill.flowmap_loss`); a zero weight leaves its term out.
    ``energy`` pushes the batch's prior samples ``z`` and ``likelihood`` scores its points
    ``x_ml``; FALCON draws nothing itself, so on a share of the rows (one rank under DDP,
    ``context.shards`` of them) this is that share's part of the global batch's loss.

    Returns:
        the scalar loss and its parts (``fm``, ``pair``, ``meanflow``, ``inverse``, ...).

    Raises:
        ValueError: ``energy`` without ``context.energy`` or without the batch's ``z``, or
            ``likelihood`` without the batch's ``x_ml``.
    """
    bt = batch
    p = next(model.parameters())
    total = p.new_zeros(())
    parts: dict[str, float] = {}
    if cfg.diagonal:
        val = falcon_diagonal_loss(model, bt["x_k"], bt["t_k"], bt["v_k"])
        total, parts["fm"] = total + cfg.diagonal * val, float(val.detach())
    if cfg.pairs:
        val = falcon_pair_loss(model, bt["x_s"], bt["s"], bt["x_t"], bt["t"])
        total, parts["pair"] = total + cfg.pairs * val, float(val.detach())
    if cfg.meanflow:
        val = falcon_meanflow_loss(
            model,
            bt["x_s"],
            bt["s"],
            bt["t_any"],
            bt["v_s"],
            adaptive_power=cfg.meanflow_adaptive_power,
        )
        total, parts["meanflow"] = total + cfg.meanflow * val, float(val.detach())
    if cfg.inverse:
        val = falcon_inverse_loss(model, bt["x_s"], bt["s"], bt["t"])
        total, parts["inverse"] = total + cfg.inverse * val, float(val.detach())
    if cfg.logdet:
        val = falcon_logdet_pair_loss(model, bt["x_s"], bt["s"], bt["t"], bt["dlogp"])
        total, parts["logdet"] = total + cfg.logdet * val, float(val.detach())
    if cfg.energy:
        if context.energy is None:
            raise ValueError("loss.energy needs the target's energy (context.energy)")
        if "z" not in bt:
            raise ValueError("loss.energy needs prior samples in the batch (key 'z')")
        steps = cfg.energy_steps or model.default_steps
        val = falcon_energy_loss(model, bt["z"], steps, context.energy, context=context)
        total, parts["energy"] = total + cfg.energy * val, float(val.detach())
    if cfg.likelihood:
        if "x_ml" not in bt:
            raise ValueError("loss.likelihood needs points in the batch (key 'x_ml')")
        steps = cfg.likelihood_steps or model.default_steps
        val, parts["nll_dropped"] = falcon_likelihood_loss(
            model, bt["x_ml"], steps, context=context
        )
        total, parts["nll"] = total + cfg.likelihood * val, float(val.detach())
    return total, parts
