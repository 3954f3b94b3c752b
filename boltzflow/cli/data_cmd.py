"""``boltzflow data generate`` (reference data to HDF5) and ``boltzflow data info`` (inspect)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from boltzflow.validate import arg, nonnegative_int, positive_int

__all__ = ["register"]


def _parse_set(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; values parsed as JSON where possible (numbers, true/false, null)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _cmd_generate(args: argparse.Namespace) -> int:
    from boltzflow.data import generate, write_dataset
    from boltzflow.io.outputs import check_output_file, remove_on_failure

    output = check_output_file(args.output)
    settings = _parse_set(args.set or [])
    for key in ("burn_in", "stride", "n_chains"):
        value = getattr(args, key)
        if value is not None:
            settings[key] = value
    if args.method == "md_seeded":  # finished segments go beside the output, for a resume
        from boltzflow.data.seeded_md import default_segments_dir

        settings.setdefault("segments_dir", str(default_segments_dir(output)))
    x, u, provenance = generate(
        args.system, args.n, seed=args.seed, method=args.method, progress=True, **settings
    )
    with remove_on_failure(output):  # the folders write_dataset creates
        path = write_dataset(output, x, system=args.system, provenance=provenance, energies=u)
    if args.method == "md_seeded" and not provenance["settings"]["keep_segments"]:
        from boltzflow.data.seeded_md import remove_segments

        remove_segments(provenance["settings"]["segments_dir"])
    stats = provenance["statistics"]
    print(
        f"wrote {len(x)} samples of {args.system} ({provenance['method']}, seed {args.seed}) to "
        f"{path}; energy {u.mean():.4f} ± {u.std():.4f} kT (mean ± std)"
    )
    for key in ("acceptance", "swap_acceptance", "step_size", "positive_phi_fraction", "seconds"):
        if key in stats:
            print(f"  {key}: {stats[key]}")
    if stats.get("interrupted"):
        print(f"  interrupted: kept {len(x)} of {args.n} frames")
        return 130
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from boltzflow.data import read_dataset

    ds = read_dataset(Path(args.file), verify=True, allow_partial=True)
    if ds.complete:
        state = "complete"
    else:
        planned = "an unknown number of" if ds.n_planned is None else ds.n_planned
        state = f"PARTIAL: {len(ds)} of {planned} planned samples (generation interrupted)"
    print(f"{ds.path}: {len(ds)} samples x {ds.dim} coordinates ({ds.positions.dtype}); {state}")
    print("checksum: OK (sha256 " + str(ds.attrs["checksum_sha256"]) + ")")
    if ds.energies is not None:
        e = ds.energies
        print(
            f"energies: mean {e.mean():.4f} kT, std {e.std():.4f}, "
            f"min {e.min():.4f}, max {e.max():.4f}"
        )
    for name, value in ds.extra.items():
        print(f"extra: {name} {value.shape} {value.dtype}")
    skip = {"provenance", "checksum_sha256"}
    width = max(len(k) for k in ds.attrs)
    for key in sorted(ds.attrs):
        if key in skip:
            continue
        value = ds.attrs[key]
        text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
        print(f"  {key.ljust(width)}  {text}")
    stats = ds.attrs.get("provenance", {}).get("statistics")
    if stats:
        print(f"  {'statistics'.ljust(width)}  {json.dumps(stats, sort_keys=True)}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="generate and inspect reference datasets (HDF5)")
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    data_sub.required = True

    g = data_sub.add_parser(
        "generate",
        help="sample a system (MCMC, exact or MD) into an HDF5 dataset",
        description="Sample a named system and write positions, reduced energies and provenance "
        "to an HDF5 file. Methods and their settings: see boltzflow.data.generate.",
    )
    g.add_argument("system", help="system name (see `boltzflow systems`)")
    g.add_argument(
        "-n", type=arg(positive_int, "-n"), required=True, help="number of samples (MD frames)"
    )
    g.add_argument("-o", "--output", required=True, help="output .h5 file")
    g.add_argument(
        "--seed", type=arg(nonnegative_int, "--seed"), default=0, help="random seed (default 0)"
    )
    g.add_argument(
        "--method",
        default="auto",
        choices=["auto", "exact", "mala", "hmc", "pt", "md", "md_seeded"],
        help="sampler (default auto: md for molecules, exact where available, pt for dw4, "
        "else mala); md_seeded: ALDP data covering both phi basins from seeded segments",
    )
    g.add_argument(
        "--burn-in",
        dest="burn_in",
        type=arg(nonnegative_int, "--burn-in"),
        default=None,
        help="burn-in steps",
    )
    g.add_argument(
        "--stride",
        type=arg(positive_int, "--stride"),
        default=None,
        help="steps between saved samples",
    )
    g.add_argument(
        "--chains",
        dest="n_chains",
        type=arg(positive_int, "--chains"),
        default=None,
        help="parallel MCMC chains",
    )
    g.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="any other method setting, e.g. --set t_max=8 --set platform=Reference (repeatable)",
    )
    g.set_defaults(func=_cmd_generate)

    i = data_sub.add_parser("info", help="print a dataset's attributes and verify its checksum")
    i.add_argument("file", help="HDF5 dataset written by `boltzflow data generate`")
    i.set_defaults(func=_cmd_info)
