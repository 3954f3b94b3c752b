"""Molecular systems defined by an OpenMM force field (``kind = "openmm"`` in a system definition).

The reduced energy is u(x) = U(x) / kT with U the potential energy of the ``openmm.System`` in
kJ/mol and kT = R·T (:mod:`boltzflow.constants`); positions are in nm, flat
``(batch, 3 * n_atoms)`` in the atom order of the structure file. Gradients come from the
forces: du/dx = −F / kT.

Two energy backends compute U and F (``backend`` parameter):

- ``"torch"`` (the default): :mod:`boltzflow.systems.torch_ff` evaluates whole batches with tensor
  operations, chunked (bounded memory for any batch, with or without gradients), forces by
  autograd, in ``dtype`` on ``device``. It matches OpenMM's Reference platform to about 1e-13
  relative in float64 (``tests/systems/test_torch_ff.py``) and is faster per core.
- ``"openmm"``: a pool of OpenMM worker processes (:mod:`boltzflow.systems.openmm_pool`), one
  configuration at a time on ``platform``; the reference implementation.

Both go through the same post-processing, so they agree on everything but rounding: a row whose
energy (or, when a gradient is needed, force) is not finite gets u = +inf and zero gradient and
is counted in :attr:`MolecularSystem.n_failed`; ``energy_cap`` regularises both alike. OpenMM
stays the MD engine (:mod:`boltzflow.data.md`) whatever the backend.

Definition parameters (``[parameters]`` table):

- ``structure``: PDB file (relative to the folder of the definition file) giving topology, atom
  order and the reference configuration.
- either ``forcefield``: list of OpenMM force-field XML files (OpenMM's built-in names such as
  ``"amber99sbildn.xml"``, or paths relative to the definition's folder, which win over a built-in
  of the same name), applied to the PDB topology;
- or ``prmtop``: an AMBER prmtop (same atom order as the PDB, checked) with ``implicit_solvent``
  one of ``"none"``, ``"HCT"``, ``"OBC1"``, ``"OBC2"``, ``"GBn"``, ``"GBn2"``.
- ``backend``: ``"torch"`` (default) or ``"openmm"``, see above.
- ``dtype``: ``"float64"`` (default) or ``"float32"``, the torch backend's precision.
- ``device``: where the torch backend computes: ``"input"`` (default, the device of ``x``) or a
  torch device such as ``"cpu"`` or ``"cuda"``.
- ``chunk_size``: configurations per torch pass (0 = automatic, the default: about 64 MiB of
  intermediates on CPU, 1 GiB on a GPU).
- ``compiled``: run the torch backend through ``torch.compile`` (default false). On 2 CPU cores
  about 10x faster for energies (docs/benchmarks.md), after a compilation of 5-20 s per chunk
  size and gradient mode in each process: worth it for long runs, not for a few batches.
- ``platform``: ``"Reference"``, ``"CPU"``, ``"CUDA"``, ``"OpenCL"`` or ``"auto"``: the OpenMM
  backend's platform, and the default platform of MD data generation.
- ``n_workers``: OpenMM worker processes (0 = in-process); ``threads``: CPU-platform threads
  per worker (0 = split the cores). The torch backend uses torch's threads instead.
- ``energy_cap``: reduced energy above which u is regularised (``inf`` = off, the default).
- ``phi_atoms``, ``psi_atoms``, ``chirality_atoms``: 0-based atom indices for
  :mod:`boltzflow.systems.geometry`.

Every system is built with no cutoff, no constraints and no rigid water: the density lives on all
3·n_atoms Cartesian coordinates.

Example (scripts that use the OpenMM backend must keep their work under a main guard: the
pool's spawned workers re-import the main script)::

    from boltzflow.systems import load_system

    if __name__ == "__main__":
        aldp = load_system("aldp")  # torch backend, float64
        u = aldp.energy(aldp.reference_configuration())  # tensor([-38.3655]) kT
        with load_system("aldp", backend="openmm", n_workers=2) as reference:
            u_openmm = reference.energy(aldp.reference_configuration())  # the same to ~1e-13
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import openmm
import torch
from openmm import app, unit
from torch import Tensor
from torch.autograd.function import once_differentiable

from boltzflow.constants import kt_kj_per_mol
from boltzflow.systems import geometry
from boltzflow.systems.base import System, SystemInfo
from boltzflow.systems.openmm_pool import OpenMMPool, resolve_platform
from boltzflow.systems.torch_ff import TorchForceField, compile_openmm_system

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "INPUT_DEVICE",
    "MolecularSystem",
    "build",
    "regularise_energy",
]

#: Energy backends of a molecular system; see the module docstring.
BACKENDS = ("torch", "openmm")
#: The backend of a definition that names none.
DEFAULT_BACKEND = "torch"
_DTYPES = {"float64": torch.float64, "float32": torch.float32}
#: ``device`` value for "compute where the coordinates are".
INPUT_DEVICE = "input"

ArrayT = TypeVar("ArrayT", np.ndarray, Tensor)

_IMPLICIT_SOLVENTS = {
    "none": None,
    "HCT": app.HCT,
    "OBC1": app.OBC1,
    "OBC2": app.OBC2,
    "GBn": app.GBn,
    "GBn2": app.GBn2,
}
# Those with a default here are also in the registry's _DEFAULTED_PARAMETERS["openmm"] (so
# that load_system can set them for any molecule); a test keeps the two in step.
_PARAMETERS = {
    "backend",
    "dtype",
    "device",
    "chunk_size",
    "compiled",
    "structure",
    "forcefield",
    "prmtop",
    "implicit_solvent",
    "platform",
    "n_workers",
    "threads",
    "energy_cap",
    "phi_atoms",
    "psi_atoms",
    "chirality_atoms",
}


def regularise_energy(u: ArrayT, cap: float | None) -> tuple[ArrayT, ArrayT]:
    """Soften reduced energies above ``cap``: u ↦ cap + log(1 + u − cap) for u > cap.

    The map is continuous with a continuous first derivative at the cap (slope 1 there), grows
    only logarithmically beyond it, and leaves u ≤ cap and u = +inf unchanged. This is the
    "linlog" energy cut of Boltzmann generators (Noé et al., Science 365, eaaw1147 (2019)) used
    to keep training gradients bounded; it changes the target only where exp(−u) is negligible.

    Args:
        u: reduced energies, a numpy array or a tensor (any shape).
        cap: threshold in kT, or None / inf for no regularisation.

    Returns:
        ``(u_reg, slope)``: regularised energies and d u_reg / d u (1 below the cap), of the
        type, dtype and device of ``u``.
    """
    if isinstance(u, np.ndarray):
        u_reg, slope = regularise_energy(torch.from_numpy(u), cap)
        return u_reg.numpy(), slope.numpy()
    slope = torch.ones_like(u)
    if cap is None or math.isinf(cap):
        return u, slope
    above = u > cap
    excess = torch.where(above, u - cap, 0.0)
    u_reg = torch.where(above, cap + torch.log1p(excess), u)
    slope = torch.where(above, 1.0 / (1.0 + excess), 1.0)
    return u_reg, slope


class _ReducedEnergy(torch.autograd.Function):
    """u(x) from the system's backend; the backward pass uses the forces computed with it
    (du/dx = −F/kT), so memory stays bounded by the backend's chunks with gradients too."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, system: MolecularSystem, need_grad: bool) -> Tensor:
        u, grad = system._reduced_energy(x.detach(), need_grad)
        if grad is not None:
            ctx.save_for_backward(grad.to(device=x.device, dtype=x.dtype))
        return u.to(device=x.device, dtype=x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_u: Tensor) -> tuple[Tensor, None, None]:
        (grad,) = ctx.saved_tensors
        # Rows with u = +inf carry zero gradient; keep a non-finite upstream factor from
        # turning 0 into NaN there.
        factor = torch.where(torch.isfinite(grad_u), grad_u, torch.zeros_like(grad_u))
        return factor[:, None] * grad, None, None


