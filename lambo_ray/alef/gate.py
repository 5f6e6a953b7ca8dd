"""The validation gate of ALEF, and why it decided what it did.

After each round the decoder update is kept only if the evidence says greedy decoding did not get
worse; otherwise the decoder is rolled back. Imitation loss can fall while greedy decisions get
worse, an update judged on its own training labels passes when it only memorised them, and a
fine-tuning run must not ship a worse decoder than it started from. The benchmark's held-out sets are
never used for this. The evidence is paired: the old and the new decoder decide the same instances,
and the gate looks at the per-instance relative changes of the evaluator's objective
(:func:`paired_change`), with their standard error:

* on the next ``AlefConfig.gate_instances`` drifted arrivals (unlabelled: a paired change needs no
  label, so this set can be large), the update must be *shown* not to be worse: the upper
  confidence bound of the mean change (``AlefConfig.gate_confidence``, one-sided) must be at most
  ``gate_tolerance``;
* on held-back labels (a share of every round's drifted labels and of the replay set that training
  never sees, ``AlefConfig.gate_holdout``; the replay part watches forgetting), which are few, the
  update must not be *shown* to be worse: the lower bound must be at most ``gate_tolerance``.
  Without unlabelled arrivals this set is all the gate has, and its upper bound must pass instead;
* on as many fresh instances of the undrifted regime (``AlefConfig.scenario``, unlabelled, the same
  set every round) the update must not be shown worse either: adapting to the drift may cost nothing
  measurable on the regime the policy was trained for;
* any decision the update makes infeasible that was feasible before rolls it back.

Why bounds and not means: per-instance changes are heavy-tailed (most instances move by well under
1 %, a few by 5-15 %) and the changes to tell apart are tenths of a percent. On ``deadline`` /
``min_energy`` the mean of 64 arrivals has a standard deviation of about 0.13 points, so a gate that
keeps every update whose 64-arrival mean is not above zero keeps neutral updates on a coin flip; one
such update took a run's 32 held-out instances from 1.13 % to 1.95 % while it changed the objective of
1024 fresh arrivals by +0.03 % (standard error 0.03 %).

A rolled-back round records enough to tell the usual causes apart (:func:`diagnose`):

* ``infeasible``: the update made some greedy decisions infeasible (each counts as a 100 % gap);
* ``not_fitted``: the imitation loss on the labelled data did not fall: the update did not fit the
  labels (learning rate, epochs, or labels that contradict each other);
* ``targets_not_fitted``: the loss fell through the share term only (target cross-entropy down by
  less than 2 %): the share head's negative log-density is unbounded below and its gradients can
  dominate the clipped update, while the targets decide the objective (all of it for ``min_energy``);
* ``exposure_bias``: teacher-forced accuracy rose (the decoder predicts the expert's next choice
  given the expert's earlier ones) but greedy agreement with the expert did not: at decode time the
  decoder conditions on its own earlier decisions, and the errors compound;
* ``objective_mismatch``: greedy decisions agree with the expert more often, yet cost more: the
  UEs that still disagree (or the shares) matter more than the ones fixed;
* ``unlabelled_worse``: the labelled check passed, but on the unlabelled arrivals the new decoder's
  greedy decisions cost more on average than the old one's;
* ``unlabelled_unproven``: they cost no more on average, but not by enough to rule out, at the gate's
  confidence, that the update is worse;
* ``labelled_worse``: the held-back labels show the update worse with confidence although its mean
  greedy gap to them did not grow (the change is relative to the old decisions, the gap to the labels);
* ``forgetting``: everything else passed, but fresh instances of the undrifted regime show the update
  worse with confidence.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np
import torch

from lambo_ray.alef.buffer import Example
from lambo_ray.alef.config import AlefConfig
from lambo_ray.alef.online import decide, objectives
from lambo_ray.alef.training import imitation_losses, label_packings
from lambo_ray.mec.evaluator import relative_gap


@dataclass
class LabelledFit:
    """How the current decoder does on labelled examples, greedy and teacher-forced."""

    gap: float  # mean greedy gap to the labels (infeasible = 1.0), all examples
    gap_drifted: float  # ... over the round's drifted labels only
    gap_replay: float  # ... over the replay labels only (forgetting)
    infeasible: int  # greedy decisions that break a constraint
    loss: float  # imitation loss (target_weight * target_ce + share_weight * share_nll)
    target_ce: float
    share_nll: float
    tf_accuracy: float  # teacher-forced argmax == expert target, fraction of real UEs
    greedy_agreement: float  # greedy decision's target == expert target, fraction of real UEs
    objectives: list[float] = field(default_factory=list)  # greedy objective per example, NaN if infeasible


def _mean(x: Sequence[float]) -> float:
    return float(np.mean(x)) if len(x) else math.nan


def teacher_forced_accuracy(
    policy: torch.nn.Module, examples: Sequence[Example], label_plan: str = "inference", chunk: int = 64
) -> float:
    """Fraction of real UEs whose teacher-forced argmax target equals the expert's (in decode order, with
    the must-offload plan the imitation loss uses, exactly as it sees them)."""
    from lambo_ray.policy.features import featurize
    from lambo_ray.policy.imitation import pad_labels

    hits = total = 0
    with torch.no_grad():
        for lo in range(0, len(examples), chunk):
            part = examples[lo : lo + chunk]
            packings = label_packings(part, label_plan)
            batch = featurize([e.instance for e in part], [e.prompt for e in part], packings=packings)
            target, share = pad_labels([e.target for e in part], [e.share for e in part], batch.n_max)
            target, share = batch.to_decode_order(target), batch.to_decode_order(share)
            tf = policy.teacher_forced(batch, policy.encode(batch), target, share)
            real = batch.ue_mask
            hits += int(((tf.logits.argmax(-1) == target) & real).sum())
            total += int(real.sum())
    return hits / max(total, 1)


def labelled_fit(
    policy: torch.nn.Module, drifted: Sequence[Example], replay: Sequence[Example], cfg: AlefConfig
) -> LabelledFit:
    examples = list(drifted) + list(replay)
    dec = decide(policy, [e.instance for e in examples], [e.prompt for e in examples])
    objective = objectives([e.instance for e in examples], [e.prompt for e in examples], dec.targets, dec.shares)
    gaps = [relative_gap(o, e.objective) if np.isfinite(o) else 1.0 for o, e in zip(objective, examples)]
    agree = sum(int((t == e.target).sum()) for e, t in zip(examples, dec.targets))
    with torch.no_grad():
        il = imitation_losses(policy, examples, cfg.label_plan)
    return LabelledFit(
        gap=_mean(gaps),
        gap_drifted=_mean(gaps[: len(drifted)]),
        gap_replay=_mean(gaps[len(drifted) :]),
        infeasible=int(np.isnan(objective).sum()),
        loss=float(il.total(cfg.target_weight, cfg.share_weight)),
        target_ce=float(il.target_ce),
        share_nll=float(il.share_nll),
        tf_accuracy=teacher_forced_accuracy(policy, examples, cfg.label_plan),
        greedy_agreement=agree / max(sum(len(e.target) for e in examples), 1),
        objectives=[float(o) for o in objective],
    )


# Relative fall of the target cross-entropy below which an update counts as not fitting the targets.
TARGET_FIT = 0.02


def diagnose(before: LabelledFit, after: LabelledFit) -> str:
    """The most likely reason greedy decisions got worse (module docstring); "" if they did not."""
    if not after.gap > before.gap:
        return ""
    if after.infeasible > before.infeasible:
        return "infeasible"
    if not after.loss < before.loss:
        return "not_fitted"
    if not after.target_ce < before.target_ce * (1 - TARGET_FIT):
        return "targets_not_fitted"
    if after.tf_accuracy > before.tf_accuracy and not after.greedy_agreement > before.greedy_agreement:
        return "exposure_bias"
    return "objective_mismatch"


@dataclass(frozen=True)
class PairedChange:
    """Relative objective changes from old to new greedy decisions on the same instances: their mean,
    its standard error, how many instances count (feasible both times) and how many the new decoder
    made infeasible."""

    mean: float
    se: float
    n: int
    new_infeasible: int = 0

    def upper(self, z: float) -> float:
        return math.inf if self.new_infeasible else self.mean + z * self.se

    def lower(self, z: float) -> float:
        return math.inf if self.new_infeasible else self.mean - z * self.se


def paired_change(before: Sequence[float], after: Sequence[float]) -> PairedChange:
    """Per-instance ``(after - before) / |before|`` of greedy objectives (NaN marks an infeasible
    decision), summarised; instances infeasible before are left out (the update cannot make them worse)."""
    before, after = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    new_infeasible = int(np.sum(np.isnan(after) & ~np.isnan(before)))
    both = ~np.isnan(before) & ~np.isnan(after)
    rel = (after[both] - before[both]) / np.abs(before[both])
    n = int(rel.size)
    mean = float(rel.mean()) if n else 0.0
    se = float(rel.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    return PairedChange(mean, se, n, new_infeasible)


def confidence_z(confidence: float) -> float:
    """One-sided standard normal quantile of the gate's confidence (0.5 -> 0: judge the means alone)."""
    return NormalDist().inv_cdf(confidence)


