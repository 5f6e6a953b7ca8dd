"""Crash safety of an ALEF run: a label journal and the last completed round, on disk.

Expert labels are the expensive part of a run (exact ``min_latency`` labels cost seconds each), so
none may be bought twice and none lost by a crash:

* ``journal.jsonl``: every labelling outcome (label or skip) appended and fsynced the moment it
  arrives, keyed by (instance id, prompt, digest of the instance). :class:`CachedLabeller` answers
  from it before asking the expert pool, so a resumed run gets every label it already paid for,
  including those of a round the crash interrupted.
* ``round/``: the state after the last completed round (``state.json``: counters, RNG states,
  metrics; ``labels.jsonl``: the labelled buffer with provenance; ``trainer.pt``: decoder and
  optimiser state and torch's RNG), written to a staged directory and swapped in by rename, so it
  is always one whole round, old or new.
* ``run.json``: the config and base policy the state belongs to; resuming with another is refused.

A resumed run replays what it does not restore: arrivals come from the seeded stream (skipping
those already seen) and queries from the restored RNG state and decoder, so it asks for the same
instances as the uninterrupted run would and finds their labels in the journal.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lambo_ray.alef.buffer import Example
from lambo_ray.alef.labels import Outcome, outcome_from_dict, outcome_to_dict
from lambo_ray.errors import LamboInputError
from lambo_ray.mec.instance import Instance
from lambo_ray.mec.io import jsonable, recover_dir, swap_in_dir, write_json, write_jsonl

RUN_FORMAT, ROUND_FORMAT = "lambo.alef_run/1", "lambo.alef_round/1"
# Config fields that may change on resume: how many actors label does not change any label.
RESUMABLE_CHANGES = ("experts",)


def instance_digest(inst: Instance) -> str:
    """sha256 (first 32 hex digits) of an instance's optimisation data: a label belongs to exactly it."""
    h = hashlib.sha256()
    for a in (inst.data_bits, inst.cycles, inst.deadline_s, inst.local_cps, inst.rate_bps, inst.capacity_cps):
        h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
    h.update(np.array([inst.tx_w, inst.local_w], dtype=np.float64).tobytes())
    return h.hexdigest()[:32]