class MolecularSystem(System):
    """A molecule whose reduced energy and forces come from an OpenMM force field.

    Args:
        info: static description (``dim = 3 * n_atoms``, temperature in K).
        openmm_system: the OpenMM system (no constraints, no virtual sites).
        topology: OpenMM topology in the coordinate order.
        positions_nm: ``(n_atoms, 3)`` reference positions in nm.
        backend: ``"torch"`` (batched torch force field) or ``"openmm"`` (worker pool); see the
            module docstring.
        dtype: the torch backend's precision, ``"float64"`` / ``"float32"`` (or the torch dtype).
        device: where the torch backend computes: ``"input"`` (the device of ``x``) or a torch
            device.
        chunk_size: configurations per torch pass (None or 0 = automatic).
        compiled: evaluate the torch backend through ``torch.compile`` (see
            :class:`~boltzflow.systems.torch_ff.TorchForceField`).
        platform: OpenMM platform name or ``"auto"`` (OpenMM backend; default of MD data).
        n_workers: worker processes for :class:`OpenMMPool` (0 = in-process).
        threads: CPU-platform threads per worker (None or 0 = split the cores).
        energy_cap: see :func:`regularise_energy` (None = off).
        phi_atoms, psi_atoms, chirality_atoms: atom indices for :mod:`boltzflow.systems.geometry`.
        timeout: seconds allowed per pool evaluation (None = the pool's default).

    Raises:
        ValueError: inconsistent sizes, constraints, an unknown backend or dtype (the message
            lists the valid names), a bad device, or (torch backend) a force the torch force
            field cannot reproduce (the message names it and the ``backend="openmm"`` way out).

    The torch force field is compiled when the system is built. The OpenMM worker pool starts on
    the first OpenMM evaluation and stops on :meth:`close` (or with ``with system: ...``, or at
    garbage collection / interpreter exit); a later evaluation starts a new pool.

    Derivatives: :meth:`energy` is differentiable to first order on both backends (the
    backward pass reuses the forces computed in the forward pass). For higher orders use the
    force field itself, :meth:`torch_force_field`.

    Counters: :attr:`n_nonfinite` (base class) counts input rows with NaN/inf coordinates;
    :attr:`n_failed` counts rows the backend could not turn into a finite energy (and, when a
    gradient is needed, finite forces), which includes atoms on top of each other and also
    those non-finite rows (the base class hands them to :meth:`_energy` as zeros). Both kinds
    get u = +inf and zero gradient, on either backend.
    """

    def __init__(
        self,
        info: SystemInfo,
        openmm_system: openmm.System,
        topology: app.Topology,
        positions_nm: np.ndarray,
        *,
        backend: str = DEFAULT_BACKEND,
        dtype: str | torch.dtype = "float64",
        device: str | torch.device = INPUT_DEVICE,
        chunk_size: int | None = None,
        compiled: bool = False,
        platform: str = "Reference",
        n_workers: int = 1,
        threads: int | None = None,
        energy_cap: float | None = None,
        phi_atoms: tuple[int, ...] = geometry.ALDP_PHI_ATOMS,
        psi_atoms: tuple[int, ...] = geometry.ALDP_PSI_ATOMS,
        chirality_atoms: tuple[int, ...] = geometry.ALDP_CHIRALITY_ATOMS,
        timeout: float | None = None,
    ) -> None:
        super().__init__(info)
        n_atoms = openmm_system.getNumParticles()
        if info.dim != 3 * n_atoms or topology.getNumAtoms() != n_atoms:
            raise ValueError(
                f"system {info.name!r}: dim {info.dim}, topology with {topology.getNumAtoms()} "
                f"atoms and an OpenMM system with {n_atoms} particles do not match"
            )
        if openmm_system.getNumConstraints():
            raise ValueError(f"system {info.name!r}: constraints are not supported")
        if info.temperature is None or not info.temperature > 0:
            raise ValueError(f"system {info.name!r}: needs a positive temperature in kelvin")
        positions = np.asarray(positions_nm, dtype=np.float64)
        if positions.shape != (n_atoms, 3):
            raise ValueError(f"positions_nm must be ({n_atoms}, 3), got {positions.shape}")
        for label, atoms in (
            ("phi_atoms", phi_atoms),
            ("psi_atoms", psi_atoms),
            ("chirality_atoms", chirality_atoms),
        ):
            try:
                geometry._index_tensor(list(atoms), 4, n_atoms)
            except ValueError as err:
                raise ValueError(f"system {info.name!r}: {label}: {err}") from err
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 0):
            raise ValueError(
                f"system {info.name!r}: chunk_size must be an integer >= 0 (0 = automatic), "
                f"got {chunk_size!r}"
            )
        if not isinstance(compiled, bool):
            raise ValueError(
                f"system {info.name!r}: compiled must be true or false, got {compiled!r}"
            )
        self.openmm_system = openmm_system
        self.topology = topology
        self.phi_atoms = tuple(int(i) for i in phi_atoms)
        self.psi_atoms = tuple(int(i) for i in psi_atoms)
        self.chirality_atoms = tuple(int(i) for i in chirality_atoms)
        self.backend = _check_backend(backend, info.name)
        self.energy_dtype = _check_dtype(dtype, info.name)
        self.energy_device = _check_device(device, info.name)
        self.chunk_size = chunk_size or None
        self.compiled = compiled
        self.platform_name = resolve_platform(platform)
        self.n_workers = int(n_workers)
        self.threads = threads or None
        self.energy_cap = (
            None if energy_cap is None or math.isinf(energy_cap) else float(energy_cap)
        )
        self.timeout = timeout
        self.kt = kt_kj_per_mol(info.temperature)  # kJ/mol
        self.n_failed = 0
        centred = positions - positions.mean(axis=0)  # mean-free convention, energy unchanged
        self._reference = torch.from_numpy(centred.reshape(1, -1).copy())
        self._xml: str | None = None
        self._pool: OpenMMPool | None = None
        self._fields: dict[torch.device, TorchForceField] = {}
        self._mdtraj_topology: Any = None
        # The shipped structure is the L form; its chirality sign defines L for this system.
        volume = float(geometry.chirality_volume(self._reference, self.chirality_atoms)[0])
        self.l_form_sign = 1 if volume > 0 else -1
        if self.backend == "torch":
            # Compiled now, so that a force the torch force field cannot reproduce is reported
            # when the system is built, not in the middle of a sampling run.
            self.torch_force_field(self.energy_device or torch.device("cpu"))

    # -- structure -------------------------------------------------------------------------------
    @property
    def n_atoms(self) -> int:
        return self.dim // 3

    @property
    def positions_nm(self) -> Tensor:
        """Reference configuration ``(1, 3 * n_atoms)`` float64 in nm, centred at the origin."""
        return self._reference.clone()

    def reference_configuration(self) -> Tensor:
        """The structure file's configuration, ``(1, 3 * n_atoms)`` float64 nm, centred."""
        return self._reference.clone()

    @property
    def mdtraj_topology(self) -> Any:
        """The topology as an ``mdtraj.Topology`` (imported lazily)."""
        if self._mdtraj_topology is None:
            import mdtraj

            self._mdtraj_topology = mdtraj.Topology.from_openmm(self.topology)
        return self._mdtraj_topology

    def backbone_dihedrals(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(φ, ψ) in radians of ``(..., dim)`` positions, with this system's atom indices."""
        return geometry.backbone_dihedrals(x, self.phi_atoms, self.psi_atoms)

    def fix_chirality(self, x: Tensor) -> tuple[Tensor, float]:
        """Mirror the non-L rows (x → −x); returns the fixed batch and the fraction mirrored."""
        return geometry.fix_chirality(x, self.chirality_atoms, self.l_form_sign)

    # -- energy backends -------------------------------------------------------------------------
    @property
    def pool(self) -> OpenMMPool:
        """The OpenMM worker pool, started on first use (and again after :meth:`close`)."""
        if self._pool is None or self._pool.closed:
            if self._xml is None:
                self._xml = openmm.XmlSerializer.serialize(self.openmm_system)
            self._pool = OpenMMPool(
                self._xml,
                self.platform_name,
                self.n_workers,
                threads=self.threads,
                timeout=self.timeout,
            )
        return self._pool

    def torch_force_field(self, device: str | torch.device = "cpu") -> TorchForceField:
        """The torch force field of :attr:`openmm_system` on ``device``, in this system's dtype
        and chunk size (compiled once, one copy per device; energies in kJ/mol).

        Raises:
            ValueError: a force the torch force field cannot reproduce (named in the message).
        """
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._fields:
            cpu = torch.device("cpu")
            if cpu not in self._fields:
                try:
                    self._fields[cpu] = compile_openmm_system(
                        self.openmm_system,
                        dtype=self.energy_dtype,
                        temperature=self.temperature,
                        chunk_size=self.chunk_size,
                        compiled=self.compiled,
                    )
                except ValueError as err:
                    raise ValueError(
                        f"system {self.name!r}: {err}. Use backend='openmm' (in load_system or "
                        "the definition's [parameters]) to evaluate it with OpenMM"
                    ) from err
            if device != cpu:
                self._fields[device] = copy.deepcopy(self._fields[cpu]).to(device)
        return self._fields[device]

    def _evaluate_torch(self, x: Tensor, forces: bool) -> tuple[Tensor, Tensor | None, int]:
        ff = self.torch_force_field(self.energy_device or x.device)
        if forces:
            energies, out_forces = ff.energy_and_forces(x)
            failed = ~torch.isfinite(energies) | ~torch.isfinite(out_forces).all(dim=1)
        else:
            with torch.no_grad():
                energies, out_forces = ff.energy(x), None
            failed = ~torch.isfinite(energies)
        # As the pool does (rows that reach here through energy() are already finite).
        failed |= ~torch.isfinite(x).all(dim=1).to(failed.device)
        energies = torch.where(failed, math.inf, energies)
        if out_forces is not None:
            out_forces = torch.where(failed[:, None], 0.0, out_forces)
        return energies, out_forces, int(failed.sum())

    def _evaluate_openmm(self, x: Tensor, forces: bool) -> tuple[Tensor, Tensor | None, int]:
        batch = x.shape[0]
        pos = x.to(device="cpu", dtype=torch.float64).numpy().reshape(batch, self.n_atoms, 3)
        result = self.pool.evaluate(pos, forces=forces)
        out_forces = None
        if result.forces is not None:
            out_forces = torch.from_numpy(result.forces.reshape(batch, self.dim))
        return torch.from_numpy(result.energies), out_forces, result.n_failed

    def _reduced_energy(self, x: Tensor, forces: bool) -> tuple[Tensor, Tensor | None]:
        """Reduced energies ``(batch,)`` and du/dx ``(batch, dim)`` (or None) of ``x``
        ``(batch, dim)`` nm, in the backend's dtype and on its device.

        The one place where both backends' results become u: energies over kT, failed rows
        (u = +inf, zero gradient) counted in :attr:`n_failed`, then :attr:`energy_cap`.
        """
        evaluate = self._evaluate_torch if self.backend == "torch" else self._evaluate_openmm
        energies, out_forces, n_failed = evaluate(x, forces)
        self.n_failed += n_failed
        u, slope = regularise_energy(energies / self.kt, self.energy_cap)
        if out_forces is None:
            return u, None
        return u, -out_forces / self.kt * slope[:, None]

    def _energy(self, x: Tensor) -> Tensor:
        # Forces cost about 0.5x (OpenMM) to 2-3x (torch, autograd) more than energies alone
        # (docs/benchmarks.md): compute them only when a graph is built.
        need_grad = torch.is_grad_enabled() and x.requires_grad
        return _ReducedEnergy.apply(x, self, need_grad)

    def energy_provenance(self) -> dict[str, Any]:
        """The base description plus the backend's settings (dtype and device, or platform)."""
        out = super().energy_provenance()
        out["backend"] = self.backend
        if self.backend == "torch":
            out["dtype"] = str(self.energy_dtype).removeprefix("torch.")
            out["device"] = INPUT_DEVICE if self.energy_device is None else str(self.energy_device)
            out["compiled"] = self.compiled
        else:
            out["platform"] = self.platform_name
        out["energy_cap"] = self.energy_cap
        return out

    def close(self) -> None:
        """Stop the OpenMM worker pool (a later OpenMM evaluation starts a new one)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __repr__(self) -> str:
        if self.backend == "torch":
            device = INPUT_DEVICE if self.energy_device is None else str(self.energy_device)
            where = f"dtype={str(self.energy_dtype).removeprefix('torch.')!r}, device={device!r}"
        else:
            where = f"platform={self.platform_name!r}, n_workers={self.n_workers}"
        return (
            f"MolecularSystem(name={self.name!r}, n_atoms={self.n_atoms}, "
            f"backend={self.backend!r}, {where})"
        )


def _check_backend(backend: object, system: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(
            f"system {system!r}: unknown energy backend {backend!r}; valid backends: "
            + ", ".join(repr(b) for b in BACKENDS)
        )
    return str(backend)


def _check_dtype(dtype: object, system: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"system {system!r}: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")


def _check_device(device: object, system: str) -> torch.device | None:
    """None for ``"input"`` (compute on the device of the coordinates)."""
    if device == INPUT_DEVICE:
        return None
    try:
        return torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"system {system!r}: device must be {INPUT_DEVICE!r} or a torch device such as "
            f"'cpu' or 'cuda', got {device!r}"
        ) from err


# -- building from a definition -------------------------------------------------------------------
def _file(source_dir: Path, name: str, key: str, system: str) -> Path:
    if not isinstance(name, str):
        raise TypeError(f"system {system!r}: parameter {key!r} must be a file name, got {name!r}")
    path = Path(source_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"system {system!r}: {key} file not found: {path}")
    return path


def _atoms(params: dict[str, Any], key: str, default: tuple[int, ...]) -> tuple[int, ...]:
    value = params.get(key, default)
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise ValueError(f"parameter {key!r} must be a list of 4 atom indices, got {value!r}")
    return tuple(int(i) for i in value)


def _check_same_atoms(prmtop: app.Topology, pdb: app.Topology, system: str) -> None:
    """The prmtop must list the PDB's atoms in the same order (element and residue by index)."""
    a, b = list(prmtop.atoms()), list(pdb.atoms())
    if len(a) != len(b):
        raise ValueError(f"system {system!r}: prmtop has {len(a)} atoms, structure {len(b)}")
    for i, (p, q) in enumerate(zip(a, b)):
        if p.element != q.element or p.residue.name != q.residue.name:
            raise ValueError(
                f"system {system!r}: atom {i} differs between prmtop ({p.residue.name} {p.name}) "
                f"and structure ({q.residue.name} {q.name}); the atom orders must match"
            )


def build(spec: dict[str, Any], params: dict[str, Any], source_dir: Path) -> MolecularSystem:
    """Build a :class:`MolecularSystem` from a ``<name>.toml`` definition in ``source_dir``.

    Raises:
        ValueError: unknown or inconsistent parameters.
        FileNotFoundError: a structure, prmtop or force-field file is missing.
    """
    name = spec["name"]
    unknown = set(params) - _PARAMETERS
    if unknown:
        raise ValueError(
            f"system {name!r}: unknown parameters {sorted(unknown)}; allowed: {sorted(_PARAMETERS)}"
        )
    if spec.get("spatial_dim", 3) != 3:
        raise ValueError(f"system {name!r}: molecular systems have spatial_dim = 3")
    pdb = app.PDBFile(str(_file(source_dir, params.get("structure"), "structure", name)))
    kwargs = {
        "nonbondedMethod": app.NoCutoff,
        "constraints": None,
        "rigidWater": False,
        "removeCMMotion": False,
    }
    has_ff, has_prmtop = "forcefield" in params, "prmtop" in params
    if has_ff == has_prmtop:
        raise ValueError(f"system {name!r}: give exactly one of 'forcefield' and 'prmtop'")
    if has_ff:
        files = params["forcefield"]
        if isinstance(files, str) or not files:
            raise ValueError(f"system {name!r}: 'forcefield' must be a non-empty list of XML files")
        # A file beside the definitions wins over OpenMM's built-in library of the same name.
        resolved = [
            str(Path(source_dir) / f) if (Path(source_dir) / f).is_file() else f for f in files
        ]
        if "implicit_solvent" in params:
            raise ValueError(
                f"system {name!r}: with 'forcefield' the solvent model is an XML file, "
                "not 'implicit_solvent'"
            )
        try:
            forcefield = app.ForceField(*resolved)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(
                f"system {name!r}: cannot load force field {files}: {err}"
            ) from err
        openmm_system = forcefield.createSystem(pdb.topology, **kwargs)
    else:
        prmtop = app.AmberPrmtopFile(str(_file(source_dir, params["prmtop"], "prmtop", name)))
        _check_same_atoms(prmtop.topology, pdb.topology, name)
        solvent = params.get("implicit_solvent", "none")
        if solvent not in _IMPLICIT_SOLVENTS:
            raise ValueError(
                f"system {name!r}: implicit_solvent {solvent!r} is not one of "
                f"{sorted(_IMPLICIT_SOLVENTS)}"
            )
        openmm_system = prmtop.createSystem(implicitSolvent=_IMPLICIT_SOLVENTS[solvent], **kwargs)
    n_atoms = openmm_system.getNumParticles()
    if spec.get("n_particles", n_atoms) != n_atoms:
        raise ValueError(
            f"system {name!r}: n_particles = {spec['n_particles']} but the structure has "
            f"{n_atoms} atoms"
        )
    spec = {**spec, "n_particles": n_atoms, "spatial_dim": 3}
    n_workers, threads = params.get("n_workers", 1), params.get("threads", 0)
    if not isinstance(n_workers, int) or n_workers < 0:
        raise ValueError(f"system {name!r}: n_workers must be an integer >= 0, got {n_workers!r}")
    if not isinstance(threads, int) or threads < 0:
        raise ValueError(f"system {name!r}: threads must be an integer >= 0, got {threads!r}")
    cap = params.get("energy_cap")
    if cap is not None and not isinstance(cap, (int, float)):
        raise ValueError(f"system {name!r}: energy_cap must be a number (inf = off), got {cap!r}")
    return MolecularSystem(
        SystemInfo.from_spec(spec, params),
        openmm_system,
        pdb.topology,
        np.asarray(pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer)),
        backend=params.get("backend", DEFAULT_BACKEND),
        dtype=params.get("dtype", "float64"),
        device=params.get("device", INPUT_DEVICE),
        chunk_size=params.get("chunk_size", 0),
        compiled=params.get("compiled", False),
        platform=str(params.get("platform", "Reference")),
        n_workers=n_workers,
        threads=threads,
        energy_cap=None if cap is None else float(cap),
        phi_atoms=_atoms(params, "phi_atoms", geometry.ALDP_PHI_ATOMS),
        psi_atoms=_atoms(params, "psi_atoms", geometry.ALDP_PSI_ATOMS),
        chirality_atoms=_atoms(params, "chirality_atoms", geometry.ALDP_CHIRALITY_ATOMS),
    )
