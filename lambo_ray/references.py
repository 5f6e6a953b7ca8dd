"""Reference values from the exact expert, computed once per instance and cached on disk.

A benchmark scores every method against the exact expert. At N = 200, M = 8 one exact solve costs a
minute or more, so a rerun of a benchmark (another checkpoint, another decode mode) must not pay that
again. The cache stores, per (instance digest, prompt, time limit, solver settings), what the exact
expert returned: its objective (the evaluator's), its certified lower bound, whether it proved
optimality, its status and wall time, and its decision. The *reference* of an instance is the exact
objective when it is proven optimal, else the certified lower bound (so a gap measured against it is
an upper bound on the true gap); :attr:`Reference.kind` says which.

The key holds a digest of the instance's optimisation data (every array, its dtype and shape, and the
powers), never the seed it came from: a changed generator gives new instances and thus new keys
instead of silently stale references.

File format: JSONL, a header line ``{"format": "lambo.references/1"}`` then one reference per line.
Lines are appended under an exclusive ``flock`` in one ``write`` and fsync'ed, so a background job and
a benchmark may share one cache (a per-key lock file beside it makes the second one wait for the
first one's result instead of solving the same instance again); a torn last line (a killed writer)
is cut off by the next writer, and readers skip it. A process picks up lines other processes
appended each time it looks a key up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lambo_ray.errors import LamboInputError
from lambo_ray.mec.instance import Instance, check_prompt

REFERENCES_FORMAT = "lambo.references/1"
_ARRAYS = ("data_bits", "cycles", "deadline_s", "local_cps", "rate_bps", "capacity_cps")


def instance_digest(inst: Instance) -> str:
    """sha256 (32 hex digits) of the optimisation data of an instance; geometry is not part of it."""
    h = hashlib.sha256()
    for name in _ARRAYS:
        a = np.ascontiguousarray(getattr(inst, name), dtype=np.float64)
        h.update(f"{name}|{a.shape}|".encode())
        h.update(a.tobytes())
    h.update(f"tx_w={float(inst.tx_w)!r}|local_w={float(inst.local_w)!r}".encode())
    return h.hexdigest()[:32]


def solver_fingerprint(config: Any) -> str:
    """A short id of the exact expert's settings (all but its default time limit, which is keyed apart)."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "time_limit_s"}
    return "exact:" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Reference:
    """What the exact expert returned for one instance and prompt under one time limit."""

    digest: str
    prompt: str
    time_limit: float
    solver: str
    objective: float | None  # the evaluator's objective of exact's decision; None without an incumbent
    lower_bound: float | None  # certified; None when no MILP finished in time
    proven_optimal: bool
    status: str
    gap: float | None  # certified relative gap (objective - lower_bound) / objective
    wall_s: float
    target: list[int]
    share: list[float]
    cpu_s: float | None = None  # CPU time the solve got: on a loaded machine far less than wall_s

    @property
    def kind(self) -> str:
        """``optimal`` (value = proven optimum), ``bound`` (value = certified lower bound) or ``none``."""
        if self.proven_optimal and _finite(self.objective):
            return "optimal"
        return "bound" if _finite(self.lower_bound) else "none"

    @property
    def value(self) -> float:
        """The number gaps are measured against (class docstring); NaN when exact produced neither."""
        kind = self.kind
        if kind == "optimal":
            return float(self.objective)
        return float(self.lower_bound) if kind == "bound" else float("nan")

    @property
    def key(self) -> tuple[str, str, float, str]:
        return (self.digest, self.prompt, float(self.time_limit), self.solver)


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


class JsonlLog:
    """An append-only JSONL file with a format header that several processes may share (module docstring).

    :meth:`read_new` returns the documents appended since the last call (by any process); a line
    without its newline (being written, or torn by a killed writer) is left for later or cut off by
    the next :meth:`append`."""

    def __init__(self, path: str | os.PathLike[str], fmt: str) -> None:
        self.path = Path(path)
        self.fmt = fmt
        if self.path.is_dir():
            raise LamboInputError("expected a file, found a directory", where=str(self.path))
        self._offset = 0

    def read_new(self) -> list[Any]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        docs = []
        for k, raw in enumerate(data[:end].splitlines()):
            try:
                doc = json.loads(raw)
            except ValueError:
                doc = None
            if self._offset == 0 and k == 0:
                if not isinstance(doc, dict) or doc.get("format") != self.fmt:
                    raise LamboInputError(f"not a {self.fmt} file (first line)", where=str(self.path))
            elif doc is not None:
                docs.append(doc)
        self._offset += end
        return docs

    def append(self, doc: dict[str, Any]) -> None:
        """One locked, fsync'ed write of one line (a torn tail is cut off first)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        header = (json.dumps({"format": self.fmt}) + "\n").encode()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            keep = _whole_lines(fd)
            if keep < os.fstat(fd).st_size:
                os.ftruncate(fd, keep)
            if keep == 0:
                os.lseek(fd, 0, os.SEEK_SET)
                os.write(fd, header)
            os.lseek(fd, 0, os.SEEK_END)
            os.write(fd, (json.dumps(doc) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)  # releases the lock


def _whole_lines(fd: int) -> int:
    """Length of the file up to and including its last newline (the whole file when it ends in one)."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    return os.pread(fd, size, 0).rfind(b"\n") + 1


