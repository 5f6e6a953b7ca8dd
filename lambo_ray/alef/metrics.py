"""What an ALEF run measures: greedy gaps to the expert on labelled sets, per-round records, the result."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lambo_ray.alef.buffer import Example
from lambo_ray.alef.labels import Label
from lambo_ray.alef.online import decide
from lambo_ray.alef.training import imitation_losses
from lambo_ray.mec.evaluator import evaluate, relative_gap
from lambo_ray.mec.instance import Instance


@dataclass
class LabelledSet:
    """Instances with expert reference labels: the held-out sets and the replay set. Instances whose
    label was skipped are left out (``skipped`` counts them)."""

    instances: list[Instance]
    prompts: list[str]
    labels: list[Label]
    skipped: int = 0

    def examples(self) -> list[Example]:
        return [Example.from_label(i, lab) for i, lab in zip(self.instances, self.labels)]


def gap_report(policy: torch.nn.Module, ref: LabelledSet) -> dict[str, float]:
    """Greedy decode against the expert: mean relative gap over feasible decisions, feasibility rate,
    and the imitation losses on the reference labels (all objectives from the evaluator)."""
    if not ref.instances:
        nan = float("nan")
        return {"gap": nan, "feasible": nan, "target_ce": nan, "share_nll": nan}
    dec = decide(policy, ref.instances, ref.prompts)
    gaps, feasible = [], []
    for inst, p, lab, t, s in zip(ref.instances, ref.prompts, ref.labels, dec.targets, dec.shares):
        ev = evaluate(inst, t, s)
        feasible.append(ev.feasible)
        if ev.feasible:
            gaps.append(relative_gap(ev.objective(p), lab.objective))
    with torch.no_grad():
        il = imitation_losses(policy, ref.examples())
    return {
        "gap": float(np.mean(gaps)) if gaps else float("nan"),
        "feasible": float(np.mean(feasible)),
        "target_ce": float(il.target_ce),
        "share_nll": float(il.share_nll),
    }


def labelled_gap(policy: torch.nn.Module, examples: Sequence[Example]) -> float:
    """Mean greedy gap to the labels over ``examples``; an infeasible decision counts as a 100% gap."""
    if not examples:
        return float("nan")
    dec = decide(policy, [e.instance for e in examples], [e.prompt for e in examples])
    return float(np.mean(decision_gaps(examples, dec.targets, dec.shares)))


def decision_gaps(examples: Sequence[Example], targets: Sequence[np.ndarray], shares: Sequence[np.ndarray]) -> list:
    """Gap of each decision to its example's label; 1.0 (100%) where the decision is infeasible."""
    out = []
    for e, t, s in zip(examples, targets, shares):
        ev = evaluate(e.instance, t, s)
        out.append(relative_gap(ev.objective(e.prompt), e.objective) if ev.feasible else 1.0)
    return out


@dataclass
class OnlineRecord:
    """One served decision of the stream: what was decided online and, if queried, what the expert said."""

    instance_id: int
    round: int
    prompt: str
    objective: float
    feasible: bool
    score: float  # query score
    queried: bool = False
    label_objective: float | None = None
    label_source: str | None = None
    skipped: bool = False  # queried, but the pool could not label it

    @property
    def gap(self) -> float | None:
        """Gap of the *online* decision to its label (only labelled instances have one)."""
        if self.label_objective is None or not self.feasible:
            return None
        return relative_gap(self.objective, self.label_objective)


@dataclass
class RoundMetrics:
    round: int
    labels_used: int  # cumulative
    labels_this_round: int
    label_sources: dict[str, int]
    online_objective: dict[str, float]  # per prompt: mean objective of the round's served decisions
    online_feasible: float  # feasibility rate of those decisions (no labels exist for most of them)
    queried_online_gap: float  # gap of the online decisions of the queried instances to their labels
    query_score_mean: float  # mean query score of the queried instances
    pool_score_mean: float  # ... and of the whole arrival pool (entropy query: queried > pool)
    train: dict[str, float]
    drifted: dict[str, float]  # gap_report on the held-out drifted set after this round
    undrifted: dict[str, float]  # gap_report on the held-out undrifted set (forgetting)
    label_s: float
    train_s: float
    decide_s: float
    gate_gap_before: float = float("nan")  # greedy gap on buffer + replay labels before this round's update
    gate_gap_after: float = float("nan")  # ... and after it
    accepted: bool = True  # False: the update was rolled back (see AlefConfig.gate)
    skipped: int = 0  # queried instances the pool could not label this round
    labels_cached: int = 0  # labels of this round found in the run's journal (a resumed run), not bought
    label_quality: dict[str, float] = field(default_factory=dict)  # certified gaps of this round's labels
    gate: dict[str, Any] = field(default_factory=dict)  # GateReport.to_dict(): why it kept or rolled back

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoundMetrics:
        """Inverse of ``dataclasses.asdict`` after a JSON round trip (which writes NaN as null)."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        out = {}
        for k, v in d.items():
            if k not in fields:
                continue
            if v is None and fields[k].type == "float":
                v = math.nan
            elif k in ("online_objective", "train", "drifted", "undrifted", "label_quality"):
                v = {kk: math.nan if vv is None else vv for kk, vv in v.items()}
            out[k] = v
        return cls(**out)


def label_quality(labels: Sequence[Label]) -> dict[str, float]:
    """Certified gaps of a set of labels: how many are proven optimal, mean and worst known gap."""
    gaps = [lab.gap for lab in labels if lab.gap is not None]
    return {
        "proven": sum(lab.source == "exact" for lab in labels),
        "unknown_gap": sum(lab.gap is None for lab in labels),
        "mean_gap": float(np.mean(gaps)) if gaps else math.nan,
        "max_gap": float(np.max(gaps)) if gaps else math.nan,
        "mean_wall_s": float(np.mean([lab.wall_s for lab in labels])) if labels else math.nan,
    }


@dataclass
class AlefResult:
    config: dict[str, Any]
    before: dict[str, dict[str, float]]  # {"drifted": gap_report, "undrifted": gap_report}
    rounds: list[RoundMetrics]
    setup_label_s: float
    wall_s: float
    pool_stats: dict[str, Any]
    online: list[OnlineRecord] = field(default_factory=list)
    buffer: list[Example] = field(default_factory=list)  # every label the rounds bought, with provenance
    reference_examples: dict[str, list[Example]] = field(default_factory=dict)  # heldout / undrifted / replay
    resumed_after_round: int | None = None  # a resumed run: the last round restored from disk

    @property
    def after(self) -> dict[str, dict[str, float]]:
        last = self.rounds[-1] if self.rounds else None
        return self.before if last is None else {"drifted": last.drifted, "undrifted": last.undrifted}

    @property
    def labels_used(self) -> int:
        return self.rounds[-1].labels_used if self.rounds else 0

    @property
    def skipped(self) -> int:
        return sum(r.skipped for r in self.rounds)

    def label_records(self) -> list[dict[str, Any]]:
        """Every label of the run (references, then the rounds' labels), one saved-file line each."""
        out = [e.to_record(role) for role, exs in self.reference_examples.items() for e in exs]
        return out + [e.to_record("query") for e in self.buffer]

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "before": self.before,
            "after": self.after,
            "labels_used": self.labels_used,
            "skipped": self.skipped,
            "rounds": [dataclasses.asdict(r) for r in self.rounds],
            "setup_label_s": self.setup_label_s,
            "wall_s": self.wall_s,
            "pool_stats": self.pool_stats,
            "resumed_after_round": self.resumed_after_round,
            "online": [dataclasses.asdict(o) | {"gap": o.gap} for o in self.online],
        }
