"""The ``boltzflow reweight`` analysis: :func:`reweight_analysis` turns stored proposal samples
(x, log q) into weights, ESS, log Z, metrics against optional reference samples, plots and a
markdown + JSON report.

The samples may be one store or several (the shards of a distributed ``boltzflow sample``,
:mod:`boltzflow.io.shards`); the union is their concatenation. Under ``torchrun`` each rank
reads a contiguous part of the union's rows and evaluates their energies; N, ESS, log Z, the
reweighted mean energy and the ALDP ΔF come from sufficient statistics combined across ranks
(:mod:`boltzflow.sampling.reduction`), the bootstrap intervals from the gathered union, and
rank 0 draws the plots and writes the report from the gathered u and log w (16 bytes per
sample; the positions too for the molecular section, the reference metrics and trajectories).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from boltzflow import distributed
from boltzflow.analysis.free_energy import ALDP_STATE_A, in_region
from boltzflow.analysis.report import write_report
from boltzflow.io.samples import FORMAT_NAME, SampleSet, read_samples
from boltzflow.io.shards import resolve_sample_files
from boltzflow.metrics import (
    chirality_rate,
    energy_w1,
    energy_w2,
    nll,
    ramachandran_kl,
    torus_w2,
)
from boltzflow.sampling.estimators import (
    free_energy_difference,
    free_energy_profile,
    log_partition,
    snis_expectation,
)
from boltzflow.sampling.reduction import LOCAL, ProcessGroupReduction, Reduction
from boltzflow.sampling.weights import (
    clip_log_weights,
    forward_ess_fraction,
    log_weights,
)
from boltzflow.systems.base import (
    System,
    compute_energies,
    describe_energy_provenance,
    energy_provenance_of,
)

__all__ = ["ALDP_STATE_A", "load_reference", "reweight_analysis", "sample_energies"]

# Below this Kish ESS the report warns that its intervals are not to be trusted.
_MIN_RELIABLE_ESS = 30


def load_reference(
    path: str | os.PathLike[str], system: System
) -> tuple[np.ndarray, np.ndarray | None]:
    """Reference positions (and their model log q if stored) from ``.npy``, a boltzflow dataset,
    a boltzflow sample store, or a plain HDF5 file with a ``positions`` dataset."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference file not found: {path}")
    if path.suffix.lower() in (".h5", ".hdf5", ".hdf"):
        import h5py

        try:
            with h5py.File(path, "r") as f:
                is_store = f.attrs.get("format") == FORMAT_NAME
        except OSError:
            is_store = True  # an SWMR file whose writer died: read_samples handles it
        if is_store:
            ref = read_samples(path)
            if ref.x.shape[1] != system.dim:
                raise ValueError(f"{path}: reference has dim {ref.x.shape[1]}, not {system.dim}")
            if ref.n == 0:
                raise ValueError(f"{path}: the reference holds no samples")
            return ref.x.astype(np.float64), ref.log_q
    from boltzflow.data import load_positions

    x = np.asarray(load_positions(path, system=system), dtype=np.float64)
    if len(x) == 0:
        raise ValueError(f"{path}: the reference holds no samples")
    return x, None


@dataclass(frozen=True)
class _Rows:
    """This process's rows of the union of the sample files, and facts about the files."""

    x: np.ndarray
    log_q: np.ndarray
    u: np.ndarray | None
    source: str  # the file, or "K files (first, ...)"
    partial: str  # partial-file note ("" if every file is complete)
    # the ``energy`` entry of the first file's provenance (what computed its stored u; None if
    # not recorded), and whether every file records the same one
    energy: Any = None
    energy_same: bool = True


def _partial_note(n: int, planned: int | None) -> str:
    planned_text = "an unknown number of" if planned is None else str(planned)
    return f"partial file: using {n} of {planned_text} planned rows"


