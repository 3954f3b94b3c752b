"""A small internal-coordinate NF trained on MD frames for a fixed number of steps, by maximum
likelihood alone or distilled from a larger internal-coordinate NF (Walton et al. 2025,
"Distilling Normalizing Flows", arXiv:2506.21003).

:func:`train_icnf_student` is one loop for both arms of a distillation-versus-scratch
comparison, so that they differ in the loss alone:

- the student is an :class:`~boltzflow.distill.nf_internal.InternalNFStudent` on a *given*
  fitted transform (the teacher's, when there is one: latents can only be matched on the same
  normalised internal coordinates u);
- ``teacher=None``: ``L = -E_data[log q(u)]`` (the from-scratch arm);
- with a teacher: the terms of :func:`~boltzflow.distill.nf_losses.nf_distillation_terms`
  (NLL, intermediate and final latents, decoded samples from the same base noise), with the
  periodic columns' differences taken on the circle, weighted and optionally annealed as in
  :func:`~boltzflow.distill.nf_train.distill_nf_from_nf`; the frames are fixed, so the
  teacher's matched latents are computed once for all of them and looked up per minibatch;
- same initialisation (``torch.manual_seed(train.seed)`` before the build), same minibatch
  indices (drawn first from the trainer's per-step generator), same optimiser, schedule and EMA
  (the shared :class:`~boltzflow.train.trainer.Trainer`), no early stopping; the EMA weights
  after ``train.steps`` go to ``out_dir/student.pt``.

Early-stopped maximum-likelihood training with its own fitted transform is
:func:`boltzflow.distill.nf_internal_train.train_nf_internal` (``boltzflow train nf``).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

import torch
from torch import Tensor, nn

from boltzflow.distill.nf_internal import ICNFModelConfig, InternalNFStudent
from boltzflow.distill.nf_losses import NFLossConfig, latent_pairs, nf_distillation_terms
from boltzflow.distill.nf_train import _fit_student, _weighted_total
from boltzflow.systems.internal_coords import InternalCoordinates
from boltzflow.train.config import TrainConfig

__all__ = ["train_icnf_student"]


def _check_frames(data: Any, n_cartesian: int) -> Tensor:
    """``(N, 3n)`` finite float64 Cartesian frames, checked."""
    x = torch.as_tensor(data, dtype=torch.float64)
    if x.ndim != 2 or x.shape[1] != n_cartesian or len(x) < 1:
        raise ValueError(f"frames must be (N >= 1, {n_cartesian}), got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("frames contain NaN or infinite values")
    return x


@torch.no_grad()
def _teacher_latents(
    teacher: InternalNFStudent, u: Tensor, student_blocks: int, device: str, chunk: int = 4096
) -> dict[int, Tensor]:
    """The teacher's outputs of the blocks matched by :func:`latent_pairs`, for every row of
    ``u (N, D)``: ``{teacher block: (N, D)}`` on CPU, in ``u``'s dtype."""
    blocks = sorted({k for _, k in latent_pairs(student_blocks, teacher.flow.n_blocks)})
    out: dict[int, list[Tensor]] = {k: [] for k in blocks}
    p = next(teacher.parameters())
    for s in range(0, len(u), chunk):
        ub = u[s : s + chunk].to(device=device, dtype=p.dtype)
        _, _, lat = teacher.flow.encode(ub, return_latents=True)
        for k in blocks:
            out[k].append(lat[k].to(device="cpu", dtype=u.dtype))
    return {k: torch.cat(v) for k, v in out.items()}


