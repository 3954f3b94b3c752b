"""Teacher trajectories on a time grid: positions, accumulated log density, velocity and exact
divergence, the supervision of the distilled students.

One adaptive solve per batch (:meth:`~boltzflow.flows.cnf.TeacherCNF.push_prior` with the grid
as output times and the exact divergence) gives x(t_k) and log p_{t_k}(x(t_k)) - log p_0(x(0))
at every grid time; the teacher's velocity and exact divergence are then evaluated at the grid
points. Everything is in the teacher's flow units
(``x / scale``). Any two grid times give an exact flow-map pair: X(x(t_i), t_i, t_j) = x(t_j) and
int_{t_i}^{t_j} div = -(logp_j - logp_i), in either direction.

Internal coordinates (an internal-coordinate teacher, whose ODE runs on the flat chart of its
z): the positions are stored as the ODE's continuous path, the periodic columns
(:attr:`Trajectories.periodic`) starting in [-pi, pi) and not wrapped along the way, so that
x(t_j) - x(t_i) is the exact displacement of the flow map even where a dihedral moves past ±pi.
:meth:`Trajectories.pairs` and :meth:`Trajectories.points` give the points the students see
(wrapped into [-pi, pi)) with the end of each pair moved by the same 2π multiple as its start.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from boltzflow.flows.cnf import TeacherCNF
from boltzflow.flows.flow_matching import wrap_columns
from boltzflow.flows.ode import exact_divergence, gauss_legendre
from boltzflow.io.checkpoint import load_checkpoint, save_checkpoint
from boltzflow.progress import Progress

__all__ = ["TRAJECTORY_DIVERGENCES", "Trajectories", "tail_partial_file", "teacher_trajectories"]

#: how log p_t reaches the grid times (:func:`teacher_trajectories`)
TRAJECTORY_DIVERGENCES = ("exact", "quadrature")


@dataclass
class Trajectories:
    """Teacher trajectories on a grid.

    Attributes:
        times: ``(K + 1,)`` increasing grid times from 0 to 1.
        x: ``(N, K + 1, dim)`` positions (flow units).
        logp: ``(N, K + 1)`` log p_t(x_t) - log p_0(x_0) (0 at the first time).
        v: ``(N, K + 1, dim)`` teacher velocity at the grid points.
        div: ``(N, K + 1)`` its exact divergence.
        seconds: wall time of the generation.
        periodic: boolean ``(dim,)`` mask of the periodic columns (internal coordinates; their
            positions are the continuous path, not wrapped: module docstring), or None.
        n_prior: the first ``n_prior`` trajectories start from prior samples; any after them
            from a widened prior (tail supervision), so their ends are not teacher samples.
            None: all of them.
    """

    times: Tensor
    x: Tensor
    logp: Tensor
    v: Tensor
    div: Tensor
    seconds: float = 0.0
    periodic: Tensor | None = None
    n_prior: int | None = None

    def __len__(self) -> int:
        return self.x.shape[0]

    def _wrap(self, x: Tensor) -> Tensor:
        return x if self.periodic is None else wrap_columns(x, self.periodic)

    def points(self, idx: Tensor, k: Tensor) -> Tensor:
        """Positions ``(B, dim)`` of trajectories ``idx (B,)`` at grid indices ``k (B,)``,
        periodic columns wrapped into [-pi, pi)."""
        return self._wrap(self.x[idx, k])

    def pairs(self, idx: Tensor, i0: Tensor, i1: Tensor) -> tuple[Tensor, Tensor]:
        """Exact flow-map pairs ``(x_s, x_t)``, each ``(B, dim)``, of trajectories ``idx`` at
        grid indices ``i0 -> i1``: ``x_s`` wrapped into [-pi, pi) on the periodic columns and
        ``x_t = x_s + (x(t) - x(s))`` the end on the same sheet (possibly outside [-pi, pi)),
        so that ``x_t - x_s`` is the teacher's exact displacement."""
        start, end = self.x[idx, i0], self.x[idx, i1]
        x_s = self._wrap(start)
        return x_s, x_s + (end - start)

    def ends(self) -> Tensor:
        """``(n_prior, dim)`` the teacher's samples (the last points of the trajectories that
        start from the prior), wrapped."""
        return self._wrap(self.x[: self.n_prior, -1])

    @classmethod
    def cat(cls, first: Trajectories, second: Trajectories) -> Trajectories:
        """``first`` (from the prior) followed by ``second`` (from a widened prior)."""
        if not torch.equal(first.times, second.times):
            raise ValueError("trajectories on different grids cannot be joined")
        return cls(
            first.times,
            torch.cat([first.x, second.x]),
            torch.cat([first.logp, second.logp]),
            torch.cat([first.v, second.v]),
            torch.cat([first.div, second.div]),
            first.seconds + second.seconds,
            first.periodic,
            len(first) if first.n_prior is None else first.n_prior,
        )

    def save(self, path: str | os.PathLike[str], *, info: dict | None = None) -> Path:
        """Write a checksummed checkpoint file (kind ``"teacher_trajectories"``)."""
        payload = {
            "kind": "teacher_trajectories",
            "times": self.times,
            "x": self.x,
            "logp": self.logp,
            "v": self.v,
            "div": self.div,
            "seconds": self.seconds,
            "periodic": self.periodic,
            "n_prior": self.n_prior,
            "info": dict(info or {}),
        }
        return save_checkpoint(path, payload)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> tuple[Trajectories, dict]:
        """Inverse of :meth:`save`; returns the trajectories and the stored ``info``."""
        p = load_checkpoint(path, kind="teacher_trajectories")
        traj = cls(
            p["times"],
            p["x"],
            p["logp"],
            p["v"],
            p["div"],
            float(p["seconds"]),
            p.get("periodic"),  # files written before internal coordinates: None
            p.get("n_prior"),  # files written before tail trajectories: None (all)
        )
        return traj, dict(p.get("info", {}))


