"""The training loop shared by the teacher and the students.

A :class:`Trainer` owns the optimiser (AdamW), the warm-up + cosine schedule, gradient clipping,
an EMA copy of the weights, a seeded CPU generator that is the only source of randomness given to
the loss, metrics as JSON lines, progress reports, and atomic checkpoints that make resuming
exact: a run interrupted after a checkpoint and resumed produces bit-identical weights to an
uninterrupted one on CPU (same seed, same thread count).

The caller supplies ``loss_fn(model, generator, step) -> loss`` (a scalar tensor, or
``(loss, {name: float})`` for extra metrics) which draws its own minibatch from ``generator``,
or a :class:`BatchedLoss`, whose minibatches depend on the step alone and can therefore be built
ahead by ``config.data_workers`` background processes (:mod:`boltzflow.train.prefetch`).

Run folder layout: ``checkpoint.pt`` (latest full training state), ``metrics.jsonl`` (one JSON
object per logged step), ``run.json`` (the run's configuration, written at the start).

Under ``torchrun`` (:mod:`boltzflow.distributed`, K > 1 ranks) the model trains under
``DistributedDataParallel``: every rank builds the same global minibatch of ``batch_size`` rows
(it depends on the step alone, so only a :class:`BatchedLoss` can be spread: the teacher's,
F2D2's and FALCON's, not the NF students'), evaluates the loss on its own contiguous
``batch_size / K`` rows, and DDP averages the gradients, which is the
gradient of the global batch's mean loss; clipping, AdamW and EMA then run identically on every
rank. The logged loss is the mean over ranks. Rank 0 alone writes ``run.json``, the metrics and
the checkpoints; every rank resumes from the same checkpoint. Building the whole batch on every
rank keeps the result that of one process (the OT coupling of the global batch), at the price of
repeating that work K times.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from boltzflow import distributed
from boltzflow.io.atomic import atomic_write_text
from boltzflow.io.checkpoint import load_checkpoint, save_checkpoint
from boltzflow.nn.compile import CPU_OPTIONS, cpp_compiler
from boltzflow.progress import Progress
from boltzflow.train.config import TrainConfig
from boltzflow.train.prefetch import step_batches

__all__ = ["EMA", "BatchedLoss", "Trainer", "lr_factor"]

LossFn = Callable[[nn.Module, torch.Generator, int], "Tensor | tuple[Tensor, dict[str, float]]"]


@runtime_checkable
class BatchedLoss(Protocol):
    """A loss whose minibatch is a pure function of the step number.

    ``make_batch(step)`` builds it (CPU tensors; it may run in a worker process, so the object
    must be picklable), ``batch_loss(model, batch)`` evaluates the loss on the model's device.
    """

    def make_batch(self, step: int) -> Any: ...

    def batch_loss(self, model: nn.Module, batch: Any) -> Any: ...


class _LossModule(nn.Module):
    """``forward(batch) = batch_loss(model, batch)``: the loss inside the module DDP wraps, so
    that DDP sees the forward pass that produces the gradients it reduces."""

    def __init__(self, model: nn.Module, batch_loss: Callable[[nn.Module, Any], Any]) -> None:
        super().__init__()
        self.model = model
        self.batch_loss = batch_loss

    def forward(self, batch: Any) -> Any:
        return self.batch_loss(self.model, batch)


def rank_rows(batch: Any, rank: int, world_size: int) -> Any:
    """Rank ``rank``'s contiguous rows of a minibatch: every tensor (in nested tuples, lists and
    dicts; None kept) whose first dimension is the batch's is sliced the same way."""
    sizes = [t.shape[0] for t in _tensors(batch) if t.ndim > 0]
    if not sizes:
        return batch
    start, stop = distributed.shard_range(sizes[0], rank, world_size)

    def cut(obj: Any) -> Any:
        if isinstance(obj, Tensor):
            return obj[start:stop] if obj.ndim > 0 and obj.shape[0] == sizes[0] else obj
        if isinstance(obj, (tuple, list)):
            return type(obj)(cut(o) for o in obj)
        if isinstance(obj, dict):
            return {k: cut(v) for k, v in obj.items()}
        return obj

    return cut(batch)


