"""What labelling one instance produces: a :class:`Label` with its provenance, or a :class:`Skipped`.

A label says which expert produced it (``source``), what the exact expert reported (``exact_status``),
how far from optimal it is known to be (``gap``, certified against exact's lower bound when there is
one) and what it cost (``wall_s``). Fine-tuning on a label whose quality is unknown would be imitation
of noise, so this provenance travels with every label into the buffer, the metrics and the saved
label files. An instance that could not be labelled (both experts failed, or its actors kept missing
their deadline) is a :class:`Skipped` with the reason: the run goes on without it and reports it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from lambo_ray.mec.instance import Decision

# "exact": proven optimal (certified gap <= the expert's tolerance); "exact_time_limit": exact's
# incumbent when it stopped before proving optimality (its exact_status says why: time limit, round
# limit, stall); otherwise the name of the fallback expert whose decision was better.
LabelSource = Literal["exact", "exact_time_limit", "ils", "local_search", "de"]


class LabellingError(RuntimeError):
    """An instance could not be labelled, or the pool as a whole cannot label anything."""


@dataclass
class Label:
    """One expert decision for one queried instance, with its provenance."""

    instance_id: int
    prompt: str
    target: np.ndarray
    share: np.ndarray
    objective: float
    source: str  # a LabelSource
    gap: float | None  # certified relative gap (objective - lower_bound) / |objective|; None when unknown
    lower_bound: float | None
    exact_status: str  # what the exact expert reported ("optimal", "time_limit", "error: ...", ...)
    wall_s: float  # expert time for this instance, every expert it ran included
    worker_pid: int
    attempt: int = 1  # 2 or more: earlier actors died or missed their deadline with this instance

    ok = True

    def decision(self) -> Decision:
        return Decision(
            target=self.target,
            share=self.share,
            prompt=self.prompt,
            method=self.source,
            objective=self.objective,
            stats={"gap": self.gap, "source": self.source, "status": self.exact_status},
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target"], d["share"] = self.target.tolist(), self.share.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Label:
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        fields["target"] = np.asarray(d["target"], dtype=np.int64)
        fields["share"] = np.asarray(d["share"], dtype=np.float64)
        return cls(**fields)


@dataclass
class Skipped:
    """An instance the pool gave up on; the run continues without its label and reports it."""

    instance_id: int
    prompt: str
    reason: str
    attempts: int

    ok = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Skipped:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


Outcome = Label | Skipped


def outcome_to_dict(o: Outcome) -> dict[str, Any]:
    return {"kind": "label" if o.ok else "skipped", **o.to_dict()}


def outcome_from_dict(d: dict[str, Any]) -> Outcome:
    body = {k: v for k, v in d.items() if k != "kind"}
    return Label.from_dict(body) if d.get("kind") == "label" else Skipped.from_dict(body)


def certified_gap(objective: float, lower_bound: float | None) -> float | None:
    """(objective - lower_bound) / |objective|, clipped at 0; None without a finite bound."""
    if lower_bound is None or not math.isfinite(lower_bound) or objective == 0:
        return None
    return max(0.0, objective - lower_bound) / abs(objective)
