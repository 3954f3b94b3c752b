"""Reference data: HDF5 datasets with provenance and checksums, MCMC and MD generators.

* :mod:`boltzflow.data.store`: :func:`write_dataset`, :func:`read_dataset`, :func:`load_positions`.
* :mod:`boltzflow.data.mcmc`: batched MALA, HMC and parallel tempering for analytic systems.
* :mod:`boltzflow.data.md`: OpenMM Langevin MD (:func:`run_md`, imported on first use so that
  ``import boltzflow.data`` does not import OpenMM).
* :mod:`boltzflow.data.generate`: :func:`generate` picks the method per system.
"""

from __future__ import annotations

from typing import Any

from boltzflow.data.generate import generate
from boltzflow.data.mcmc import MCMCResult, hmc, mala, parallel_tempering, run_chains
from boltzflow.data.store import Dataset, load_positions, read_dataset, write_dataset

__all__ = [
    "Dataset",
    "MCMCResult",
    "generate",
    "hmc",
    "load_positions",
    "mala",
    "parallel_tempering",
    "read_dataset",
    "run_chains",
    "run_md",
    "write_dataset",
]


def __getattr__(name: str) -> Any:
    if name == "run_md":
        from boltzflow.data.md import run_md

        return run_md
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
