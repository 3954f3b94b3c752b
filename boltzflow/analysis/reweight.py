"""The ``boltzflow reweight`` analysis: :func:`reweight_analysis` turns stored proposal samples
(x, log q) into weights, ESS, log Z, metrics against optional reference samples, plots and a
markdown + JSON report.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from boltzflow.analysis.free_energy import ALDP_STATE_A, in_region
from boltzflow.analysis.report import write_report
from boltzflow.io.samples import FORMAT_NAME, SampleSet, read_samples
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
from boltzflow.sampling.weights import (
    clip_log_weights,
    forward_ess_fraction,
    kish_ess,
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
        record["u"] = f"recomputed: {describe_energy_provenance(energy_provenance_of(system))}"
        if samples.u is not None:
            diff = np.abs(u.numpy() - samples.u)
            finite = np.isfinite(diff)
            record["stored_u_max_abs_diff"] = float(diff[finite].max()) if finite.any() else None
    else:
        u = torch.as_tensor(samples.u, dtype=torch.float64)
        stored = describe_energy_provenance(samples.provenance.get("energy"))
        record["u"] = f"stored column: {stored}"
    return u, record


def reweight_analysis(
    samples: SampleSet | str | os.PathLike[str],
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
        samples: a sample store (or its path) with ``x`` and ``log_q``.
        system: the target.
        out_dir: output folder (``report.md``, ``report.json``, ``*.png``).
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
        ``"report"`` paths added.
    """
    if not isinstance(samples, SampleSet):
        samples = read_samples(samples, allow_partial=allow_partial)
    out = Path(out_dir)
    if samples.x.shape[1] != system.dim:
        raise ValueError(
            f"samples have dim {samples.x.shape[1]} but {system.name} has {system.dim}"
        )
    if samples.log_q is None:
        raise ValueError(
            "the sample file has no log_q column: importance weights need the proposal's "
            "log-density at every sample"
        )
    if samples.n == 0:
        raise ValueError("the sample file holds no complete chunk of samples")
    # the reference is checked before the output folder is made
    ref = None if reference is None else load_reference(reference, system)
    out.mkdir(parents=True, exist_ok=True)
    x = torch.as_tensor(samples.x, dtype=torch.float64)
    log_q = torch.as_tensor(samples.log_q, dtype=torch.float64)
    u, energy_check = sample_energies(samples, system, recompute=recompute_energy)
    log_w = log_weights(u, log_q)
    n = samples.n
    results: dict[str, Any] = {}
    weights: dict[str, Any] = {
        "N": n,
        **({"partial file": samples.partial_note()} if not samples.complete else {}),
        "ESS": kish_ess(log_w),
        "ESS/N": kish_ess(log_w) / n,
        "zero-weight samples (u = inf or log q invalid)": int((~torch.isfinite(log_w)).sum()),
        **energy_check,
    }
    if clip_fraction > 0:
        clipped = clip_log_weights(log_w, clip_fraction)
        log_w = clipped.log_w
        weights.update(
            {
                "clipped fraction": clipped.fraction_clipped,
                "clipped weights": clipped.n_clipped,
                "clipped weight mass": clipped.mass_clipped,
                "ESS/N after clipping": kish_ess(log_w) / n,
            }
        )
    weights["log Z (delta)"] = log_partition(log_w, level=level)
    weights["log Z (bootstrap)"] = log_partition(
        log_w, method="bootstrap", n_bootstrap=n_bootstrap, level=level, seed=seed
    )
    if system.log_z is not None:
        weights["exact log Z"] = system.log_z
    results["weights"] = weights
    lw_np = log_w.numpy()
    w_norm = np.exp(lw_np - np.max(lw_np))
    w_norm /= w_norm.sum()
    results["energy"] = {
        "mean u, proposal": float(np.mean(u.numpy()[np.isfinite(u.numpy())]))
        if bool(torch.isfinite(u).any())
        else None,
        "mean u, reweighted": snis_expectation(u.numpy(), lw_np, level=level),
    }

    ref_x = ref_lq = None
    u_ref = None
    if ref is not None:
        ref_x, ref_lq = ref
        u_ref = compute_energies(system, torch.as_tensor(ref_x))
        finite_u = np.isfinite(u.numpy())
        metrics: dict[str, Any] = {
            "reference N": int(ref_x.shape[0]),
            "energy W1, proposal (kT)": energy_w1(u_ref.numpy(), u.numpy()[finite_u]),
            "energy W2, proposal (kT, with sqrt)": energy_w2(u_ref.numpy(), u.numpy()[finite_u]),
            "energy W1, reweighted (kT)": energy_w1(u_ref.numpy(), u.numpy(), w_norm),
            "energy W2, reweighted (kT, with sqrt)": energy_w2(u_ref.numpy(), u.numpy(), w_norm),
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
        u.numpy(),
        log_w=lw_np,
        u_reference=None if u_ref is None else u_ref.numpy(),
        title=f"{system.name}: reduced energy",
    )
    plots["log-weight histogram"] = P.plot_log_weights(out / "log_weights.png", lw_np)
    plots["ESS vs N"] = P.plot_ess_vs_n(out / "ess_vs_n.png", lw_np, seed=seed)

    if _is_dihedral_system(system):
        results["molecular"] = _molecular_section(
            system, x, lw_np, w_norm, ref_x, out, plots, n_bootstrap, level, seed, max_ot_points
        )
        if trajectory is not None:
            from boltzflow.analysis.trajectory import export_trajectory

            k = n_resample or min(n, 1000)
            path = export_trajectory(
                out / f"reweighted.{trajectory.lstrip('.')}",
                x.numpy(),
                system,
                log_w=lw_np,
                n_resample=k,
                seed=seed,
            )
            results["molecular"]["trajectory"] = f"{path.name} ({k} frames resampled by weight)"
    elif trajectory is not None:
        raise ValueError(f"trajectory export needs a molecular system; {system.name} is not one")

    notes = [
        f"system {system.name}, samples {samples.path}, N = {n}",
        f"seed {seed}, bootstrap B = {n_bootstrap}, confidence level {level:g}",
        "log w = -u(x) - log q(x); energy W2 is reported with the square root (W2, not W2^2)",
        f"u: {energy_check['u']}",
    ]
    if not samples.complete:
        notes.append(samples.partial_note() + " (the writer did not finish)")
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


def _molecular_section(
    system: System,
    x: Tensor,
    lw: np.ndarray,
    w_norm: np.ndarray,
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
    in_a = in_region(phi)
    lo, hi = ALDP_STATE_A
    label = f"ΔF = -log P({lo:g} < φ < {hi:g}) / P(otherwise) (kT)"
    try:
        section[f"{label}, reweighted (delta)"] = free_energy_difference(
            in_a, ~in_a, lw, level=level
        )
        section[f"{label}, reweighted (bootstrap)"] = free_energy_difference(
            in_a, ~in_a, lw, method="bootstrap", n_bootstrap=n_bootstrap, level=level, seed=seed
        )
    except ValueError as err:
        section[f"{label}, reweighted"] = f"undefined: {err}"
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
