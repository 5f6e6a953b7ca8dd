"""`lambo` command line: one sub-command per module in :mod:`lambo_ray.commands`.

Sub-command modules are imported lazily (Ray and torch take seconds to import), and every
:class:`LamboInputError` (bad files, bad values, and command lines argparse rejects) becomes one line
on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import sys

from lambo_ray.commands import COMMANDS, build_parser, command_module
from lambo_ray.errors import LamboInputError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    only = argv[0] if argv and argv[0] in COMMANDS else None
    label = f"lambo {only}" if only else "lambo"
    try:
        # `lambo --help` / a bad command: list the commands without importing their modules.
        args = build_parser(only).parse_args(argv)
        if only is None:
            return 2
        return int(command_module(args.command).run(args) or 0)
    except LamboInputError as err:
        print(f"{label}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{label}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
