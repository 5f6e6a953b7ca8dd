"""The validation gate of ALEF, and why it decided what it did.

After each round the decoder update is kept only if greedy decoding on held-back labelled data (a
share of every round's drifted labels and of the replay set that training never sees,
``AlefConfig.gate_holdout``) did not get worse; otherwise the decoder is rolled back. Imitation
loss can fall while greedy decisions get worse, an update judged on its own training labels passes
when it only memorised them, and a fine-tuning run must not ship a worse decoder than it started
from. The benchmark's held-out sets are never used for this.

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
* ``unlabelled_worse``: the labelled check passed, but on the next drifted arrivals (unlabelled,
  ``AlefConfig.gate_instances``) the new decoder's greedy decisions cost more on average than the old
  one's, instance by instance. Held-back labels are few; this check needs none, so it can be large.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lambo_ray.alef.buffer import Example
from lambo_ray.alef.config import AlefConfig
from lambo_ray.alef.metrics import decision_gaps
from lambo_ray.alef.online import decide
from lambo_ray.alef.training import imitation_losses, label_packings
from lambo_ray.mec.evaluator import evaluate


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
    gaps = decision_gaps(examples, dec.targets, dec.shares)
    agree = sum(int((t == e.target).sum()) for e, t in zip(examples, dec.targets))
    feasible = [evaluate(e.instance, t, s).feasible for e, t, s in zip(examples, dec.targets, dec.shares)]
    with torch.no_grad():
        il = imitation_losses(policy, examples, cfg.label_plan)
    return LabelledFit(
        gap=_mean(gaps),
        gap_drifted=_mean(gaps[: len(drifted)]),
        gap_replay=_mean(gaps[len(drifted) :]),
        infeasible=sum(not f for f in feasible),
        loss=float(il.total(cfg.target_weight, cfg.share_weight)),
        target_ce=float(il.target_ce),
        share_nll=float(il.share_nll),
        tf_accuracy=teacher_forced_accuracy(policy, examples, cfg.label_plan),
        greedy_agreement=agree / max(sum(len(e.target) for e in examples), 1),
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


def paired_change(before: np.ndarray, after: np.ndarray) -> float:
    """Mean relative change of the greedy objective from ``before`` to ``after`` on the same instances
    (NaN marks an infeasible decision): +inf if the update made a feasible decision infeasible,
    instances infeasible both times left out; 0.0 for no instances."""
    before, after = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    if np.any(np.isnan(after) & ~np.isnan(before)):
        return math.inf
    both = ~np.isnan(before) & ~np.isnan(after)
    if not both.any():
        return 0.0
    return float(np.mean((after[both] - before[both]) / np.abs(before[both])))


@dataclass
class GateReport:
    accepted: bool
    diagnosis: str  # see :func:`diagnose`; "" when accepted without a worse gap
    n_drifted: int  # labels the gate judged on
    n_replay: int
    before: LabelledFit
    after: LabelledFit
    n_unlabelled: int = 0  # unlabelled drifted arrivals the gate compared old and new decisions on
    unlabelled_change: float | None = None  # their mean relative objective change (paired_change)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        b, a = self.before, self.after
        return (
            f"labelled gap {b.gap:.4f} -> {a.gap:.4f}, loss {b.loss:.4f} -> {a.loss:.4f}, teacher-forced "
            f"accuracy {b.tf_accuracy:.3f} -> {a.tf_accuracy:.3f}, greedy agreement {b.greedy_agreement:.3f} -> "
            f"{a.greedy_agreement:.3f} on {self.n_drifted}+{self.n_replay} labels"
            + (
                f", greedy objective {100 * self.unlabelled_change:+.3f} % on {self.n_unlabelled} unlabelled arrivals"
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
) -> GateReport:
    """Accept when the labelled gap did not grow by more than ``tolerance`` and, given the greedy
    objectives of unlabelled arrivals before and after the update, neither did their mean relative
    change (:func:`paired_change`)."""
    change = None if unlabelled is None or not len(unlabelled[0]) else paired_change(*unlabelled)
    labelled_ok = after.gap <= before.gap + tolerance
    unlabelled_ok = change is None or change <= tolerance
    diagnosis = diagnose(before, after) or ("" if unlabelled_ok else "unlabelled_worse")
    n_unlabelled = 0 if unlabelled is None else len(unlabelled[0])
    return GateReport(
        labelled_ok and unlabelled_ok, diagnosis, n_drifted, n_replay, before, after, n_unlabelled, change
    )
