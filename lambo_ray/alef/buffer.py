"""The labelled buffer of ALEF: expert labels of drifted instances plus a replay set of pre-drift ones.

Fine-tuning only on the drifted regime makes the decoder forget the old one (the cell may drift
back: an outage ends, the crowd disperses). A small set of undrifted instances is labelled once
at the start and a fixed fraction of every training minibatch is drawn from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lambo_ray.alef.labels import Label
from lambo_ray.mec.instance import Instance

LABEL_RECORD = "lambo.alef_label/1"


@dataclass(frozen=True)
class Example:
    """One (instance, prompt) with the expert's decision to imitate, and where that decision came from."""

    instance: Instance
    prompt: str
    target: np.ndarray  # (N,) 0 = local, j = server j
    share: np.ndarray  # (N,) 0 where local
    source: str  # which expert produced the label (a LabelSource: "exact", "exact_time_limit", "ils", ...)
    objective: float
    status: str = ""  # what the exact expert reported ("optimal", "time_limit", ...)
    gap: float | None = None  # certified relative gap of the label; None when unknown
    lower_bound: float | None = None
    wall_s: float | None = None  # expert time spent on it
    instance_id: int | None = None  # position in the drifted stream (references: negative)
    round: int | None = None  # ALEF round that bought it (None: a reference label)
    validation: bool = False  # held back from training: only the gate judges on it (AlefConfig.gate_holdout)
    # Decode positions before this one are the policy's own decisions, not the expert's (a completion of
    # the policy's prefix, DAgger style): teacher-forced as given but left out of the loss.
    first_step: int = 0

    @classmethod
    def from_label(cls, inst: Instance, lab: Label, round: int | None = None, validation: bool = False) -> Example:
        return cls(
            inst,
            lab.prompt,
            np.array(lab.target, dtype=np.int64),  # a copy: labels from Ray's object store are read-only
            np.array(lab.share, dtype=np.float64),
            lab.source,
            lab.objective,
            lab.exact_status,
            lab.gap,
            lab.lower_bound,
            lab.wall_s,
            lab.instance_id,
            round,
            validation,
        )

    def to_record(self, role: str) -> dict[str, Any]:
        """One line of a saved label file: the instance itself, the label and its provenance."""
        from lambo_ray.mec.io import instance_to_dict

        record = {
            "schema": LABEL_RECORD,
            "role": "validation" if self.validation else role,  # "query" (bought by a round, trained on),
            # "validation" (bought by a round, gate only), "heldout", "undrifted" or "replay"
            "round": self.round,
            "instance_id": self.instance_id,
            "prompt": self.prompt,
            "target": self.target.tolist(),
            "share": self.share.tolist(),
            "objective": self.objective,
            "source": self.source,
            "status": self.status,
            "gap": self.gap,
            "lower_bound": self.lower_bound,
            "wall_s": self.wall_s,
            "instance": instance_to_dict(self.instance),
        }
        if self.first_step:  # only prefix completions carry it; ALEF's own labels never do
            record["first_step"] = self.first_step
        return record

    @classmethod
    def from_record(cls, doc: dict[str, Any]) -> Example:
        from lambo_ray.mec.io import instance_from_dict

        return cls(
            instance_from_dict(doc["instance"]),
            doc["prompt"],
            np.asarray(doc["target"], dtype=np.int64),
            np.asarray(doc["share"], dtype=np.float64),
            doc["source"],
            float(doc["objective"]),
            doc.get("status", ""),
            doc.get("gap"),
            doc.get("lower_bound"),
            doc.get("wall_s"),
            doc.get("instance_id"),
            doc.get("round"),
            doc.get("role") == "validation",
            int(doc.get("first_step", 0)),
        )


class LabelBuffer:
    """Append-only list of examples with seeded uniform sampling (with replacement)."""

    def __init__(self, examples: Sequence[Example] = ()) -> None:
        self.examples: list[Example] = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def add(self, examples: Sequence[Example]) -> None:
        self.examples.extend(examples)

    def sample(self, k: int, rng: np.random.Generator) -> list[Example]:
        if k <= 0 or not self.examples:
            return []
        return [self.examples[i] for i in rng.integers(len(self.examples), size=k)]


def held_back(n: int, fraction: float) -> list[bool]:
    """Which of ``n`` examples (in their given order) the gate keeps for itself: evenly spread, so a
    round's labels, which come best query score first, give the gate every kind of instance."""
    return [int((i + 1) * fraction) > int(i * fraction) for i in range(n)]


def split_validation(examples: Sequence[Example]) -> tuple[LabelBuffer, list[Example]]:
    """(what training sees, what the gate judges on)."""
    return LabelBuffer([e for e in examples if not e.validation]), [e for e in examples if e.validation]


def replay_split(batch_size: int, replay_fraction: float, have_replay: bool) -> tuple[int, int]:
    """(drifted, replay) counts of one minibatch; at least one drifted example when the batch allows."""
    if not have_replay or replay_fraction <= 0:
        return batch_size, 0
    n_replay = int(round(batch_size * replay_fraction))
    n_replay = min(n_replay, batch_size - 1) if batch_size > 1 else n_replay
    return batch_size - n_replay, n_replay


def epoch_minibatches(
    drifted: LabelBuffer,
    replay: LabelBuffer,
    batch_size: int,
    replay_fraction: float,
    rng: np.random.Generator,
) -> list[list[Example]]:
    """One epoch: every drifted example once (shuffled), each minibatch topped up with replay samples."""
    n_drift, n_replay = replay_split(batch_size, replay_fraction, len(replay) > 0)
    order = rng.permutation(len(drifted))
    batches = []
    for start in range(0, len(order), n_drift):
        chunk = [drifted.examples[i] for i in order[start : start + n_drift]]
        batches.append(chunk + replay.sample(max(1, round(len(chunk) * n_replay / n_drift)) if n_replay else 0, rng))
    return batches
