"""``boltzflow systems`` (table of named systems) and ``boltzflow energy`` (reduced energies)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from boltzflow.systems import available, load_system

__all__ = ["register", "systems_table"]


def systems_table() -> list[dict[str, object]]:
    """One row per named system: name, dim, particles, temperature, force field, exact facts."""
    rows = []
    for name in available():
        with load_system(name) as system:
            temperature = system.temperature
            rows.append(
                {
                    "name": name,
                    "dim": system.dim,
                    "particles": system.n_particles if system.n_particles is not None else "-",
                    "temperature": f"{temperature:g} K" if temperature is not None else "- (kT=1)",
                    "force field": system.info.force_field or "-",
                    "log Z known": "yes" if system.log_z is not None else "no",
                    "exact samples": "yes" if system.has_exact_samples else "no",
                }
            )
    return rows


def format_table(rows: list[dict[str, object]]) -> str:
    """Plain-text table with aligned columns."""
    if not rows:
        return "(empty)"
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
    lines.append("  ".join("-" * widths[c] for c in cols))
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def _cmd_systems(args: argparse.Namespace) -> int:
    print(format_table(systems_table()))
    return 0


def _cmd_energy(args: argparse.Namespace) -> int:
    from boltzflow.data import load_positions  # local: data module pulls in h5py
    from boltzflow.io.atomic import atomic_save_npy
    from boltzflow.io.outputs import check_output_file, remove_on_failure

    output = check_output_file(args.output)
    with load_system(args.system) as system:
        # NaN/inf rows are refused unless --nan keep: then they evaluate to u = +inf, row-aligned
        # with the input, and are counted (never dropped silently).
        x = load_positions(Path(args.input), dataset=args.dataset, system=system, nan=args.nan)
        if len(x) == 0:
            raise ValueError(f"{args.input}: no configurations (0 rows)")
        u = system.energy(torch.as_tensor(x, dtype=torch.float64)).detach().cpu().numpy()
        n_bad = int((~np.isfinite(u)).sum())
    with remove_on_failure(output):  # the folders atomic_save_npy creates
        atomic_save_npy(output, u)
    print(f"wrote {len(u)} reduced energies (kT) to {args.output}; non-finite: {n_bad}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("systems", help="list the named systems")
    p.set_defaults(func=_cmd_systems)

    p = sub.add_parser("energy", help="reduced energies u(x) = U(x)/kT of configurations")
    p.add_argument("system", help="system name (see `boltzflow systems`)")
    p.add_argument("input", help=".npy array (N, dim) or HDF5 file")
    p.add_argument("--dataset", default=None, help="HDF5 dataset name (default: positions)")
    p.add_argument("-o", "--output", required=True, help="output .npy of shape (N,)")
    p.add_argument(
        "--nan",
        choices=("raise", "keep"),
        default="raise",
        help="rows with NaN/inf coordinates: refuse them (default) or keep them with u = +inf",
    )
    p.set_defaults(func=_cmd_energy)
