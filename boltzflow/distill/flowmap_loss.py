"""What the flow-map students' losses share (F2D2 in :mod:`boltzflow.distill.f2d2`, FALCON in
:mod:`boltzflow.distill.falcon`): the loss options common to both, the minibatch they read and
the run context a step's loss may use.

Each method defines a subclass of :class:`FlowMapLossConfig` with its own weights (the
``[loss]`` section of its config file) and a per-step loss
``loss(model, batch, config, context) -> (loss, {name: float})`` (:data:`FlowMapLoss`);
:mod:`boltzflow.distill.train_students` draws the batch and runs the shared training loop.

A batch (built by :class:`boltzflow.distill.train_students.StudentBatches`) holds, for ``B`` rows
in flow units: ``x_s (B, dim)`` at times ``s (B,)`` with the teacher's (or conditional)
velocity ``v_s``; for exact teacher jumps ``x_t`` at ``t (B,)`` and ``dlogp (B,)``
(``log p_t - log p_s``); diagonal points ``x_k`` at ``t_k`` with velocity ``v_k`` and exact
divergence ``div_k``; ``m (B,)`` uniform fractions (intermediate times) and ``t_any (B,)``
uniform end times. A data batch (``target = "data"``) has only ``x_k, t_k, v_k, x_s, s, v_s,
t, t_any``. Terms that need more draws get them as rows of the batch too: ``z (B, dim)`` prior
samples when :attr:`FlowMapLossConfig.uses_energy` (FALCON's reverse KL of its own samples) and
``x_ml (B, dim)`` points for maximum likelihood when :attr:`FlowMapLossConfig.uses_ml_points`
(FALCON's ``likelihood``).

Every random draw of a step is a row of its batch, so a loss is a mean over rows of per-row
terms: on a contiguous share of the rows it is that share's part of the global batch's loss,
which is what training under ``DistributedDataParallel`` needs (each rank evaluates its rows,
the gradients are averaged). A term that leaves rows out (non-finite energies, unconverged
preimages) takes its mean over the rows kept in the *global* batch with
:meth:`LossContext.kept_mean`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor, nn

from boltzflow import distributed

__all__ = ["FlowMapLoss", "FlowMapLossConfig", "LossContext"]


@dataclass
class FlowMapLossConfig:
    """Options of every flow-map student's loss: weights ``diagonal`` (targets at ``s = t``) and
    ``pairs`` (exact teacher jumps); ``dyadic_fraction`` of the pairs are aligned jumps, those
    used at 1, 2, 4, ... steps (or only at the step counts listed in ``aligned_steps``, e.g.
    ``[4]``), the rest any two grid times; ``target``: ``"teacher"`` (cached teacher
    trajectories) or ``"data"`` (conditional flow matching on the training data)."""

    diagonal: float = 1.0
    pairs: float = 1.0
    dyadic_fraction: float = 0.5
    aligned_steps: list[int] = field(default_factory=list)
    target: str = "teacher"

    #: fields that must be >= 0 (subclasses add their weights)
    nonnegative: ClassVar[tuple[str, ...]] = ("diagonal", "pairs")
    #: weights of terms that read teacher jumps (must be 0 with ``target = "data"``)
    teacher_terms: ClassVar[tuple[str, ...]] = ("pairs",)

    def __post_init__(self) -> None:
        for name in self.nonnegative:
            if getattr(self, name) < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.dyadic_fraction <= 1:
            raise ValueError(f"loss.dyadic_fraction must be in [0, 1], got {self.dyadic_fraction}")
        if self.target not in ("teacher", "data"):
            raise ValueError(f"loss.target must be 'teacher' or 'data', got {self.target!r}")
        if not isinstance(self.aligned_steps, list | tuple) or not all(
            isinstance(k, int) for k in self.aligned_steps
        ):
            raise TypeError(
                f"loss.aligned_steps must be a list of step counts, got {self.aligned_steps!r}"
            )
        self.aligned_steps = list(self.aligned_steps)
        for k in self.aligned_steps:
            if k < 1 or k & (k - 1):
                raise ValueError(f"loss.aligned_steps must be powers of 2, got {k}")

    @property
    def uses_energy(self) -> bool:
        """Whether a term needs the system's energy (:attr:`LossContext.energy`)."""
        return False

    @property
    def uses_ml_points(self) -> bool:
        """Whether a term reads points for maximum likelihood (batch key ``x_ml``)."""
        return False

    @property
    def uses_data(self) -> bool:
        """Whether a term reads training data (``target = "data"``, or a method's own term)."""
        return self.target == "data"


@dataclass(frozen=True)
class LossContext:
    """What a step's loss may use beyond its batch.

    Attributes:
        energy: ``energy(x (B, dim)) -> (B,)``, the target's reduced energy at flow-unit points
            (None when no term uses it).
        shards: the number of equal contiguous shares of the global batch that are evaluated
            separately, one per rank under ``DistributedDataParallel`` (1: the whole batch here).
            With ``shards > 1`` :meth:`kept_mean` sums its row count over the ranks, so every
            rank must evaluate the same terms in the same order.
    """

    energy: Callable[[Tensor], Tensor] | None = None
    shards: int = 1

    def kept_mean(self, values: Tensor, keep: Tensor, zero: Tensor) -> Tensor:
        """The mean of ``values (b,)`` over the rows ``keep (b,)`` of the global batch, as this
        share's part: ``sum(values[keep]) * shards / (rows kept in all shares)``, so that the
        mean over the shares (what DDP's gradient averaging takes) is the global mean. ``zero``
        (a finite zero on the model's graph) is returned where no row is kept here."""
        local = int(keep.sum())
        total = local
        if self.shards > 1:
            total = int(distributed.sum_over_ranks(keep.sum().detach()))
        if local == 0:
            return zero
        return values[keep].sum() * (self.shards / total)


#: ``loss(model, batch, config, context) -> (scalar loss, {part: float})``
FlowMapLoss = Callable[
    [nn.Module, dict[str, Tensor], FlowMapLossConfig, LossContext],
    tuple[Tensor, dict[str, float]],
]
