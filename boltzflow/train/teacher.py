"""Train a teacher CNF by (equivariant-OT) flow matching on a data set of configurations.

One step: draw a data minibatch x1 (and, for non-equivariant particle backbones, rotate it by
random rotations), draw prior samples x0, re-pair them by the configured coupling, and regress the
velocity on x1 - x0 at a uniform random time (:mod:`boltzflow.flows.flow_matching`). All of it
draws from a generator seeded by (seed, step), so runs reproduce and resume exactly, and the
batches can be built ahead in background processes (``train.data_workers``).

With ``model.representation = "internal"`` the run first fits an
:class:`~boltzflow.systems.internal_coords.InternalCoordinates` transform (periodic dihedrals) to
the training data and trains on z: prior samples from the torus Gaussian, the coupling
``independent`` or ``ot`` (minibatch OT with the wrapped distance on the dihedrals; no rotation
augmentation, z is invariant), and the geodesic interpolant on the dihedrals (Chen & Lipman 2023,
arXiv:2302.03660; :func:`boltzflow.flows.flow_matching.interpolate`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from boltzflow.flows.cnf import MODEL_FILE, TeacherCNF
from boltzflow.flows.coupling import CouplingFlow, check_fits_internal
from boltzflow.flows.flow_matching import (
    couple,
    flow_matching_loss,
    interpolant_draws,
    random_rotations,
    rotate,
)
from boltzflow.io.checkpoint import load_model_checkpoint
from boltzflow.models.protocol import check_trained_for
from boltzflow.systems.internal_coords import InternalCoordinates
from boltzflow.systems.particles import remove_mean
from boltzflow.systems.zmatrix import ZMatrix
from boltzflow.train.config import SampleConfig, TeacherConfig
from boltzflow.train.fit import fit_and_export
from boltzflow.train.prefetch import step_generator

__all__ = [
    "SystemShape",
    "TeacherLoss",
    "basin_weights",
    "build_teacher",
    "load_base_nf",
    "start_from",
    "system_zmatrix",
    "train_teacher",
]

#: files of an NF run folder, in the order :func:`load_base_nf` tries them
_NF_FILES = ("student.pt", "checkpoint.pt")
#: training frames mapped to the flow's coordinates at a time (base-flow memory)
_ENCODE_CHUNK = 10_000


@dataclass(frozen=True)
class SystemShape:
    """What the teacher needs to know about a system: its dimension and particle structure."""

    dim: int
    n_particles: int | None = None
    spatial_dim: int | None = None
    mean_free: bool = False

    @classmethod
    def of(cls, system: Any) -> SystemShape:
        """From a :class:`~boltzflow.systems.base.System` or :class:`SystemInfo`."""
        info = getattr(system, "info", system)
        return cls(info.dim, info.n_particles, info.spatial_dim, bool(info.mean_free))

    @classmethod
    def from_name(cls, name: str) -> SystemShape:
        """From a registered system's definition file (does not build the system)."""
        from boltzflow.systems.registry import system_info

        return cls.of(system_info(name))


