"""`lambo` command line: one sub-command per module in :mod:`lambo_ray.commands`.

Sub-command modules are imported lazily (Ray and torch take seconds to import), and every
:class:`LamboInputError` becomes one line on stderr with exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lambo_ray.errors import LamboInputError

COMMANDS: dict[str, str] = {
    "generate": "generate instances of a scenario (optionally drifted) into a .jsonl file",
    "solve": "solve instances with a method (exact, de, droo, are, greedy, ..., lambo)",
    "evaluate": "evaluate decisions against instances (objective, feasibility, gap)",
    "pretrain": "pretrain the LAMBO policy with actor-critic RL on RLlib",
    "finetune": "ALEF: fine-tune the decoder under drift from an expert pool",
    "tune": "Ray Tune sweep over hyperparameters and model scale",
    "serve": "serve the policy with Ray Serve (HTTP API)",
    "report": "reproduction report: tables and plots of every method",
    "demo": "the whole small pipeline on an embedded local Ray",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lambo", description="LAMBO task offloading on Ray")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_text, add_help=False)
            continue
        module = _command_module(name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
    return parser


def _command_module(name: str):
    try:
        return importlib.import_module(f"lambo_ray.commands.{name}")
    except ModuleNotFoundError as err:
        if err.name == f"lambo_ray.commands.{name}":
            raise SystemExit(f"lambo: command '{name}' is not available in this build") from None
        raise


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    only = argv[0] if argv and argv[0] in COMMANDS else None
    if only is None:
        # `lambo --help` / bad command: list commands without importing their modules.
        parser = argparse.ArgumentParser(prog="lambo", description="LAMBO task offloading on Ray")
        sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
        for name, help_text in COMMANDS.items():
            sub.add_parser(name, help=help_text)
        parser.parse_args(argv)
        return 2
    args = build_parser(only).parse_args(argv)
    try:
        return int(_command_module(args.command).run(args) or 0)
    except LamboInputError as err:
        print(f"lambo {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lambo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
