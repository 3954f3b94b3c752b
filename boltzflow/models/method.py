"""One entry of the method registry (:mod:`boltzflow.registry.methods`): what a distillation
method brings: model class, config dataclass, builder, training function, log-q kind."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Method", "never_reads_data"]


def never_reads_data(config: Any) -> bool:
    """The default :attr:`Method.reads_data`: training never needs data frames."""
    return False


@dataclass(frozen=True)
class Method:
    """One distillation method.

    Attributes:
        name: the registry name (``--method NAME``, ``method = "NAME"`` in workflow files).
        model: the model class (a :class:`~boltzflow.distill.base.Student`).
        config: its config dataclass; ``config()`` is the default configuration.
        build: ``build(config, teacher, *, system) -> model``, an untrained model.
        train: ``train(config, teacher, output, *, system, data, resume, progress, run_info)
            -> model``: trains, writes ``output/student.pt`` and returns the model.
        log_q_kind: how the model's log q is obtained (a value of
            :data:`boltzflow.models.protocol.LOG_Q_KINDS`).
        uses_steps: whether ``steps`` selects the model's discretisation.
        description: one line for ``--help`` and tables.
        defaults: config fields that select this method when several share a config class
            (F2D2 and FALCON share :class:`~boltzflow.distill.train_students.StudentConfig`).
        uses_teacher: whether ``train`` (and ``build``) read the teacher CNF. False for a model
            trained on data alone (``nf_internal``): it is passed ``teacher=None``, the workflow
            trains it without waiting for the teacher, and ``boltzflow distill`` does not offer it.
        reads_data: ``reads_data(config) -> bool``: whether ``train`` needs the training frames
            (``data``) with this config (F2D2/FALCON with ``loss.target = "data"``, always for
            ``nf_internal``); the workflow then hands them over.
        distributed: whether ``train`` runs under torchrun, every rank calling it together
            (DistributedDataParallel over shares of each global batch: F2D2 and FALCON); the
            others train as one process, and ``boltzflow distill`` refuses them under torchrun.
    """

    name: str
    model: type
    config: type
    build: Callable[..., Any]
    train: Callable[..., Any]
    log_q_kind: str
    uses_steps: bool
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)
    uses_teacher: bool = True
    reads_data: Callable[[Any], bool] = never_reads_data
    distributed: bool = False

    def new_config(self, **fields: Any) -> Any:
        """A config of this method: :attr:`defaults` updated by ``fields``."""
        return self.config(**{**self.defaults, **fields})
