"""The model layer shared by the teacher and every student.

- :mod:`~boltzflow.models.protocol`: the one model protocol (``sample``, ``log_prob``,
  ``iter_samples`` with cost, ``system``, ``log_q_kind``, save/load with the system check);
- :mod:`~boltzflow.models.method`: one entry of the method registry;
- :mod:`~boltzflow.registry.methods`: :data:`METHODS`, every distillation method;
- :mod:`~boltzflow.registry.loading`: :func:`load_model`, any model from its file or folder.

Only the protocol is imported here; the registry and the loader import the model modules.
"""

from boltzflow.models.protocol import LOG_Q_KINDS, FlowOutput, Model

__all__ = ["LOG_Q_KINDS", "FlowOutput", "Model"]
