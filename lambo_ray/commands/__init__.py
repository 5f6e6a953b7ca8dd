"""One module per `lambo` sub-command, each with ``add_arguments(parser)`` and ``run(args) -> int``.

This package also owns the parser itself (:func:`build_parser`, :func:`command_module`), so that a
command which runs other commands (``demo``) builds them exactly as the console script does.
"""

from __future__ import annotations

import argparse
import importlib
from types import ModuleType
from typing import Any, NoReturn

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


class UsageError(LamboInputError):
    """A command line argparse rejects (unknown flag, bad value, missing required flag)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` where a default says something: not for None, False, or help that names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "(default" in text.lower():
            return text
        return super()._get_help_string(action)


class CommandParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a :class:`UsageError` (one line on stderr, exit code 2)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def command_module(name: str) -> ModuleType:
    """The module of sub-command ``name`` (imported on demand: Ray and torch take seconds to import)."""
    try:
        return importlib.import_module(f"lambo_ray.commands.{name}")
    except ModuleNotFoundError as err:
        if err.name == f"lambo_ray.commands.{name}":
            raise SystemExit(f"lambo: command '{name}' is not available in this build") from None
        raise


def build_parser(only: str | None = None) -> CommandParser:
    """The `lambo` parser; with ``only``, only that sub-command's flags are built (the others are listed)."""
    parser = CommandParser(prog="lambo", description="LAMBO task offloading on Ray")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_text, add_help=False)
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        if only is not None:
            command_module(name).add_arguments(p)
    return parser
