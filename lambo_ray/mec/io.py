"""Reading and writing instances and decisions (JSON documents, `.jsonl` batches).

Every failure becomes a :class:`LamboInputError` naming file, line and field; nothing here ever
repairs a value. Batch files are read lazily, one line at a time. Writes are atomic (temp file +
rename) so an interrupted run never leaves a half-written result over a good one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from lambo_ray.config_files import parse_json
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


def _existing_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise LamboInputError(f"file not found: {p}")
    if p.is_dir():
        raise LamboInputError(f"expected a file, got a directory: {p}")
    return p


def iter_jsonl(path: str | os.PathLike, start: int = 0) -> Iterator[tuple[int, Any]]:
    """(line number, parsed document) for each non-empty line, read lazily (constant memory).

    The first ``start`` documents are skipped without being parsed (a resumed run has checked them
    already). Bad bytes, bad JSON, NaN/Infinity, runaway nesting and over-long integers are a
    LamboInputError naming file and line.
    """
    p = _existing_file(path)
    index = 0
    with p.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            index += 1
            if index > start:
                yield lineno, parse_json(raw, f"{p}:{lineno}")


def _iter(path: str | os.PathLike, parse, start: int = 0) -> Iterator:
    seen = False
    for lineno, doc in iter_jsonl(path, start):
        seen = True
        try:
            yield parse(doc)
        except LamboInputError as err:
            raise err.located(f"{path}:{lineno}") from None
    if not seen and start == 0:
        raise LamboInputError(f"no documents in {path} (empty file)")


def iter_instances(path: str | os.PathLike, start: int = 0) -> Iterator[Instance]:
    """Instances of a ``.jsonl`` file one by one, from the ``start``-th (0-based) on."""
    return _iter(path, instance_from_dict, start)


def iter_decisions(path: str | os.PathLike, start: int = 0) -> Iterator[Decision]:
    return _iter(path, decision_from_dict, start)


def read_instances(path: str | os.PathLike) -> list[Instance]:
    return list(iter_instances(path))


def read_decisions(path: str | os.PathLike) -> list[Decision]:
    return list(iter_decisions(path))


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with _existing_file(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Temp file in the same directory, fsync, rename over ``path``, fsync the directory: a reader (or
    a crash) sees the old file or the new one, never a torn one."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; results are meant to be shared
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(p.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _umask() -> int:
    """The process umask, read without changing it where possible (os.umask sets it for all threads)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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
