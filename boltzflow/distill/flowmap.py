"""Building blocks shared by the flow-map students: a two-time backbone, its initialisation
from a teacher's velocity network, a feature tap for extra heads, time grids, and
:class:`FlowMapStudent`, the base of F2D2 and FALCON (construction from a description and the
few-step loop of jumps).

A flow map X(x, s, t) moves a point at time s to time t. Students write it as
X = x + (t - s) u(x, s, t) (the "average velocity" form of shortcut models, Frans et al. 2024,
arXiv:2410.12557, MeanFlow, Geng et al. 2025, arXiv:2505.13447, and flow map matching, Boffi et
al. 2024, arXiv:2406.07507), with u given by the teacher's backbone type built with two times
(``n_times=2``, :class:`boltzflow.nn.embeddings.TimeEmbedding`).

:func:`init_from_teacher` copies the teacher's weights and puts its time-embedding weights on the
``s`` features (zeros on ``t`` and ``t - s``), so that at initialisation u(x, s, t) = v(s, x):
the student starts as the Euler step of the teacher and training only has to learn the
correction.

Internal coordinates (a teacher with ``representation = "internal"``): the student lives on the
same z, with the teacher's :class:`~boltzflow.nn.torus.TorusMLP` built with two times (it sees
the periodic columns through (cos, sin), so u is 2π-periodic in them). Each jump
z -> z + (t - s) u(z, s, t) runs on the flat chart and is wrapped back into [-pi, pi) on the
periodic columns; since u is periodic the jump is a well-defined map of the torus (a jump from z
and from z + 2π e_k land on the same point), and the wrap, a piecewise translation, leaves its
Jacobian, hence every per-step log-determinant, unchanged (Rezende et al. 2020,
arXiv:2002.02428, flows on tori).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap

from boltzflow.distill.base import Student, prior_from_config, transform_from_config
from boltzflow.flows.ode import jacobian_rows, over_fixed_chunks, over_row_chunks
from boltzflow.flows.priors import MeanFreeGaussian, Prior
from boltzflow.nn import EGNN, MLP, ParticleTransformer, TorusMLP, build_backbone
from boltzflow.nn.compile import CompiledPaths
from boltzflow.systems.internal_coords import InternalCoordinates

__all__ = [
    "FeatureTap",
    "FlowMapStudent",
    "build_two_time_backbone",
    "init_from_teacher",
    "map_and_jacobian",
    "map_and_logdet",
    "newton_inverse",
    "subspace_basis",
    "time_grid",
]

_FM = TypeVar("_FM", bound="FlowMapStudent")


def build_two_time_backbone(
    backbone: str,
    *,
    dim: int,
    n_particles: int | None,
    spatial_dim: int | None,
    options: dict[str, Any] | None = None,
    periodic: list[int] | None = None,
) -> nn.Module:
    """A backbone of type ``backbone`` taking ``(t, x, s=s)``, output ``(B, dim)``.

    ``periodic``: column indices on the circle (internal coordinates): the backbone is then a
    :class:`~boltzflow.nn.torus.TorusMLP` with two times (``backbone`` must be ``"mlp"``, as for
    the internal-coordinate teacher).

    Raises:
        ValueError: ``periodic`` with a backbone other than ``"mlp"``.
    """
    opts = dict(options or {})
    opts.pop("n_times", None)
    if periodic is not None:
        if backbone != "mlp":
            raise ValueError(
                f"internal coordinates take backbone 'mlp' (a TorusMLP), not {backbone!r}"
            )
        return TorusMLP(dim, periodic, n_times=2, **opts)
    return build_backbone(
        backbone, dim=dim, n_particles=n_particles, spatial_dim=spatial_dim, n_times=2, **opts
    )


def init_from_teacher(student_net: nn.Module, teacher_net: nn.Module) -> None:
    """Copy a one-time teacher backbone into a two-time student backbone of the same type.

    Every parameter of equal shape is copied. The time embedding's first linear layer of the
    student sees ``[feat(s), feat(t), feat(t - s)]``; the teacher's weights go to the ``feat(s)``
    block and the other blocks are zeroed, so the student's output equals ``teacher(s, x)``.

    Raises:
        ValueError: the two networks are of different types or sizes.
    """
    if type(student_net) is not type(teacher_net):
        raise ValueError(
            f"student backbone {type(student_net).__name__} differs from the teacher's "
            f"{type(teacher_net).__name__}"
        )
    src = teacher_net.state_dict()
    dst = student_net.state_dict()
    key = "time_embedding.mlp.0.weight"
    if set(src) != set(dst):
        raise ValueError(
            f"teacher and student backbones differ in parameters: {sorted(set(src) ^ set(dst))[:4]}"
        )
    new = {}
    for name, value in src.items():
        if name == key:
            w = torch.zeros_like(dst[name])
            if w.shape[0] != value.shape[0] or w.shape[1] != 3 * value.shape[1]:
                raise ValueError(
                    f"{name}: unexpected shapes {tuple(value.shape)}, {tuple(w.shape)}"
                )
            w[:, : value.shape[1]] = value
            new[name] = w
        elif value.shape != dst[name].shape:
            raise ValueError(
                f"{name}: teacher shape {tuple(value.shape)} != student {tuple(dst[name].shape)}; "
                "use the teacher's backbone options for the student"
            )
        else:
            new[name] = value.clone()
    student_net.load_state_dict(new)


class FeatureTap:
    """Captures a backbone's last hidden features during its forward pass (a forward hook).

    EGNN: node features of the last layer ``(B, n, H)``; particle transformer: the final
    normalised tokens ``(B, n, H)``; MLP and TorusMLP: the last hidden activation ``(B, H)`` (for
    the TorusMLP periodic in the angles, as its input features are). :meth:`pooled`
    sums over particles, which keeps permutation/rotation/translation invariance.
    """

    def __init__(self, backbone: nn.Module) -> None:
        if isinstance(backbone, EGNN):
            module, self.width = backbone.layers[-1], backbone.time_embedding.out_dim
            self._pick = lambda out: out[0]
        elif isinstance(backbone, ParticleTransformer):
            module, self.width = backbone.norm, backbone.time_embedding.out_dim
            self._pick = lambda out: out
        elif isinstance(backbone, MLP | TorusMLP):
            module, self.width = backbone.net[-2], backbone.time_embedding.out_dim
            self._pick = lambda out: out
        else:
            raise TypeError(f"no feature tap for backbone {type(backbone).__name__}")
        self._value: Tensor | None = None
        module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self._value = self._pick(output)

    def pooled(self) -> Tensor:
        """``(B, H)`` features of the most recent forward pass (consumed)."""
        if self._value is None:
            raise RuntimeError("no features captured: run the backbone first")
        value, self._value = self._value, None
        return value.sum(dim=1) if value.ndim == 3 else value


def time_grid(steps: int, *, reverse: bool = False, like: Tensor | None = None) -> Tensor:
    """``steps + 1`` uniform times from 0 to 1 (1 to 0 if ``reverse``), float64 unless ``like``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    dtype = like.dtype if like is not None else torch.float64
    device = like.device if like is not None else None
    grid = torch.linspace(0.0, 1.0, steps + 1, dtype=dtype, device=device)
    return grid.flip(0) if reverse else grid


