"""Minibatches built ahead of the optimiser, in background processes.

A loss that can build its minibatch from the step number alone (``make_batch(step)``, seeded by
:func:`step_generator`) lets the training loop move that work to other CPU cores: with equivariant
OT couplings the assignment problems cost as much as the network's forward and backward pass.
Because each batch depends only on ``(seed, step)``, the result is the same for any number of
workers and a resumed run continues with exactly the batches an uninterrupted one would use.

Workers are ``torch.utils.data.DataLoader`` processes (one torch thread each); they stop when the
iterator is closed, when the training loop raises, and when the parent process dies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["step_batches", "step_generator"]

#: batches each worker keeps ready
PREFETCH_PER_WORKER = 8


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator for one training step, independent across ``(seed, step)`` pairs
    (the pair is hashed by numpy's ``SeedSequence``)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    state = np.random.SeedSequence([int(seed) % 2**63, int(step)]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


class _Steps(Dataset):
    def __init__(self, make_batch: Callable[[int], Any], start: int, end: int) -> None:
        self.make_batch, self.start, self.end = make_batch, start, end

    def __len__(self) -> int:
        return self.end - self.start

    def __getitem__(self, i: int) -> Any:
        return self.make_batch(self.start + i)


@contextmanager
def step_batches(
    make_batch: Callable[[int], Any], start: int, end: int, workers: int = 0
) -> Iterator[Iterator[Any]]:
    """Iterate over ``make_batch(step)`` for ``step = start, ..., end - 1`` in order.

    Args:
        make_batch: builds the minibatch of one step (pure in ``step``; picklable when
            ``workers > 0``, since the workers may be spawned).
        start, end: the step range.
        workers: background processes (0: build each batch in the loop when it is needed).

    Yields:
        an iterator over the batches; leaving the ``with`` block stops the workers.
    """
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if workers == 0 or end <= start:
        yield (make_batch(step) for step in range(start, end))
        return
    loader = DataLoader(
        _Steps(make_batch, start, end),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=PREFETCH_PER_WORKER,
    )
    batches = iter(loader)
    try:
        yield batches
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
