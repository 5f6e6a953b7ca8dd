"""Crash-safe decision files for long batch runs: each decision is on disk as soon as it is made.

A run that writes ``OUT`` keeps two files next to it until it finishes::

    .OUT.part        decisions appended one JSON line at a time (write, flush, fsync), in input order
    .OUT.run.json    the run's parameters (method, prompt, digest of the input, time limit, seed, ...)

When the last decision is in, ``.OUT.part`` is renamed to ``OUT`` (atomic) and the sidecar removed,
so ``OUT`` is always absent, the previous complete file, or the complete file of one run: never a
half-written file nor a mix of two runs. After a crash, reopening with ``resume=True`` keeps every
complete line, cuts a torn last line (a write the crash interrupted), and refuses (a LamboInputError)
when the parameters differ from the interrupted run's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lambo_ray.config_files import parse_json
from lambo_ray.errors import LamboInputError
from lambo_ray.mec.instance import Decision
from lambo_ray.mec.io import atomic_write_text, decision_from_dict, decision_to_dict, fsync_dir

RUN_FORMAT = "lambo.solve-run/1"


def part_path(out: Path) -> Path:
    return out.parent / f".{out.name}.part"


def run_path(out: Path) -> Path:
    return out.parent / f".{out.name}.run.json"


class DecisionJournal:
    """Append-only, fsynced decisions of one run; :meth:`open` starts or resumes, :meth:`commit` publishes."""

    def __init__(self, out: Path, done: int) -> None:
        self.out = out
        self.done = done  # decisions already on disk (a resumed run skips that many instances)
        self._fh = part_path(out).open("ab")

    @classmethod
    def open(
        cls, out: str | os.PathLike, record: Mapping[str, Any], *, resume: bool, align: int = 1
    ) -> DecisionJournal:
        """Start a run of ``record``'s parameters, or continue the interrupted one with ``resume``.

        ``align``: the resumed count is rounded down to a multiple of it, so a method that decides in
        batches of ``align`` instances sees the same batches as an uninterrupted run would.
        """
        out = Path(out)
        if out.exists() and out.is_dir():
            raise LamboInputError(f"expected a file, got a directory: {out}", where="--out")
        part, meta = part_path(out), run_path(out)
        if meta.exists() and not part.exists():  # a crash after the final rename: that run is complete
            meta.unlink()
        if part.exists() and not resume:
            raise LamboInputError(
                f"{part} holds the decisions of an interrupted run; pass --resume to continue it, "
                "or delete it to start over",
                where=str(out),
            )
        if resume and part.exists():
            _check_same_run(meta, record, part)
            done = _keep_complete_lines(part, align)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(meta, json.dumps({"format": RUN_FORMAT, **record}, indent=1, sort_keys=True) + "\n")
            part.write_bytes(b"")
            fsync_dir(out.parent)
            done = 0
        return cls(out, done)

    def append(self, decision: Decision) -> None:
        """One decision, durable when this returns (a crash after it cannot lose it)."""
        self._fh.write((json.dumps(decision_to_dict(decision), separators=(",", ":")) + "\n").encode())
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.done += 1

    def commit(self) -> Path:
        """Publish the complete file as ``out`` (atomic rename) and remove the run's sidecar."""
        self.close()
        os.replace(part_path(self.out), self.out)
        fsync_dir(self.out.parent)
        run_path(self.out).unlink(missing_ok=True)
        return self.out

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def saved(self) -> Iterator[Decision]:
        """The decisions on disk so far, in order."""
        with part_path(self.out).open("rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                yield decision_from_dict(parse_json(raw, f"{part_path(self.out)}:{lineno}"))


def _check_same_run(meta: Path, record: Mapping[str, Any], part: Path) -> None:
    if not meta.exists():
        raise LamboInputError(f"{part} has no run record ({meta.name}); delete it to start over", where="--resume")
    saved = parse_json(meta.read_bytes(), str(meta))
    now = json.loads(json.dumps({"format": RUN_FORMAT, **record}))
    keys = sorted(k for k in set(saved) | set(now) if k != "input_path" and saved.get(k) != now.get(k))
    if keys:
        diffs = "; ".join(f"{k}: was {saved.get(k)!r}, now {now.get(k)!r}" for k in keys)
        raise LamboInputError(
            f"cannot resume: the interrupted run had other parameters ({diffs}); rerun with the same ones, "
            f"or delete {part} to start over",
            where="--resume",
        )


def _keep_complete_lines(part: Path, align: int) -> int:
    """Count the decisions that are complete and readable, rounded down to ``align``; cut the rest."""
    ends = [0]
    with part.open("rb") as fh:
        for raw in fh:
            if not raw.endswith(b"\n"):
                break  # torn last line: the write a crash interrupted
            try:
                decision_from_dict(parse_json(raw, str(part)))
            except LamboInputError:
                break
            ends.append(ends[-1] + len(raw))
    keep = (len(ends) - 1) // align * align
    if ends[keep] != part.stat().st_size:
        with part.open("r+b") as fh:
            fh.truncate(ends[keep])
            fh.flush()
            os.fsync(fh.fileno())
    return keep
