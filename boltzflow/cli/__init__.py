"""Command-line interface ``boltzflow``.

Each command group lives in its own module exposing ``register(subparsers)``; the module sets
``func`` on its parser, which receives the parsed namespace and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from boltzflow import __version__, distributed
from boltzflow.progress import set_quiet

__all__ = ["build_parser", "main"]

# One module per command group, registered in this order.
_COMMANDS = [
    "boltzflow.cli.systems_cmd",
    "boltzflow.cli.demo_cmd",
    "boltzflow.cli.data_cmd",
    "boltzflow.cli.reweight_cmd",
    "boltzflow.cli.teacher_cmd",
    "boltzflow.cli.nf_cmd",
    "boltzflow.cli.distill_cmd",
    "boltzflow.cli.sample_cmd",
    "boltzflow.cli.run_cmd",
]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="boltzflow", description="Boltzmann sampling with distilled flows."
    )
    parser.add_argument("--version", action="version", version=f"boltzflow {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help=_QUIET_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in _COMMANDS:
        importlib.import_module(module).register(sub)
    _add_quiet_to_subcommands(parser)
    return parser


_QUIET_HELP = "no progress output (bars or periodic progress lines); also BOLTZFLOW_QUIET=1"


def _add_quiet_to_subcommands(parser: argparse.ArgumentParser) -> None:
    """Accept ``--quiet`` after any subcommand too (``boltzflow train teacher ... --quiet``).

    SUPPRESS as default keeps a ``--quiet`` given before the subcommand: the subparser then sets
    nothing. A subcommand that already uses ``-q`` or ``--quiet`` keeps its own meaning."""
    seen: set[int] = set()
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for child in action.choices.values():
            if id(child) in seen:  # aliases share one parser
                continue
            seen.add(id(child))
            flags = [f for f in ("-q", "--quiet") if f not in child._option_string_actions]
            if flags:
                child.add_argument(
                    *flags,
                    dest="quiet",
                    action="store_true",
                    default=argparse.SUPPRESS,
                    help=_QUIET_HELP,
                )
            _add_quiet_to_subcommands(child)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code. Expected user errors print one line, not a traceback.

    Under ``torchrun`` (``WORLD_SIZE > 1``) the commands that support it (``sample``,
    ``reweight``, ``train teacher``, ``distill`` of F2D2 and FALCON students, ``run``) run
    inside a process group (:func:`boltzflow.distributed.session`); the others refuse to start.
    Only rank 0 shows progress; errors name the rank.
    """
    args = build_parser().parse_args(argv)
    try:
        env = distributed.launched()
    except ValueError as err:
        print(f"boltzflow {args.command}: error: {err}", file=sys.stderr)
        return 2
    where = f"boltzflow {args.command}" + (f" ({env.tag()})" if env.distributed else "")
    if env.distributed and not getattr(args, "distributed", False):
        print(
            f"{where}: error: this command does not run under torchrun (WORLD_SIZE="
            f"{env.world_size}); run it as one process",
            file=sys.stderr,
        )
        return 2
    # --quiet holds for this call only (main may run several times in one process, e.g. tests)
    quiet = getattr(args, "quiet", False) or not env.is_main
    quiet_before = set_quiet(True) if quiet else None
    try:
        # SIGTERM (kill, a scheduler's preemption, the launcher) stops a command as Ctrl-C does
        with distributed.sigterm_raises(), distributed.session():
            return int(args.func(args) or 0)
    except distributed.Terminated:
        why = " by the launcher (another rank failed?)" if env.distributed else " (SIGTERM)"
        print(f"{where}: terminated{why}", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("boltzflow: interrupted", file=sys.stderr)
        return 130
    except (CLIError, FileNotFoundError, KeyError, ValueError, TypeError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"{where}: error: {msg}", file=sys.stderr)
        return 2
    except OSError as err:  # the last line of defence: unwritable paths, a full disk
        print(f"{where}: error: {_os_error(err)}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        if not (env.distributed and distributed.is_communication_error(err)):
            raise
        # a collective that failed or timed out: another rank died or stopped answering
        first = str(err).splitlines()[0] if str(err) else ""
        print(
            f"{where}: error: communication with the other ranks failed (another rank probably "
            f"failed or was killed; see its message): {type(err).__name__}: {first}",
            file=sys.stderr,
        )
        return 1
    finally:
        if quiet_before is not None:
            set_quiet(quiet_before)


def _os_error(err: OSError) -> str:
    """One line naming the path and the reason (``out.h5: Permission denied``)."""
    if err.strerror is None:
        return str(err)
    names = [str(n) for n in (err.filename, err.filename2) if n is not None]
    return ": ".join([" -> ".join(names), err.strerror] if names else [err.strerror])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