def _read_rows(
    samples: SampleSet | str | os.PathLike[str] | Sequence[Any],
    dim: int,
    allow_partial: bool,
    me: distributed.DistInfo,
) -> _Rows:
    """Read and check this rank's contiguous part of the union's rows (all of them for one
    process); a :class:`SampleSet` is this process's part as it is."""
    if isinstance(samples, SampleSet):
        heads, n_rows, parts = [samples], [samples.n], [samples]
    else:
        files = resolve_sample_files(samples)
        # the headers (no row read): row counts, completeness, columns
        heads = [read_samples(f, stop=0, allow_partial=allow_partial) for f in files]
        n_rows = [int(h.attrs["n_complete"]) for h in heads]
        lo, hi = distributed.shard_range(sum(n_rows), me.rank, me.world_size)
        parts, first = [], 0
        for f, k in zip(files, n_rows):
            a, b = max(lo, first) - first, min(hi, first + k) - first
            if b > a:
                parts.append(read_samples(f, start=a, stop=b, allow_partial=True))
            first += k
    for head in heads:
        where = "" if head.path is None else f"{head.path}: "
        if head.dim != dim:
            raise ValueError(f"{where}samples have dim {head.dim} but the system has {dim}")
        if head.log_q is None:
            raise ValueError(
                f"{where}the sample file has no log_q column: importance weights need the "
                "proposal's log-density at every sample"
            )
    if sum(n_rows) == 0 and not isinstance(samples, SampleSet):
        raise ValueError("the sample file holds no complete chunk of samples")
    notes = [(h, k) for h, k in zip(heads, n_rows) if not h.complete]
    if len(heads) == 1:
        partial = _partial_note(n_rows[0], heads[0].n_planned) if notes else ""
    else:
        partial = "; ".join(f"{h.path.name}: {_partial_note(k, h.n_planned)}" for h, k in notes)
    x = np.concatenate([p.x for p in parts]) if parts else np.zeros((0, dim))
    log_q = np.concatenate([p.log_q for p in parts]) if parts else np.zeros(0)
    u = None
    if all(h.u is not None for h in heads):
        u = np.concatenate([p.u for p in parts]) if parts else np.zeros(0)
    paths = [h.path for h in heads]
    source = str(paths[0]) if len(paths) == 1 else f"{len(paths)} files ({paths[0]}, ...)"
    energies = [h.provenance.get("energy") for h in heads]
    same = all(e == energies[0] for e in energies[1:])
    return _Rows(x, log_q, u, source, partial, energies[0], same)


def _is_dihedral_system(system: System) -> bool:
    return hasattr(system, "backbone_dihedrals") and system.spatial_dim == 3


def _dihedrals(system: System, x: Tensor) -> tuple[np.ndarray, np.ndarray]:
    phi, psi = system.backbone_dihedrals(torch.as_tensor(x, dtype=torch.float64))
    return phi.numpy(), psi.numpy()


def sample_energies(
    samples: SampleSet, system: System, *, recompute: bool = True
) -> tuple[Tensor, dict[str, Any]]:
    """Reduced energies ``(N,)`` float64 (kT) of stored samples, and where they come from.

    Recomputed with ``system`` when ``recompute`` is set or the store has no ``u`` column (a
    stored column is then compared: ``stored_u_max_abs_diff``); otherwise the stored column,
    described by the ``energy`` entry of the store's provenance (written by ``boltzflow
    sample`` and the workflows since energy backends exist; "not recorded" before).

    Returns:
        ``(u, record)``; ``record["u"]`` is one line such as ``"recomputed: aldp, torch backend
        (float64, device input)"``, plus ``stored_u_max_abs_diff`` where both exist.
    """
    record: dict[str, Any] = {}
    if recompute or samples.u is None:
        u = compute_energies(system, torch.as_tensor(samples.x, dtype=torch.float64))
        record["u"] = _recomputed_line(system)
        if samples.u is not None:
            diff = np.abs(u.numpy() - samples.u)
            finite = np.isfinite(diff)
            record["stored_u_max_abs_diff"] = float(diff[finite].max()) if finite.any() else None
    else:
        u = torch.as_tensor(samples.u, dtype=torch.float64)
        record["u"] = _stored_line(samples.provenance.get("energy"))
    return u, record


def _recomputed_line(system: System) -> str:
    return f"recomputed: {describe_energy_provenance(energy_provenance_of(system))}"


def _stored_line(energy: Any, same: bool = True) -> str:
    """``record["u"]`` for a stored column, from the store's provenance ``energy`` entry."""
    line = f"stored column: {describe_energy_provenance(energy)}"
    return line if same else f"{line} (first file; the files record different sources)"


