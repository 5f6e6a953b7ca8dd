"""The one rule every config dataclass follows when built from a mapping (YAML, JSON, CLI, HTTP):
unknown keys are an error that names them, never silently ignored."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from lambo_ray.mec.errors import LamboInputError


def reject_unknown_keys(cls: type, data: Mapping[str, Any], what: str) -> None:
    """Raise a LamboInputError listing the keys of ``data`` that are not fields of dataclass ``cls``."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise LamboInputError(f"unknown key(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}",
                              where=what)
