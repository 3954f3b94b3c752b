"""Export molecular samples as trajectories with mdtraj (.h5, .dcd, .pdb), optionally resampled.

Positions are in nm (boltzflow's convention, and mdtraj's). Files are written atomically
(temporary file + rename). mdtraj's ``.h5`` format needs PyTables (``pip install tables``), also to
read it back; ``.dcd`` (coordinates only; pair it with a ``.pdb`` topology) and ``.pdb`` need
nothing extra.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from boltzflow.io.atomic import atomic_path
from boltzflow.sampling.resampling import resample_indices

__all__ = ["TRAJECTORY_FORMATS", "export_trajectory", "load_topology"]

#: Suffixes :func:`export_trajectory` writes.
TRAJECTORY_FORMATS = (".h5", ".dcd", ".pdb")


def load_topology(source: Any) -> Any:
    """An ``mdtraj.Topology`` from a topology, a structure file path, or a system.

    Args:
        source: an ``mdtraj.Topology``; an OpenMM topology; a path to a PDB (or any structure
            file mdtraj reads); or an object with an ``mdtraj_topology`` attribute (e.g.
            :class:`boltzflow.systems.molecular.MolecularSystem`).
    """
    import mdtraj

    if isinstance(source, mdtraj.Topology):
        return source
    if hasattr(source, "mdtraj_topology"):
        return source.mdtraj_topology
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"topology file not found: {path}")
        return mdtraj.load_topology(str(path))
    if hasattr(source, "atoms") and hasattr(source, "getNumAtoms"):  # openmm.app.Topology
        return mdtraj.Topology.from_openmm(source)
    raise TypeError(f"cannot make an mdtraj topology from {type(source).__name__}")


def export_trajectory(
    path: str | os.PathLike[str],
    x: Any,
    topology: Any,
    *,
    log_w: Any = None,
    n_resample: int | None = None,
    method: str = "systematic",
    seed: int = 0,
) -> Path:
    """Write samples as a trajectory, one frame per sample (or per resampled sample).

    Args:
        path: output file; its suffix picks the format (one of :data:`TRAJECTORY_FORMATS`).
        x: ``(N, 3 * n_atoms)`` positions in nm.
        topology: anything :func:`load_topology` accepts.
        log_w: ``(N,)`` log weights; with ``n_resample`` the frames are drawn by weight.
        n_resample: number of frames to resample (needs ``log_w``); None writes all N samples.
        method: resampling scheme (``"systematic"`` or ``"multinomial"``).
        seed: resampling seed.

    Returns:
        The path written.

    Raises:
        ValueError: unknown suffix, shape mismatch with the topology, or ``n_resample`` without
            ``log_w``.
        ImportError: ``.h5`` without PyTables.
    """
    import mdtraj

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in TRAJECTORY_FORMATS:
        raise ValueError(f"unknown trajectory format {suffix!r}; choose from {TRAJECTORY_FORMATS}")
    if suffix == ".h5":
        try:
            import tables  # noqa: F401  (mdtraj's HDF5 writer needs it)
        except ImportError as err:
            raise ImportError(
                "mdtraj's .h5 format needs PyTables: pip install tables (or export .dcd/.pdb)"
            ) from err
    top = load_topology(topology)
    pos = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if pos.ndim != 2 or pos.shape[1] != 3 * top.n_atoms:
        raise ValueError(
            f"x must be (N, {3 * top.n_atoms}) for a topology of {top.n_atoms} atoms, "
            f"got shape {pos.shape}"
        )
    if n_resample is not None:
        if log_w is None:
            raise ValueError("n_resample needs log_w (weights to resample by)")
        idx = resample_indices(torch.as_tensor(log_w), n_resample, method=method, seed=seed)
        pos = pos[idx.numpy()]
    elif log_w is not None and np.shape(log_w) != (pos.shape[0],):
        raise ValueError(f"log_w must have shape ({pos.shape[0]},), got {np.shape(log_w)}")
    traj = mdtraj.Trajectory(pos.reshape(-1, top.n_atoms, 3).astype(np.float32), top)
    with atomic_path(path, suffix=suffix) as tmp:
        traj.save(str(tmp), force_overwrite=True)
    return path