def policy_digest(policy: torch.nn.Module) -> str:
    """sha256 (first 16 hex digits) of every weight of the policy, decoder included."""
    h = hashlib.sha256()
    for name, t in sorted(policy.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


class LabelJournal:
    """Append-only record of every labelling outcome of a run, durable as soon as it is recorded."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._entries: dict[tuple[int, str, str], Outcome] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        raw = self.path.read_bytes()
        if raw and not raw.endswith(b"\n"):  # a crash mid-append: drop the torn last line
            raw = raw[: raw.rfind(b"\n") + 1]
            with open(self.path, "r+b") as fh:
                fh.truncate(len(raw))
        for n, line in enumerate(raw.decode("utf-8").splitlines(), 1):
            try:
                doc = json.loads(line)
                key = (int(doc["key"][0]), str(doc["key"][1]), str(doc["key"][2]))
                outcome = outcome_from_dict(doc["outcome"])
            except (ValueError, KeyError, TypeError, IndexError) as err:
                raise LamboInputError(f"corrupt label journal line: {err}", where=f"{self.path}:{n}") from None
            self._entries.setdefault(key, outcome)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, instance_id: int, prompt: str, inst: Instance) -> Outcome | None:
        return self._entries.get((int(instance_id), prompt, instance_digest(inst)))

    def record(self, inst: Instance, outcome: Outcome) -> None:
        key = (int(outcome.instance_id), outcome.prompt, instance_digest(inst))
        line = json.dumps(jsonable({"key": list(key), "outcome": outcome_to_dict(outcome)}), separators=(",", ":"))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self._entries.setdefault(key, outcome)


class CachedLabeller:
    """The expert pool behind a journal: labels already recorded are reused, new ones recorded."""

    def __init__(self, pool: Any, journal: LabelJournal) -> None:
        self.pool, self.journal = pool, journal
        self.cached = 0  # outcomes answered from the journal so far

    def label(self, instances: Sequence[Instance], prompt: str | Sequence[str], ids: Sequence[int]) -> list[Outcome]:
        prompts = [prompt] * len(instances) if isinstance(prompt, str) else list(prompt)
        out: dict[int, Outcome] = {}
        for k, (inst, p, i) in enumerate(zip(instances, prompts, ids)):
            hit = self.journal.get(i, p, inst)
            if hit is not None:
                out[k] = hit
        self.cached += len(out)
        todo = [k for k in range(len(instances)) if k not in out]
        if todo:
            where = {int(ids[k]): k for k in todo}
            for o in self.pool.label_iter(
                [instances[k] for k in todo], [prompts[k] for k in todo], [ids[k] for k in todo]
            ):
                k = where[o.instance_id]
                self.journal.record(instances[k], o)
                out[k] = o
        return [out[k] for k in range(len(instances))]


@dataclass
class SavedRound:
    """What :meth:`RunStore.load_round` restores."""

    state: dict[str, Any]  # state.json
    buffer: list[Example]
    trainer: dict[str, Any]  # decoder / optimizer state dicts, torch RNG state


def _canonical(doc: Any) -> Any:
    return json.loads(json.dumps(jsonable(doc)))


def with_later_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved run's config with the settings it predates filled in at their defaults: AlefConfig's
    fields are added with the default that keeps the earlier behaviour (e.g. ``pg_lr_scale`` = 1), so a
    run interrupted before such an addition still resumes under the code after it."""
    from lambo_ray.alef.config import AlefConfig

    defaults = _canonical(AlefConfig().to_dict())
    return {k: v for k, v in defaults.items() if k not in saved} | saved


class RunStore:
    """The directory of one ALEF run's state (module docstring)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        self.journal = LabelJournal(self.dir / "journal.jsonl")

    @property
    def round_dir(self) -> Path:
        return self.dir / "round"

    def begin(self, config: dict[str, Any], base_digest: str) -> None:
        """Tie the directory to a config and base policy; a directory tied to others is refused."""
        path = self.dir / "run.json"
        doc = {"format": RUN_FORMAT, "config": _canonical(config), "base_digest": base_digest}
        if not path.exists():
            write_json(path, doc)
            return
        try:
            saved = json.loads(path.read_text())
        except ValueError as err:
            raise LamboInputError(f"unreadable run state: {err}", where=str(path)) from None
        if saved.get("base_digest") != base_digest:
            raise LamboInputError("the saved run fine-tuned another policy (checkpoint differs)", where=str(self.dir))
        old, new = with_later_defaults(saved.get("config", {})), doc["config"]
        diff = [k for k in sorted(set(old) | set(new)) if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k)]
        if diff:
            shown = ", ".join(f"{k} {old.get(k)!r} (now {new.get(k)!r})" for k in diff)
            raise LamboInputError(f"the saved run used other settings: {shown}", where=str(self.dir))

    def save_round(self, state: dict[str, Any], buffer: Sequence[Example], trainer: dict[str, Any]) -> None:
        """Write one completed round's state; the previous one stays until the new one is complete."""
        self.dir.mkdir(parents=True, exist_ok=True)
        stage_root = Path(tempfile.mkdtemp(prefix=".round.stage-", dir=self.dir))
        try:
            stage = stage_root / "round"
            stage.mkdir()
            write_json(stage / "state.json", {"format": ROUND_FORMAT, **state})
            write_jsonl(stage / "labels.jsonl", (e.to_record("query") for e in buffer))
            with open(stage / "trainer.pt", "wb") as fh:
                torch.save(trainer, fh)
                fh.flush()
                os.fsync(fh.fileno())
            swap_in_dir(stage, self.round_dir)
        finally:
            shutil.rmtree(stage_root, ignore_errors=True)

    def load_round(self) -> SavedRound | None:
        d = recover_dir(self.round_dir)
        if not d.exists():
            return None
        try:
            state = json.loads((d / "state.json").read_text())
            if state.get("format") != ROUND_FORMAT:
                raise ValueError(f"format {state.get('format')!r}, expected {ROUND_FORMAT}")
            lines = (d / "labels.jsonl").read_text().splitlines()
            buffer = [Example.from_record(json.loads(line)) for line in lines if line.strip()]
            trainer = torch.load(d / "trainer.pt", weights_only=True)
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise LamboInputError(f"unreadable saved round: {err}", where=str(d)) from None
        return SavedRound(state, buffer, trainer)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
