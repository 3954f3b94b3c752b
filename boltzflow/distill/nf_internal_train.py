"""Maximum-likelihood training of the internal-coordinate NF on MD frames, with a held-out
split, validation NLL and early stopping (``boltzflow train nf``).

Data volume limits quality here (DESIGN.md: a 1-2 M parameter flow on 47,000 frames overfits
within minutes), so the run keeps the weights of the best validation NLL, not the last ones:

1. split the frames into training and held-out frames (``split = "tail"``: the last
   ``val_fraction`` of the frames, the least correlated with the training frames of a time
   series; ``"random"``: a seeded random subset);
2. fit the :class:`~boltzflow.systems.internal_coords.InternalCoordinates` (standardisation,
   dihedral cuts) on the training frames only;
3. minimise ``-E[log q(z)]`` over training frames with the shared
   :class:`~boltzflow.train.trainer.Trainer` (AdamW with ``train.weight_decay``, warm-up and
   cosine decay, EMA of the weights, checkpoints, exact resume); every ``eval_every`` steps
   the EMA weights are scored on the held-out frames;
4. stop after ``patience`` evaluations without an improvement of at least ``min_delta`` nats,
   and export the best EMA weights as ``student.pt``.

NLLs are reported per frame in the density convention of the model (DESIGN.md): NLL(x) =
-mean log q(x) = -mean [log q(z) - log J(z) - Σ log σ], in nats, for Cartesian nm; they are
comparable between runs on the same data whatever the normalisation. Files of a run folder:
``checkpoint.pt``, ``metrics.jsonl``, ``run.json`` (the trainer's), ``validation.jsonl`` (one
line per evaluation: step, train_nll, val_nll, best), ``best.pt`` (the best weights so far, for
resuming) and ``student.pt`` (the result).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from boltzflow import distributed
from boltzflow.distill.base import STUDENT_FILE
from boltzflow.distill.nf_internal import ICNFModelConfig, InternalNFStudent
from boltzflow.distill.nf_train import NF_WHY
from boltzflow.io.atomic import atomic_write_text
from boltzflow.io.checkpoint import load_checkpoint, save_checkpoint
from boltzflow.models.method import Method
from boltzflow.progress import is_quiet
from boltzflow.systems.internal_coords import InternalCoordinates
from boltzflow.systems.zmatrix import ZMatrix, zmatrix_from_topology
from boltzflow.train.config import TrainConfig, dataclass_from_dict, read_toml
from boltzflow.train.trainer import Trainer

__all__ = [
    "BEST_FILE",
    "METHOD",
    "VALIDATION_FILE",
    "ICNFRunConfig",
    "ValidationConfig",
    "build_nf_internal",
    "load_icnf_config",
    "split_frames",
    "train_method",
    "train_nf_internal",
]

#: per-evaluation record of a run (JSON lines)
VALIDATION_FILE = "validation.jsonl"
#: best weights so far (for resuming an early-stopped run)
BEST_FILE = "best.pt"
SPLITS = ("tail", "random")


@dataclass
class ValidationConfig:
    """Held-out split and early stopping.

    Attributes:
        val_fraction: fraction of the frames held out (at least one frame each side).
        split: ``"tail"`` (last frames; for time series) or ``"random"`` (seeded by
            ``train.seed``).
        eval_every: training steps between evaluations.
        patience: evaluations without improvement before stopping (0: never stop early).
        min_delta: improvement in nats that counts.
        batch_size: frames per batch when scoring.
    """

    val_fraction: float = 0.1
    split: str = "tail"
    eval_every: int = 100
    patience: int = 10
    min_delta: float = 0.0
    batch_size: int = 4096

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"validation.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.split not in SPLITS:
            raise ValueError(f"validation.split {self.split!r} is not one of {list(SPLITS)}")
        if self.eval_every < 1 or self.batch_size < 1 or self.patience < 0:
            raise ValueError("validation.eval_every, batch_size >= 1 and patience >= 0 needed")
        if not self.min_delta >= 0:
            raise ValueError(f"validation.min_delta must be >= 0, got {self.min_delta}")


def _default_train() -> TrainConfig:
    return TrainConfig(
        steps=5000, batch_size=256, lr=5e-4, weight_decay=1e-4, warmup_steps=100,
        log_every=100, checkpoint_every=1000, ema_decay=0.99,
    )  # fmt: skip


@dataclass
class ICNFRunConfig:
    """A whole run: ``[model]``, ``[train]``, ``[validation]`` (and an optional ``system``)."""

    model: ICNFModelConfig = field(default_factory=ICNFModelConfig)
    train: TrainConfig = field(default_factory=_default_train)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    representation: str = "internal"
    system: str | None = None

    def __post_init__(self) -> None:
        if self.representation != "internal":
            raise ValueError(
                f"representation {self.representation!r}: `boltzflow train nf` trains the NF in "
                "internal coordinates; Cartesian NFs are trained with `boltzflow distill`"
            )


def load_icnf_config(path: str | os.PathLike[str], profile: str | None = None) -> ICNFRunConfig:
    """Read a run config (``workflows/configs/nf_aldp_internal.toml``); errors name the key."""
    return dataclass_from_dict(ICNFRunConfig, read_toml(path, profile), str(path))


def split_frames(n: int, cfg: ValidationConfig, seed: int) -> tuple[Tensor, Tensor]:
    """Indices ``(train, val)`` of ``n`` frames (see :class:`ValidationConfig`).

    Raises:
        ValueError: fewer than 2 frames.
    """
    if n < 2:
        raise ValueError(f"need at least 2 frames to hold some out, got {n}")
    n_val = min(max(1, round(cfg.val_fraction * n)), n - 1)
    if cfg.split == "tail":
        order = torch.arange(n)
    else:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[: n - n_val].sort().values, order[n - n_val :].sort().values


def _zmatrix(system: Any) -> tuple[str | None, ZMatrix]:
    """Name and Z-matrix of a molecular system (object or name)."""
    if isinstance(system, str):
        from boltzflow.systems import load_system

        obj = load_system(system)
        try:
            return system, zmatrix_from_topology(obj.mdtraj_topology)
        finally:
            obj.close()
    top = getattr(system, "mdtraj_topology", None)
    if top is None:
        raise ValueError(f"{system!r} is not a molecular system (no mdtraj_topology)")
    return getattr(system, "name", None), zmatrix_from_topology(top)


def _prepare(
    cfg: ICNFRunConfig, data: Any, system: Any
) -> tuple[str | None, InternalCoordinates, Tensor, Tensor, Tensor]:
    """System name, the transform fitted on the training frames, the frames (float64) and the
    indices of the training and held-out frames.

    Raises:
        ValueError: data of the wrong shape, non-finite or too few frames.
    """
    name, zmatrix = _zmatrix(system)
    x = torch.as_tensor(data, dtype=torch.float64)
    if x.ndim != 2 or x.shape[1] != 3 * zmatrix.n_atoms:
        raise ValueError(f"frames must be (N, {3 * zmatrix.n_atoms}), got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("frames contain NaN or infinite values")
    train, val = split_frames(len(x), cfg.validation, cfg.train.seed)
    if len(train) < 2:
        raise ValueError(f"need at least 2 training frames, got {len(train)}")
    ic = InternalCoordinates.fit(
        zmatrix,
        x[train],
        periodic=True,
        shift_cuts=cfg.model.shift_cuts,
        standardize_dihedrals=cfg.model.standardize_dihedrals,
    )
    return name, ic, x, train, val


@torch.no_grad()
def _nll(model: InternalNFStudent, z: Tensor, log_det: Tensor, batch: int) -> float:
    """Mean −log q(x) over frames (nats), from their internal coordinates ``z`` and the
    transform's forward log-dets (log q(x) = log q(z) + log_det)."""
    model.eval()
    p = model._param()
    total = 0.0
    for s in range(0, len(z), batch):
        lq = model.log_prob_internal(z[s : s + batch].to(device=p.device, dtype=p.dtype))
        total += float((lq.double().cpu() + log_det[s : s + batch]).sum())
    return -total / len(z)


