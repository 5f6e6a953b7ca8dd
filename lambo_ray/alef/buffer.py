"""The labelled buffer of ALEF: expert labels of drifted instances plus a replay set of pre-drift ones.

Fine-tuning only on the drifted regime makes the decoder forget the old one (the cell may drift
back: an outage ends, the crowd disperses). A small set of undrifted instances is labelled once
at the start and a fixed fraction of every training minibatch is drawn from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lambo_ray.mec.instance import Instance


@dataclass(frozen=True)
class Example:
    """One (instance, prompt) with the expert's decision to imitate."""

    instance: Instance
    prompt: str
    target: np.ndarray  # (N,) 0 = local, j = server j
    share: np.ndarray  # (N,) 0 where local
    source: str  # which expert produced the label ("exact", "exact_time_limit", "de")
    objective: float


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
