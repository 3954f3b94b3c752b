"""The one model protocol: what the teacher and every student offer to the rest of boltzflow.

Every model maps prior noise to data and reports the density of what it produced:

- ``sample(n, *, steps=None, seed=0, batch_size=None) -> (x (n, dim), log_q (n,))``;
- ``log_prob(x, *, steps=None, batch_size=None) -> log_q (N,)``;
- ``iter_samples(n, *, steps, seed, batch_size, progress, skip)`` yields :class:`FlowOutput`
  batches (samples, log q and cost) and ``sample_with_stats`` concatenates them; ``skip`` drops
  the first rows of the draw (all ``n`` prior points are drawn first), to resume one;
- ``system`` (the name of the system it was trained for), ``dim``, ``log_q_kind`` (how its log q
  is obtained, one of :data:`LOG_Q_KINDS`), ``uses_steps`` (whether ``steps`` changes the model);
- ``save(path)`` and ``load(path, *, system=None)``, which refuses a checkpoint trained for
  another system.

``log_q`` is in the units of the data (nm for molecules) and, for mean-free particle systems, the
density on the (n - 1) d subspace (DESIGN.md). :class:`SamplingMixin` derives ``sample`` and
``sample_with_stats`` from ``iter_samples`` and checks the arguments every model shares, so each
model writes only its batch loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from boltzflow.validate import positive_int

__all__ = [
    "LOG_Q_KINDS",
    "FlowOutput",
    "Model",
    "SamplingMixin",
    "check_batch_size",
    "check_count",
    "check_skip",
    "check_steps",
    "check_trained_for",
    "system_name",
]

#: how a model obtains log q (the benchmark's ``log q`` column and the sample files' provenance)
LOG_Q_KINDS = {
    "ode_exact": "ODE, exact trace",
    "ode_quadrature": "ODE, exact trace by quadrature",
    "ode_hutchinson": "ODE, Hutchinson trace (unbiased, noisy)",
    "learned_head": "divergence head",
    "step_logdet": "exact step log-det",
    "one_pass": "exact (one pass)",
    "euler_rule": "Euler-rule divergence",
}


@dataclass
class FlowOutput:
    """Samples (or evaluated points) with log densities and cost.

    Attributes:
        x: ``(N, dim)`` positions (data side).
        log_q: ``(N,)`` model log density at ``x``.
        nfe: network evaluations summed over batches (each batched).
        nfe_per_batch: mean network evaluations per batch (= per sample: each is batched).
        trace_evals: total batched Jacobian-trace evaluations (ODE models; else 0).
        seconds: wall time of the model's work.
        cpu_seconds: CPU time of the model's work (NaN where not measured).
        columns: further ``(N,)`` per-sample values by name, written beside log q in the sample
            store (e.g. ``log_q_internal`` of models in internal coordinates).
    """

    x: Tensor
    log_q: Tensor
    nfe: int
    nfe_per_batch: float
    trace_evals: int
    seconds: float
    cpu_seconds: float = float("nan")
    columns: dict[str, Tensor] = field(default_factory=dict)

    @property
    def seconds_per_1000(self) -> float:
        """Wall time per 1,000 samples."""
        return 1000.0 * self.seconds / max(len(self.x), 1)

    @property
    def cpu_seconds_per_1000(self) -> float:
        """CPU time per 1,000 samples."""
        return 1000.0 * self.cpu_seconds / max(len(self.x), 1)

    @staticmethod
    def concat(parts: list[FlowOutput]) -> FlowOutput:
        """Join per-batch outputs (costs add up; ``nfe_per_batch`` is the mean).

        Raises:
            ValueError: no parts, or parts with different extra columns.
        """
        if not parts:
            raise ValueError("no batches to concatenate")
        names = set(parts[0].columns)
        if any(set(p.columns) != names for p in parts):
            raise ValueError("batches carry different extra columns")
        per_batch = {p.nfe_per_batch for p in parts}
        return FlowOutput(
            torch.cat([p.x for p in parts]),
            torch.cat([p.log_q for p in parts]),
            sum(p.nfe for p in parts),
            per_batch.pop() if len(per_batch) == 1 else sum(p.nfe for p in parts) / len(parts),
            sum(p.trace_evals for p in parts),
            sum(p.seconds for p in parts),
            sum(p.cpu_seconds for p in parts),
            {k: torch.cat([p.columns[k] for p in parts]) for k in sorted(names)},
        )


@runtime_checkable
class Model(Protocol):
    """What every trained model (teacher CNF, students, baselines) offers; see the module text."""

    dim: int
    system: str | None

    @property
    def log_q_kind(self) -> str:
        """How log q is obtained (a value of :data:`LOG_Q_KINDS`)."""
        ...

    @property
    def uses_steps(self) -> bool:
        """Whether ``steps`` selects the model's discretisation (False: one pass, or the
        teacher's own ODE settings)."""
        ...

    def sample(
        self, n: int, *, steps: int | None = None, seed: int = 0, batch_size: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(x (n, dim), log_q (n,))``."""
        ...

    def sample_with_stats(
        self, n: int, *, steps: int | None = None, seed: int = 0, batch_size: int | None = None
    ) -> FlowOutput:
        """Samples, log q and cost."""
        ...

    def log_prob(
        self, x: Tensor, *, steps: int | None = None, batch_size: int | None = None
    ) -> Tensor:
        """``(N,)`` log q of ``(N, dim)`` points."""
        ...

    def save(self, path: str | os.PathLike[str]) -> Any:
        """Write the model to one checkpoint file."""
        ...


def check_count(n: Any, what: str = "n") -> int:
    """``n`` as a positive int, else a :class:`ValueError` naming ``what``."""
    return positive_int(n, what)


def check_steps(steps: Any) -> int | None:
    """``None`` (the model's default) or a positive step count."""
    return None if steps is None else check_count(steps, "steps")


def check_batch_size(batch_size: Any) -> int | None:
    """``None`` (the model's default) or a positive batch size."""
    return None if batch_size is None else check_count(batch_size, "batch_size")


def check_skip(skip: Any, n: int) -> int:
    """``skip`` (rows of a draw of ``n`` already done) as an int in ``[0, n]``."""
    if isinstance(skip, bool) or int(skip) != skip or not 0 <= skip <= n:
        raise ValueError(f"skip must be an int in [0, n = {n}], got {skip!r}")
    return int(skip)


def system_name(system: Any) -> str | None:
    """The name of ``system``: None, a name, or anything with a ``name`` string attribute."""
    if system is None or isinstance(system, str):
        return system
    name = getattr(system, "name", None)
    if isinstance(name, str):
        return name
    raise TypeError(f"system must be a name or a System, got {type(system).__name__}")


def check_trained_for(
    path: Any, label: str, trained_for: str | None, system: Any, model_dim: int
) -> None:
    """Refuse a model trained for another system than ``system`` (name or System), or whose
    dimension differs from the system's.

    Raises:
        ValueError: naming the checkpoint, the system it was trained for and the one asked for.
    """
    wanted = system_name(system)
    if wanted is not None and trained_for is not None and wanted != trained_for:
        raise ValueError(
            f"{path}: this {label} was trained for system {trained_for!r}, not {wanted!r}"
        )
    dim = getattr(system, "dim", None)
    if dim is not None and int(dim) != model_dim:
        raise ValueError(f"{path}: {label} has dim {model_dim}, system {wanted!r} has dim {dim}")


class SamplingMixin:
    """``sample`` and ``sample_with_stats`` from a model's ``iter_samples``."""

    def sample_with_stats(
        self,
        n: int,
        *,
        steps: int | None = None,
        seed: int = 0,
        batch_size: int | None = None,
        progress: bool = False,
        **settings: Any,
    ) -> FlowOutput:
        """Draw ``n`` samples with log q and report the cost (see ``iter_samples``).

        Returns:
            :class:`FlowOutput` with ``x (n, dim)`` and ``log_q (n,)`` in the model's dtype.
        """
        batches = self.iter_samples(  # type: ignore[attr-defined]
            n, steps=steps, seed=seed, batch_size=batch_size, progress=progress, **settings
        )
        return FlowOutput.concat(list(batches))

    def sample(
        self,
        n: int,
        *,
        steps: int | None = None,
        seed: int = 0,
        batch_size: int | None = None,
        **settings: Any,
    ) -> tuple[Tensor, Tensor]:
        """``(x (n, dim), log_q (n,))``: the same seed gives the same samples."""
        out = self.sample_with_stats(n, steps=steps, seed=seed, batch_size=batch_size, **settings)
        return out.x, out.log_q
