"""Every hyperparameter of one ALEF run, in one dataclass (logged with its metrics, so a run is
reproducible from it), and the run's derived seeds."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lambo_ray.errors import LamboInputError
from lambo_ray.mec.drift import DRIFTS
from lambo_ray.mec.instance import check_prompt
from lambo_ray.mec.scenario import ScenarioConfig

# Which must-offload plan a label is teacher-forced on (AlefConfig.label_plan).
LABEL_PLANS = ("inference", "label")


@dataclass
class AlefConfig:
    """Every hyperparameter of one ALEF run (logged with its metrics, so a run is reproducible)."""

    drift: str = field(default="outage", metadata={"help": "the named drift to adapt to", "choices": tuple(DRIFTS)})
    prompts: tuple[str, ...] = field(
        default=("min_latency", "min_energy"),
        metadata={"help": "prompts of the arriving instances (they cycle)", "choices": ("min_latency", "min_energy")},
    )
    rounds: int = field(default=4, metadata={"help": "query-label-train rounds"})
    # Arrivals cost no label, and the policy-gradient phase learns from every one of them: on `outage`
    # (min_energy, random query, 192 labels, 3 seeds, 1024 fresh drifted instances each) the shipped
    # decoder was 0.16 % cheaper than the start with 128 or 768 arrivals per round and no phase, 0.19 %
    # with the phase on 128 and 0.24-0.25 % with it on 768 (docs/alef.md, "What more arrivals buy"). On
    # `lambo finetune --drift outage` (both prompts, seeds 0 and 1) 512 arrivals and 4 passes shipped
    # 0.19-0.21 % against 0.06-0.10 % with 64 and 2, for 3-5 minutes more per run.
    pool_size: int = field(default=512, metadata={"help": "unlabelled drifted instances decided online per round"})
    budget: int = field(default=200, metadata={"help": "expert labels in total over all rounds"})
    budget_per_round: int | None = field(
        default=None, metadata={"help": "labels per round (default: the budget spread evenly over the rounds)"}
    )
    query: str = field(
        default="entropy",
        metadata={"help": "query strategy: which arrivals get an expert label (entropy, power, gain, polish, random)"},
    )
    query_share_weight: float = field(
        default=0.0, metadata={"help": "entropy query: weight of the share head's entropy"}
    )
    query_samples: int = field(
        default=8, metadata={"help": "gain query: sampled decodes per arriving instance (best of k against greedy)"}
    )
    experts: int = field(default=2, metadata={"help": "expert actors (one CPU each)"})
    label_time_limit: float = field(
        default=10.0, metadata={"help": "seconds per label for exact, and again for each fallback"}
    )
    label_fallbacks: tuple[str, ...] = field(
        default=("ils", "local_search", "de"),
        metadata={"help": "experts tried when exact proves nothing within the time limit (best feasible label wins)"},
    )
    label_accept_gap: float = field(
        default=1e-3, metadata={"help": "an exact incumbent certified within this relative gap needs no fallback"}
    )
    label_grace_s: float = field(
        default=10.0,
        metadata={"help": "seconds past the time limits after which an expert actor is killed and replaced"},
    )
    label_attempts: int = field(
        default=3, metadata={"help": "actors tried per instance before it is skipped (and reported)"}
    )
    # Passes over the labelled drifted buffer after each round, and the learning rate. On the shipped
    # LAMBO-S (imitation-trained; min_energy, 128-192 exact labels, 64 held-out drifted instances),
    # lr 3e-4 x 20 epochs was best or tied on deadline (1.71% -> 1.44-1.47%), outage (0.91% -> 0.64-
    # 0.69%) and density (1.36% -> 1.13%) against lr 1e-3 or 1e-4, 5 or 40 epochs, or a 10x lighter
    # share term. (An earlier RL-shaped policy needed lr 1e-3: gentle steps made it worse.)
    epochs: int = field(default=20, metadata={"help": "passes over the labelled data after each round"})
    batch_size: int = field(default=16, metadata={"help": "labelled instances per gradient step"})
    lr: float = field(default=3e-4, metadata={"help": "Adam learning rate of the decoder"})
    weight_decay: float = field(default=0.0, metadata={"help": "Adam weight decay of the decoder"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip"})
    replay_fraction: float = field(
        default=0.25, metadata={"help": "share of each minibatch drawn from the pre-drift replay set"}
    )
    # Keep a round's decoder update only if greedy decoding did not get worse (lambo_ray.alef.gate: paired
    # changes on unlabelled arrivals and held-back labels, with confidence bounds): imitation loss can
    # fall while greedy decisions get worse (exposure bias), and a fine-tuning run must never ship a
    # decoder worse than the one it started from. The held-out sets stay untouched by this choice.
    gate: bool = field(
        default=True,
        metadata={"help": "keep a round's update only if its greedy decisions are shown not worse (else roll back)"},
    )
    gate_tolerance: float = field(
        default=0.0,
        metadata={"help": "largest mean relative objective change the gate lets through (0.001: 0.1 % worse)"},
    )
    # Judging an update on the labels it was trained on lets it through when it merely memorised them:
    # on the shipped LAMBO-S (mobility, min_latency, 96 labels) the gate kept updates that took the
    # held-out gap from 0.51% to 0.68%. So a share of every round's labels (and of the replay set) is
    # never trained on and is what the gate judges; 0 restores judging on the training labels.
    gate_holdout: float = field(
        default=0.25,
        metadata={"help": "share of each round's labels (and of the replay set) kept out of training for the gate"},
    )
    # Held-back labels are few (a quarter of a round's), so the labelled check is noisy: on the shipped
    # LAMBO-S (deadline, min_energy, 192 labels) it kept updates that took the held-out gap from 1.1 % to
    # 2.0 %. Whether greedy decisions got worse needs no label: the gate also decides the next arrivals
    # with the old and the new decoder and compares them instance by instance. Per-instance changes are
    # heavy-tailed and the changes to tell apart are tenths of a percent: the mean of 64 arrivals has a
    # standard deviation of about 0.13 points on deadline, that of 512 about 0.05 (deciding 512 arrivals
    # twice costs a few seconds a round on 2 cores).
    gate_instances: int = field(
        default=512,
        metadata={"help": "next drifted arrivals (unlabelled) on which the gate compares old and new greedy decisions"},
    )
    gate_confidence: float = field(
        default=0.95,
        metadata={
            "help": "one-sided confidence with which the gate must see an update not worse on the unlabelled "
            "arrivals (0.5: their mean change alone decides)"
        },
    )
    n_replay: int = field(default=32, metadata={"help": "undrifted instances labelled once at the start (replay)"})
    n_heldout: int = field(
        default=32, metadata={"help": "held-out drifted instances (gap), and as many undrifted ones (forgetting)"}
    )
    # The decoder holds capacity for the must-offload UEs still to come on a plan, and it learns to follow
    # its plan closely. Teacher-forcing a label on its own placement of those UEs ("label") trains it on
    # plans it never sees when deciding; "inference" trains on the plan decoding uses
    # (policy.decoding.decode_packing), leaving out the label steps that plan's masks exclude.
    label_plan: str = field(
        default="inference",
        metadata={
            "help": "must-offload plan a label is trained with: the one decoding uses, or the label's own",
            "choices": LABEL_PLANS,
        },
    )
    # After each round's imitation, a label-free policy-gradient phase on the drifted instances
    # (lambo_ray.alef.policy_gradient): k sampled decodes per instance, group baseline; the gate judges the
    # round's whole update. On `lambo finetune --drift outage` (seeds 0 and 1, 1024 fresh drifted
    # instances each) the decoder shipped with 2 passes was 0.06-0.10 % cheaper than the start against
    # 0.00-0.06 % with imitation alone, for 40-110 s more per run; the capacity probe measured it lowering
    # the held-out gap on deadline, outage and density and raising it on mobility (the gate's business).
    # 4 passes over 512 arrivals per round (the defaults since December 7) against 2 over 64: see the
    # pool_size comment and docs/alef.md, "What more arrivals buy".
    pg_epochs: int = field(
        default=4,
        metadata={"help": "policy-gradient passes over the round's drifted instances after imitation (0: off)"},
    )
    pg_samples: int = field(default=8, metadata={"help": "sampled decodes per instance in the policy-gradient phase"})
    # The phase shares Adam with imitation, whose clipped gradients (norm ~1) fill Adam's second-moment
    # estimate; the phase's own gradients are ~20x smaller, so its steps come out about a third of what
    # the same learning rate gives on a fresh optimiser (measured on `outage`, min_energy, after 20 epochs
    # of imitation). This multiplies the learning rate for the phase's steps only; 3 (about a fresh
    # optimiser's step) shipped no better decoders on `outage` (docs/alef.md, "Larger policy-gradient steps").
    pg_lr_scale: float = field(
        default=1.0, metadata={"help": "learning-rate multiplier for the policy-gradient phase's steps"}
    )
    target_weight: float = field(default=1.0, metadata={"help": "weight of the cross-entropy of the expert's targets"})
    share_weight: float = field(
        default=1.0, metadata={"help": "weight of the negative log-likelihood of the expert's shares"}
    )
    series_dt_s: float = field(
        default=30.0, metadata={"help": "mobility drift: seconds between arrivals of the cells' time series"}
    )
    mobility_cells: int = field(
        default=64,
        metadata={"help": "mobility drift: cells the arrivals come from in turn (1: a single cell's time series)"},
    )
    seed: int = field(default=0, metadata={"help": "seed of the arrivals, the reference sets and training"})
    scenario: ScenarioConfig = field(
        default_factory=ScenarioConfig, metadata={"help": "the undrifted (pretraining) regime"}
    )

    def __post_init__(self) -> None:
        from lambo_ray.alef.query import query_strategies

        problems = []
        if self.drift not in DRIFTS:
            problems.append(f"unknown drift {self.drift!r}; expected one of {', '.join(DRIFTS)}")
        self.prompts = tuple(check_prompt(p) for p in self.prompts)
        self.label_fallbacks = tuple(self.label_fallbacks)
        if not self.prompts:
            problems.append("at least one prompt is needed")
        if self.label_plan not in LABEL_PLANS:
            problems.append(f"unknown label_plan {self.label_plan!r}; expected one of {', '.join(LABEL_PLANS)}")
        if self.query not in query_strategies():
            problems.append(f"unknown query strategy {self.query!r}; expected one of {', '.join(query_strategies())}")
        for name in ("rounds", "pool_size", "budget", "experts", "epochs", "batch_size", "n_heldout"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.label_attempts < 1 or self.query_samples < 1:
            problems.append("label_attempts and query_samples must be >= 1")
        if self.pg_epochs < 0 or self.pg_samples < 2:
            problems.append(f"pg_epochs must be >= 0 and pg_samples >= 2 (got {self.pg_epochs}, {self.pg_samples})")
        if not (self.pg_lr_scale > 0 and math.isfinite(self.pg_lr_scale)):
            problems.append(f"pg_lr_scale must be a positive number (got {self.pg_lr_scale})")
        if self.n_replay < 0 or self.gate_instances < 0:
            problems.append(f"n_replay and gate_instances must be >= 0 (got {self.n_replay}, {self.gate_instances})")
        if not (0.5 <= self.gate_confidence < 1.0):
            problems.append(f"gate_confidence must be in [0.5, 1) (got {self.gate_confidence})")
        if not (0.0 <= self.gate_holdout < 1.0):
            problems.append(f"gate_holdout must be in [0, 1) (got {self.gate_holdout})")
        if not (0.0 <= self.replay_fraction < 1.0):
            problems.append(f"replay_fraction must be in [0, 1) (got {self.replay_fraction})")
        if not (self.lr > 0 and self.label_time_limit > 0 and self.series_dt_s > 0):
            problems.append("lr, label_time_limit and series_dt_s must be > 0")
        if self.mobility_cells < 1:
            problems.append(f"mobility_cells must be >= 1 (got {self.mobility_cells})")
        if self.label_grace_s < 0 or self.label_accept_gap < 0:
            problems.append("label_grace_s and label_accept_gap must be >= 0")
        if self.target_weight < 0 or self.share_weight < 0 or self.target_weight + self.share_weight == 0:
            problems.append("loss weights must be >= 0 and not both 0")
        if problems:
            raise LamboInputError("; ".join(problems), where="alef config")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["scenario"] = self.scenario.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AlefConfig:
        """The config :meth:`to_dict` wrote (e.g. a run's metrics.json); fields it lacks take their defaults."""
        return cls(**{**data, "scenario": ScenarioConfig.from_dict(data.get("scenario") or {})})

    def held_back_share(self) -> float:
        """Share of labels the gate keeps for itself: none without a gate (nothing would judge on them)."""
        return self.gate_holdout if self.gate else 0.0

    def query_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the chosen query strategy (lambo_ray.alef.query.get_query)."""
        return {
            "entropy": {"share_weight": self.query_share_weight},
            "gain": {"samples": self.query_samples},
        }.get(self.query, {})


def run_seeds(seed: int) -> dict[str, int]:
    """Independent child seeds of a run's seed, one per random stream: a run that queries differently
    still sees the same arrivals and reference sets."""
    # append only: a child's seed depends on its position
    names = ("stream", "heldout_drifted", "heldout_undrifted", "replay", "query", "train", "check", "gate_undrifted")
    children = np.random.SeedSequence(seed).spawn(len(names))
    return {n: int(c.generate_state(1)[0]) for n, c in zip(names, children)}


def make_pool(cfg: AlefConfig, **overrides: Any):
    """The expert pool a config asks for (``overrides``: e.g. ``cpus_per_actor`` in tests)."""
    from lambo_ray.alef.expert_pool import ExpertPool
    from lambo_ray.alef.worker import LabelWorkerConfig

    kwargs: dict[str, Any] = {
        "time_limit": cfg.label_time_limit,
        "worker": LabelWorkerConfig(fallbacks=cfg.label_fallbacks, accept_gap=cfg.label_accept_gap),
        "max_attempts": cfg.label_attempts,
        "grace_s": cfg.label_grace_s,
        **overrides,
    }
    return ExpertPool(cfg.experts, **kwargs)