def _tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"
RUN_FILE = "run.json"


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Learning-rate multiplier at optimiser step ``step`` (0-based): linear warm-up from
    1/warmup to 1 over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` at ``steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of a model's floating-point state (parameters and buffers).

    ``decay_t = min(decay, (1 + t) / (10 + t))`` so early averages are not dominated by the
    random initialisation (as in TensorFlow's ExponentialMovingAverage with num_updates).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.updates = 0
        # averaged in one foreach call per operation; integer buffers (counters) and frozen
        # parameters (requires_grad False: e.g. a teacher's base flow) are copied, so that
        # round-off never moves what is not trained
        frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
        self._floats = [
            k for k, v in self.shadow.items() if v.is_floating_point() and k not in frozen
        ]
        self._others = [k for k in self.shadow if k not in self._floats]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        state = model.state_dict()
        if self._floats:
            shadow = [self.shadow[k] for k in self._floats]
            torch._foreach_mul_(shadow, d)
            torch._foreach_add_(shadow, [state[k].detach() for k in self._floats], alpha=1 - d)
        for key in self._others:
            self.shadow[key].copy_(state[key])

    def state_dict(self) -> dict[str, Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, Tensor], updates: int) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise ValueError(f"EMA state does not match the model (keys {sorted(missing)[:5]})")
        for key, value in state.items():
            self.shadow[key].copy_(value)
        self.updates = updates

    def copy_to(self, model: nn.Module) -> nn.Module:
        """A deep copy of ``model`` carrying the averaged weights."""
        out = copy.deepcopy(model)
        out.load_state_dict(self.shadow)
        return out


class Trainer:
    """Generic optimisation loop with exact resume.

    Args:
        model: the module to train (moved to ``config.device``).
        loss_fn: ``loss_fn(model, generator, step)``; ``generator`` is a CPU ``torch.Generator``
            seeded from ``config.seed`` whose state is checkpointed. Or a :class:`BatchedLoss`
            (minibatches built ahead by ``config.data_workers`` processes).
        config: loop settings.
        out_dir: run folder (created).
        model_kind: recorded in checkpoints (``"teacher_cnf"``, ``"f2d2"``, ...).
        model_config: description from which the model can be rebuilt, recorded in checkpoints.
        run_config: the whole run's configuration (JSON-able), recorded and compared on resume.
        extra: more JSON-able entries stored in every checkpoint (e.g. sampling defaults).
        progress: show progress (a bar on a terminal, periodic lines otherwise).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        config: TrainConfig,
        out_dir: str | os.PathLike[str],
        *,
        model_kind: str,
        model_config: dict[str, Any],
        run_config: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        progress: bool = True,
    ) -> None:
        self.config = config
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("train.device is 'cuda' but CUDA is not available")
        self.dist = distributed.info()
        if self.dist.distributed:
            _check_distributed(loss_fn, config, self.dist, (extra or {}).get("student_kind"))
            if self.device.type == "cuda":  # one GPU per rank
                self.device = torch.device("cuda", self.dist.local_rank)
        self.model = model.to(self.device)
        self.loss_fn = loss_fn
        if config.compile and not isinstance(loss_fn, BatchedLoss):
            raise ValueError(
                "train.compile needs a loss whose batches are built ahead (a BatchedLoss, "
                "such as the teacher's); this model's loss draws its batches inside the step"
            )
        if config.compile and self.device.type == "cpu" and not cpp_compiler():
            raise ValueError("train.compile on CPU needs a C++ compiler on PATH (g++, or $CXX)")
        self.out_dir = Path(out_dir)
        self.model_kind = model_kind
        self.model_config = model_config
        self.run_config = run_config or {}
        self.extra = extra or {}
        self.progress = progress and self.dist.is_main
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=config.lr,
            betas=tuple(config.betas),
            weight_decay=config.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, config)
        )
        self.ema = EMA(self.model, config.ema_decay)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.elapsed = 0.0
        self.metrics: list[dict[str, Any]] = []

    # -- checkpoints -----------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_FILE

    def state(self) -> dict[str, Any]:
        """Everything needed to continue bit-for-bit."""
        rng = {"torch": torch.get_rng_state(), "generator": self.generator.get_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {
            "kind": "training",
            "model_kind": self.model_kind,
            "model_config": self.model_config,
            "run_config": self.run_config,
            "train_config": _asdict(self.config),
            "step": self.step,
            "elapsed_s": self.elapsed,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "ema_updates": self.ema.updates,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            **self.extra,
        }

    def save(self) -> Path:
        """Write ``checkpoint.pt`` atomically (and the metrics so far); rank 0 only."""
        if not self.dist.is_main:
            return self.checkpoint_path
        path = save_checkpoint(self.checkpoint_path, self.state())
        self._write_metrics()
        return path

    def resume(self, path: str | os.PathLike[str] | None = None) -> int:
        """Restore the state saved in ``path`` (default: this run's checkpoint).

        Returns:
            the restored step.

        Raises:
            ValueError: the checkpoint is corrupt, of another model kind, or was written with a
                different training configuration (the message names the differing keys).
        """
        path = Path(path) if path is not None else self.checkpoint_path
        state = load_checkpoint(path, kind="training", map_location=self.device)
        if state.get("model_kind") != self.model_kind:
            raise ValueError(
                f"{path}: checkpoint of a {state.get('model_kind')!r} model, "
                f"not {self.model_kind!r}"
            )
        # how the work is spread over processes does not change the result
        diff = _diff(
            _result_keys(state.get("train_config", {})), _result_keys(_asdict(self.config)), "train"
        )
        diff += _diff(
            _result_keys(state.get("run_config", {})), _result_keys(self.run_config), "run"
        )
        if diff:
            raise ValueError(
                f"{path}: cannot resume, the configuration changed: {', '.join(diff[:6])}"
            )
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"], state["ema_updates"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        self.generator.set_state(state["rng"]["generator"].cpu())
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
        self.step = int(state["step"])
        self.elapsed = float(state.get("elapsed_s", 0.0))
        self.metrics = [m for m in self._read_metrics() if m.get("step", 0) <= self.step]
        return self.step

    def _read_metrics(self) -> list[dict[str, Any]]:
        path = self.out_dir / METRICS_FILE
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def _write_metrics(self) -> None:
        if not self.dist.is_main:
            return

        # strict JSON: non-finite numbers (e.g. no gradient norm yet) become null
        def finite(v: Any) -> Any:
            return None if isinstance(v, float) and not math.isfinite(v) else v

        clean = [{k: finite(v) for k, v in m.items()} for m in self.metrics]
        text = "".join(json.dumps(m, allow_nan=False) + "\n" for m in clean)
        atomic_write_text(self.out_dir / METRICS_FILE, text)

    # -- the loop --------------------------------------------------------------------------------
    def fit(self, *, resume: bool = True, stop_at: int | None = None) -> dict[str, Any]:
        """Train until ``config.steps`` (or ``stop_at``, to split a run in parts).

        Args:
            resume: continue from ``out_dir/checkpoint.pt`` if it exists.
            stop_at: stop after this many total steps (a checkpoint is written there).

        Returns:
            the last logged metrics (``step``, ``loss``, ``lr``, ``grad_norm``, ...).
        """
        cfg = self.config
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if resume and self.checkpoint_path.is_file():
            self.resume()
        elif self.dist.is_main:
            atomic_write_text(
                self.out_dir / RUN_FILE,
                json.dumps({"train": _asdict(cfg), "run": self.run_config}, indent=2) + "\n",
            )
        end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        self.model.train()
        window: list[float] = []
        extras: dict[str, list[float]] = {}
        grad_norm = float("nan")
        t_window = time.perf_counter()
        bar = Progress(
            cfg.steps, initial=self.step, enabled=self.progress, desc=self.model_kind, unit="step"
        )
        stream, batch_loss = nullcontext(None), None
        if isinstance(self.loss_fn, BatchedLoss):
            stream = step_batches(self.loss_fn.make_batch, self.step, end, cfg.data_workers)
            batch_loss = self.loss_fn.batch_loss
            if cfg.compile:  # the constructor allows compile only here
                options = CPU_OPTIONS if self.device.type == "cpu" else None
                batch_loss = torch.compile(batch_loss, options=options)
        ddp = None
        if self.dist.distributed:  # after resume: every rank holds the same weights
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            # some backbones hold parameters a loss never reaches (the EGNN's last coordinate
            # head): DDP must look for them every step, or it waits for their gradients
            ddp = DistributedDataParallel(
                _LossModule(self.model, batch_loss), device_ids=ids, find_unused_parameters=True
            )
        me = self.dist
        with bar, stream as batches:  # closing the stream stops its workers
            while self.step < end:
                if batches is None:
                    out = self.loss_fn(self.model, self.generator, self.step)
                elif ddp is not None:
                    out = ddp(rank_rows(next(batches), me.rank, me.world_size))
                else:
                    out = batch_loss(self.model, next(batches))
                loss, more = out if isinstance(out, tuple) else (out, {})
                if not torch.isfinite(loss):
                    raise FloatingPointError(
                        f"non-finite loss {float(loss.detach())} at step {self.step}"
                    )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip > 0:
                    grad_norm = float(
                        torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                    )
                self.optimizer.step()
                self.scheduler.step()
                self.ema.update(self.model)
                self.step += 1
                window.append(float(loss.detach()))
                for k, v in more.items():
                    extras.setdefault(k, []).append(float(v))
                bar.update(1)
                logged = self.step % cfg.log_every == 0 or self.step == end
                if logged:
                    now = time.perf_counter()
                    self.elapsed += now - t_window
                    rate = len(window) / max(now - t_window, 1e-9)
                    if me.distributed:  # the global batch's loss: the mean over the ranks
                        window, extras = _mean_over_ranks(window, extras)
                    record = {
                        "step": self.step,
                        "loss": sum(window) / len(window),
                        "lr": self.scheduler.get_last_lr()[0],
                        "grad_norm": grad_norm,
                        "steps_per_s": rate,
                        "elapsed_s": self.elapsed,
                    }
                    record.update({k: sum(v) / len(v) for k, v in extras.items()})
                    self.metrics.append(record)
                    bar.set_postfix(loss=record["loss"])
                    window, extras, t_window = [], {}, now
                if self.step % cfg.checkpoint_every == 0 or self.step == end:
                    self.save()  # also writes the metrics
                elif logged:
                    self._write_metrics()
        return self.metrics[-1] if self.metrics else {"step": self.step}

    def ema_model(self) -> nn.Module:
        """A copy of the model with the EMA weights."""
        return self.ema.copy_to(self.model)


def _check_distributed(
    loss_fn: Any, config: TrainConfig, me: distributed.DistInfo, kind: str | None = None
) -> None:
    """What training on several ranks needs (raises ``ValueError`` naming what is missing)."""
    if not isinstance(loss_fn, BatchedLoss):
        model = f"the {kind} student's" if kind else "this model's"
        raise ValueError(
            f"training on {me.world_size} ranks needs a loss whose minibatch depends on the step "
            "alone (a BatchedLoss: the teacher's, F2D2's and FALCON's); "
            f"{model} loss draws its own batches: train it as one process (without torchrun)"
        )
    if config.compile:
        raise ValueError("train.compile is not supported under torchrun; set compile = false")
    if config.batch_size % me.world_size:
        raise ValueError(
            f"train.batch_size {config.batch_size} is not divisible by the {me.world_size} "
            "ranks: each rank takes an equal share of the global batch"
        )


def _mean_over_ranks(
    window: list[float], extras: dict[str, list[float]]
) -> tuple[list[float], dict[str, list[float]]]:
    """Per-step losses (and extra metrics) averaged over the ranks, in a fixed order."""
    keys = sorted(extras)
    local = np.array([window, *(extras[k] for k in keys)], dtype=np.float64).T  # (steps, 1+m)
    mean = np.mean(np.stack(distributed.all_gather_arrays(local)), axis=0)
    return mean[:, 0].tolist(), {k: mean[:, 1 + i].tolist() for i, k in enumerate(keys)}


# train-config keys that change how the work is done, not what is computed
_RESULT_NEUTRAL = ("data_workers",)


def _result_keys(cfg: Any) -> Any:
    """``cfg`` without the :data:`_RESULT_NEUTRAL` keys, at any depth of nested dicts."""
    if not isinstance(cfg, dict):
        return cfg
    return {k: _result_keys(v) for k, v in cfg.items() if k not in _RESULT_NEUTRAL}


def _asdict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


def _diff(old: Any, new: Any, where: str) -> list[str]:
    """Keys whose values differ between two nested dicts (JSON-normalised)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _diff(old.get(key), new.get(key), f"{where}.{key}")
        return out
    norm = lambda v: json.loads(json.dumps(v, default=str))  # noqa: E731 (tuples == lists)
    return [] if norm(old) == norm(new) else [f"{where}: {old!r} -> {new!r}"]
