"""The one exception for bad input, and the one rule for building configs from mappings.

Every layer (files, CLI, configs, the policy, Serve) raises :class:`LamboInputError` for a problem
caused by what a user handed us. The CLI turns it into one line on stderr and exit code 2, the Serve
app into an HTTP error with the same message; anything else that escapes is a bug and keeps its
traceback.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


class LamboInputError(ValueError):
    """Bad input (file, field, shape, value, prompt, checkpoint), with a message naming the problem."""

    def __init__(self, message: str, *, where: str | None = None, status: int = 422) -> None:
        self.where = where
        self.status = status
        super().__init__(f"{where}: {message}" if where else message)

    def located(self, where: str) -> LamboInputError:
        """The same error, prefixed with a location such as ``file.jsonl:3``."""
        return LamboInputError(str(self), where=where, status=self.status)


def reject_unknown_keys(cls: type, data: Mapping[str, Any], what: str) -> None:
    """Raise a LamboInputError listing the keys of ``data`` that are not fields of dataclass ``cls``.

    Unknown keys in a YAML, JSON, CLI or HTTP config are always an error that names them: a typo
    silently ignored would run a different experiment than the one asked for.
    """
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise LamboInputError(
            f"unknown key(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}",
            where=what,
        )
