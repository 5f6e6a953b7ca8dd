"""Every hyperparameter of a pretraining run in one typed dataclass (logged in the checkpoint and in
TensorBoard), and the padding / environment config derived from it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lambo_ray.errors import LamboInputError, reject_unknown_keys
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
    prompts: tuple[str, ...] = PROMPTS
    n_max: int | None = None  # padding; default: the scenario's N and M
    m_max: int | None = None
    seed: int = 0
    # Validation.
    val_size: int = 16
    val_seed: int = 1_000_003  # far from the training seeds
    val_expert: str | None = "exact"  # None: objectives only, no gap
    val_expert_time_limit: float = 60.0
    eval_every: int = 1
    checkpoint_every: int = 1
    # Supervised warm start on exact min_energy labels (0 = pure ACRL).
    warm_start_labels: int = 0
    warm_start_epochs: int = 30
    warm_start_lr: float = 1e-3
    warm_start_prompts: tuple[str, ...] = ("min_energy",)
    # Who labels each prompt: exact min_energy labels cost ~0.05 s, exact min_latency labels seconds,
    # local search's min_latency labels ~0.04 s at a 0.04% gap (benchmarks/results/experts.json).
    warm_start_experts: dict[str, str] = field(
        default_factory=lambda: {"min_energy": "exact", "min_latency": "local_search"}
    )
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
            "val_size",
            "eval_every",
            "checkpoint_every",
            "driver_threads",
        ):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.num_env_runners < 0 or self.warm_start_labels < 0:
            problems.append("num_env_runners and warm_start_labels must be >= 0")
        if self.minibatch_size > self.train_batch_size:
            problems.append(f"minibatch_size {self.minibatch_size} > train_batch_size {self.train_batch_size}")
        if not (self.lr > 0 and self.warm_start_lr > 0):
            problems.append("learning rates must be > 0")
        if problems:
            raise LamboInputError("; ".join(problems), where="pretrain config")
        for p in (*self.prompts, *self.warm_start_prompts):
            check_prompt(p)
        missing = [p for p in self.warm_start_prompts if p not in self.warm_start_experts]
        if missing:
            raise LamboInputError(
                f"warm_start_experts names no expert for {', '.join(missing)}", where="pretrain config"
            )
        sc = self.scenario_config()  # validates the scenario
        self.n_max = sc.n_ues if self.n_max is None else int(self.n_max)
        self.m_max = sc.n_servers if self.m_max is None else int(self.m_max)
        self.env_config()  # validates the padding against the scenario

    def scenario_config(self) -> ScenarioConfig:
        from lambo_ray.mec.drift import apply_drift

        return apply_drift(ScenarioConfig.from_dict(dict(self.scenario)), self.drift)

    def policy_config(self) -> PolicyConfig:
        return scale_config(self.scale, **self.policy_overrides)

    def env_config(self) -> MecEnvConfig:
        return MecEnvConfig(
            scenario=dict(self.scenario),
            drift=self.drift,
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