@dataclass
class GateReport:
    accepted: bool
    diagnosis: str  # see :func:`diagnose` and the module docstring; "" when accepted without a worse gap
    n_drifted: int  # labels the gate judged on
    n_replay: int
    before: LabelledFit
    after: LabelledFit
    n_unlabelled: int = 0  # unlabelled drifted arrivals the gate compared old and new decisions on
    unlabelled_change: float | None = None  # their mean relative objective change (inf: new infeasible)
    unlabelled_se: float | None = None  # its standard error
    labelled_change: float | None = None  # the same on the held-back labels' instances
    labelled_se: float | None = None
    n_undrifted: int = 0  # undrifted (pre-drift regime) instances the gate watched forgetting on
    undrifted_change: float | None = None
    undrifted_se: float | None = None
    z: float = 0.0  # the confidence bounds are mean +- z * se

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for fit in (d["before"], d["after"]):
            fit.pop("objectives")  # per example; the report keeps what they sum up to
        return d

    def summary(self) -> str:
        b, a = self.before, self.after
        return (
            f"labelled gap {b.gap:.4f} -> {a.gap:.4f}, loss {b.loss:.4f} -> {a.loss:.4f}, teacher-forced "
            f"accuracy {b.tf_accuracy:.3f} -> {a.tf_accuracy:.3f}, greedy agreement {b.greedy_agreement:.3f} -> "
            f"{a.greedy_agreement:.3f} on {self.n_drifted}+{self.n_replay} labels"
            + (
                f", greedy objective {100 * self.unlabelled_change:+.3f} % (se {100 * (self.unlabelled_se or 0):.3f})"
                f" on {self.n_unlabelled} unlabelled arrivals"
                if self.unlabelled_change is not None
                else ""
            )
            + f" ({self.diagnosis or 'ok'})"
        )