def reweight_analysis(
    samples: SampleSet | str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    system: System,
    out_dir: str | os.PathLike[str],
    *,
    reference: str | os.PathLike[str] | None = None,
    clip_fraction: float = 0.0,
    recompute_energy: bool = True,
    n_bootstrap: int = 200,
    level: float = 0.95,
    seed: int = 0,
    max_ot_points: int = 2000,
    trajectory: str | None = None,
    n_resample: int | None = None,
    allow_partial: bool = False,
) -> dict[str, Any]:
    """Importance-weight stored proposal samples and write plots and a report into ``out_dir``.

    Args:
        samples: a sample store (or its path) with ``x`` and ``log_q``; or several stores, or a
            shard manifest (:func:`~boltzflow.io.shards.resolve_sample_files`), whose union is
            analysed. Under several ranks each reads its part of the union (module docstring);
            a :class:`SampleSet` is then this rank's part.
        system: the target.
        out_dir: output folder (``report.md``, ``report.json``, ``*.png``; written by rank 0).
        reference: optional reference samples file (see :func:`load_reference`): adds energy
            W1/W2, forward ESS and NLL (if it stores the proposal's log q at the reference
            samples), and for ALDP-like systems Ramachandran KL, torus W2 and the reference ΔF.
        clip_fraction: clip this fraction of the largest weights (reported) before estimating.
        recompute_energy: recompute u with ``system`` (else trust a stored ``u`` column).
        n_bootstrap: bootstrap replicates for log Z, ΔF and profile bands.
        level: confidence level.
        seed: seed of the bootstrap, OT subsampling and resampling.
        max_ot_points: cap on points per side for the torus W2.
        trajectory: write reweighted samples as a trajectory of this format (``"dcd"``,
            ``"pdb"`` or ``"h5"``) for molecular systems.
        n_resample: frames to resample for the trajectory (default: min(N, 1000)).
        allow_partial: accept a store whose writer did not finish (its complete chunks); the
            rows used are reported in ``results["weights"]["partial file"]`` and the notes.

    Returns:
        The results dict (as in ``report.json``'s ``results``), with ``"plots"`` and
        ``"report"`` paths added on rank 0 (the same estimates on every rank, without them).
    """
    me = distributed.info()
    red: Reduction = ProcessGroupReduction() if me.distributed else LOCAL
    rows = red.run(lambda: _read_rows(samples, system.dim, allow_partial, me))
    if trajectory is not None and not _is_dihedral_system(system):
        raise ValueError(f"trajectory export needs a molecular system; {system.name} is not one")
    out = Path(out_dir)
    # the reference is checked before the output folder is made
    ref = red.run(lambda: None if reference is None else load_reference(reference, system))
    counts = distributed.all_gather_objects(len(rows.x))
    n, offset = sum(counts), sum(counts[: me.rank])
    if n == 0:
        raise ValueError("the sample file holds no complete chunk of samples")
    if me.is_main:
        out.mkdir(parents=True, exist_ok=True)
    x = torch.as_tensor(rows.x, dtype=torch.float64)
    log_q = torch.as_tensor(rows.log_q, dtype=torch.float64)
    energy_check: dict[str, Any] = {}
    if recompute_energy or rows.u is None:
        u = compute_energies(system, x) if len(x) else torch.zeros(0, dtype=torch.float64)
        energy_check["u"] = _recomputed_line(system)
        if rows.u is not None:
            diff = np.abs(u.numpy() - rows.u)
            diff = red.gather(diff[np.isfinite(diff)])
            energy_check["stored_u_max_abs_diff"] = float(diff.max()) if diff.size else None
    else:
        u = torch.as_tensor(rows.u, dtype=torch.float64)
        energy_check["u"] = _stored_line(rows.energy, rows.energy_same)
    log_w = log_weights(u, log_q)
    ess = red.kish_ess(log_w.numpy())
    results: dict[str, Any] = {}
    weights: dict[str, Any] = {
        "N": n,
        **({"partial file": rows.partial} if rows.partial else {}),
        "ESS": ess,
        "ESS/N": ess / n,
        "zero-weight samples (u = inf or log q invalid)": red.count(
            int((~torch.isfinite(log_w)).sum())
        ),
        **energy_check,
    }
    lw_np = log_w.numpy()
    if clip_fraction > 0:
        clipped = clip_log_weights(torch.as_tensor(red.gather(lw_np)), clip_fraction)
        lw_np = clipped.log_w.numpy()[offset : offset + len(lw_np)]
        weights.update(
            {
                "clipped fraction": clipped.fraction_clipped,
                "clipped weights": clipped.n_clipped,
                "clipped weight mass": clipped.mass_clipped,
                "ESS/N after clipping": red.kish_ess(lw_np) / n,
            }
        )
    weights["log Z (delta)"] = log_partition(lw_np, level=level, reduction=red)
    weights["log Z (bootstrap)"] = log_partition(
        lw_np, method="bootstrap", n_bootstrap=n_bootstrap, level=level, seed=seed, reduction=red
    )
    if system.log_z is not None:
        weights["exact log Z"] = system.log_z
    results["weights"] = weights
    u_np = u.numpy()
    finite = np.isfinite(u_np)
    n_finite = red.count(int(finite.sum()))
    results["energy"] = {
        "mean u, proposal": float(red.sum(u_np[finite])) / n_finite if n_finite else None,
        "mean u, reweighted": snis_expectation(u_np, lw_np, level=level, reduction=red),
    }
    molecular = _is_dihedral_system(system)
    delta_f = _delta_f(system, x, lw_np, n_bootstrap, level, seed, red) if molecular else {}
    # from here on rank 0 works alone, on the gathered union
    u_all, lw_all = red.gather(u_np), red.gather(lw_np)
    x_all = red.gather(rows.x) if (molecular or ref is not None) and red.distributed else rows.x
    if not me.is_main:
        if molecular:
            results["molecular"] = delta_f
        return results
    x_all = torch.as_tensor(x_all, dtype=torch.float64)
    w_norm = np.exp(lw_all - np.max(lw_all))
    w_norm /= w_norm.sum()

    ref_x = ref_lq = None
    u_ref = None
    if ref is not None:
        ref_x, ref_lq = ref
        u_ref = compute_energies(system, torch.as_tensor(ref_x))
        finite_u = np.isfinite(u_all)
        metrics: dict[str, Any] = {
            "reference N": int(ref_x.shape[0]),
            "energy W1, proposal (kT)": energy_w1(u_ref.numpy(), u_all[finite_u]),
            "energy W2, proposal (kT, with sqrt)": energy_w2(u_ref.numpy(), u_all[finite_u]),
            "energy W1, reweighted (kT)": energy_w1(u_ref.numpy(), u_all, w_norm),
            "energy W2, reweighted (kT, with sqrt)": energy_w2(u_ref.numpy(), u_all, w_norm),
        }
        if ref_lq is not None:
            lw_ref = log_weights(u_ref, torch.as_tensor(ref_lq, dtype=torch.float64))
            metrics["forward ESS/N (over reference)"] = forward_ess_fraction(lw_ref)
            metrics["NLL of reference under the proposal (nats)"] = nll(ref_lq, level=level)
        results["metrics vs reference"] = metrics

    plots: dict[str, Path] = {}
    from boltzflow import plots as P

    plots["energy histograms"] = P.plot_energy_histograms(
        out / "energy_histograms.png",
        u_all,
        log_w=lw_all,
        u_reference=None if u_ref is None else u_ref.numpy(),
        title=f"{system.name}: reduced energy",
    )
    plots["log-weight histogram"] = P.plot_log_weights(out / "log_weights.png", lw_all)
    plots["ESS vs N"] = P.plot_ess_vs_n(out / "ess_vs_n.png", lw_all, seed=seed)

    if molecular:
        results["molecular"] = _molecular_section(
            system,
            x_all,
            lw_all,
            w_norm,
            delta_f,
            ref_x,
            out,
            plots,
            n_bootstrap,
            level,
            seed,
            max_ot_points,
        )
        if trajectory is not None:
            from boltzflow.analysis.trajectory import export_trajectory

            k = n_resample or min(n, 1000)
            path = export_trajectory(
                out / f"reweighted.{trajectory.lstrip('.')}",
                x_all.numpy(),
                system,
                log_w=lw_all,
                n_resample=k,
                seed=seed,
            )
            results["molecular"]["trajectory"] = f"{path.name} ({k} frames resampled by weight)"

    notes = [
        f"system {system.name}, samples {rows.source}, N = {n}",
        f"seed {seed}, bootstrap B = {n_bootstrap}, confidence level {level:g}",
        "log w = -u(x) - log q(x); energy W2 is reported with the square root (W2, not W2^2)",
        f"u: {energy_check['u']}",
    ]
    if me.distributed:
        notes.append(
            f"analysed by {me.world_size} processes (each its part of the union's rows); "
            "N, ESS, log Z, mean u and ΔF combined exactly across them"
        )
    if rows.partial:
        notes.append(rows.partial + " (the writer did not finish)")
    if clip_fraction > 0:
        notes.append(f"the largest {100 * clip_fraction:g}% of weights were clipped (see weights)")
    if weights["ESS"] < _MIN_RELIABLE_ESS:
        notes.append(
            f"ESS = {weights['ESS']:.1f} < {_MIN_RELIABLE_ESS}: the weights are degenerate and the "
            "delta-method and bootstrap intervals are not reliable"
        )
    md_path, json_path = write_report(
        out, results, title=f"Reweighting report: {system.name}", plots=plots, notes=notes
    )
    results["plots"] = {k: str(v) for k, v in plots.items()}
    results["report"] = {"markdown": str(md_path), "json": str(json_path)}
    return results


