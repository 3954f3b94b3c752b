"""What exists: every distillation method and a loader for any trained model.

- :mod:`~boltzflow.registry.methods`: :data:`METHODS`, the one method registry;
- :mod:`~boltzflow.registry.loading`: :func:`load_model`, any model from its file or folder.

This package sits above the model packages (``flows``, ``distill``) that it lists; the protocol
every model follows is :mod:`boltzflow.models.protocol`, below them.
"""

from boltzflow.registry.loading import load_model, model_kind
from boltzflow.registry.methods import METHODS, Method, get_method

__all__ = ["METHODS", "Method", "get_method", "load_model", "model_kind"]
