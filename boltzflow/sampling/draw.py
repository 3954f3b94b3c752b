"""The one sampling path: draw from any model in batches, weight against a system, store.

Every caller that turns a model into weighted samples (``boltzflow sample``, the workflow's
sampling stages, the benchmark, the teacher evaluation) goes through :func:`iter_draws` (batch
by batch, for streaming into a file) or :func:`draw_samples` (all at once), and writes with
:func:`write_draws`. A model is anything with the protocol of :mod:`boltzflow.models.protocol`
(``iter_samples(n, *, steps, seed, batch_size, progress) -> FlowOutput`` batches).

Per batch: x and log q (and any extra per-sample columns of the model, such as
``log_q_internal``, stored under ``columns/`` in the sample file) come back as float64 on the
CPU, u(x) = U(x)/kT is evaluated without gradients, and log w = -u - log q
(:func:`boltzflow.sampling.weights.log_weights`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from boltzflow.io.atomic import atomic_path
from boltzflow.io.samples import SampleWriter
from boltzflow.models.protocol import FlowOutput
from boltzflow.progress import Progress
from boltzflow.sampling.results import WeightedSamples
from boltzflow.sampling.weights import log_weights
from boltzflow.systems.base import compute_energies

__all__ = [
    "Draw",
    "DrawBatch",
    "SampleCost",
    "cost_of",
    "draw_samples",
    "iter_draws",
    "write_draws",
]


@dataclass(frozen=True)
class SampleCost:
    """What drawing ``n`` samples with log q cost.

    Attributes:
        n: number of samples.
        nfe_per_sample: network evaluations per sample (mean over batches; each is batched).
        seconds: wall time of the model's work (energies excluded).
        cpu_seconds: CPU time of the model's work (NaN where not measured).
        trace_evals: batched Jacobian-trace evaluations (ODE models).
    """

    n: int
    nfe_per_sample: float
    seconds: float
    cpu_seconds: float
    trace_evals: int

    @classmethod
    def of(cls, out: FlowOutput) -> SampleCost:
        """The cost recorded in a (concatenated) :class:`FlowOutput`."""
        return cls(len(out.x), out.nfe_per_batch, out.seconds, out.cpu_seconds, out.trace_evals)

    @property
    def seconds_per_1000(self) -> float:
        """Wall time per 1,000 samples."""
        return 1000.0 * self.seconds / max(self.n, 1)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (with ``seconds_per_1000``)."""
        return {**asdict(self), "seconds_per_1000": self.seconds_per_1000}


@dataclass(frozen=True)
class DrawBatch:
    """One batch of draws: the model's output (float64, CPU) and, with a system, u and log w."""

    out: FlowOutput
    u: Tensor | None = None
    log_w: Tensor | None = None


@dataclass(frozen=True)
class Draw:
    """``n`` weighted samples of a model and what they cost."""

    samples: WeightedSamples
    cost: SampleCost

    @classmethod
    def from_batches(cls, batches: list[DrawBatch]) -> Draw:
        """Join batches that all carry energies (raises ``ValueError`` otherwise)."""
        if any(b.u is None for b in batches):
            raise ValueError("draws without a system have no weights")
        out = FlowOutput.concat([b.out for b in batches])
        u = torch.cat([b.u for b in batches])  # type: ignore[misc]
        log_w = torch.cat([b.log_w for b in batches])  # type: ignore[misc]
        return cls(WeightedSamples(out.x, out.log_q, u, log_w), SampleCost.of(out))


def cost_of(batches: list[DrawBatch]) -> SampleCost:
    """The cost of drawing ``batches`` (summed over them)."""
    return SampleCost.of(FlowOutput.concat([b.out for b in batches]))


