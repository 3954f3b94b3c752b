"""``boltzflow demo``: the main job on the embedded default systems.

For now: the systems table and the reduced energy of each system's reference configuration.
"""

from __future__ import annotations

import argparse

from boltzflow.cli.systems_cmd import format_table, systems_table
from boltzflow.systems import available, load_system

__all__ = ["register"]


def _cmd_demo(args: argparse.Namespace) -> int:
    print(format_table(systems_table()))
    print()
    rows = []
    for name in available():
        with load_system(name) as system:
            x0 = system.reference_configuration()
            u = float(system.energy(x0)[0])
        rows.append({"system": name, "reference configuration u (kT)": f"{u:.4f}"})
    print(format_table(rows))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the main job on the embedded default systems")
    p.set_defaults(func=_cmd_demo)