def teacher_trajectories(
    teacher: TeacherCNF,
    n: int,
    *,
    grid: int = 16,
    seed: int = 0,
    batch_size: int = 1000,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    method: str = "dopri5",
    progress: bool = False,
    tail_fraction: float = 0.0,
    tail_scale: float = 1.5,
    prior_scale: float = 1.0,
    partial: str | os.PathLike[str] | None = None,
    divergence: str = "exact",
    quadrature_points: int = 3,
) -> Trajectories:
    """Integrate ``n`` prior samples through the teacher and record a uniform grid (exact
    divergence by the teacher's own ``sampling["trace_mode"]``).

    Args:
        teacher: the teacher CNF.
        n: number of trajectories.
        grid: number of grid intervals (``grid + 1`` times, uniform on [0, 1]).
        seed: seeds the prior draw.
        batch_size: trajectories per solve.
        atol, rtol, method: solver settings (adaptive torchdiffeq method).
        tail_fraction, tail_scale: append ``round(tail_fraction · n)`` trajectories started
            from prior samples multiplied by ``tail_scale`` (seed ``seed + 1``). The teacher's
            map and divergence are exact from any start, so these are exact supervision where
            the prior puts little mass but importance weights are most sensitive: a student's
            log q error on a rare far-out draw becomes one dominant weight.
        prior_scale: the factor of this call's own starts (used for the tail part).
        partial: a file that holds the trajectories made so far, rewritten (atomically) after
            every batch. If it exists and was made with the same settings, generation resumes
            after its last batch, with the same result as an uninterrupted run (the same
            prior draws in the same batches); a file made with other settings is replaced.
            The tail part keeps its own file (``partial`` with ``.tail`` before the suffix).
        divergence: how log p_t reaches the grid times. ``"exact"``: the trace is integrated
            with the positions at every solver stage. ``"quadrature"``: the positions alone
            are integrated (with dense output at the nodes), then the exact trace at
            ``quadrature_points`` Gauss-Legendre nodes inside each grid interval is summed
            (``grid * quadrature_points`` trace evaluations instead of one per stage: about 2x
            fewer for LJ13 at ``grid = 8``; the error is the quadrature's, as for
            ``divergence="quadrature"`` of sampling).

    Returns:
        :class:`Trajectories` in float32 on CPU (for an internal-coordinate teacher: on its z,
        with its periodic mask; positions as the continuous path, module docstring).
    """
    if n < 1 or grid < 1:
        raise ValueError(f"need n >= 1 and grid >= 1, got {n}, {grid}")
    if divergence not in TRAJECTORY_DIVERGENCES or quadrature_points < 1:
        raise ValueError(
            f"divergence must be one of {list(TRAJECTORY_DIVERGENCES)} and quadrature_points "
            f">= 1, got {divergence!r}, {quadrature_points}"
        )
    n_tail = round(tail_fraction * n)
    if n_tail > 0:
        settings = {
            "grid": grid,
            "batch_size": batch_size,
            "atol": atol,
            "rtol": rtol,
            "divergence": divergence,
            "quadrature_points": quadrature_points,
        }
        main = teacher_trajectories(
            teacher, n, seed=seed, method=method, progress=progress, partial=partial, **settings
        )
        tail = teacher_trajectories(
            teacher,
            n_tail,
            seed=seed + 1,
            method=method,
            progress=progress,
            prior_scale=tail_scale,
            partial=None if partial is None else tail_partial_file(Path(partial)),
            **settings,
        )
        return Trajectories.cat(main, tail)
    start = time.perf_counter()
    p = next(teacher.parameters())
    times = torch.linspace(0.0, 1.0, grid + 1, dtype=p.dtype, device=p.device)
    key = {
        "n": n,
        "grid": grid,
        "seed": seed,
        "batch_size": batch_size,
        "atol": atol,
        "rtol": rtol,
        "method": method,
        "prior_scale": prior_scale,
    }
    if divergence != "exact":  # partial files of exact runs keep their key
        key.update(divergence=divergence, quadrature_points=quadrature_points)
    out_times, grid_index, nodes = _output_times(times, divergence, quadrature_points)
    # the teacher's own way to the exact trace: stacked products ("vjp") can need tens of GB
    # for a large particle network on CPU, where the reverse passes in a loop need little
    trace_mode = teacher.sampling["trace_mode"]
    parts = _resumable(partial, key)
    done = sum(len(part) for part in parts)
    batches = teacher.push_prior(
        n,
        skip=done,
        seed=seed,
        times=out_times,
        method=method,
        atol=atol,
        rtol=rtol,
        steps=None,
        divergence="exact" if divergence == "exact" else "none",
        trace_mode=trace_mode,
        batch_size=batch_size,
        prior_scale=prior_scale,
    )
    net = teacher.net
    was_training = teacher.training
    teacher.eval()
    # counted once a batch is complete, traces included (the solve alone is the small part)
    bar = Progress(n, initial=done, enabled=progress, desc="teacher trajectories", unit="traj")
    try:
        with torch.no_grad(), bar:
            for _, res in batches:
                path = res.path[grid_index]  # (K + 1, B, dim)
                if nodes is None:
                    logp = res.delta_logp_path  # (K + 1, B)
                else:
                    logp = _quadrature_logp(net, res.path, times, out_times, nodes, trace_mode)
                vk, dk = [], []
                for k in range(grid + 1):
                    v, div = exact_divergence(net, times[k], path[k], mode=trace_mode)
                    vk.append(v)
                    dk.append(div)
                parts.append(
                    Trajectories(
                        times.float().cpu(),
                        path.transpose(0, 1).float().cpu(),
                        logp.transpose(0, 1).float().cpu(),
                        torch.stack(vk, 1).float().cpu(),
                        torch.stack(dk, 1).float().cpu(),
                        time.perf_counter() - start,
                        teacher.periodic,
                    )
                )
                start = time.perf_counter()
                if partial is not None:
                    _joined(parts).save(partial, info={"resume": key})
                bar.update(res.path.shape[1])
    finally:
        teacher.train(was_training)
    return _joined(parts)  # seconds: those of the earlier runs (in the file) and this one


