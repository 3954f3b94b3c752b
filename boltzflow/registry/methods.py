"""The one method registry: every way to turn a teacher CNF into a few-step model, and the
models trained beside the teacher on the same data (``nf_internal``: ``uses_teacher = False``).

An entry (:class:`~boltzflow.models.method.Method`) carries the model class, its config
dataclass, how an untrained model is built from a config and a teacher, its own training
function (losses included) and the kind of its log q. The CLI (``boltzflow distill --method``),
the workflow spec and stages, the benchmark and the contract tests iterate over :data:`METHODS`.

Adding a method is one new module (the model class registered with
:func:`boltzflow.distill.base.register_student`, its config dataclass, its training function
and a ``METHOD = Method(...)`` entry) and one line in :data:`METHODS` below; see the README's
"Adding a method".
"""

from __future__ import annotations

from boltzflow.distill import baselines, nf_internal_train, nf_run, train_students
from boltzflow.models.method import Method

__all__ = ["METHODS", "Method", "get_method"]

#: name -> :class:`Method`, in registration order
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        train_students.F2D2_METHOD,
        train_students.FALCON_METHOD,
        nf_run.METHOD,
        nf_internal_train.METHOD,
        *baselines.METHODS,
    )
}


def get_method(name: str) -> Method:
    """The method called ``name``.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {list(METHODS)}")
    return METHODS[name]
