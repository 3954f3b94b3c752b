"""Loss terms and augmentation of the NF students (all in flow units; recipes in
:mod:`boltzflow.distill.nf_train`).

- NF -> NF (Walton et al. 2025, "Distilling Normalizing Flows", CVPR 2025 eLVM workshop,
  arXiv:2506.21003), :func:`nf_distillation_terms`: a student with fewer blocks minimises

      L = w_nll NLL_S(x) + w_lat mean_j MSE(h_S^j(x), h_T^{m(j)}(x)) + w_fin MSE(f_S(x), f_T(x))
          + w_smp MSE(g_S(eps), g_T(eps)),   eps ~ N(0, I),

  i.e. maximum likelihood plus matching the teacher's intermediate latents (output of student
  block ``j`` against teacher block ``m(j) = round((j + 1) K_T / K_S) - 1``, the paper's
  "intermediate latent" distillation, matched at every ``K_T / K_S``-th teacher block as in the
  authors' code, which matches every 4th Glow step), the final latent ("latent" distillation)
  and samples decoded by both flows from the *same* noise ("synthesized" distillation). MSE is
  the elementwise mean, as in the authors' code (``nn.MSELoss``); on a flow with periodic
  columns (the dihedrals of an internal-coordinate NF) those differences are taken on the
  circle and the NLL uses the flow's normal x uniform-angle base.
- CNF -> NF, :func:`pair_regression_terms`: regression onto the teacher CNF's ODE pairs
  ``(z0, x1 = phi(z0))``,

      L = w_nll NLL_S(x1) + w_fin MSE(f_S(x1), z0) + w_smp MSE(g_S(z0), x1),

  the knowledge-distillation-of-a-flow recipe of Baranchuk et al. 2021 ("Distilling the
  Knowledge from Normalizing Flows", ICML INNF+ workshop) applied to an invertible student, so
  log q stays exact.

:func:`augment_batch` (random O(d) rotations and particle permutations, applied to a pair or to
teacher/student inputs alike) matches the target's symmetries; the EGNN teacher CNF is
E(n)-equivariant, so rotated/permuted pairs are pairs of the same teacher.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from boltzflow.distill.nf import NFStudent
from boltzflow.flows.coupling import wrap_to_circle
from boltzflow.flows.priors import standard_normal_log_prob

if TYPE_CHECKING:
    from boltzflow.distill.nf_internal import InternalNFStudent

__all__ = [
    "NFLossConfig",
    "augment_batch",
    "latent_pairs",
    "nf_distillation_terms",
    "pair_regression_terms",
]


@dataclass
class NFLossConfig:
    """Loss weights and augmentation (see the module docstring for the objectives).

    Defaults: NLL weight 1 and 0.1 for each distillation term, the 0.9 : 0.1 NLL-to-KD ratio of
    Walton et al.'s tabular configs (github.com/vklyukin/nf_distillation,
    ``conf/training/tabular.yaml``). On DW4 (``workflows/nf_distillation_dw4.py``) no setting
    tried beat the same student trained from scratch (see that script). For a CNF teacher
    :func:`~boltzflow.distill.nf_train.distill_nf_from_cnf` defaults to regression weights 1
    (``final``, ``sample``).

    ``synthetic_fraction`` (NF teacher only): that share of every minibatch is drawn fresh
    from the teacher (``x = g_T(eps)``, no augmentation) instead of the data, the
    "synthesized" data of Walton et al.; all terms are evaluated on the mixed batch.
    ``anneal``: the distillation weights (latent, final, sample; not the NLL) decay linearly
    from their value at step 0 to 0 at the last step.

    ``latent_weight`` is ignored for a CNF teacher (it has no blocks). ``rotations``,
    ``reflections`` (O(d) instead of SO(d)) and ``permutations`` augment particle systems.
    """

    nll_weight: float = 1.0
    latent_weight: float = 0.1
    final_weight: float = 0.1
    sample_weight: float = 0.1
    synthetic_fraction: float = 0.0
    anneal: bool = False
    rotations: bool = False
    reflections: bool = False
    permutations: bool = False

    def __post_init__(self) -> None:
        for name in ("nll_weight", "latent_weight", "final_weight", "sample_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.synthetic_fraction <= 1:
            raise ValueError(
                f"loss.synthetic_fraction must be in [0, 1], got {self.synthetic_fraction}"
            )


def latent_pairs(student_blocks: int, teacher_blocks: int) -> list[tuple[int, int]]:
    """Matched ``(student block, teacher block)`` indices: student block ``j`` against teacher
    block ``round((j + 1) K_T / K_S) - 1``; the last pair is the final latent.

    Raises:
        ValueError: the student has more blocks than the teacher.
    """
    if not 1 <= student_blocks <= teacher_blocks:
        raise ValueError(
            f"latent matching needs 1 <= student blocks <= teacher blocks, got "
            f"{student_blocks} and {teacher_blocks}"
        )
    ratio = teacher_blocks / student_blocks
    return [(j, round((j + 1) * ratio) - 1) for j in range(student_blocks)]


def augment_batch(
    xs: list[Tensor], gen: torch.Generator, cfg: NFLossConfig, n: int | None, d: int | None
) -> list[Tensor]:
    """Apply the same random rotation/reflection/permutation to every tensor in ``xs``.

    Args:
        xs: ``(B, n d)`` tensors of ``n`` particles in ``d`` dimensions (row ``i`` of each
            gets the same transformation).
        gen: CPU generator for the random draws.
        cfg: which transformations (``rotations``, ``reflections``, ``permutations``).
        n, d: particle structure (None: not a particle system, ``xs`` returned unchanged).
    """
    if n is None or d is None or not (cfg.rotations or cfg.reflections or cfg.permutations):
        return xs
    from boltzflow.flows.flow_matching import random_rotations

    b = len(xs[0])
    rot = torch.eye(d).expand(b, d, d)
    if cfg.rotations:
        rot = random_rotations(b, d, generator=gen)
    if cfg.reflections:
        sign = torch.randint(0, 2, (b,), generator=gen).float() * 2 - 1
        flip = torch.ones(b, d)
        flip[:, 0] = sign
        rot = rot * flip[:, None, :]  # R diag(s): an improper rotation where s = -1
    perm = torch.argsort(torch.rand(b, n, generator=gen), dim=1) if cfg.permutations else None
    out = []
    for x in xs:
        p = x.reshape(b, n, d)
        p = p @ rot.transpose(1, 2).to(device=x.device, dtype=x.dtype)
        if perm is not None:
            p = p.gather(1, perm.to(x.device)[..., None].expand(b, n, d))
        out.append(p.reshape(b, n * d))
    return out


def _mse(a: Tensor, b: Tensor, periodic: Tensor | None = None) -> Tensor:
    """Elementwise mean of ``(a - b)^2``; on the ``periodic`` columns (bool mask, angles) the
    difference is taken on the circle, wrapped to ``[-pi, pi)``, so that -pi + e and pi - e
    are 2 e apart, not 2 pi - 2 e."""
    d = a - b
    if periodic is not None and bool(periodic.any()):
        mask = periodic.to(d.device)
        d = torch.where(mask, wrap_to_circle(d), d)
    return d.square().mean()


def _periodic_mask(flow: Any) -> Tensor | None:
    """Bool mask of a coupling flow's periodic columns (None: a flow on R^D)."""
    base = getattr(flow, "base", None)
    return base.mask if base is not None else None