def _output_times(
    times: Tensor, divergence: str, points: int
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
    """The solver's output times, the indices of the grid ``times (K + 1,)`` among them and,
    for quadrature, the node weights ``(points,)`` (per unit interval) with the node indices
    ``(K, points)``: interval k's nodes follow its start, ``points + 1`` outputs apart."""
    if divergence == "exact":
        return times, torch.arange(len(times)), None
    unit, weights = gauss_legendre(points, times.dtype)
    unit, weights = unit.to(times.device), weights.to(times.device)
    start, width = times[:-1], times[1:] - times[:-1]
    inner = start[:, None] + width[:, None] * unit[None, :]  # (K, points)
    out = torch.cat([torch.cat([start[:, None], inner], 1).reshape(-1), times[-1:]])
    k = len(times) - 1
    grid_index = torch.arange(k + 1) * (points + 1)
    node_index = grid_index[:-1, None] + 1 + torch.arange(points)[None, :]
    return out, grid_index, (weights, node_index)


def _quadrature_logp(
    net: torch.nn.Module,
    path: Tensor,
    times: Tensor,
    out_times: Tensor,
    nodes: tuple[Tensor, Tensor],
    trace_mode: str,
) -> Tensor:
    """``(K + 1, B)`` log p_t - log p_0 at the grid times: minus the Gauss-Legendre sums of the
    exact trace over each interval of the grid ``times (K + 1,)``, accumulated (``path
    (T, B, dim)`` at ``out_times``)."""
    weights, node_index = nodes
    k = node_index.shape[0]
    width = times[1:] - times[:-1]
    steps = []
    for i in range(k):
        total = torch.zeros(path.shape[1], dtype=path.dtype, device=path.device)
        for w, j in zip(weights, node_index[i].tolist(), strict=True):
            _, div = exact_divergence(net, out_times[j], path[j], mode=trace_mode)
            total = total + w * div
        steps.append(-width[i] * total)
    zero = torch.zeros_like(steps[0])
    return torch.cumsum(torch.stack([zero, *steps]), 0)


def tail_partial_file(path: Path) -> Path:
    """The partial file of the tail part beside ``path``: ``name.tail.suffix``."""
    return path.with_name(f"{path.stem}.tail{path.suffix}")


def _resumable(partial: str | os.PathLike[str] | None, key: dict) -> list[Trajectories]:
    """The trajectories already in ``partial`` if it was written with settings ``key``, as a
    one-element list; else an empty list."""
    if partial is None or not Path(partial).is_file():
        return []
    got, info = Trajectories.load(partial)
    return [got] if info.get("resume") == key else []


def _joined(parts: list[Trajectories]) -> Trajectories:
    """Batches of trajectories (all from the prior) in order, as one; seconds summed."""
    first = parts[0]
    return Trajectories(
        first.times,
        *(torch.cat([getattr(p, name) for p in parts]) for name in ("x", "logp", "v", "div")),
        sum(p.seconds for p in parts),
        first.periodic,
    )
