"""Reading user-written files (YAML/JSON configs, JSON lines) so that bad bytes are one clear error.

Every reader here turns what a file can throw at a parser into a :class:`LamboInputError` naming the
file (and line for ``.jsonl``): invalid UTF-8, NaN/Infinity literals (JSON has neither), numbers that
overflow to infinity, integers longer than Python's conversion limit, and nesting deep enough to
exhaust the recursion limit. Without this, those inputs end in a traceback instead of exit code 2.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import yaml

from lambo_ray.errors import LamboInputError


class _NonFinite(ValueError):
    """A NaN/Infinity literal or a number that overflows a float."""


def _reject_constant(name: str) -> Any:
    raise _NonFinite(f"{name} is not valid JSON (numbers must be finite)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NonFinite(f"number {text[:40]} overflows a float")
    return value


def parse_json(raw: bytes | str, where: str) -> Any:
    """One JSON document from bytes (must be UTF-8) or text; every failure names ``where``."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise LamboInputError(
                f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})", where=where
            ) from None
    try:
        return json.loads(raw, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as err:
        raise LamboInputError(f"invalid JSON ({err.msg} at column {err.colno})", where=where) from None
    except RecursionError:
        raise LamboInputError("invalid JSON (nested too deeply)", where=where) from None
    except _NonFinite as err:
        raise LamboInputError(f"invalid JSON ({err})", where=where) from None
    except ValueError as err:  # integer string conversion limit (sys.get_int_max_str_digits)
        if "integer string conversion" in str(err):
            raise LamboInputError("invalid JSON (an integer has too many digits)", where=where) from None
        raise LamboInputError(f"invalid JSON ({str(err).splitlines()[0]})", where=where) from None


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float (YAML 1.2), not as the string PyYAML's 1.1 rules give."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+][0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(text: str, where: str) -> Any:
    """A YAML document with YAML 1.2 number rules; syntax errors and runaway nesting name ``where``."""
    try:
        return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise LamboInputError(f"not valid YAML: {str(err).splitlines()[0]}", where=where) from None
    except (RecursionError, ValueError) as err:
        raise LamboInputError(f"not valid YAML: {type(err).__name__}", where=where) from None


def read_text(path: str | Path) -> str:
    """The UTF-8 text of an existing file; missing files, directories and bad bytes are input errors."""
    p = Path(path)
    if not p.exists():
        raise LamboInputError(f"file not found: {p}")
    if p.is_dir():
        raise LamboInputError(f"expected a file, got a directory: {p}")
    raw = p.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise LamboInputError(f"not valid UTF-8 (byte 0x{raw[err.start]:02x})", where=f"{p}:{line}") from None


def load_mapping(path: str | Path) -> dict[str, Any]:
    """A config file (``.json``, else YAML) whose top level must be a mapping."""
    text = read_text(path)
    data = parse_json(text, str(path)) if str(path).endswith(".json") else load_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LamboInputError("expected a mapping (key: value) at the top level", where=str(path))
    return data
