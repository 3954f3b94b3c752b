"""Building blocks shared by the flow-map students: a two-time backbone, its initialisation
from a teacher's velocity network, a feature tap for extra heads, and time grids.

A flow map X(x, s, t) moves a point at time s to time t. Students write it as
X = x + (t - s) u(x, s, t) (the "average velocity" form of shortcut models, Frans et al. 2024,
arXiv:2410.12557, MeanFlow, Geng et al. 2025, arXiv:2505.13447, and flow map matching, Boffi et
al. 2024, arXiv:2406.07507), with u given by the teacher's backbone type built with two times
(``n_times=2``, :class:`boltzflow.nn.embeddings.TimeEmbedding`).

:func:`init_from_teacher` copies the teacher's weights and puts its time-embedding weights on the
``s`` features (zeros on ``t`` and ``t - s``), so that at initialisation u(x, s, t) = v(s, x):
the student starts as the Euler step of the teacher and training only has to learn the
correction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap

from boltzflow.flows.priors import MeanFreeGaussian, Prior
from boltzflow.nn import EGNN, MLP, ParticleTransformer, build_backbone

__all__ = [
    "FeatureTap",
    "build_two_time_backbone",
    "init_from_teacher",
    "map_and_logdet",
    "subspace_basis",
    "time_grid",
]


def build_two_time_backbone(
    backbone: str,
    *,
    dim: int,
    n_particles: int | None,
    spatial_dim: int | None,
    options: dict[str, Any] | None = None,
) -> nn.Module:
    """A backbone of type ``backbone`` taking ``(t, x, s=s)``, output ``(B, dim)``."""
    opts = dict(options or {})
    opts.pop("n_times", None)
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
    normalised tokens ``(B, n, H)``; MLP: the last hidden activation ``(B, H)``. :meth:`pooled`
    sums over particles, which keeps permutation/rotation/translation invariance.
    """

    def __init__(self, backbone: nn.Module) -> None:
        if isinstance(backbone, EGNN):
            module, self.width = backbone.layers[-1], backbone.time_embedding.out_dim
            self._pick = lambda out: out[0]
        elif isinstance(backbone, ParticleTransformer):
            module, self.width = backbone.norm, backbone.time_embedding.out_dim
            self._pick = lambda out: out
        elif isinstance(backbone, MLP):
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


def map_and_logdet(
    fn: Callable[[Tensor], Tensor], x: Tensor, basis: Tensor
) -> tuple[Tensor, Tensor]:
    """A batched map's value and the log|det| of each sample's Jacobian on a subspace.

    With ``basis`` B (orthonormal columns), one forward pass and ``B.shape[1]`` reverse-mode
    products stacked by ``vmap`` give rows B_k^T J_b of every sample's Jacobian (samples are
    independent, so the cotangent B_k in every row yields each sample's own row), hence the
    restricted Jacobian B^T J_b B. For a map that keeps the subspace (J B = B B^T J B) and is the
    identity across it, as every mean-free translation-invariant step x + h u(x) is, its
    determinant equals the full-coordinate one; the density on the subspace needs exactly it.
    On CPU this is about 4x faster than ``vmap(jacfwd)`` per sample with all ``dim`` directions.

    Args:
        fn: ``(B, dim) -> (B, dim)`` map acting on samples independently.
        x: ``(B, dim)`` points.
        basis: ``(dim, m)`` orthonormal basis (:func:`subspace_basis`).

    Returns:
        ``fn(x) (B, dim)`` and ``log|det B^T J B| (B,)``.
    """
    b = x.shape[0]
    cot = basis.T[:, None, :].expand(basis.shape[1], b, basis.shape[0])
    y, pullback = vjp(fn, x)
    (rows,) = vmap(pullback)(cot)  # rows[k, b] = B_k^T J_b
    restricted = torch.einsum("kbi,ij->bkj", rows, basis)
    return y, torch.linalg.slogdet(restricted)[1]