def _sampling(cfg: SampleConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def system_zmatrix(name: str) -> ZMatrix:
    """The Z-matrix of a registered molecular system, from the bond graph of its structure file
    (:func:`~boltzflow.systems.zmatrix.zmatrix_from_topology`).

    Raises:
        ValueError: the system has no ``structure`` (PDB) parameter.
    """
    from openmm import app

    from boltzflow.systems.registry import definition, definition_file
    from boltzflow.systems.zmatrix import zmatrix_from_topology

    structure = definition(name)["parameters"].get("structure")
    if structure is None:
        raise ValueError(f"system {name!r} has no structure file: no Z-matrix for it")
    pdb = app.PDBFile(str(definition_file(name).parent / structure))
    return zmatrix_from_topology(pdb.topology)


def load_base_nf(
    path: str | os.PathLike[str], system: str | None
) -> tuple[InternalCoordinates, CouplingFlow]:
    """The transform and flow of a trained ``nf_internal`` model (file or run folder) for a
    teacher's NF base (``model.base_nf``). Read from the checkpoint directly (the model class
    lives in :mod:`boltzflow.distill`, which builds on this package).

    Raises:
        FileNotFoundError: nothing loadable at ``path``.
        ValueError: another kind of model, or one trained for another system.
    """
    path, payload, state = load_model_checkpoint(
        path, kind="student", files=_NF_FILES, label="base NF", weights="ema", map_location="cpu"
    )
    kind = payload.get("student_kind")
    if kind != "nf_internal":
        raise ValueError(f"model.base_nf {path}: a {kind!r} model, not an 'nf_internal' one")
    config = payload["model_config"]
    ic = InternalCoordinates.from_dict(config["internal_coordinates"])
    check_trained_for(path, "base NF", payload.get("system"), system, 3 * ic.n_atoms)
    flow = CouplingFlow(**config["flow"])
    check_fits_internal(flow, ic, "base NF")
    flow.load_state_dict({k[len("flow.") :]: v for k, v in state.items() if k.startswith("flow.")})
    return ic, flow


def basin_weights(system: str, data: Tensor, delta_f: float) -> tuple[Tensor, dict[str, Any]]:
    """Frame-drawing probabilities that give the positive-φ basin the Boltzmann share
    ``1 / (1 + e^delta_f)`` (``data.basin_free_energy``, :class:`~boltzflow.train.config.
    DataConfig`), uniform within each side.

    Args:
        system: a registered molecule with backbone dihedrals (φ from its atoms).
        data: ``(N, 3n)`` Cartesian frames (nm).
        delta_f: ΔF(0 < φ < 2 vs the rest) in kT.

    Returns:
        ``(N,)`` float64 probabilities summing to 1, and a JSON-able summary for the run record.

    Raises:
        ValueError: a system without backbone dihedrals, or a side of the basin with no frame.
    """
    from boltzflow.analysis.free_energy import backbone_angles
    from boltzflow.data.seeded_md import POSITIVE_PHI_BASIN, in_positive_basin
    from boltzflow.systems.registry import load_system

    angles = backbone_angles(load_system(system), data.double())
    if angles is None:
        raise ValueError(f"data.basin_free_energy needs a molecule with φ; {system!r} has none")
    inside = torch.as_tensor(in_positive_basin(angles[0]))
    n_in = int(inside.sum())
    if n_in in (0, len(data)):
        raise ValueError(
            f"data.basin_free_energy: {n_in} of {len(data)} frames lie in {POSITIVE_PHI_BASIN}; "
            "both sides need frames"
        )
    share = 1.0 / (1.0 + math.exp(delta_f))
    f64 = torch.float64
    weights = torch.where(
        inside,
        torch.tensor(share / n_in, dtype=f64),
        torch.tensor((1.0 - share) / (len(data) - n_in), dtype=f64),
    )
    summary = {
        "basin": list(POSITIVE_PHI_BASIN),
        "delta_f": float(delta_f),
        "frames_in_basin": n_in,
        "share_in_data": n_in / len(data),
        "share_drawn": share,
    }
    return weights, summary


def start_from(teacher: TeacherCNF, path: str | os.PathLike[str]) -> None:
    """Copy the weights of the finished teacher at ``path`` (model file or run folder) into
    ``teacher`` (``model.init_from``).

    Raises:
        FileNotFoundError: nothing loadable at ``path``.
        ValueError: a teacher of another architecture, system convention or transform (its
            ``model_config`` differs from the one this run builds).
    """
    done = TeacherCNF.load(path)
    if done.model_config != teacher.model_config:
        differ = sorted(
            k
            for k in set(done.model_config) | set(teacher.model_config)
            if done.model_config.get(k) != teacher.model_config.get(k)
        )
        raise ValueError(
            f"model.init_from {path}: that teacher's model differs from this run's in {differ}; "
            "it can only start a run of the same architecture"
        )
    teacher.load_state_dict(done.state_dict())


def build_teacher(
    cfg: TeacherConfig,
    shape: SystemShape,
    transform: InternalCoordinates | None = None,
    base_flow: CouplingFlow | None = None,
) -> TeacherCNF:
    """A fresh (untrained) teacher for ``shape`` as described by ``cfg.model``/``cfg.sample``.

    ``transform``: the fitted internal-coordinate transform, required iff
    ``cfg.model.representation == "internal"``; ``base_flow``: the trained flow on its z that
    the CNF lives on (``cfg.model.base_nf``, :func:`load_base_nf`), frozen.
    """
    if (transform is not None) != (cfg.model.representation == "internal"):
        raise ValueError(
            f"model.representation {cfg.model.representation!r} "
            + ("needs" if transform is None else "takes no")
            + " internal-coordinate transform"
        )
    if transform is not None:
        return TeacherCNF.build(
            cfg.model.backbone,
            dim=shape.dim,
            backbone_options=cfg.model.backbone_options(),
            sampling=_sampling(cfg.sample),
            scale=cfg.model.scale,
            transform=transform,
            base_flow=base_flow,
        )
    if base_flow is not None:
        raise ValueError("a base flow needs model.representation = 'internal'")
    particles = shape.n_particles is not None and shape.spatial_dim is not None
    if cfg.model.backbone != "mlp" and not particles:
        raise ValueError(
            f"backbone {cfg.model.backbone!r} needs a particle system; use backbone = 'mlp'"
        )
    return TeacherCNF.build(
        cfg.model.backbone,
        dim=shape.dim,
        n_particles=shape.n_particles,
        spatial_dim=shape.spatial_dim,
        mean_free=shape.mean_free,
        backbone_options=cfg.model.backbone_options(),
        sampling=_sampling(cfg.sample),
        scale=cfg.model.scale,
    )


class TeacherLoss:
    """Flow-matching loss of one training step, as a :class:`~boltzflow.train.trainer.BatchedLoss`.

    ``make_batch(step)`` draws everything random from :func:`step_generator` ``(seed, step)``:
    data indices, optional random rotations, prior samples, the coupling, times and noise, as
    CPU float32 tensors ``(x0, x1, t, noise)``; it runs in the trainer's background workers when
    ``train.data_workers > 0``. ``batch_loss(model, batch)`` regresses the velocity.

    Args:
        teacher: the model being trained (its prior, scale and backbone symmetry are read).
        data: ``(N, dim)`` training configurations in physical units.
        cfg: run configuration (flow-matching options, batch size, seed).
        shape: the system's dimension and particle structure.
        weights: ``(N,)`` non-negative probabilities of drawing each frame (:func:`basin_weights`);
            None: uniformly.
    """

    def __init__(
        self,
        teacher: TeacherCNF,
        data: Tensor,
        cfg: TeacherConfig,
        shape: SystemShape,
        weights: Tensor | None = None,
    ) -> None:
        fm = cfg.flow_matching
        self.fm, self.batch, self.seed = fm, cfg.train.batch_size, cfg.train.seed
        if weights is not None and (weights.shape != (len(data),) or not weights.sum() > 0):
            raise ValueError(f"weights must be ({len(data)},) with a positive sum")
        self.weights = None if weights is None else weights.double()
        self.prior = teacher.prior
        self.periodic: Tensor | None = teacher.periodic
        if teacher.transform is not None:  # internal coordinates: the flow's z, float32
            if fm.coupling == "equivariant_ot":
                raise ValueError(
                    "coupling 'equivariant_ot' is for Cartesian particles; internal coordinates "
                    "take 'independent' or 'ot' (wrapped distance on the dihedrals)"
                )
            if fm.augment_rotations:
                raise ValueError("internal coordinates are rotation invariant: no augmentation")
            self.n_particles, self.spatial_dim, self.augment = None, None, False
            with torch.no_grad():  # in chunks: the base flow's splines are memory-hungry
                chunks = [teacher.to_flow(c)[0].float() for c in data.split(_ENCODE_CHUNK)]
            self.data = torch.cat(chunks)
            return
        n, d = shape.n_particles, shape.spatial_dim
        particles = n is not None and d is not None
        augment = fm.augment_rotations
        if augment is None:
            augment = particles and not getattr(teacher.net, "equivariant", False)
        if augment and not particles:
            raise ValueError("flow_matching.augment_rotations needs a particle system")
        if fm.coupling == "equivariant_ot" and not particles:
            raise ValueError("coupling 'equivariant_ot' needs a particle system; use 'ot'")
        self.n_particles, self.spatial_dim, self.augment = n, d, bool(augment)
        self.data = (data / teacher.scale).float()  # the flow's units

    def make_batch(self, step: int) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``(x0, x1, t, noise)`` of ``step``: coupled ``(B, dim)`` pairs, ``(B,)`` times and
        ``(B, dim)`` interpolant noise (None when sigma is 0)."""
        gen = step_generator(self.seed, step)
        n, d, b, fm = self.n_particles, self.spatial_dim, self.batch, self.fm
        if self.weights is None:
            idx = torch.randint(len(self.data), (b,), generator=gen)
        else:
            idx = torch.multinomial(self.weights, b, replacement=True, generator=gen)
        x1 = self.data[idx]
        if self.augment:
            x1 = rotate(x1, random_rotations(b, d, generator=gen), n, d)
        x0 = self.prior.sample(b, generator=gen, dtype=torch.float32, device="cpu")
        x0 = couple(
            x0,
            x1,
            fm.coupling,
            n_particles=n,
            spatial_dim=d,
            reflections=fm.reflections,
            permutations=fm.permutations,
            periodic=self.periodic,
        )
        t, noise = interpolant_draws(
            b, x0.shape[1], generator=gen, sigma=fm.sigma, n_particles=n, spatial_dim=d
        )
        return x0, x1, t, noise

    def batch_loss(
        self, model: nn.Module, batch: tuple[Tensor, Tensor, Tensor, Tensor | None]
    ) -> Tensor:
        """Scalar flow-matching loss of ``model`` on a batch from :meth:`make_batch`."""
        p = next(model.parameters())
        x0, x1, t, noise = (
            None if v is None else v.to(device=p.device, dtype=p.dtype) for v in batch
        )
        return flow_matching_loss(
            model.net,
            x0,
            x1,
            t=t,
            noise=noise,
            sigma=self.fm.sigma,
            n_particles=self.n_particles,
            spatial_dim=self.spatial_dim,
            periodic=self.periodic,
            path=self.fm.path,
        )


def train_teacher(
    cfg: TeacherConfig,
    data: Tensor,
    out_dir: str | os.PathLike[str],
    shape: SystemShape,
    *,
    resume: bool = True,
    stop_at: int | None = None,
    progress: bool = True,
    run_info: dict[str, Any] | None = None,
    zmatrix: ZMatrix | None = None,
) -> TeacherCNF:
    """Train a teacher and write ``out_dir/teacher.pt`` (EMA weights) when finished.

    Args:
        cfg: the run configuration.
        data: ``(N, dim)`` training configurations (float32 is fine); for mean-free systems the
            centre of mass is removed here (idempotent).
        out_dir: run folder (``checkpoint.pt``, ``metrics.jsonl``, ``run.json``, ``teacher.pt``).
        shape: the system's dimension and particle structure.
        resume: continue from an existing checkpoint in ``out_dir``.
        stop_at: stop early after this many steps (checkpointed; resume later).
        run_info: extra JSON-able facts recorded in the run config (data path, system name).
        zmatrix: for ``model.representation = "internal"``: the molecule's Z-matrix (default:
            :func:`system_zmatrix` of ``cfg.system`` or ``run_info["system"]``). The transform
            (periodic dihedrals, standardised bonds and angles, cuts at the least populated
            angles, narrow dihedrals standardised if ``model.standardize_dihedrals``) is
            fitted to ``data`` and stored in the model. With ``model.base_nf`` the NF's
            transform is used instead (not refitted) and ``zmatrix`` is ignored.

    Returns:
        the teacher with EMA weights, in eval mode, on the training device.
    """
    data = torch.as_tensor(data)
    if data.ndim != 2 or data.shape[1] != shape.dim:
        raise ValueError(f"training data must be (N, {shape.dim}), got {tuple(data.shape)}")
    if len(data) == 0:
        raise ValueError(f"training data hold no configurations: shape {tuple(data.shape)}")
    if not bool(torch.isfinite(data).all()):
        raise ValueError("training data contain NaN or infinite values")
    data = data.float()
    if shape.mean_free:
        data = remove_mean(data, shape.n_particles, shape.spatial_dim)
    transform = base_flow = None
    if cfg.model.base_nf is not None:  # the NF's transform, and its flow as the base
        name = cfg.system or (run_info or {}).get("system")
        transform, base_flow = load_base_nf(cfg.model.base_nf, name)
        run_info = {**(run_info or {}), "base_nf": str(Path(cfg.model.base_nf).resolve())}
    elif cfg.model.representation == "internal":
        if zmatrix is None:
            name = cfg.system or (run_info or {}).get("system")
            if name is None:
                raise ValueError("internal coordinates need a zmatrix or a system name")
            zmatrix = system_zmatrix(name)
        transform = InternalCoordinates.fit(
            zmatrix,
            data.double(),
            periodic=True,
            standardize_dihedrals=cfg.model.standardize_dihedrals,
        )
    weights = None
    if cfg.data.basin_free_energy is not None:
        name = cfg.system or (run_info or {}).get("system")
        if name is None:
            raise ValueError("data.basin_free_energy needs a system name")
        weights, summary = basin_weights(name, data, cfg.data.basin_free_energy)
        run_info = {**(run_info or {}), "basin_weighting": summary}
    torch.manual_seed(cfg.train.seed)  # parameter initialisation
    teacher = build_teacher(cfg, shape, transform, base_flow)
    if cfg.model.init_from is not None:
        start_from(teacher, cfg.model.init_from)
        run_info = {**(run_info or {}), "init_from": str(Path(cfg.model.init_from).resolve())}
    run_config = {"teacher": cfg.to_dict(), "n_data": len(data), **(run_info or {})}
    teacher.system = run_config.get("system")
    return fit_and_export(
        teacher,
        TeacherLoss(teacher, data, cfg, shape, weights),
        cfg.train,
        out_dir,
        filename=MODEL_FILE,
        model_kind="teacher_cnf",
        run_config=run_config,
        extra={"sampling": teacher.sampling},
        resume=resume,
        stop_at=stop_at,
        progress=progress,
    )