def judge(
    before: LabelledFit,
    after: LabelledFit,
    n_drifted: int,
    n_replay: int,
    tolerance: float,
    unlabelled: tuple[np.ndarray, np.ndarray] | None = None,
    confidence: float = 0.95,
    undrifted: tuple[np.ndarray, np.ndarray] | None = None,
) -> GateReport:
    """Keep or roll back (module docstring): given the greedy objectives of unlabelled drifted arrivals
    before and after the update, the upper confidence bound of their mean relative change must be at
    most ``tolerance``; the held-back labels and the ``undrifted`` instances (forgetting) must not show
    it worse; without drifted arrivals the held-back labels' upper bound decides. A new infeasible
    decision on any set rejects."""
    z = confidence_z(confidence)
    labelled = paired_change(before.objectives, after.objectives)
    free = None if unlabelled is None or not len(unlabelled[0]) else paired_change(*unlabelled)
    old = None if undrifted is None or not len(undrifted[0]) else paired_change(*undrifted)
    if free is None:
        labelled_ok, free_ok = labelled.upper(z) <= tolerance, True
    else:
        labelled_ok, free_ok = labelled.lower(z) <= tolerance, free.upper(z) <= tolerance
    old_ok = old is None or old.lower(z) <= tolerance
    diagnosis = diagnose(before, after)
    if not free_ok and not diagnosis:
        diagnosis = "unlabelled_unproven" if free.mean <= tolerance and not free.new_infeasible else "unlabelled_worse"
    if not labelled_ok and not diagnosis:
        diagnosis = "labelled_worse"
    if not old_ok and not diagnosis:
        diagnosis = "forgetting"
    return GateReport(
        accepted=labelled_ok and free_ok and old_ok,
        diagnosis=diagnosis,
        n_drifted=n_drifted,
        n_replay=n_replay,
        before=before,
        after=after,
        n_unlabelled=0 if free is None else len(unlabelled[0]),
        unlabelled_change=_reported(free),
        unlabelled_se=None if free is None else free.se,
        labelled_change=_reported(labelled),
        labelled_se=labelled.se,
        n_undrifted=0 if old is None else len(undrifted[0]),
        undrifted_change=_reported(old),
        undrifted_se=None if old is None else old.se,
        z=z,
    )


def _reported(change: PairedChange | None) -> float | None:
    if change is None:
        return None
    return math.inf if change.new_infeasible else change.mean
