"""Reading and writing instances and decisions (JSON documents, `.jsonl` batches).

Every failure becomes a :class:`LamboInputError` naming file, line and field; nothing here ever
repairs a value. Writes are atomic (temp file + rename) so an interrupted run never leaves a
half-written result over a good one.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from lambo_ray.errors import LamboInputError
from lambo_ray.mec.instance import Decision, Instance
from lambo_ray.mec.schema import DECISION_SCHEMA, INSTANCE_SCHEMA, DecisionModel, InstanceModel, describe


def instance_to_dict(inst: Instance) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema": INSTANCE_SCHEMA,
        "servers": {"capacity_cps": inst.capacity_cps.tolist()},
        "ues": {
            "data_bits": inst.data_bits.tolist(),
            "cycles": inst.cycles.tolist(),
            "deadline_s": inst.deadline_s.tolist(),
            "local_cps": inst.local_cps.tolist(),
            "rate_bps": inst.rate_bps.tolist(),
        },
        "power": {"tx_w": inst.tx_w, "local_w": inst.local_w},
    }
    if inst.geometry is not None:
        doc["geometry"] = inst.geometry
    return doc


def instance_from_dict(doc: Any, *, max_ues: int | None = None) -> Instance:
    if not isinstance(doc, dict):
        raise LamboInputError(f"expected a JSON object for an instance, got {type(doc).__name__}")
    if max_ues is not None:
        n = _peek_n(doc)
        if n is not None and n > max_ues:
            raise LamboInputError(f"instance has {n} UEs, more than the limit of {max_ues}", status=413)
    try:
        m = InstanceModel.model_validate(doc)
    except ValidationError as err:
        raise LamboInputError(describe(err)) from None
    return Instance(
        data_bits=np.asarray(m.ues.data_bits, dtype=float),
        cycles=np.asarray(m.ues.cycles, dtype=float),
        deadline_s=np.asarray(m.ues.deadline_s, dtype=float),
        local_cps=np.asarray(m.ues.local_cps, dtype=float),
        rate_bps=np.asarray(m.ues.rate_bps, dtype=float).reshape(len(m.ues.cycles), len(m.servers.capacity_cps)),
        capacity_cps=np.asarray(m.servers.capacity_cps, dtype=float),
        tx_w=float(m.power.tx_w),
        local_w=float(m.power.local_w),
        geometry=m.geometry,
    )


def _peek_n(doc: dict[str, Any]) -> int | None:
    cycles = doc.get("ues", {}).get("cycles") if isinstance(doc.get("ues"), dict) else None
    return len(cycles) if isinstance(cycles, list) else None


def decision_to_dict(dec: Decision) -> dict[str, Any]:
    doc = {
        "schema": DECISION_SCHEMA,
        "prompt": dec.prompt,
        "target": dec.target.astype(int).tolist(),
        "share": dec.share.astype(float).tolist(),
        "objective": None if dec.objective is None or not math.isfinite(dec.objective) else float(dec.objective),
        "method": dec.method,
    }
    if dec.stats:
        doc["stats"] = jsonable(dec.stats)
    return doc


def decision_from_dict(doc: Any) -> Decision:
    if not isinstance(doc, dict):
        raise LamboInputError(f"expected a JSON object for a decision, got {type(doc).__name__}")
    try:
        m = DecisionModel.model_validate(doc)
    except ValidationError as err:
        raise LamboInputError(describe(err)) from None
    return Decision(
        target=np.asarray(m.target),
        share=np.asarray(m.share, dtype=float),
        prompt=m.prompt,
        method=m.method,
        objective=m.objective,
        stats=dict(doc.get("stats") or {}),
    )


def jsonable(x: Any) -> Any:
    """Plain JSON values of nested containers, numpy / torch scalars and arrays; non-finite floats
    become ``null`` (JSON has no NaN or infinity)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):  # numpy and torch, arrays and scalars
        return jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, parsed document) for each non-empty line; JSON errors name file and line."""
    p = Path(path)
    if not p.exists():
        raise LamboInputError(f"file not found: {p}")
    if p.is_dir():
        raise LamboInputError(f"expected a file, got a directory: {p}")
    with p.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise LamboInputError(
                    f"invalid JSON ({err.msg} at column {err.colno})", where=f"{p}:{lineno}"
                ) from None


def _read(path: str | os.PathLike, parse) -> list:
    out = []
    for lineno, doc in iter_jsonl(path):
        try:
            out.append(parse(doc))
        except LamboInputError as err:
            raise err.located(f"{path}:{lineno}") from None
    if not out:
        raise LamboInputError(f"no documents in {path} (empty file)")
    return out


def read_instances(path: str | os.PathLike) -> list[Instance]:
    return _read(path, instance_from_dict)


def read_decisions(path: str | os.PathLike) -> list[Decision]:
    return _read(path, decision_from_dict)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _aside(target: Path) -> Path:
    return target.parent / f".{target.name}.old"


def recover_dir(target: str | os.PathLike) -> Path:
    """Finish or undo a :func:`swap_in_dir` that a crash interrupted between its two renames: when
    ``target`` is missing but its moved-aside copy exists, the copy is put back. Returns ``target``."""
    target = Path(target)
    old = _aside(target)
    if not target.exists() and old.exists():
        os.rename(old, target)
    return target


def swap_in_dir(stage: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename a complete staged directory to ``target``. An existing ``target`` is first moved aside
    to ``.<name>.old`` and put back if the rename fails, so ``target`` is always either the old or the
    new complete directory (checkpoints, decoder outputs), never a mix. A process killed between the
    two renames leaves only ``.<name>.old``; :func:`recover_dir` (called here first, and by every
    reader of such directories) restores it."""
    import shutil

    stage, target = Path(stage), Path(target)
    recover_dir(target)
    old = _aside(target)
    shutil.rmtree(old, ignore_errors=True)  # a leftover of a crash after the second rename
    moved = False
    if target.exists():
        os.rename(target, old)
        moved = True
    try:
        os.rename(stage, target)
    except BaseException:
        if moved:
            os.rename(old, target)
        raise
    if moved:
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(target.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_jsonl(path: str | os.PathLike, docs: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(d, separators=(",", ":")) + "\n" for d in docs))


def write_instances(path: str | os.PathLike, instances: Iterable[Instance]) -> None:
    write_jsonl(path, (instance_to_dict(i) for i in instances))


def write_decisions(path: str | os.PathLike, decisions: Iterable[Decision]) -> None:
    write_jsonl(path, (decision_to_dict(d) for d in decisions))


def write_json(path: str | os.PathLike, doc: Any) -> None:
    atomic_write_text(path, json.dumps(jsonable(doc), indent=2) + "\n")
