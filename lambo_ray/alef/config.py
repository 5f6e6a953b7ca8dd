"""Every hyperparameter of one ALEF run, in one dataclass (logged with its metrics, so a run is
reproducible from it), and the run's derived seeds."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lambo_ray.errors import LamboInputError
from lambo_ray.mec.drift import DRIFTS
from lambo_ray.mec.instance import check_prompt
from lambo_ray.mec.scenario import ScenarioConfig


@dataclass
class AlefConfig:
    """Every hyperparameter of one ALEF run (logged with its metrics, so a run is reproducible)."""

    drift: str = "outage"  # a drift scenario (lambo_ray.mec.drift.DRIFTS)
    prompts: tuple[str, ...] = ("min_latency", "min_energy")  # arrivals cycle through these
    rounds: int = 4
    pool_size: int = 64  # unlabelled drifted instances decided online per round
    budget: int = 200  # expert labels in total over all rounds
    budget_per_round: int | None = None  # default: budget spread evenly over the rounds
    query: str = "entropy"  # query strategy (lambo_ray.alef.query): entropy | random | gain
    query_share_weight: float = 0.0  # entropy query: weight of the share head's entropy
    query_samples: int = 8  # gain query: sampled decodes per instance (best-of-k against greedy)
    experts: int = 2  # expert actors (one CPU each)
    label_time_limit: float = 10.0  # seconds per instance for exact, and again for each fallback
    label_fallbacks: tuple[str, ...] = ("ils", "local_search", "de")  # when exact proves nothing in time
    label_accept_gap: float = 1e-3  # an exact incumbent certified within this gap needs no fallback
    label_grace_s: float = 10.0  # deadline = time limit x experts per label + grace; then kill + retry
    label_attempts: int = 3  # actors tried per instance before it is skipped (and reported)
    # Passes over the labelled drifted buffer after each round. A few gentle Adam steps on a policy
    # shaped by RL made things worse (outage, 96 labels: gap 7.6% -> 9.0% at lr 3e-4 x 8 epochs);
    # training to convergence on the labels cut it to 3.4% and also lowered the undrifted gap
    # (1.5% -> 1.1%) with lr 1e-3 x 20 epochs.
    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    replay_fraction: float = 0.25  # share of each minibatch drawn from the pre-drift replay set
    # Keep a round's decoder update only if greedy decoding on the labelled data (drifted buffer +
    # replay) does not get worse: imitation loss can fall while greedy decisions get worse (exposure
    # bias), and a fine-tuning run must never ship a decoder worse than the one it started from on
    # the data it has. The held-out sets stay untouched by this choice.
    gate: bool = True
    gate_tolerance: float = 0.0  # accepted if gap_after <= gap_before + tolerance (absolute)
    n_replay: int = 32  # undrifted instances labelled once at the start (replay)
    n_heldout: int = 32  # held-out drifted instances (gap), and as many undrifted ones (forgetting)
    target_weight: float = 1.0  # lambda_target: cross-entropy of the expert's targets
    share_weight: float = 1.0  # lambda_share: negative log-likelihood of the expert's shares (as the warm start)
    series_dt_s: float = 30.0  # mobility: seconds between arrivals of the cell's time series
    seed: int = 0
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)  # the undrifted (pretraining) regime

    def __post_init__(self) -> None:
        from lambo_ray.alef.query import query_strategies

        problems = []
        if self.drift not in DRIFTS:
            problems.append(f"unknown drift {self.drift!r}; expected one of {', '.join(DRIFTS)}")
        self.prompts = tuple(check_prompt(p) for p in self.prompts)
        self.label_fallbacks = tuple(self.label_fallbacks)
        if not self.prompts:
            problems.append("at least one prompt is needed")
        if self.query not in query_strategies():
            problems.append(f"unknown query strategy {self.query!r}; expected one of {', '.join(query_strategies())}")
        for name in ("rounds", "pool_size", "budget", "experts", "epochs", "batch_size", "n_heldout"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.label_attempts < 1 or self.query_samples < 1:
            problems.append("label_attempts and query_samples must be >= 1")
        if self.n_replay < 0:
            problems.append(f"n_replay must be >= 0 (got {self.n_replay})")
        if not (0.0 <= self.replay_fraction < 1.0):
            problems.append(f"replay_fraction must be in [0, 1) (got {self.replay_fraction})")
        if not (self.lr > 0 and self.label_time_limit > 0 and self.series_dt_s > 0):
            problems.append("lr, label_time_limit and series_dt_s must be > 0")
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

    def query_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the chosen query strategy (lambo_ray.alef.query.get_query)."""
        return {
            "entropy": {"share_weight": self.query_share_weight},
            "gain": {"samples": self.query_samples},
        }.get(self.query, {})


def run_seeds(seed: int) -> dict[str, int]:
    """Independent child seeds of a run's seed, one per random stream: a run that queries differently
    still sees the same arrivals and reference sets."""
    names = ("stream", "heldout_drifted", "heldout_undrifted", "replay", "query", "train")
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
