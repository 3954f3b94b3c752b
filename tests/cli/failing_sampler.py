"""``boltzflow sample`` in which rank 1 fails after two batches (run by torchrun in tests).

    python -m torch.distributed.run --nproc_per_node=2 failing_sampler.py raise|kill MODEL OUT

Rank 1's model raises ``ValueError("injected failure")`` (``raise``) or kills its own process
with SIGKILL (``kill``) when asked for its third batch, once rank 0 has written a batch; rank 0
samples slowly on, so it is still working when the launcher stops it.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

BATCH = 25


def _wait_for_rows(out: str, timeout: float = 30.0) -> None:
    """Wait until rank 0's shard holds a completed chunk (so that there is one to check)."""
    from boltzflow.io.samples import read_samples
    from boltzflow.io.shards import shard_path

    path, deadline = shard_path(out, 0, 2), time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if read_samples(path, allow_partial=True).n > 0:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)


def main() -> int:
    how, model, out = sys.argv[1:4]
    from boltzflow.cli import main as cli
    from boltzflow.flows.cnf import TeacherCNF

    rank = int(os.environ["RANK"])
    original = TeacherCNF.iter_samples

    def iter_samples(self: Any, n: int, **kw: Any) -> Iterator[Any]:
        for i, batch in enumerate(original(self, n, **kw)):
            if rank == 1 and i == 2:
                _wait_for_rows(out)
                if how == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise ValueError("injected failure")
            if rank == 0 and i > 0:
                time.sleep(0.5)
            yield batch

    TeacherCNF.iter_samples = iter_samples  # type: ignore[method-assign]
    argv = ["sample", model, "-n", "2000", "-o", out, "--batch-size", str(BATCH)]
    return cli(argv)


if __name__ == "__main__":
    sys.exit(main())