def _read_history(out: Path, step: int) -> list[dict[str, Any]]:
    path = out / VALIDATION_FILE
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= step]


def train_nf_internal(
    data: Any,
    out_dir: str | os.PathLike[str],
    *,
    system: Any,
    config: ICNFRunConfig | None = None,
    resume: bool = True,
    progress: bool = True,
    run_info: dict[str, Any] | None = None,
) -> InternalNFStudent:
    """Train the internal-coordinate NF on frames by maximum likelihood with early stopping.

    Args:
        data: ``(N, 3n)`` Cartesian frames (nm), e.g. ``read_dataset(path).positions``.
        out_dir: run folder (module docstring).
        system: the molecular system (object with ``mdtraj_topology``, or its name).
        config: run settings (default :class:`ICNFRunConfig`).
        resume: continue from ``out_dir/checkpoint.pt`` (and ``best.pt``) if present.
        progress: print one line per evaluation (to stderr; works without a terminal; silenced
            by ``boltzflow --quiet`` / ``BOLTZFLOW_QUIET=1``).
        run_info: extra JSON-able facts recorded in ``run.json``.

    Returns:
        the model with the best-validation EMA weights, in eval mode (also in
        ``out_dir/student.pt``).

    Raises:
        ValueError: data of the wrong shape, non-finite or too few frames; a non-molecular system.
    """
    distributed.single_process_only("training the nf_internal student", NF_WHY)
    cfg = config or ICNFRunConfig()
    name, ic, x, train, val = _prepare(cfg, data, system)
    with torch.no_grad():
        z_all, ld_all = ic(x)
    z_tr, z_val = z_all[train].float(), z_all[val].float()
    ld_tr, ld_val = ld_all[train], ld_all[val]
    torch.manual_seed(cfg.train.seed)  # parameter initialisation
    student = InternalNFStudent.build(cfg.model, ic, system=name)
    batch = cfg.train.batch_size

    def loss_fn(m: nn.Module, gen: torch.Generator, step: int) -> Tensor:
        p = next(m.parameters())
        u = z_tr[torch.randint(len(z_tr), (batch,), generator=gen)]
        return -m.log_prob_internal(u.to(device=p.device, dtype=p.dtype)).mean()

    run_config = {
        "method": "nf_internal_mle",
        "system": name,
        "model": dataclasses.asdict(cfg.model),
        "validation": dataclasses.asdict(cfg.validation),
        "n_train": len(train),
        "n_val": len(val),
        **(run_info or {}),
    }
    out = Path(out_dir)
    trainer = Trainer(
        student,
        loss_fn,
        cfg.train,
        out,
        model_kind="student",
        model_config=student.model_config,
        run_config=run_config,
        extra={"student_kind": student.student_kind, "system": name},
        progress=False,  # one line per evaluation instead of a bar
    )
    vcfg = cfg.validation
    # the same number of training frames as held-out ones, to see overfitting in the log
    sub = torch.randperm(len(z_tr), generator=torch.Generator().manual_seed(1))[: len(z_val)]
    best: dict[str, Any] = {"val_nll": math.inf, "step": 0, "state": None}
    history: list[dict[str, Any]] = []
    first = True
    t0 = time.perf_counter()
    bad = 0
    while True:
        next_eval = (trainer.step // vcfg.eval_every + 1) * vcfg.eval_every
        trainer.fit(resume=resume and first, stop_at=min(cfg.train.steps, next_eval))
        if first:
            first = False
            history = _read_history(out, trainer.step) if resume else []
            if history and (out / BEST_FILE).is_file():
                saved = load_checkpoint(out / BEST_FILE, kind="icnf_best")
                best = {"val_nll": saved["val_nll"], "step": saved["step"], "state": saved["state"]}
                bad = history[-1]["bad"] if history[-1]["step"] == trainer.step else 0
        ema = trainer.ema_model()
        record = {
            "step": trainer.step,
            "train_nll": _nll(ema, z_tr[sub], ld_tr[sub], vcfg.batch_size),
            "val_nll": _nll(ema, z_val, ld_val, vcfg.batch_size),
            "loss": trainer.metrics[-1]["loss"] if trainer.metrics else math.nan,
            "elapsed_s": trainer.elapsed,
        }
        if record["val_nll"] < best["val_nll"] - vcfg.min_delta:
            best = {
                "val_nll": record["val_nll"],
                "step": trainer.step,
                "state": copy.deepcopy(ema.state_dict()),
            }
            save_checkpoint(out / BEST_FILE, {"kind": "icnf_best", **best})
            bad = 0
        else:
            bad += 1
        record.update(best_val_nll=best["val_nll"], best_step=best["step"], bad=bad)
        history.append(record)
        atomic_write_text(out / VALIDATION_FILE, "".join(json.dumps(r) + "\n" for r in history))
        if progress and not is_quiet():
            print(
                f"nf_internal step {trainer.step}/{cfg.train.steps}: loss {record['loss']:.3f}, "
                f"train NLL {record['train_nll']:.3f}, val NLL {record['val_nll']:.3f} "
                f"(best {best['val_nll']:.3f} at step {best['step']}), "
                f"{time.perf_counter() - t0:.0f} s",
                file=sys.stderr,
                flush=True,
            )
        stop_early = vcfg.patience > 0 and bad >= vcfg.patience
        if trainer.step >= cfg.train.steps or stop_early:
            break
    model = trainer.ema_model()
    model.load_state_dict(best["state"])
    model.eval()
    info = {
        "steps": trainer.step,
        "elapsed_s": trainer.elapsed,
        "best_step": best["step"],
        "best_val_nll": best["val_nll"],
        "stopped_early": bool(stop_early and trainer.step < cfg.train.steps),
        "n_parameters": model.n_parameters,
        "run": run_config,
    }
    model.save(out / STUDENT_FILE, extra=info)
    return model


# -- the method registry's entry ------------------------------------------------------------------
def build_nf_internal(
    config: ICNFRunConfig, teacher: Any = None, *, system: Any, data: Any = None
) -> InternalNFStudent:
    """An untrained NF on the internal coordinates fitted to the training part of ``data``
    (the registry's ``build``; ``teacher`` is not used).

    Raises:
        ValueError: no ``data`` (the transform is fitted on frames), or bad frames.
    """
    if data is None:
        raise ValueError("nf_internal fits its internal-coordinate transform on frames: pass data")
    name, ic, _, _, _ = _prepare(config, data, system)
    torch.manual_seed(config.train.seed)  # parameter initialisation, as in training
    return InternalNFStudent.build(config.model, ic, system=name)


def train_method(
    config: ICNFRunConfig,
    teacher: Any,
    output: str | os.PathLike[str],
    *,
    system: Any = None,
    data: Any = None,
    resume: bool = True,
    progress: bool = True,
    run_info: dict[str, Any] | None = None,
) -> InternalNFStudent:
    """The registry's training function: :func:`train_nf_internal` on ``data`` (``teacher`` is
    not used: the NF learns from the frames alone).

    Raises:
        ValueError: no ``data`` or no ``system``.
    """
    if data is None:
        raise ValueError("nf_internal trains on MD frames by maximum likelihood: pass data")
    system = system if system is not None else config.system
    if system is None:
        raise ValueError("nf_internal needs the molecular system (its topology)")
    return train_nf_internal(
        data,
        output,
        system=system,
        config=config,
        resume=resume,
        progress=progress,
        run_info=run_info,
    )


def _always(config: Any) -> bool:
    return True


#: registry entry (:mod:`boltzflow.registry.methods`): not a distillation method; trained on
#: frames alone (``uses_teacher = False``, ``reads_data`` always)
METHOD = Method(
    name="nf_internal",
    model=InternalNFStudent,
    config=ICNFRunConfig,
    build=build_nf_internal,
    train=train_method,
    log_q_kind=InternalNFStudent.log_q_kind,
    uses_steps=False,
    description="coupling NF in internal coordinates, maximum likelihood on MD frames",
    uses_teacher=False,
    reads_data=_always,
)
