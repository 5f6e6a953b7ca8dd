"""One exception type for every problem caused by what a user handed us.

The CLI turns it into a one-line message and exit code 2, the Serve app into HTTP 422/404/413;
anything else that escapes is a bug and keeps its traceback.
"""
from __future__ import annotations


class LamboInputError(ValueError):
    """Bad input (file, field, shape, value, prompt, checkpoint), with a message naming the problem."""

    def __init__(self, message: str, *, where: str | None = None, status: int = 422) -> None:
        self.where = where
        self.status = status
        super().__init__(f"{where}: {message}" if where else message)

    def located(self, where: str) -> "LamboInputError":
        """The same error, prefixed with a location such as ``file.jsonl:3``."""
        inner = str(self)
        return LamboInputError(inner, where=where, status=self.status)
