"""Every hyperparameter of a pretraining run in one typed dataclass (logged in the checkpoint and in
TensorBoard), and the padding / environment config derived from it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lambo_ray.errors import LamboInputError, reject_unknown_keys
from lambo_ray.mec.distribution import ScenarioDistribution
from lambo_ray.mec.instance import PROMPTS, check_prompt
from lambo_ray.mec.scenario import ScenarioConfig
from lambo_ray.policy import SCALES, PolicyConfig, scale_config
from lambo_ray.rl.env import MecEnvConfig

# Fields that fix the shapes of the networks: a checkpoint can only be resumed with the same values.
ARCHITECTURE_FIELDS = ("scale", "policy_overrides", "critic", "n_max", "m_max")


@dataclass
class PretrainConfig:
    # Model.
    scale: str = "S"
    policy_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"enc_layers": 2} for Tune
    critic: str = "two_head"  # "two_head" | "single_head" (ablation)
    ratio: str = "per_ue"  # PPO ratio per UE decision, or "joint" for the whole decision (ablation)
    share_credit: str = "total"  # share log-probs baselined by A_off + A_alloc ("total") or A_alloc ("alloc")
    # Ray / sampling.
    iterations: int = 20
    num_env_runners: int = 2
    num_envs_per_env_runner: int = 32  # the decoder costs ~the same per step for 4 or 64 rows: batch wide
    instances_per_episode: int = 64
    # PPO / ACRL.
    train_batch_size: int = 512  # instances per iteration
    minibatch_size: int = 128
    num_epochs: int = 4
    lr: float = 1e-4  # 3e-4 moved the S model's log-probs by >20 nats in one Adam step
    grad_clip: float | None = 1.0
    clip_param: float = 0.2
    vf_loss_coeff: float = 0.5
    entropy_bonus: bool = True
    entropy_coeff_target: float = 0.01
    entropy_coeff_share: float = 0.001
    penalty: float = 0.1
    # Environment.
    scenario: dict[str, Any] = field(default_factory=dict)  # ScenarioConfig fields; {} = the paper
    drift: str | None = None
    # A scenario distribution (ScenarioDistribution fields) to train one model for every cell size; when
    # set, every training / validation instance draws its own scenario and ``scenario`` is its base.
    scenario_dist: dict[str, Any] | None = None
    prompts: tuple[str, ...] = PROMPTS
    n_max: int | None = None  # padding; default: the scenario's (or the distribution's largest) N and M
    m_max: int | None = None
    seed: int = 0
    # Validation.
    val_size: int = 16
    val_seed: int = 1_000_003  # far from the training seeds
    val_expert: str | None = "exact"  # "exact", "labels" (the label experts, cached) or None: no gap
    val_expert_time_limit: float = 60.0
    eval_every: int = 1
    checkpoint_every: int = 1
    # Supervised warm start on expert labels (0 = pure ACRL): instances, each labelled for every prompt
    # of warm_start_prompts by lambo_ray.rl.labels (exact min_energy MILP with a time limit and
    # iterated local search), cached in <out>/labels.jsonl.
    warm_start_labels: int = 0
    warm_start_epochs: int = 30
    warm_start_lr: float = 1e-3
    warm_start_prompts: tuple[str, ...] = PROMPTS
    warm_start_batch_ues: int = 4096  # UE tokens per minibatch (cells of similar size are batched together)
    label_energy_time_limit: float = 3.0
    label_kicks: int = 20
    # Self-imitation after the warm start (lambo_ray.rl.self_imitation): rounds of fresh instances labelled
    # by the policy's own search, then more epochs on all labels.
    self_imitation_rounds: int = 0
    self_imitation_instances: int = 256
    self_imitation_k: int = 8
    self_imitation_epochs: int = 5
    self_imitation_lr_scale: float = 0.3
    driver_threads: int = 1  # torch threads of the driver, which hosts the learner (notes P3)

    def __post_init__(self) -> None:
        self.prompts = tuple(self.prompts)
        self.warm_start_prompts = tuple(self.warm_start_prompts)
        problems = []
        if self.scale not in SCALES:
            problems.append(f"unknown scale {self.scale!r}; expected one of {', '.join(SCALES)}")
        if self.critic not in ("two_head", "single_head"):
            problems.append(f"critic must be two_head or single_head (got {self.critic!r})")
        if self.share_credit not in ("total", "alloc"):
            problems.append(f"share_credit must be total or alloc (got {self.share_credit!r})")
        if self.ratio not in ("per_ue", "joint"):
            problems.append(f"ratio must be per_ue or joint (got {self.ratio!r})")
        for name in (
            "iterations",
            "num_envs_per_env_runner",
            "instances_per_episode",
            "train_batch_size",
            "minibatch_size",
            "num_epochs",
            "warm_start_batch_ues",
            "self_imitation_instances",
            "self_imitation_k",
            "self_imitation_epochs",
            "val_size",
            "eval_every",
            "checkpoint_every",
            "driver_threads",
        ):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.num_env_runners < 0 or self.warm_start_labels < 0 or self.self_imitation_rounds < 0:
            problems.append("num_env_runners, warm_start_labels and self_imitation_rounds must be >= 0")
        if self.minibatch_size > self.train_batch_size:
            problems.append(f"minibatch_size {self.minibatch_size} > train_batch_size {self.train_batch_size}")
        if not (self.lr > 0 and self.warm_start_lr > 0):
            problems.append("learning rates must be > 0")
        if problems:
            raise LamboInputError("; ".join(problems), where="pretrain config")
        for p in (*self.prompts, *self.warm_start_prompts):
            check_prompt(p)
        if self.val_expert not in (None, "exact", "labels"):
            raise LamboInputError(
                f"val_expert must be exact, labels or null (got {self.val_expert!r})", where="pretrain config"
            )
        sc = self.scenario_config()  # validates the scenario
        n_big, m_big = self.training_distribution().max_size
        self.n_max = n_big if self.n_max is None else int(self.n_max)
        self.m_max = m_big if self.m_max is None else int(self.m_max)
        if sc.n_ues > self.n_max or sc.n_servers > self.m_max or n_big > self.n_max or m_big > self.m_max:
            raise LamboInputError(
                f"padding n_max={self.n_max}, m_max={self.m_max} is smaller than the cells the scenario draws "
                f"(up to N={n_big}, M={m_big})",
                where="pretrain config",
            )
        self.env_config()  # validates the environment

    def scenario_config(self) -> ScenarioConfig:
        from lambo_ray.mec.drift import apply_drift

        return apply_drift(ScenarioConfig.from_dict(dict(self.scenario)), self.drift)

    def training_distribution(self) -> ScenarioDistribution:
        """Where training instances come from: ``scenario_dist`` on top of the scenario, or the scenario
        itself as a one-point distribution."""
        base = self.scenario_config().to_dict()
        if self.scenario_dist is None:
            return ScenarioDistribution(paper_prob=1.0, base=base)
        dist = dict(self.scenario_dist)
        return ScenarioDistribution.from_dict({**dist, "base": {**base, **dist.get("base", {})}})

    def policy_config(self) -> PolicyConfig:
        return scale_config(self.scale, **self.policy_overrides)

    def env_config(self) -> MecEnvConfig:
        return MecEnvConfig(
            scenario=dict(self.scenario),
            drift=self.drift,
            scenario_dist=None if self.scenario_dist is None else self.training_distribution().to_dict(),
            prompts=self.prompts,
            n_max=int(self.n_max),
            m_max=int(self.m_max),
            instances_per_episode=self.instances_per_episode,
            penalty=self.penalty,
            seed=self.seed,
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["prompts"], d["warm_start_prompts"] = list(self.prompts), list(self.warm_start_prompts)
        d["scenario"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.scenario.items()}
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PretrainConfig:
        reject_unknown_keys(cls, data, "pretrain config")
        return cls(**data)
