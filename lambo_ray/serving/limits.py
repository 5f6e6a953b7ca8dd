"""Bounds on what one request may cost, enforced while parsing, before any array or policy work.

A JSON body is only bytes until it is parsed, and parsing itself can be made expensive or fatal: a
100,000-deep ``[[[[...`` exhausts the parser's recursion, a 5,000-digit integer trips Python's
integer-string limit (and a 4,000-digit one passes it and overflows later), and a declared
``capacity_cps`` of a million servers makes the instance validator build a million-element array. So
the body is refused on its byte size first, then on its nesting depth (a vectorised scan of the raw
bytes), integer literals are bounded while parsing, and an instance's sizes (N, M, N*M) are read off
the parsed lists with ``len`` before the schema validator builds any array.

Every refusal is a :class:`LamboInputError` naming the limit: 413 for "too large", 422 for "not
valid JSON"; nothing here ever raises anything else.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from lambo_ray.errors import LamboInputError
from lambo_ray.serving.config import ServeConfig

_BRACKET_STEP = np.zeros(256, dtype=np.int8)
_BRACKET_STEP[[ord("["), ord("{")]] = 1
_BRACKET_STEP[[ord("]"), ord("}")]] = -1
PER_UE_FIELDS = ("data_bits", "cycles", "deadline_s", "local_cps", "rate_bps")


def too_large(message: str, where: str | None = None) -> LamboInputError:
    return LamboInputError(message, where=where, status=413)


def check_body_size(size: int, cfg: ServeConfig) -> None:
    if size > cfg.max_body_bytes:
        raise too_large(f"request body of {size} bytes exceeds the limit max_body_bytes={cfg.max_body_bytes}")


def nesting_depth(body: bytes) -> int:
    """Deepest bracket nesting of ``body`` counted over the raw bytes.

    Brackets inside JSON strings are counted too: the value is an upper bound of the real depth
    whenever the strings hold no unbalanced closing brackets, which is enough to refuse a pathological
    body in one vectorised pass (the parser's own recursion guard catches whatever slips through).
    """
    steps = _BRACKET_STEP[np.frombuffer(body, dtype=np.uint8)]
    steps = steps[steps != 0].astype(np.int32)
    return int(np.cumsum(steps).max(initial=0))


def parse_json(body: bytes, cfg: ServeConfig) -> Any:
    """The parsed body, refusing (413) oversized bodies and (422) invalid, over-nested or huge-integer JSON."""
    check_body_size(len(body), cfg)
    if not body.strip():
        raise LamboInputError("empty request body; expected a JSON object", where="body")
    depth = nesting_depth(body)
    if depth > cfg.max_json_depth:
        raise LamboInputError(
            f"JSON nested {depth} levels deep, more than max_json_depth={cfg.max_json_depth}", where="body"
        )

    def bounded_int(text: str) -> int:
        digits = len(text.lstrip("-"))
        if digits > cfg.max_int_digits:
            raise LamboInputError(
                f"integer literal with {digits} digits, more than max_int_digits={cfg.max_int_digits}", where="body"
            )
        return int(text)

    try:
        return json.loads(body, parse_int=bounded_int)
    except LamboInputError:
        raise
    except json.JSONDecodeError as err:
        raise LamboInputError(
            f"invalid JSON ({err.msg} at line {err.lineno} column {err.colno})", where="body"
        ) from None
    except UnicodeDecodeError:
        raise LamboInputError("invalid JSON (not UTF-8)", where="body") from None
    except RecursionError:
        raise LamboInputError("invalid JSON (nested too deeply)", where="body") from None
    except (ValueError, OverflowError) as err:  # e.g. a number the float parser cannot represent
        raise LamboInputError(f"invalid JSON ({str(err)[:120]})", where="body") from None


def _list_len(doc: Any, section: str, name: str) -> int | None:
    part = doc.get(section) if isinstance(doc, dict) else None
    value = part.get(name) if isinstance(part, dict) else None
    return len(value) if isinstance(value, list) else None


def instance_size(doc: Any, cfg: ServeConfig, where: str) -> int:
    """Check the sizes an instance document declares against the limits; return its N (0 if unknown).

    Reads only list lengths: the schema validator, which runs next, names every other problem.
    """
    if not isinstance(doc, dict):
        return 0
    m = _list_len(doc, "servers", "capacity_cps")
    if m is not None and m > cfg.max_servers:
        raise too_large(f"{m} servers exceed the limit max_servers={cfg.max_servers}", where)
    n = 0
    for name in PER_UE_FIELDS:
        length = _list_len(doc, "ues", name)
        if length is not None and length > cfg.max_ues:
            raise too_large(f"{length} UEs (ues.{name}) exceed the limit max_ues={cfg.max_ues}", where)
        n = max(n, length or 0)
    rates = doc["ues"].get("rate_bps") if isinstance(doc.get("ues"), dict) else None
    if isinstance(rates, list):
        widest = max((len(row) for row in rates if isinstance(row, list)), default=0)
        if widest > cfg.max_servers:
            raise too_large(
                f"{widest} servers (ues.rate_bps rows) exceed the limit max_servers={cfg.max_servers}", where
            )
        m = max(m or 0, widest)
    if n * (m or 0) > cfg.max_pairs:
        raise too_large(f"{n} UEs x {m} servers = {n * m} pairs exceed the limit max_pairs={cfg.max_pairs}", where)
    return n


def check_request_sizes(docs: Sequence[Any], cfg: ServeConfig, where: Sequence[str]) -> None:
    """Every instance within the per-instance limits and their UEs together within ``max_request_ues``."""
    total = sum(instance_size(doc, cfg, w) for doc, w in zip(docs, where))
    if total > cfg.max_request_ues:
        raise too_large(f"{total} UEs in one request exceed the limit max_request_ues={cfg.max_request_ues}")