def subspace_basis(prior: Prior, like: Tensor) -> Tensor:
    """Orthonormal ``(dim, event_dim)`` basis of the space the flow lives on.

    For a mean-free prior: the (n - 1) d-dimensional subspace of zero particle mean (from the QR
    factorisation of the centring projector); otherwise the identity.
    """
    if isinstance(prior, MeanFreeGaussian):
        n, d = prior.n_particles, prior.spatial_dim
        centre = torch.eye(n, dtype=torch.float64) - 1.0 / n
        q, _ = torch.linalg.qr(torch.kron(centre, torch.eye(d, dtype=torch.float64)))
        basis = q[:, : (n - 1) * d]
    else:
        basis = torch.eye(prior.dim, dtype=torch.float64)
    return basis.to(dtype=like.dtype, device=like.device)


def map_and_jacobian(
    fn: Callable[..., Tensor],
    x: Tensor,
    basis: Tensor,
    *,
    extra: tuple[Tensor, ...] = (),
    batch_rows: int | None = None,
) -> tuple[Tensor, Tensor]:
    """A batched map's value and each sample's Jacobian restricted to a subspace.

    With ``basis`` B (orthonormal columns), one forward pass and ``B.shape[1]`` reverse-mode
    products stacked by ``vmap`` give rows B_k^T J_b of every sample's Jacobian (samples are
    independent, so the cotangent B_k in every row yields each sample's own row), hence the
    restricted Jacobian B^T J_b B. For a map that keeps the subspace (J B = B B^T J B) and is the
    identity across it, as every mean-free translation-invariant step x + h u(x) is, its
    determinant equals the full-coordinate one; the density on the subspace needs exactly it.
    On CPU this is about 4x faster than ``vmap(jacfwd)`` per sample with all ``dim`` directions.
    The batch goes through in chunks of ``batch_rows`` rows
    (:func:`~boltzflow.flows.ode.jacobian_rows`: 256 on CPU, where smaller passes are 3x
    faster, all at once on CUDA).

    Args:
        fn: ``fn(x (B, dim), *extra) -> (B, dim)``, acting on samples independently.
        x: ``(B, dim)`` points.
        basis: ``(dim, m)`` orthonormal basis (:func:`subspace_basis`).
        extra: per-sample tensors ``(B, ...)`` passed to ``fn``, chunked with ``x`` (not
            differentiated).
        batch_rows: rows per vectorised pass (default by device).

    Returns:
        ``fn(x) (B, dim)`` and ``B^T J B (B, m, m)`` (row: output direction, column: input).
    """
    b = x.shape[0]
    rows = jacobian_rows(x, batch_rows)
    if b > rows:

        def part(xc: Tensor, *ec: Tensor) -> tuple[Tensor, Tensor]:
            return map_and_jacobian(fn, xc, basis, extra=ec, batch_rows=rows)

        y, jac = over_row_chunks(part, rows, x, *extra)
        return y, jac
    cot = basis.T[:, None, :].expand(basis.shape[1], b, basis.shape[0])
    y, pullback = vjp(lambda y: fn(y, *extra), x)
    (rows_,) = vmap(pullback)(cot)  # rows_[k, b] = B_k^T J_b
    return y, torch.einsum("kbi,ij->bkj", rows_, basis)