def train_icnf_student(
    data: Any,
    out_dir: str | os.PathLike[str],
    *,
    ic: InternalCoordinates | None = None,
    teacher: InternalNFStudent | None = None,
    model: ICNFModelConfig,
    train: TrainConfig,
    loss: NFLossConfig | None = None,
    system: str | None = None,
    resume: bool = True,
    progress: bool = True,
    run_info: dict[str, Any] | None = None,
) -> InternalNFStudent:
    """Train a small internal-coordinate NF for exactly ``train.steps`` steps (module
    docstring), from scratch (``teacher=None``) or distilled from ``teacher``.

    Args:
        data: ``(N, 3n)`` Cartesian training frames (nm).
        out_dir: run folder (``checkpoint.pt``, ``metrics.jsonl``, ``run.json``, ``student.pt``).
        ic: the fitted transform (periodic mode); default and required match: the teacher's.
        teacher: the NF to distil (frozen); None trains by maximum likelihood alone.
        model: student architecture (its ``shift_cuts``/``standardize_dihedrals`` are the
            transform's business and not used here).
        train: loop settings; ``train.seed`` seeds the initialisation and every minibatch.
        loss: distillation weights (default :class:`NFLossConfig`; with no teacher only
            ``nll_weight`` counts and the others must be 0). ``synthetic_fraction`` and the
            augmentation flags are not supported (molecules: atoms are distinct, and the
            internal coordinates are invariant to rigid motions).
        system: system name recorded in the student (default: the teacher's).
        resume, progress, run_info: as in :func:`~boltzflow.distill.nf_train.train_nf`.

    Returns:
        the student with its EMA weights, in eval mode.

    Raises:
        ValueError: neither ``ic`` nor ``teacher``; an ``ic`` other than the teacher's; a
            student with more blocks than the teacher; distillation weights without a teacher;
            unsupported loss options; bad frames.
    """
    loss = loss or NFLossConfig()
    if loss.synthetic_fraction or loss.rotations or loss.reflections or loss.permutations:
        raise ValueError(
            "train_icnf_student supports neither synthetic batches nor augmentation "
            "(loss.synthetic_fraction, rotations, reflections, permutations must be 0/False)"
        )
    kd_weights = loss.latent_weight + loss.final_weight + loss.sample_weight
    if teacher is None:
        if ic is None:
            raise ValueError("pass the fitted internal coordinates (ic) or a teacher")
        if kd_weights > 0:
            raise ValueError(
                "distillation weights (latent, final, sample) need a teacher; set them to 0 "
                "for maximum likelihood"
            )
    else:
        if ic is not None and ic.to_dict() != teacher.ic.to_dict():
            raise ValueError("ic differs from the teacher's: latents need the same coordinates")
        ic = teacher.ic
        latent_pairs(model.blocks, teacher.flow.n_blocks)  # validates the block counts
        system = system or teacher.system
    x = _check_frames(data, 3 * ic.n_atoms)
    with torch.no_grad():
        u_all = ic(x)[0].float()
    torch.manual_seed(train.seed)  # parameter initialisation
    student = InternalNFStudent.build(model, copy.deepcopy(ic), system=system)
    if teacher is not None:
        teacher = copy.deepcopy(teacher).to(train.device).eval()  # frozen copy
        for p in teacher.parameters():
            p.requires_grad_(False)
    batch, steps, w = train.batch_size, train.steps, loss
    latents = teacher is not None and (w.latent_weight > 0 or w.final_weight > 0)
    cache: dict[int, Tensor] = {}
    if latents:  # the frames are fixed (no augmentation): the teacher encodes each one once
        cache = _teacher_latents(teacher, u_all, model.blocks, train.device)

    def loss_fn(m: nn.Module, gen: torch.Generator, step: int) -> tuple[Tensor, dict[str, float]]:
        p = next(m.parameters())
        idx = torch.randint(len(u_all), (batch,), generator=gen)
        u = u_all[idx].to(device=p.device, dtype=p.dtype)
        if teacher is None:
            nll = -m.log_prob_internal(u).mean()
            return w.nll_weight * nll, {"nll": float(nll.detach())}
        eps = None
        if w.sample_weight > 0:
            eps = m.prior.sample(batch, generator=gen, dtype=p.dtype, device=p.device)
        lat_t = {k: v[idx].to(device=p.device, dtype=p.dtype) for k, v in cache.items()}
        terms = nf_distillation_terms(
            m, teacher, u, eps, latents=latents, teacher_latents=lat_t or None
        )
        total = _weighted_total(terms, w, step, steps)
        return total, {k: float(v.detach()) for k, v in terms.items()}

    run_config: dict[str, Any] = {
        "method": "nf_internal_from_nf" if teacher is not None else "nf_internal_fixed_steps",
        "system": system,
        "model": dataclasses.asdict(model),
        "loss": dataclasses.asdict(loss),
        "n_data": len(x),
    }
    if teacher is not None:
        run_config["teacher"] = {
            "model_config": teacher.model_config,
            "n_parameters": teacher.n_parameters,
        }
    run_config.update(run_info or {})
    return _fit_student(
        student, loss_fn, train, out_dir, run_config=run_config, resume=resume, progress=progress
    )