def _delta_f(
    system: System,
    x: Tensor,
    lw: np.ndarray,
    n_bootstrap: int,
    level: float,
    seed: int,
    red: Reduction,
) -> dict[str, Any]:
    """ΔF between φ in ALDP_STATE_A and the rest (delta and bootstrap), over all ranks."""
    phi = _dihedrals(system, x)[0] if len(x) else np.zeros(0)
    in_a = in_region(phi)
    lo, hi = ALDP_STATE_A
    label = f"ΔF = -log P({lo:g} < φ < {hi:g}) / P(otherwise) (kT)"
    try:
        return {
            f"{label}, reweighted (delta)": free_energy_difference(
                in_a, ~in_a, lw, level=level, reduction=red
            ),
            f"{label}, reweighted (bootstrap)": free_energy_difference(
                in_a,
                ~in_a,
                lw,
                method="bootstrap",
                n_bootstrap=n_bootstrap,
                level=level,
                seed=seed,
                reduction=red,
            ),
        }
    except ValueError as err:  # a state without weight: the same on every rank
        return {f"{label}, reweighted": f"undefined: {err}"}


def _molecular_section(
    system: System,
    x: Tensor,
    lw: np.ndarray,
    w_norm: np.ndarray,
    delta_f: dict[str, Any],
    ref_x: np.ndarray | None,
    out: Path,
    plots: dict[str, Path],
    n_bootstrap: int,
    level: float,
    seed: int,
    max_ot_points: int,
) -> dict[str, Any]:
    from boltzflow import plots as P

    phi, psi = _dihedrals(system, x)
    atoms = getattr(system, "chirality_atoms", None)
    l_sign = getattr(system, "l_form_sign", 1)
    section: dict[str, Any] = {
        "chirality: D-form fraction, proposal": chirality_rate(x, atoms, l_sign),
        "chirality: D-form fraction, reweighted": chirality_rate(x, atoms, l_sign, w_norm),
    }
    lo, hi = ALDP_STATE_A
    label = f"ΔF = -log P({lo:g} < φ < {hi:g}) / P(otherwise) (kT)"
    section.update(delta_f)
    panels: dict[str, tuple[Any, Any, Any]] = {
        "proposal": (phi, psi, None),
        "reweighted": (phi, psi, w_norm),
    }
    profile = free_energy_profile(
        phi,
        lw,
        bins=36,
        value_range=(-math.pi, math.pi),
        n_bootstrap=n_bootstrap,
        level=level,
        seed=seed,
    )
    ref_profile = None
    if ref_x is not None:
        rphi, rpsi = _dihedrals(system, torch.as_tensor(ref_x))
        panels["reference"] = (rphi, rpsi, None)
        zeros = np.zeros(rphi.size)
        r_in = in_region(rphi)
        try:
            section[f"{label}, reference"] = free_energy_difference(r_in, ~r_in, zeros, level=level)
        except ValueError as err:
            section[f"{label}, reference"] = f"undefined: {err}"
        ref_angles = np.stack([rphi, rpsi], 1)
        angles = np.stack([phi, psi], 1)
        section["Ramachandran KL(ref || proposal) (60x60 bins, pseudocount 1e-6)"] = (
            ramachandran_kl(rphi, rpsi, phi, psi)
        )
        section["Ramachandran KL(ref || reweighted) (60x60 bins, pseudocount 1e-6)"] = (
            ramachandran_kl(rphi, rpsi, phi, psi, w_norm)
        )
        section["torus W2 (φ, ψ), proposal (rad)"] = torus_w2(
            ref_angles, angles, max_points=max_ot_points, seed=seed
        )
        section["torus W2 (φ, ψ), reweighted (rad)"] = torus_w2(
            ref_angles, angles, weights=w_norm, max_points=max_ot_points, seed=seed
        )
        ref_profile = free_energy_profile(
            rphi, zeros, bins=36, value_range=(-math.pi, math.pi), method="delta"
        )
    section["φ profile"] = profile
    plots["Ramachandran"] = P.plot_ramachandran(out / "ramachandran.png", panels)
    plots["free-energy profile φ"] = P.plot_free_energy_profile(
        out / "profile_phi.png", profile, label="φ [rad]", reference=ref_profile, f_max=12.0
    )
    return section