def nf_distillation_terms(
    student: NFStudent | InternalNFStudent,
    teacher: NFStudent | InternalNFStudent,
    u: Tensor,
    eps: Tensor | None,
    *,
    latents: bool = True,
    teacher_latents: Mapping[int, Tensor] | Sequence[Tensor] | None = None,
) -> dict[str, Tensor]:
    """The four terms of the NF -> NF objective on one minibatch (flow coordinates).

    Args:
        student, teacher: models with a :class:`~boltzflow.flows.coupling.CouplingFlow`
            ``flow`` on the same coordinates (Cartesian NFs sharing ``scale``, or
            internal-coordinate NFs sharing one fitted transform).
        u: ``(B, event_dim)`` data (or teacher samples) in flow coordinates.
        eps: ``(B', event_dim)`` noise for the decoded-sample term, drawn from the flow's base
            (uniform on the periodic columns; None skips it).

    The NLL uses the flow's own base density (standard normal, or normal x uniform angles for a
    flow with periodic columns); every MSE takes periodic columns' differences on the circle.
        latents: compute the latent-matching terms (False: ``latent`` and ``final`` are 0 and
            the teacher's encode pass is skipped).
        teacher_latents: the teacher's block outputs for ``u``, indexed by teacher block (at
            least the blocks of :func:`latent_pairs`), e.g. cached once for a fixed training
            set; None: the teacher encodes ``u`` here.

    Returns:
        ``nll``, ``latent`` (intermediate blocks; 0 when the student has one block), ``final``
        and ``sample`` (0 without ``eps``), each a scalar tensor.
    """
    z_s, ladj_s, lat_s = student.flow.encode(u, return_latents=True)
    nll = -(student.flow.base_log_prob(z_s) + ladj_s).mean()
    per = _periodic_mask(student.flow)
    latent = final = u.new_zeros(())
    if latents:
        lat_t = teacher_latents
        if lat_t is None:
            with torch.no_grad():
                _, _, lat_t = teacher.flow.encode(u, return_latents=True)
        pairs = latent_pairs(student.flow.n_blocks, teacher.flow.n_blocks)
        inter = [_mse(lat_s[j], lat_t[k], per) for j, k in pairs[:-1]]
        latent = torch.stack(inter).mean() if inter else u.new_zeros(())
        j, k = pairs[-1]
        final = _mse(lat_s[j], lat_t[k], per)
    sample = u.new_zeros(())
    if eps is not None:
        with torch.no_grad():
            x_t, _ = teacher.flow.decode(eps)
        x_s, _ = student.flow.decode(eps)
        sample = _mse(x_s, x_t, per)
    return {"nll": nll, "latent": latent, "final": final, "sample": sample}


def pair_regression_terms(
    student: NFStudent, z0: Tensor, x1: Tensor, *, sample: bool = True
) -> dict[str, Tensor]:
    """The three terms of the CNF -> NF objective on one minibatch of pairs (flow coordinates).

    Args:
        student: the flow being trained.
        z0: ``(B, event_dim)`` teacher noise.
        x1: ``(B, event_dim)`` its teacher image.
        sample: compute the decoded-sample term (False: ``sample`` is 0).

    Returns:
        ``nll``, ``final`` (``MSE(f_S(x1), z0)``) and ``sample`` (``MSE(g_S(z0), x1)``), each a
        scalar tensor.
    """
    z_s, ladj = student.flow.encode(x1)
    nll = -(standard_normal_log_prob(z_s, student.flow.dim) + ladj).mean()
    final = _mse(z_s, z0)
    sample_term = x1.new_zeros(())
    if sample:
        sample_term = _mse(student.flow.decode(z0)[0], x1)
    return {"nll": nll, "final": final, "sample": sample_term}
