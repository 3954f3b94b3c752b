"""Estimators over samples spread across 2 gloo processes equal one process on the union.

Each rank holds a contiguous part of one fixed sample set (uneven parts, and a rank with no
sample at all); :class:`ProcessGroupReduction` combines them. log Z, the Kish ESS, ΔF, an
observable and a free-energy profile, with delta and bootstrap intervals, must equal the
single-process estimators on the union to 1e-10 (relative; the only differences are the orders
of floating-point sums). An invalid input on one rank raises on both, naming it.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
from dist_helpers import spawn_ranks

from boltzflow.distributed import shard_range
from boltzflow.sampling.estimators import (
    free_energy_difference,
    free_energy_profile,
    log_partition,
    snis_expectation,
)
from boltzflow.sampling.reduction import LOCAL, ProcessGroupReduction, Reduction

N = 2001
B = 40  # bootstrap replicates


def _union() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    lw = rng.normal(0.0, 3.0, N) - 40.0  # heavy tail, far from 0 (as log w of real runs)
    lw[rng.random(N) < 0.02] = -np.inf  # zero-weight samples
    phi = rng.uniform(-math.pi, math.pi, N)
    return {"lw": lw, "f": rng.normal(size=N), "phi": phi, "a": (phi > 0) & (phi < 2)}


def _estimates(d: dict[str, np.ndarray], red: Reduction) -> dict[str, object]:
    lw, f, a, phi = d["lw"], d["f"], d["a"], d["phi"]
    out: dict[str, object] = {"ess": red.kish_ess(lw)}
    for m in ("delta", "bootstrap"):
        kw = {"method": m, "n_bootstrap": B, "seed": 3, "reduction": red}
        out[f"logz {m}"] = log_partition(lw, **kw)
        out[f"mean {m}"] = snis_expectation(f, lw, **kw)
        out[f"dF {m}"] = free_energy_difference(a, ~a, lw, **kw)
        prof = free_energy_profile(phi, lw, bins=12, **kw)
        out[f"profile {m}"] = (prof.free_energy, prof.ci_low, prof.ci_high, prof.stderr, prof.n)
    return out


def _worker(rank: int, out_dir: str) -> None:
    union, red = _union(), ProcessGroupReduction()
    results = {}
    lo, hi = shard_range(N, rank, 2)  # 1001 / 1000 rows
    results["split"] = _estimates({k: v[lo:hi] for k, v in union.items()}, red)
    cut = (0, N) if rank == 0 else (N, N)  # rank 1 holds no sample
    results["empty rank"] = _estimates({k: v[cut[0] : cut[1]] for k, v in union.items()}, red)
    lw = union["lw"][lo:hi].copy()
    if rank == 1:
        lw[5] = np.inf
    try:
        log_partition(lw, reduction=red)
    except ValueError as err:
        results["error"] = str(err)
    Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(results))


def _close(a: object, b: object, path: str) -> None:
    if hasattr(a, "to_dict"):
        a, b = a.to_dict(), b.to_dict()
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (tuple, list)):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, (float, np.ndarray)):
        x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        same_inf = (x == y) | (np.isnan(x) & np.isnan(y))
        err = np.where(same_inf, 0.0, np.abs(x - y) / np.maximum(1.0, np.abs(y)))
        assert np.all(err <= 1e-10), f"{path}: {x} vs {y} (max rel diff {np.max(err):.2e})"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


@pytest.mark.timeout(120)
def test_two_ranks_equal_one_process_on_the_union(tmp_path: Path) -> None:
    spawn_ranks(_worker, str(tmp_path))
    single = _estimates(_union(), LOCAL)
    ranks = [pickle.loads((tmp_path / f"rank{r}.pkl").read_bytes()) for r in range(2)]
    for rank, res in enumerate(ranks):
        for case in ("split", "empty rank"):
            _close(res[case], single, f"rank {rank} {case}")
        assert "rank 1 of 2" in res["error"] and "+inf" in res["error"]
    assert single["logz delta"].n == N and single["ess"] < N
