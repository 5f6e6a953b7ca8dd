"""The labelled sets an ALEF run is measured on and replays, labelled once at its start.

Held-out drifted instances (the gap after fine-tuning), held-out undrifted ones (forgetting) and the
pre-drift replay set. They depend on the config's scenario, drift, prompts, sizes and seed only, so
runs that differ in query or experts can share them (the benchmark labels them once per drift).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from lambo_ray.alef.buffer import Example
from lambo_ray.alef.config import AlefConfig, run_seeds
from lambo_ray.alef.environment import cycle_prompts, snapshot_set
from lambo_ray.alef.labels import Label, Outcome
from lambo_ray.alef.metrics import LabelledSet
from lambo_ray.mec.drift import apply_drift
from lambo_ray.mec.instance import Instance


class Labeller(Protocol):
    """Anything that labels instances: the expert pool, or the pool behind a run's label journal."""

    def label(self, instances: Sequence[Instance], prompt: Sequence[str], ids: Sequence[int]) -> list[Outcome]: ...


@dataclass
class References:
    heldout: LabelledSet
    undrifted: LabelledSet
    replay: LabelledSet
    label_s: float
    key: tuple = ()  # reference_key(cfg) of the config they were drawn for

    def sources(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in (self.heldout, self.undrifted, self.replay):
            for lab in s.labels:
                out[lab.source] = out.get(lab.source, 0) + 1
        return out

    @property
    def skipped(self) -> int:
        return self.heldout.skipped + self.undrifted.skipped + self.replay.skipped

    def examples(self) -> dict[str, list[Example]]:
        return {
            "heldout": self.heldout.examples(),
            "undrifted": self.undrifted.examples(),
            "replay": self.replay.examples(),
        }


def reference_key(cfg: AlefConfig) -> tuple[Any, ...]:
    return (cfg.scenario, cfg.drift, cfg.prompts, cfg.n_heldout, cfg.n_replay, cfg.seed)


def _labelled(instances: list[Instance], prompts: list[str], outcomes: list[Outcome]) -> LabelledSet:
    keep = [k for k, o in enumerate(outcomes) if isinstance(o, Label)]
    return LabelledSet(
        [instances[k] for k in keep],
        [prompts[k] for k in keep],
        [outcomes[k] for k in keep],
        skipped=len(outcomes) - len(keep),
    )


def prepare_references(cfg: AlefConfig, labeller: Labeller) -> References:
    """Draw and label the reference sets in one parallel call (negative ids: the stream's are >= 0).
    An instance whose label was skipped is left out of its set and counted."""
    seeds = run_seeds(cfg.seed)
    drifted = apply_drift(cfg.scenario, cfg.drift)
    sets = [
        (snapshot_set(drifted, cfg.n_heldout, seeds["heldout_drifted"]), cycle_prompts(cfg.prompts, cfg.n_heldout)),
        (
            snapshot_set(cfg.scenario, cfg.n_heldout, seeds["heldout_undrifted"]),
            cycle_prompts(cfg.prompts, cfg.n_heldout),
        ),
        (
            snapshot_set(cfg.scenario, cfg.n_replay, seeds["replay"]) if cfg.n_replay else [],
            cycle_prompts(cfg.prompts, cfg.n_replay),
        ),
    ]
    instances = [i for insts, _ in sets for i in insts]
    prompts = [p for _, ps in sets for p in ps]
    t0 = time.perf_counter()
    outcomes = labeller.label(instances, prompts, ids=[-1 - k for k in range(len(instances))])
    label_s = time.perf_counter() - t0
    out, lo = [], 0
    for insts, ps in sets:
        out.append(_labelled(list(insts), list(ps), outcomes[lo : lo + len(insts)]))
        lo += len(insts)
    return References(out[0], out[1], out[2], label_s, reference_key(cfg))
