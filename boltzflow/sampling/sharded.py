"""Sampling spread over the ranks of a distributed run: one shard per rank.

:func:`write_sharded_draws` is what ``boltzflow sample`` calls. In a single process it is
:func:`~boltzflow.sampling.draw.write_draws` of :func:`~boltzflow.sampling.draw.iter_draws` into
the output file itself. Under ``torchrun --nproc_per_node=K`` each rank r

* draws its share of the N samples (:func:`~boltzflow.distributed.shard_range`: the first
  N mod K ranks one more) with seed :func:`~boltzflow.distributed.rank_seed` ``(seed, r)``,
* evaluates u and log w for its own samples, and
* streams them into its own store ``OUT.rank<r>-of-<K>.h5`` (:mod:`boltzflow.io.shards`;
  completed chunks survive a crash).

Rank 0 writes the manifest ``OUT.shards.json`` atomically before sampling (``complete: false``)
and after every rank has finished (``complete: true``). The only communication is at the end:
the row counts (K integers) and, with a system, the two log-sum-exps of the Kish ESS of the union
(2K floats, :class:`~boltzflow.sampling.reduction.ProcessGroupReduction`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from boltzflow import distributed
from boltzflow.distributed import DistInfo
from boltzflow.io.samples import read_samples, recorded_provenance
from boltzflow.io.shards import shard_path, write_manifest
from boltzflow.sampling import draw
from boltzflow.sampling.draw import DrawBatch
from boltzflow.sampling.reduction import LOCAL, ProcessGroupReduction

__all__ = ["ShardPlan", "ShardedDraw", "resumable_rows", "shard_plan", "write_sharded_draws"]


@dataclass(frozen=True)
class ShardPlan:
    """What one rank draws.

    Attributes:
        path: its sample store (the output itself for a single process).
        start, stop: its rows ``[start, stop)`` of the union.
        seed: its sampling seed.
        rank, world_size: who it is.
    """

    path: Path
    start: int
    stop: int
    seed: int
    rank: int
    world_size: int

    @property
    def n(self) -> int:
        """Rows this rank draws."""
        return self.stop - self.start

    def to_dict(self) -> dict[str, Any]:
        """The manifest entry (``file``, ``rank``, ``rows``, ``n_planned``, ``seed``)."""
        rows = [self.start, self.stop]
        return {"file": str(self.path), "rank": self.rank, "rows": rows, "n_planned": self.n}


def shard_plan(output: str | os.PathLike[str], n: int, seed: int, me: DistInfo) -> list[ShardPlan]:
    """Every rank's :class:`ShardPlan` for ``n`` samples into ``output``, in rank order.

    Raises:
        ValueError: fewer samples than ranks.
    """
    k = me.world_size
    if k > 1 and n < k:
        raise ValueError(f"-n {n} is smaller than the number of ranks ({k}): every rank needs one")
    plans = []
    for r in range(k):
        start, stop = distributed.shard_range(n, r, k)
        path = Path(output) if k == 1 else shard_path(output, r, k)
        plans.append(ShardPlan(path, start, stop, distributed.rank_seed(seed, r, k), r, k))
    return plans


def resumable_rows(path: Path, provenance: dict[str, Any]) -> int:
    """Rows of the store at ``path`` that a resumed draw with ``provenance`` keeps (0: none).

    Raises:
        ValueError: the store holds another draw (its provenance differs; the message names
            the keys) or more rows than the draw asks for.
        InvalidFileError: the store is damaged (:func:`~boltzflow.io.samples.read_samples`).
    """
    if not path.exists():
        return 0
    old = read_samples(path, allow_partial=True)
    new = recorded_provenance(provenance)
    stored = old.provenance
    differ = sorted(k for k in set(new) | set(stored) if new.get(k) != stored.get(k))
    if differ:
        shown = "; ".join(f"{k}: {stored.get(k)!r} -> {new.get(k)!r}" for k in differ)
        raise ValueError(
            f"cannot resume {path}: it holds another draw ({shown}); remove it or write elsewhere"
        )
    n = int(new.get("n", old.n))
    if old.n > n:
        raise ValueError(f"cannot resume {path}: it holds {old.n} rows, more than n = {n}")
    return old.n


@dataclass(frozen=True)
class ShardedDraw:
    """The result of :func:`write_sharded_draws` on one rank.

    Attributes:
        plan: this rank's plan (its file, rows and seed).
        batches: this rank's batches as written.
        n: rows written by all ranks together.
        ess: Kish ESS of the union (None without a system).
        manifest: the manifest file (None for a single process).
    """

    plan: ShardPlan
    batches: list[DrawBatch]
    n: int
    ess: float | None
    manifest: Path | None


def write_sharded_draws(
    model: Any,
    n: int,
    output: str | os.PathLike[str],
    *,
    system: Any = None,
    seed: int = 0,
    steps: int | None = None,
    batch_size: int | None = None,
    provenance: dict[str, Any],
    progress: bool = False,
    resume: bool = False,
    **settings: Any,
) -> ShardedDraw:
    """Draw ``n`` samples over all ranks and write one store per rank (module docstring).

    Args:
        model: any model of :mod:`boltzflow.models.protocol` (every rank holds a copy).
        n: samples in total.
        output: ``OUT.h5``; the file itself for one process, else the shards' base name.
        system: the target (u and log w), or None.
        seed: the run's seed (rank r draws with ``rank_seed(seed, r)``).
        steps, batch_size, **settings: as in :func:`~boltzflow.sampling.draw.iter_draws`.
        provenance: recorded in every store, with ``rank``, ``world_size``, ``rows`` and the
            rank's ``seed`` (``base_seed``: the run's) added under several ranks.
        progress: show progress (rank 0 only).
        resume: continue this rank's store if it holds rows of the same draw (the same
            provenance: model, seed, n, settings): its rows are kept and only the rest is drawn
            (:func:`resumable_rows`); ESS is then of all rows, the batches only the new ones.

    Returns:
        this rank's :class:`ShardedDraw`. Every rank must call this (it ends in collectives).
    """
    me = distributed.info()
    plan = shard_plan(output, n, seed, me)[me.rank]
    prov = dict(provenance)
    manifest = None
    if me.distributed:
        prov.update(seed=plan.seed, base_seed=seed, n=plan.n, n_total=n)
        prov.update(rank=me.rank, world_size=me.world_size, rows=[plan.start, plan.stop])
        if me.is_main:
            plans = shard_plan(output, n, seed, me)
            facts = {"world_size": me.world_size, "n_planned": n, "seed": seed}
            shards = [{**p.to_dict(), "seed": p.seed} for p in plans]
            manifest = write_manifest(output, shards=shards, complete=False, **facts)
    kept = resumable_rows(plan.path, prov) if resume else 0
    batches = draw.iter_draws(  # looked up at call time (tests replace it)
        model,
        plan.n,
        system=system,
        steps=steps,
        seed=plan.seed,
        batch_size=batch_size,
        progress=progress and me.is_main,
        skip=kept,
        **settings,
    )
    plan.path.parent.mkdir(parents=True, exist_ok=True)
    done = draw.write_draws(
        plan.path,
        batches,
        dim=model.dim,
        provenance=prov,
        atomic=False,
        n_planned=plan.n,
        append=kept > 0,
    )
    written = kept + sum(len(b.out.x) for b in done)
    ess = None
    if system is not None:
        red = ProcessGroupReduction() if me.distributed else LOCAL
        if kept:  # the kept rows' weights are in the store
            log_w = torch.from_numpy(read_samples(plan.path).log_w)
        else:
            log_w = torch.cat([b.log_w for b in done]) if done else torch.empty(0)
        ess = red.kish_ess(log_w.numpy())
    if not me.distributed:
        return ShardedDraw(plan, done, written, ess, None)
    counts = distributed.all_gather_objects(written)
    if me.is_main:
        plans = shard_plan(output, n, seed, me)
        facts = {"world_size": me.world_size, "n_planned": n, "seed": seed, "n": sum(counts)}
        shards = [{**p.to_dict(), "seed": p.seed, "n": c} for p, c in zip(plans, counts)]
        manifest = write_manifest(output, shards=shards, complete=True, **facts)
    return ShardedDraw(plan, done, sum(counts), ess, manifest)
