"""Several ``boltzflow`` commands in one torchrun job (one process group, one start-up).

    python -m torch.distributed.run --nproc_per_node=2 torchrun_cli.py ARGV... [::: ARGV...]

Runs ``boltzflow.cli.main`` on each ``:::``-separated command line in turn, inside one
:func:`boltzflow.distributed.session` (the commands see the group and leave it open); stops at
the first command that fails and exits with its code.
"""

from __future__ import annotations

import sys


def main() -> int:
    from boltzflow import distributed
    from boltzflow.cli import main as cli

    commands: list[list[str]] = [[]]
    for word in sys.argv[1:]:
        if word == ":::":
            commands.append([])
        else:
            commands[-1].append(word)
    with distributed.session():
        for argv in commands:
            code = cli(argv)
            if code:
                return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
