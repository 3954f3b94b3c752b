"""A tiny internal-coordinate ALDP setup for fast tests of internal-coordinate models.

Frames are synthetic (no MD): the shared PDB structure with small noise on bonds (0.002 nm),
angles (0.03 rad) and most dihedrals (0.1 rad), and uniform angles on the dihedrals of
:data:`BROAD`. The transform fitted to them with ``standardize_dihedrals = 0.5`` (the setting of
``workflows/configs/teacher_aldp_internal.toml``) therefore keeps those 7 dihedrals periodic and
standardises the other 12, as the production transform does with ALDP's narrow dihedrals.
Needs OpenMM (the Z-matrix from the PDB's bond graph, and energies for sampling commands).
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import torch

from boltzflow.flows.cnf import TeacherCNF
from boltzflow.systems.internal_coords import InternalCoordinates
from boltzflow.systems.zmatrix import ZMatrix

F64 = torch.float64
SYSTEM = "aldp"
#: dihedral indices (0..18) drawn uniformly: they stay on the circle after the fit
BROAD = (0, 2, 5, 8, 11, 14, 17)
TEACHER_CONFIG = (
    Path(__file__).resolve().parents[1] / "workflows" / "configs" / "teacher_aldp_internal.toml"
)


@lru_cache(maxsize=1)
def aldp_zmatrix() -> ZMatrix:
    """ALDP's Z-matrix from the bond graph of its PDB (as the internal teacher's run builds)."""
    from boltzflow.train.teacher import system_zmatrix

    return system_zmatrix(SYSTEM)


def aldp_frames(n: int = 256, seed: int = 0) -> torch.Tensor:
    """``(n, 66)`` float64 Cartesian frames (nm) around the PDB structure (module docstring)."""
    from openmm import app, unit

    from boltzflow.systems.registry import BUILTIN_DIR

    zm = aldp_zmatrix()
    pdb = app.PDBFile(str(BUILTIN_DIR / "aldp" / "alanine-dipeptide.pdb"))
    x0 = torch.tensor(pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer), dtype=F64)
    ic0 = InternalCoordinates(zm, periodic=True)  # identity normalisation: raw r, theta, phi
    z0, _ = ic0(x0.reshape(1, -1))
    gen = torch.Generator().manual_seed(seed)
    z = z0.repeat(n, 1)
    noise = torch.randn(z.shape, generator=gen, dtype=F64)
    z[:, ic0.bond_slice] += 0.002 * noise[:, ic0.bond_slice]
    z[:, ic0.angle_slice] += 0.03 * noise[:, ic0.angle_slice]
    z[:, ic0.dihedral_slice] += 0.1 * noise[:, ic0.dihedral_slice]
    first = ic0.dihedral_slice.start
    for k in BROAD:
        z[:, first + k] = (2 * torch.rand(n, generator=gen, dtype=F64) - 1) * math.pi
    x, _ = ic0.inverse(z)
    return x


@lru_cache(maxsize=1)
def _fitted() -> dict:
    ic = InternalCoordinates.fit(
        aldp_zmatrix(), aldp_frames(), periodic=True, standardize_dihedrals=0.5
    )
    return ic.to_dict()


def aldp_transform() -> InternalCoordinates:
    """The transform fitted to :func:`aldp_frames` (a fresh copy each call)."""
    return InternalCoordinates.from_dict(_fitted())


def untrained_teacher(*, hidden: int = 8, layers: int = 1, seed: int = 0) -> TeacherCNF:
    """An internal-coordinate teacher (TorusMLP ``layers x hidden``, untrained: zero output
    layer) on :func:`aldp_transform`, system ``"aldp"``, tight float32 ODE settings."""
    torch.manual_seed(seed)
    teacher = TeacherCNF.build(
        "mlp",
        dim=66,
        backbone_options={"hidden": hidden, "layers": layers},
        sampling={"atol": 1e-6, "rtol": 1e-6, "batch_size": 16},
        transform=aldp_transform(),
    )
    teacher.system = SYSTEM
    return teacher


def trained_teacher(out_dir: Path, *, steps: int = 40) -> TeacherCNF:
    """The teacher config's ``smoke`` model (TorusMLP 2 x 32) trained ``steps`` flow-matching
    steps on :func:`aldp_frames` (about a second), written to ``out_dir/teacher.pt``."""
    from boltzflow.train.config import load_teacher_config
    from boltzflow.train.teacher import SystemShape, train_teacher

    cfg = load_teacher_config(TEACHER_CONFIG, "smoke")
    cfg.train.steps, cfg.train.batch_size, cfg.train.lr = steps, 64, 3e-3
    cfg.train.ema_decay = 0.0  # the trained weights themselves
    cfg.train.log_every, cfg.train.checkpoint_every = steps, steps
    return train_teacher(
        cfg,
        aldp_frames().float(),
        out_dir,
        SystemShape.from_name(SYSTEM),
        progress=False,
        zmatrix=aldp_zmatrix(),
        run_info={"system": SYSTEM},
    )