def iter_draws(
    model: Any,
    n: int,
    *,
    system: Any = None,
    steps: int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    progress: bool = False,
    skip: int = 0,
    **settings: Any,
) -> Iterator[DrawBatch]:
    """Draw ``n`` samples of ``model`` batch by batch, with energies and log weights.

    Args:
        model: any model of the protocol (teacher, student, baseline).
        n: number of samples.
        system: the target (``energy(x) -> u`` in kT); None: no u and no log w.
        steps: the model's steps (None: its default).
        seed: the model's sampling seed; the same seed gives the same samples.
        batch_size: rows per batch (None: the model's default).
        progress: show progress over the ``n`` samples (a bar on a terminal, periodic lines
            otherwise); the model's own bar stays off.
        skip: yield only rows ``skip`` on of the ``n`` (to resume a draw; the same rows as
            without it, the ODE teacher's Hutchinson probes aside).
        **settings: further model settings (the teacher's ODE options).

    Yields:
        :class:`DrawBatch` per batch, x ``(B, dim)`` and log q ``(B,)`` as float64 on the CPU.
    """
    if skip:
        settings["skip"] = skip
    batches = model.iter_samples(
        n, steps=steps, seed=seed, batch_size=batch_size, progress=False, **settings
    )
    with Progress(n, initial=skip, desc="sample", unit="sample", enabled=progress) as bar:
        for out in batches:
            x = out.x.detach().cpu().double()
            log_q = out.log_q.detach().cpu().double()
            columns = {k: v.detach().cpu().double() for k, v in out.columns.items()}
            out = FlowOutput(
                x,
                log_q,
                out.nfe,
                out.nfe_per_batch,
                out.trace_evals,
                out.seconds,
                out.cpu_seconds,
                columns,
            )
            if system is None:
                batch = DrawBatch(out)
            else:
                u = compute_energies(system, x)
                batch = DrawBatch(out, u, log_weights(u, log_q))
            bar.update(len(x))
            yield batch


def draw_samples(model: Any, n: int, *, system: Any, **options: Any) -> Draw:
    """All ``n`` weighted samples at once; ``options`` as in :func:`iter_draws`."""
    return Draw.from_batches(list(iter_draws(model, n, system=system, **options)))


def write_draws(
    path: str | os.PathLike[str],
    batches: Iterable[DrawBatch],
    *,
    dim: int,
    provenance: dict[str, Any],
    atomic: bool = True,
    n_planned: int | None = None,
    append: bool = False,
) -> list[DrawBatch]:
    """Write draws to an HDF5 sample store (:class:`~boltzflow.io.samples.SampleWriter`).

    Args:
        path: the ``.h5`` file (replaced if present).
        batches: the draws (e.g. :func:`iter_draws`), written as they come.
        dim: coordinates per sample.
        provenance: JSON-able description of the samples (model, system, seed, settings).
        atomic: write to a temporary file renamed on success (nothing is left on failure);
            False streams into ``path`` itself, keeping every completed batch if interrupted
            (the file is then marked partial, see :func:`~boltzflow.io.samples.read_samples`).
        n_planned: rows asked for (recorded; reported when the file is partial).
        append: continue the store at ``path`` (not atomic; its provenance is kept, see
            :class:`~boltzflow.io.samples.SampleWriter` mode ``"a"``).

    Returns:
        the batches written (for ESS, cost and further analysis).
    """
    done: list[DrawBatch] = []

    def write(target: str | os.PathLike[str]) -> None:
        mode = "a" if append else "w"
        with SampleWriter(
            target, dim=dim, provenance=provenance, n_planned=n_planned, mode=mode
        ) as writer:
            for batch in batches:
                out = batch.out
                cols: dict[str, Any] = {"log_q": out.log_q}
                if batch.u is not None:
                    cols.update(u=batch.u, log_w=batch.log_w)
                cols.update(out.columns)  # the model's extra columns (e.g. log_q_internal)
                # network evaluations of the batch that produced the row
                nfe = float(out.nfe_per_batch)
                cols["nfe"] = torch.full((len(out.x),), nfe, dtype=torch.float64)
                writer.append(out.x, **cols)
                done.append(batch)

    if append and atomic:
        raise ValueError("append continues a store in place; it cannot be atomic")
    if atomic:
        with atomic_path(path, suffix=".h5") as tmp:
            write(tmp)
    else:
        write(path)
    return done
