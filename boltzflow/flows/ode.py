"""ODE integration of a velocity field together with the change of log density.

For dx/dt = v(t, x) the instantaneous change of variables (Chen et al. 2018, arXiv:1806.07366)
gives d log p_t(x_t)/dt = -div v(t, x_t). :func:`integrate` carries (x, log p) from ``t0`` to
``t1`` and returns ``delta_logp = log p_{t1}(x_{t1}) - log p_{t0}(x_{t0})``; forward (0 -> 1)
samples, backward (1 -> 0) evaluates the likelihood of given points.

Divergence options (``divergence=``):

- ``"exact"``: the full Jacobian trace at every solver stage, vectorised with ``torch.func``: one
  batched forward pass and ``dim`` reverse passes stacked by ``vmap`` (``trace_mode="vjp"``) or
  ``dim`` forward-mode passes (``"jvp"``). ``"loop"`` runs the ``dim`` reverse passes one after
  another on the retained graph (FFJORD's brute force): on one CPU thread it was as fast as
  ``"vjp"`` for DW4 (dim 8) and 3x faster for an LJ13 EGNN (dim 39), where the vmapped
  backward moves 39x larger intermediates; on a GPU the vectorised modes win.
- ``"hutchinson"``: the unbiased estimate eps^T J eps with one Rademacher probe per sample,
  fixed for the whole solve (FFJORD, Grathwohl et al. 2019, arXiv:1810.01367).
- ``"quadrature"``: integrate positions alone, then integrate the exact trace along the
  stored path by Gauss-Legendre quadrature with ``quadrature_points`` nodes (the solver's dense
  output supplies x at the nodes). The trace is evaluated ``quadrature_points`` times instead of
  at every solver stage; the error is that of the quadrature plus the interpolation (use an
  adaptive method: fixed-step solvers interpolate linearly between their steps).
- ``"none"``: positions only (``delta_logp`` is NaN).

Mean-free particle systems. The flow lives on the subspace S = {x : sum_i x_i = 0} and densities
are taken on S. With P the orthogonal projector onto S, the divergence on S is tr(P J P), with
J = dv/dx the Jacobian in full coordinates. If v is translation invariant, v(x + 1 (x) a) = v(x)
for every shift a, then J annihilates the shift directions, J (I - P) = 0, hence J = J P and
tr(J) = tr(J P) = tr(P J P) by cyclicity and P^2 = P. So the full-coordinate trace computed here
*is* the subspace divergence, with no correction. The EGNN and particle transformer depend on x
only through differences (or centre x first), so they qualify; their outputs are additionally
mean-free (P v = v), which keeps trajectories on S. The equivariant flow-matching code of Klein
et al. (2023) computes the same full trace.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.func import jvp, vjp, vmap
from torchdiffeq import odeint

__all__ = [
    "ADAPTIVE_METHODS",
    "DIVERGENCES",
    "FIXED_METHODS",
    "ODEResult",
    "exact_divergence",
    "gauss_legendre",
    "hutchinson_divergence",
    "integrate",
]

Field = Callable[[Tensor, Tensor], Tensor]

#: adaptive-step solvers (torchdiffeq names); take ``atol``/``rtol``
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "adaptive_heun")
#: fixed-step solvers; take ``steps``
FIXED_METHODS = ("euler", "midpoint", "rk4")
DIVERGENCES = ("exact", "hutchinson", "quadrature", "none")
TRACE_MODES = ("vjp", "jvp", "loop")

#: Sample rows per vectorised Jacobian pass on CPU. ``vmap`` over ``dim`` products of a whole
#: large batch moves ``dim`` copies of every intermediate through memory at once; on one CPU
#: thread (DW4 EGNN 3 x 64, float32, batch 4,096) chunks of 256-512 rows made the exact trace
#: 2-4x and FALCON's 6 x 6 step Jacobian 2.5-3x faster than one pass
#: (``workflows/benchmark_jacobian_rows.py``, docs/benchmarks.md). On CUDA the whole batch goes
#: in one pass.
CPU_JACOBIAN_ROWS = 256


def jacobian_rows(x: Tensor, batch_rows: int | None = None) -> int:
    """Rows of ``x (B, dim)`` per vectorised Jacobian pass: ``batch_rows``, or by default
    :data:`CPU_JACOBIAN_ROWS` on CPU and all ``B`` elsewhere.

    Raises:
        ValueError: ``batch_rows < 1``.
    """
    if batch_rows is None:
        return CPU_JACOBIAN_ROWS if x.device.type == "cpu" else max(len(x), 1)
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    return int(batch_rows)


def over_row_chunks(
    fn: Callable[..., tuple[Tensor, ...]], rows: int, *tensors: Tensor
) -> tuple[Tensor, ...]:
    """``fn`` applied to successive ``rows``-row slices of ``tensors`` (all ``(B, ...)``), its
    outputs (a tuple of ``(b, ...)`` tensors per slice) concatenated along the batch."""
    parts = [fn(*chunk) for chunk in zip(*(t.split(rows) for t in tensors), strict=True)]
    return tuple(torch.cat(column) for column in zip(*parts, strict=True))


def over_fixed_chunks(
    fn: Callable[..., tuple[Tensor, ...]], rows: int, *tensors: Tensor
) -> tuple[Tensor, ...]:
    """:func:`over_row_chunks` with every slice exactly ``rows`` rows long, a short last one
    padded with copies of its first row and its outputs cut back: one shape for a compiled
    ``fn``. Rows must be independent of each other in ``fn``."""

    def padded(*chunk: Tensor) -> tuple[Tensor, ...]:
        n = len(chunk[0])
        if n == rows:
            return fn(*chunk)
        full = (torch.cat([c, c[:1].expand(rows - n, *c.shape[1:])]) for c in chunk)
        return tuple(out[:n] for out in fn(*full))

    return over_row_chunks(padded, rows, *tensors)


@dataclass
class ODEResult:
    """Outcome of :func:`integrate`.

    Attributes:
        x: ``(B, dim)`` positions at ``t1``.
        delta_logp: ``(B,)`` log p_{t1}(x_{t1}) - log p_{t0}(x_{t0}) (NaN for ``"none"``).
        nfe: velocity-field evaluations made by the ODE solver (batched calls).
        trace_evals: batched Jacobian-trace evaluations (equal to ``nfe`` for ``"exact"``).
        seconds: wall time of the call.
        cpu_seconds: CPU time of this process during the call (with one torch thread, the work
            itself, independent of other load on the machine).
        path: ``(T, B, dim)`` positions at the output ``times`` given to :func:`integrate`
            (None without them).
        delta_logp_path: ``(T, B)`` log p_t(x_t) - log p_{t0}(x_{t0}) at those times (None
            without them or for ``"none"``).
    """

    x: Tensor
    delta_logp: Tensor
    nfe: int
    trace_evals: int
    seconds: float
    cpu_seconds: float = float("nan")
    path: Tensor | None = None
    delta_logp_path: Tensor | None = None


def exact_divergence(
    field: Field,
    t: Tensor,
    x: Tensor,
    *,
    mode: str = "vjp",
    chunk_size: int | None = None,
    batch_rows: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Velocity and exact divergence (Jacobian trace) of a batched field.

    Samples are independent, so the vector-Jacobian product of the batched map with the
    cotangent e_k in every row yields row k of each sample's Jacobian; ``vmap`` over k stacks
    all ``dim`` of them (``mode="vjp"``). ``mode="jvp"`` stacks forward-mode products instead;
    ``mode="loop"`` makes the ``dim`` reverse passes in turn (see the module docstring).

    Args:
        field: ``field(t, x (B, dim)) -> (B, dim)``.
        t: scalar time, or ``(B,)`` times (chunked with ``x``).
        x: ``(B, dim)`` positions.
        chunk_size: vectorise over at most this many basis vectors at once (memory bound).
        batch_rows: sample rows per vectorised pass (:func:`jacobian_rows`; default by device).

    Returns:
        ``v (B, dim)`` and ``div (B,)``.
    """
    if mode not in TRACE_MODES:
        raise ValueError(f"unknown trace mode {mode!r}; valid: {list(TRACE_MODES)}")
    b, dim = x.shape
    rows = jacobian_rows(x, batch_rows)
    if mode != "loop" and b > rows:

        def part(xc: Tensor, *tc: Tensor) -> tuple[Tensor, ...]:
            tt = tc[0] if tc else t
            return exact_divergence(
                field, tt, xc, mode=mode, chunk_size=chunk_size, batch_rows=rows
            )

        per_row = (t,) if isinstance(t, Tensor) and t.ndim == 1 else ()
        v, div = over_row_chunks(part, rows, x, *per_row)
        return v, div
    basis = torch.eye(dim, dtype=x.dtype, device=x.device)[:, None, :].expand(dim, b, dim)

    def f(y: Tensor) -> Tensor:
        return field(t, y)

    if mode == "loop":
        with torch.enable_grad():
            y = x.detach().requires_grad_(True)
            v = f(y)
            div = torch.zeros(b, dtype=x.dtype, device=x.device)
            for k in range(dim):
                (g,) = torch.autograd.grad(v[:, k].sum(), y, retain_graph=k < dim - 1)
                div = div + g[:, k]
        return v.detach(), div
    if mode == "vjp":
        v, vjp_fn = vjp(f, x)
        (rows,) = vmap(vjp_fn, chunk_size=chunk_size)(basis)  # rows[k, b] = e_k^T J_b
    else:
        v = f(x)
        rows = vmap(lambda e: jvp(f, (x,), (e,))[1], chunk_size=chunk_size)(basis)  # J_b e_k
    div = torch.diagonal(rows, dim1=0, dim2=2).sum(-1)  # sum_k rows[k, b, k]
    return v, div


