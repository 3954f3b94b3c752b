"""``boltzflow reweight`` (weights, ESS, metrics, plots, report) and ``boltzflow estimate``
(observables and ΔF from a TOML spec)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

from boltzflow.validate import arg, nonnegative_int, positive_int, probability, unit_interval

__all__ = ["register"]


def _cmd_reweight(args: argparse.Namespace) -> int:
    from boltzflow import distributed
    from boltzflow.analysis.reweight import reweight_analysis
    from boltzflow.io.outputs import check_output_dir, remove_on_failure
    from boltzflow.systems import load_system

    me = distributed.info()
    output = distributed.run_on_all(lambda: check_output_dir(args.output))
    system = distributed.run_on_all(lambda: load_system(args.system))
    # only rank 0 writes into the output folder, and only it removes it on failure
    cleanup = remove_on_failure(output) if me.is_main else contextlib.nullcontext()
    with system, cleanup:
        results = reweight_analysis(
            args.samples,
            system,
            output,
            reference=args.reference,
            clip_fraction=args.clip,
            recompute_energy=not args.use_stored_energy,
            n_bootstrap=args.n_bootstrap,
            level=args.level,
            seed=args.seed,
            trajectory=args.trajectory,
            n_resample=args.n_resample,
            allow_partial=args.allow_partial,
        )
    if not me.is_main:
        return 0
    w = results["weights"]
    if "partial file" in w:
        print(w["partial file"])
    print(f"N = {w['N']}, ESS = {w['ESS']:.1f}, ESS/N = {w['ESS/N']:.4g}")
    print(f"log Z = {w['log Z (delta)']}")
    print(f"report: {results['report']['markdown']}")
    return 0


def _cmd_estimate(args: argparse.Namespace) -> int:
    from boltzflow.analysis.estimate import estimate_from_spec
    from boltzflow.analysis.report import jsonable
    from boltzflow.io.outputs import check_output_dir, remove_on_failure

    if args.output is None:
        results = estimate_from_spec(args.spec, allow_partial=args.allow_partial)
    else:
        output = check_output_dir(args.output)
        with remove_on_failure(output):
            results = estimate_from_spec(
                args.spec, out_dir=output, allow_partial=args.allow_partial
            )
    if "partial file" in results["weights"]:
        print(results["weights"]["partial file"], file=sys.stderr)
    print(json.dumps(jsonable(results), indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reweight",
        help="importance-weight proposal samples: ESS, log Z, metrics, plots, report",
        description="Weights log w = -u(x) - log q(x) for a sample store written by boltzflow "
        "(needs x and log_q); writes report.md, report.json and PNG plots to the output folder.",
    )
    p.add_argument(
        "samples",
        nargs="+",
        help="HDF5 sample store(s) (boltzflow.io.samples), analysed as one union; or the "
        "OUT.shards.json manifest (or OUT.h5) of a distributed `boltzflow sample`",
    )
    p.add_argument("--system", required=True, help="system name (see `boltzflow systems`)")
    p.add_argument("-o", "--output", required=True, help="result folder")
    p.add_argument("--reference", default=None, help="reference samples (.npy or .h5)")
    p.add_argument(
        "--clip",
        type=arg(unit_interval, "--clip"),
        default=0.0,
        help="fraction of largest weights to clip",
    )
    p.add_argument(
        "--n-bootstrap",
        type=arg(positive_int, "--n-bootstrap"),
        default=200,
        help="bootstrap replicates (200)",
    )
    p.add_argument(
        "--level", type=arg(probability, "--level"), default=0.95, help="confidence level (0.95)"
    )
    p.add_argument(
        "--seed",
        type=arg(nonnegative_int, "--seed"),
        default=0,
        help="seed for bootstrap and resampling",
    )
    p.add_argument("--use-stored-energy", action="store_true", help="trust the stored u column")
    p.add_argument(
        "--trajectory",
        choices=["dcd", "pdb", "h5"],
        default=None,
        help="also export resampled molecular samples as a trajectory",
    )
    p.add_argument(
        "--n-resample", type=arg(positive_int, "--n-resample"), help="frames to resample (<= 1000)"
    )
    _allow_partial_option(p)
    p.set_defaults(func=_cmd_reweight, distributed=True)

    p = sub.add_parser(
        "estimate",
        help="observables and free-energy differences from a TOML spec",
        description="See boltzflow.analysis.estimate.estimate_from_spec for the spec format.",
    )
    p.add_argument("spec", help="TOML spec file")
    p.add_argument("-o", "--output", default=None, help="folder for estimate.md / estimate.json")
    _allow_partial_option(p)
    p.set_defaults(func=_cmd_estimate)


def _allow_partial_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-partial",
        action="store_true",
        help="use the complete chunks of a sample file whose writer did not finish "
        "(interrupted or failed); the rows used are reported",
    )