def map_and_logdet(
    fn: Callable[..., Tensor],
    x: Tensor,
    basis: Tensor,
    *,
    extra: tuple[Tensor, ...] = (),
    batch_rows: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``fn(x) (B, dim)`` and ``log|det B^T J B| (B,)``; arguments as
    :func:`map_and_jacobian`."""
    y, jac = map_and_jacobian(fn, x, basis, extra=extra, batch_rows=batch_rows)
    return y, torch.linalg.slogdet(jac)[1]


def newton_inverse(
    fn: Callable[..., Tensor],
    y: Tensor,
    init: Tensor,
    basis: Tensor,
    *,
    extra: tuple[Tensor, ...] = (),
    iters: int = 20,
    tol: float = 1e-5,
    halvings: int = 8,
) -> tuple[Tensor, Tensor, Tensor]:
    """Solve ``fn(x) = y`` per sample by damped Newton steps on the subspace of ``basis``.

    Each step solves ``(B^T J B) d = B^T (fn(x) - y)`` and moves ``x - lam B d`` with the
    largest ``lam`` in 1, 1/2, ..., 2^-halvings that lowers that sample's residual (a
    backtracking line search, so a point off the map's image stalls instead of diverging; such a
    sample is then left alone). Only the samples still iterating are evaluated. Stops when
    every residual is below ``tol`` or no sample can move. No gradients.

    Args:
        fn: ``fn(x (B, dim), *extra) -> (B, dim)``, acting on samples independently.
        y: ``(B, dim)`` targets; ``init``: ``(B, dim)`` starting points.
        basis, extra: as :func:`map_and_jacobian`.

    Returns:
        ``x (B, dim)``, the restricted Jacobian at ``x (B, m, m)`` and the residual
        ``|fn(x) - y| (B,)`` (a sample with residual above ``tol`` did not converge).
    """
    with torch.no_grad():
        x = init.clone()
        fx, jac = map_and_jacobian(fn, x, basis, extra=extra)
        res = (fx - y).norm(dim=-1)
        alive = torch.ones_like(res, dtype=torch.bool)
        for _ in range(iters):
            idx = torch.nonzero(alive & (res > tol))[:, 0]
            if len(idx) == 0:
                break
            ex = tuple(e[idx] for e in extra)
            step, info = torch.linalg.solve_ex(jac[idx], ((fx[idx] - y[idx]) @ basis)[..., None])
            step = torch.where((info == 0)[:, None], step[..., 0], 0.0) @ basis.T
            lam = torch.ones_like(idx, dtype=x.dtype)
            better = torch.zeros_like(idx, dtype=torch.bool)
            for _ in range(halvings + 1):  # only the samples not yet improved are evaluated
                todo = torch.nonzero(~better)[:, 0]
                x_try = x[idx[todo]] - lam[todo, None] * step[todo]
                f_try, j_try = map_and_jacobian(fn, x_try, basis, extra=tuple(e[todo] for e in ex))
                res_try = (f_try - y[idx[todo]]).norm(dim=-1)
                gain = res_try < res[idx[todo]]
                sel = idx[todo[gain]]
                x[sel], fx[sel], jac[sel], res[sel] = (
                    x_try[gain],
                    f_try[gain],
                    j_try[gain],
                    res_try[gain],
                )
                better[todo[gain]] = True
                if better.all():
                    break
                lam[todo[~gain]] /= 2
            alive[idx[~better]] = False  # no step lowers the residual: off the image, stop it
    return x, jac, res


class FlowMapStudent(CompiledPaths, Student):
    """A student that is a two-time flow map ``net(t, x, s=s)`` applied in ``steps`` jumps.

    Subclasses implement :meth:`_jump_ladj`, one jump with its contribution to
    ``log|det dx/dz|``; this class builds the backbone and the model description, and runs the
    jumps on a uniform time grid in either direction, projecting after each jump
    (:meth:`~boltzflow.distill.base.Student._project`: mean-free, or the periodic columns of
    internal coordinates wrapped into [-pi, pi)).

    Args:
        net: two-time backbone ``net(t, x, s=s) -> (B, dim)``.
        prior: base density.
        model_config, system, scale, default_steps: see
            :class:`~boltzflow.distill.base.Student`.
    """

    #: options of the subclass's constructor recorded in ``model_config``, with their defaults
    options: ClassVar[dict[str, Any]] = {}

    def __init__(self, net: nn.Module, prior: Prior, **kwargs: Any) -> None:
        super().__init__(prior, **kwargs)
        self.net = net

    def _exact_map(self, x: Tensor, s: Tensor, t: Tensor) -> Tensor:
        """The jump ``x (B, dim)`` -> ``(B, dim)`` whose Jacobian :meth:`exact_jump` takes."""
        return self._jump_ladj(x, s, t)[0]

    def exact_jump(self, x: Tensor, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """One jump ``s -> t`` (times ``(B,)``) of ``x (B, dim)`` and the exact ``log|det|``
        ``(B,)`` of its Jacobian on the flow's subspace (:func:`map_and_logdet`).

        With :meth:`set_compiled` and gradients off (FALCON's sampler, F2D2's ``exact_logdet``)
        it runs through ``torch.compile`` in :func:`~boltzflow.flows.ode.jacobian_rows` chunks
        of one shape: the same values to rounding, 2-4 x faster on a CPU after a compilation of
        20-40 s per process (docs/benchmarks.md, compiled exact log q, 2026-12-08). Training
        (gradients on) always runs eagerly."""
        basis = subspace_basis(self.prior, x)
        if self.compiled and not torch.is_grad_enabled():
            return self._exact_jump_compiled(x, s, t, basis)
        return map_and_logdet(self._exact_map, x, basis, extra=(s, t))

    def _exact_jump_compiled(
        self, x: Tensor, s: Tensor, t: Tensor, basis: Tensor
    ) -> tuple[Tensor, Tensor]:
        def build() -> Callable[..., tuple[Tensor, Tensor]]:
            # basis depends only on the prior, dtype and device; a cast drops the graph
            def chunk(xc: Tensor, sc: Tensor, tc: Tensor) -> tuple[Tensor, Tensor]:
                return map_and_logdet(
                    self._exact_map, xc, basis, extra=(sc, tc), batch_rows=len(xc)
                )

            return chunk

        y, ladj = over_fixed_chunks(self._compiled("exact_jump", build), jacobian_rows(x), x, s, t)
        return y, ladj

    @classmethod
    def build(
        cls: type[_FM],
        backbone: str,
        *,
        prior: Any,
        n_particles: int | None = None,
        spatial_dim: int | None = None,
        backbone_options: dict[str, Any] | None = None,
        system: str | None = None,
        scale: float = 1.0,
        default_steps: int = 4,
        transform: InternalCoordinates | None = None,
        **options: Any,
    ) -> _FM:
        """Fresh student for a prior's dimension with the given backbone.

        Args:
            transform: internal-coordinate transform of an internal-coordinate teacher: the
                student then lives on its z (``prior`` the teacher's TorusGaussian, ``backbone``
                ``"mlp"``, a two-time TorusMLP; see the module docstring).
            options: the subclass's own options (:attr:`options`, e.g. FALCON's ``signed``).

        Raises:
            TypeError: an option the subclass does not have.
            ValueError: a transform with another backbone than ``"mlp"`` or that does not fit
                the prior.
        """
        unknown = sorted(set(options) - set(cls.options))
        if unknown:
            raise TypeError(
                f"{cls.__name__}.build() got unexpected option(s) {unknown}; "
                f"known: {sorted(cls.options)}"
            )
        # each option cast to its default's type (the description must stay plain JSON)
        own = {k: type(d)(options.get(k, d)) for k, d in cls.options.items()}
        opts = dict(backbone_options or {})
        periodic = None
        if transform is not None:
            periodic = transform.periodic_mask().nonzero().flatten().tolist()
        net = build_two_time_backbone(
            backbone,
            dim=prior.dim,
            n_particles=n_particles,
            spatial_dim=spatial_dim,
            options=opts,
            periodic=periodic,
        )
        config = {
            "backbone": backbone,
            "n_particles": n_particles,
            "spatial_dim": spatial_dim,
            "backbone_options": opts,
            **own,
            "prior": prior.config(),
            "scale": float(scale),
            "default_steps": int(default_steps),
        }
        if transform is not None:  # Cartesian descriptions stay as they were
            config["representation"] = "internal"
            config["internal_coordinates"] = transform.to_dict()
        return cls(
            net,
            prior,
            **own,
            model_config=config,
            system=system,
            scale=scale,
            default_steps=default_steps,
            transform=transform,
        )

    @classmethod
    def from_config(cls: type[_FM], config: dict[str, Any], *, system: str | None = None) -> _FM:
        return cls.build(
            config["backbone"],
            prior=prior_from_config(config),
            n_particles=config.get("n_particles"),
            spatial_dim=config.get("spatial_dim"),
            backbone_options=config.get("backbone_options"),
            system=system,
            scale=config.get("scale", 1.0),
            default_steps=config.get("default_steps", 4),
            transform=transform_from_config(config),
            **{k: config.get(k, d) for k, d in cls.options.items()},
        )

    @abc.abstractmethod
    def _jump_ladj(self, x: Tensor, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """One jump s -> t: ``X(x, s, t) (B, dim)`` and its ``log|det| (B,)`` contribution."""

    def _run(self, x: Tensor, grid: Tensor) -> tuple[Tensor, Tensor]:
        total = x.new_zeros(len(x))
        for k in range(len(grid) - 1):
            x, inc = self._jump_ladj(x, grid[k], grid[k + 1])
            x = self._project(x)
            total = total + inc
        return x, total

    def push(self, z: Tensor, steps: int) -> tuple[Tensor, Tensor]:
        """Noise -> data; ``ladj`` is the sum of the jumps' contributions (differentiable)."""
        return self._run(z, time_grid(steps, like=z))

    def push_exact(self, z: Tensor, steps: int) -> tuple[Tensor, Tensor]:
        """Noise -> data as :meth:`push`, with ``ladj (B,)`` the exact ``log|det|`` of every
        jump's Jacobian on the flow's subspace (:func:`map_and_logdet`) in place of the jumps'
        own contributions: the density of the samples whatever a learned divergence estimates,
        while the map is injective. Costs ``event_dim`` reverse-mode products per jump; no
        gradients flow to the parameters."""
        grid = time_grid(steps, like=z)
        x, total = z, z.new_zeros(len(z))
        for k in range(steps):
            s, t = grid[k].expand(len(x)), grid[k + 1].expand(len(x))
            y, ladj = self.exact_jump(x, s, t)
            x, total = self._project(y.detach()), total + ladj.detach()
        return x, total

    def pull(self, x: Tensor, steps: int) -> tuple[Tensor, Tensor]:
        """Data -> noise by backward jumps; ``ladj`` is minus the sum of their contributions
        (each is the log|det| of the backward, data -> noise, jump)."""
        with torch.no_grad():
            z, total = self._run(x, time_grid(steps, reverse=True, like=x))
        return z, -total