def hutchinson_divergence(field: Field, t: Tensor, x: Tensor, eps: Tensor) -> tuple[Tensor, Tensor]:
    """Velocity ``(B, dim)`` and the Hutchinson divergence estimate ``eps^T J eps`` ``(B,)``."""
    v, vjp_fn = vjp(lambda y: field(t, y), x)
    (g,) = vjp_fn(eps)
    return v, (g * eps).sum(-1)


def gauss_legendre(n: int, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Nodes (increasing) and weights of the n-point Gauss-Legendre rule on [0, 1]."""
    if n < 1:
        raise ValueError(f"quadrature_points must be >= 1, got {n}")
    nodes, weights = np.polynomial.legendre.leggauss(n)
    return torch.as_tensor((nodes + 1) / 2, dtype=dtype), torch.as_tensor(weights / 2, dtype=dtype)


class _Counted:
    """Wraps an ODE right-hand side and counts its (batched) evaluations."""

    def __init__(self, func: Callable) -> None:
        self.func = func
        self.calls = 0

    def __call__(self, t: Tensor, state: object) -> object:
        self.calls += 1
        return self.func(t, state)


def _solver_kwargs(
    method: str, atol: float, rtol: float, steps: int | None, t: Tensor
) -> dict[str, object]:
    if method in ADAPTIVE_METHODS:
        if steps is not None:
            raise ValueError(f"steps={steps} is for fixed-step methods; {method!r} is adaptive")
        if not (atol > 0 and rtol > 0):  # torchdiffeq asserts on zero tolerances mid-solve
            raise ValueError(f"atol and rtol must be positive numbers, got {atol} and {rtol}")
        return {"method": method, "atol": atol, "rtol": rtol}
    if method in FIXED_METHODS:
        if steps is None or steps < 1:
            raise ValueError(f"fixed-step method {method!r} needs steps >= 1, got {steps}")
        grid = torch.linspace(float(t[0]), float(t[-1]), steps + 1, dtype=t.dtype)
        return {"method": method, "options": {"grid_constructor": lambda *_: grid.to(t.device)}}
    raise ValueError(
        f"unknown ODE method {method!r}; valid: {list(ADAPTIVE_METHODS + FIXED_METHODS)}"
    )


def integrate(
    field: Field,
    x: Tensor,
    *,
    t0: float = 0.0,
    t1: float = 1.0,
    method: str = "dopri5",
    atol: float = 1e-5,
    rtol: float = 1e-5,
    steps: int | None = None,
    divergence: str = "exact",
    trace_mode: str = "vjp",
    quadrature_points: int = 12,
    chunk_size: int | None = None,
    generator: torch.Generator | None = None,
    times: Tensor | None = None,
    trace: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
) -> ODEResult:
    """Integrate ``dx/dt = field(t, x)`` from ``t0`` to ``t1`` with the log-density change.

    Runs under ``torch.no_grad`` (sampling and evaluation, not training).

    Args:
        field: ``field(t (scalar tensor), x (B, dim)) -> (B, dim)``.
        x: ``(B, dim)`` start positions; the solve runs in their dtype and device.
        t0, t1: start and end time (``t1 < t0`` integrates backward).
        method: one of :data:`ADAPTIVE_METHODS` (use ``atol``/``rtol``) or :data:`FIXED_METHODS`
            (use ``steps``).
        divergence: one of :data:`DIVERGENCES` (see the module docstring).
        trace_mode: ``"vjp"`` or ``"jvp"`` for the exact trace.
        quadrature_points: Gauss-Legendre nodes for ``divergence="quadrature"``.
        chunk_size: basis vectors vectorised at once in the exact trace (None: all).
        generator: CPU generator for the Hutchinson probes.
        times: ``(T,)`` monotone output times, ``T >= 2``, replacing ``t0, t1`` (the solve runs
            from ``times[0]`` to ``times[-1]``); the result then carries the path at them. Not
            with ``divergence="quadrature"``.
        trace: ``trace(t, x (B, dim)) -> (v (B, dim), div (B,))`` in place of
            :func:`exact_divergence` for ``"exact"`` and ``"quadrature"`` (e.g. a compiled one,
            :meth:`boltzflow.flows.cnf.TeacherCNF.set_compiled`); ``trace_mode`` and
            ``chunk_size`` are then unused.

    Returns:
        :class:`ODEResult`.

    Raises:
        ValueError: unknown method/divergence, ``steps`` missing/extra for the method, or
            ``times`` not ``(T >= 2,)`` or given with quadrature.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; valid: {list(DIVERGENCES)}")
    if x.ndim != 2:
        raise ValueError(f"x must be (batch, dim), got {tuple(x.shape)}")
    if times is not None and (times.ndim != 1 or len(times) < 2 or divergence == "quadrature"):
        raise ValueError(
            f"times must be (T >= 2,) and not with quadrature, got {tuple(times.shape)} with "
            f"divergence {divergence!r}"
        )
    start, cpu_start = time.perf_counter(), time.process_time()
    if times is None:
        ts = torch.tensor([t0, t1], dtype=x.dtype, device=x.device)
    else:
        ts = times.to(dtype=x.dtype, device=x.device)
    kwargs = _solver_kwargs(method, atol, rtol, steps, ts)
    counted = _Counted(field)
    if trace is None:

        def trace(t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
            return exact_divergence(field, t, y, mode=trace_mode, chunk_size=chunk_size)

    nan = torch.full((x.shape[0],), float("nan"), dtype=x.dtype, device=x.device)

    with torch.no_grad():
        if divergence in ("none", "quadrature"):
            if divergence == "none":
                path = odeint(counted, x, ts, **kwargs)
                return ODEResult(
                    path[-1],
                    nan,
                    counted.calls,
                    0,
                    time.perf_counter() - start,
                    time.process_time() - cpu_start,
                    path=path if times is not None else None,
                )
            nodes, weights = gauss_legendre(quadrature_points, x.dtype)
            nodes, weights = nodes.to(x.device), weights.to(x.device)
            t_nodes = t0 + (t1 - t0) * nodes
            path = odeint(counted, x, torch.cat([ts[:1], t_nodes, ts[1:]]), **kwargs)
            delta = torch.zeros_like(nan)
            for k in range(quadrature_points):
                _, div = trace(t_nodes[k], path[k + 1])
                delta = delta - (t1 - t0) * weights[k] * div
            return ODEResult(
                path[-1],
                delta,
                counted.calls,
                quadrature_points,
                time.perf_counter() - start,
                time.process_time() - cpu_start,
            )

        if divergence == "hutchinson":
            eps = torch.randint(0, 2, x.shape, generator=generator).to(x.dtype) * 2 - 1
            eps = eps.to(x.device)

            def augmented(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
                v, div = hutchinson_divergence(field, t, state[0], eps)
                return v, -div
        else:

            def augmented(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
                v, div = trace(t, state[0])
                return v, -div

        counted = _Counted(augmented)
        xs, logps = odeint(counted, (x, torch.zeros_like(nan)), ts, **kwargs)
    return ODEResult(
        xs[-1],
        logps[-1],
        counted.calls,
        counted.calls,
        time.perf_counter() - start,
        time.process_time() - cpu_start,
        path=xs if times is not None else None,
        delta_logp_path=logps if times is not None else None,
    )
