"""``boltzflow.distributed`` in one process: a no-op that changes nothing; the helpers' rules."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from dist_helpers import spawn_ranks

from boltzflow import distributed
from boltzflow.distributed import rank_seed, shard_range, split_sizes


@pytest.fixture
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def test_single_process_is_a_no_op(no_launcher: None) -> None:
    with distributed.session() as me:
        assert not me.distributed and me.is_main and me.tag() == ""
        assert not dist.is_initialized()  # nothing was initialised
        a = np.arange(6.0).reshape(3, 2)
        assert distributed.all_gather_concat(a) is not None
        np.testing.assert_array_equal(distributed.all_gather_concat(a), a)
        assert distributed.all_gather_objects("x") == ["x"]
        assert distributed.broadcast_object(5) == 5
        assert distributed.run_on_all(lambda: 7) == 7
        distributed.barrier()
        count = torch.tensor(3)
        assert distributed.sum_over_ranks(count) is count
        distributed.single_process_only("this", "no reason")  # one process: no error
        with pytest.raises(ValueError, match=r"^bad$"):
            distributed.collective_check("bad")


def test_launcher_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert distributed.launched() == distributed.DistInfo(2, 4, 0, None)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK in"):
        distributed.launched()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not distributed.launched().distributed


def test_timeout_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.timeout_s() == distributed.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "12.5")
    assert distributed.timeout_s() == 12.5
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "0")
    with pytest.raises(ValueError, match="positive number of seconds"):
        distributed.timeout_s()


def test_shard_ranges_cover_the_rows_once() -> None:
    for n in (0, 1, 7, 10, 1001):
        for k in (1, 2, 3, 8):
            ranges = [shard_range(n, r, k) for r in range(k)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
            sizes = split_sizes(n, k)
            assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n
    with pytest.raises(ValueError):
        shard_range(5, 2, 2)


def test_rank_seeds() -> None:
    assert rank_seed(11, 0, 1) == 11  # one process keeps its seed: results do not change
    seeds = [rank_seed(11, r, 8) for r in range(8)]
    assert len(set(seeds)) == 8 and all(0 <= s < 2**62 for s in seeds)
    assert rank_seed(11, 3, 4) == rank_seed(11, 3, 8)  # rank r's stream does not depend on K
    assert rank_seed(12, 3, 4) != rank_seed(11, 3, 4)


def _collectives(rank: int, out_dir: str) -> None:
    import time

    found: dict[str, object] = {}
    parts = distributed.all_gather_arrays(np.arange(rank * 3) > 1)  # uneven rows, bool
    found["parts"] = [p.tolist() for p in parts]
    found["sum"] = int(distributed.sum_over_ranks(torch.tensor(rank + 1)))
    try:
        distributed.single_process_only("this step", "it cannot be split")
    except ValueError as err:
        found["single"] = str(err)

    def read() -> int:
        if rank == 1:
            raise FileNotFoundError("no such shard: s.rank1-of-2.h5")
        return 1

    try:
        distributed.run_on_all(read)
    except (ValueError, OSError) as err:
        found["error"] = f"{type(err).__name__}: {err}"
    # a rank that stops answering: the other's collective raises after the timeout (2 s)
    done = Path(out_dir, "rank0-done")
    if rank == 1:  # alive, but never joins; waits for rank 0 to give up (at most a minute)
        deadline = time.monotonic() + 60
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    else:
        start = time.monotonic()
        try:
            distributed.barrier()
        except RuntimeError as err:
            found["timeout"] = (time.monotonic() - start, distributed.is_communication_error(err))
        done.touch()
    Path(out_dir, f"{rank}.json").write_text(json.dumps(found))


@pytest.mark.timeout(120)
def test_collectives_errors_and_timeout_on_two_ranks(tmp_path: Path) -> None:
    spawn_ranks(_collectives, str(tmp_path), dist_timeout="2")
    zero, one = (json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2))
    assert zero["parts"] == one["parts"] == [[], [False, False, True]]
    assert zero["sum"] == one["sum"] == 3
    refusal = "this step does not run under torchrun (2 ranks): it cannot be split; run it as "
    assert zero["single"] == one["single"] == refusal + "one process (without torchrun)"
    assert one["error"] == "FileNotFoundError: no such shard: s.rank1-of-2.h5"
    assert zero["error"] == "ValueError: rank 1 of 2: no such shard: s.rank1-of-2.h5"
    seconds, recognised = zero["timeout"]
    assert 1.5 < seconds < 30 and recognised  # 2 s, plus whatever a busy machine adds