class ReferenceCache:
    """Exact references on disk (module docstring); :meth:`get_or_solve` is the entry point."""

    def __init__(self, path: str | os.PathLike[str], time_limit: float, exact_config: Any | None = None) -> None:
        from lambo_ray.experts.exact import ExactConfig

        if not (isinstance(time_limit, (int, float)) and math.isfinite(time_limit) and time_limit > 0):
            raise LamboInputError(f"exact time limit must be a positive number of seconds (got {time_limit})")
        self.log = JsonlLog(path, REFERENCES_FORMAT)
        self.path = self.log.path
        self.time_limit = float(time_limit)
        self.config = exact_config or ExactConfig()
        self.solver = solver_fingerprint(self.config)
        self.entries: dict[tuple[str, str, float, str], Reference] = {}
        self.refresh()

    def refresh(self) -> None:
        """Take in the references appended since the last look (by this or another process)."""
        for doc in self.log.read_new():
            try:
                ref = Reference(**doc)
            except TypeError:
                continue  # not a reference line: that reference is recomputed
            self.entries[ref.key] = ref

    def key(self, inst: Instance, prompt: str) -> tuple[str, str, float, str]:
        return (instance_digest(inst), check_prompt(prompt), self.time_limit, self.solver)

    def get(self, inst: Instance, prompt: str) -> Reference | None:
        self.refresh()
        return self.entries.get(self.key(inst, prompt))

    def get_or_solve(self, inst: Instance, prompt: str) -> tuple[Reference, bool]:
        """The cached reference, else the exact expert's, appended to the cache; and whether it was cached."""
        ref = self.get(inst, prompt)
        if ref is not None:
            return ref, True
        with self._claim(self.key(inst, prompt)):  # another process solving it: wait, then read its result
            ref = self.get(inst, prompt)
            if ref is not None:
                return ref, True
            ref = self.solve(inst, prompt)
            self.add(ref)
        return ref, False

    @contextlib.contextmanager
    def _claim(self, key: tuple[str, str, float, str]) -> Iterator[None]:
        """An exclusive lock on one key (a lock file beside the cache), so two processes sharing the
        cache never spend minutes solving the same instance twice."""
        lock_dir = self.path.with_name(self.path.name + ".locks")
        lock_dir.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(repr(key).encode()).hexdigest()[:24]
        fd = os.open(lock_dir / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def solve(self, inst: Instance, prompt: str) -> Reference:
        """Run the exact expert (not cached; :meth:`get_or_solve` caches)."""
        from lambo_ray.experts import get_expert

        cpu0 = time.process_time()
        d = get_expert("exact", config=self.config).solve(inst, prompt, self.time_limit)
        cpu_s = time.process_time() - cpu0
        s = d.stats
        has_incumbent = bool(s.get("feasible")) and s.get("objective") is not None
        return Reference(
            digest=instance_digest(inst),
            prompt=prompt,
            time_limit=self.time_limit,
            solver=self.solver,
            objective=float(d.objective) if has_incumbent else None,
            lower_bound=_float_or_none(s.get("lower_bound")),
            proven_optimal=bool(s.get("proven_optimal")) and has_incumbent,
            status=str(s.get("status")),
            gap=_float_or_none(s.get("gap")),
            wall_s=float(s["wall_s"]),
            target=[int(t) for t in d.target],
            share=[float(x) for x in d.share],
            cpu_s=cpu_s,
        )

    def add(self, ref: Reference) -> None:
        self.log.append(dataclasses.asdict(ref))
        self.entries[ref.key] = ref


def _float_or_none(x: Any) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None
