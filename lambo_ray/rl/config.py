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

BASELINES = ("critic", "group")
PRECISIONS = ("fp32", "bf16", "fp16")
# Fields that fix the shapes of the networks: a checkpoint can only be resumed with the same values.
ARCHITECTURE_FIELDS = ("scale", "policy_overrides", "critic", "n_max", "m_max")


@dataclass
class PretrainConfig:
    # Model.
    scale: str = field(default="S", metadata={"help": "model scale", "choices": tuple(SCALES)})
    policy_overrides: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "PolicyConfig values over the scale's, e.g. enc_layers=2 (Tune)"}
    )
    critic: str = field(
        default="two_head",
        metadata={
            "help": "two_head: one value per reward part (offloading, allocation); single_head: ablation",
            "choices": ("two_head", "single_head"),
        },
    )
    ratio: str = field(
        default="per_ue",
        metadata={
            "help": "PPO ratio per UE decision, or of the whole decision (joint, ablation)",
            "choices": ("per_ue", "joint"),
        },
    )
    share_credit: str = field(
        default="total",
        metadata={
            "help": "advantage of the share log-probs: A_off + A_alloc (total) or A_alloc only (alloc, ablation)",
            "choices": ("total", "alloc"),
        },
    )
    baseline: str = field(
        default="group",  # measured better: benchmarks/results/acrl_baselines*.json
        metadata={
            "help": "advantage baseline: group (the mean reward of group_size rollouts of the same instance, "
            "POMO/GRPO style) or critic (the two-headed critic's values, ablation)",
            "choices": ("critic", "group"),
        },
    )
    group_size: int = field(
        default=8, metadata={"help": "rollouts of each instance with baseline=group (consecutive env steps)"}
    )
    # Ray / sampling.
    iterations: int = field(
        default=20, metadata={"help": "training iterations in total (a resume counts on); 0 = the warm start alone"}
    )
    num_env_runners: int = field(default=2, metadata={"help": "RLlib env-runner actors (0: sample in the driver)"})
    num_envs_per_env_runner: int = field(  # the decoder costs ~the same per step for 4 or 64 rows: batch wide
        default=32, metadata={"help": "environments per env runner, decoded as one batch"}
    )
    instances_per_episode: int = field(default=64, metadata={"help": "instances per episode (one step each)"})
    # PPO / ACRL.
    train_batch_size: int = field(default=512, metadata={"help": "instances per training iteration"})
    minibatch_size: int = field(default=128, metadata={"help": "instances per gradient step"})
    num_epochs: int = field(default=4, metadata={"help": "passes over each training batch"})
    lr: float = field(  # 3e-4 moved the S model's log-probs by >20 nats in one Adam step
        default=1e-4, metadata={"help": "Adam learning rate of the actor-critic updates"}
    )
    grad_clip: float | None = field(default=1.0, metadata={"help": "gradient norm clip (none: no clipping)"})
    clip_param: float = field(default=0.2, metadata={"help": "PPO clip range of the probability ratio"})
    vf_loss_coeff: float = field(default=0.5, metadata={"help": "weight of the critic's loss"})
    entropy_bonus: bool = field(
        default=True, metadata={"help": "entropy bonus on both heads (--no-entropy-bonus: ablation)"}
    )
    entropy_coeff_target: float = field(default=0.01, metadata={"help": "entropy bonus weight of the target head"})
    entropy_coeff_share: float = field(default=0.001, metadata={"help": "entropy bonus weight of the share head"})
    penalty: float = field(default=0.1, metadata={"help": "reward penalty per constraint violation"})
    # Environment.
    scenario: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "ScenarioConfig values of the training cells ({}: the paper's)"}
    )
    drift: str | None = field(default=None, metadata={"help": "named drift applied to the scenario"})
    # A scenario distribution (ScenarioDistribution fields) to train one model for every cell size; when
    # set, every training / validation instance draws its own scenario and ``scenario`` is its base.
    scenario_dist: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "ScenarioDistribution values: every instance draws its own cell (none: the scenario)"},
    )
    prompts: tuple[str, ...] = field(
        default=PROMPTS, metadata={"help": "prompts mixed in the episodes", "choices": PROMPTS}
    )
    n_max: int | None = field(
        default=None, metadata={"help": "padded UEs (default: the scenario's N, or the distribution's largest)"}
    )
    m_max: int | None = field(
        default=None, metadata={"help": "padded servers (default: the scenario's M, or the distribution's largest)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the training instances and the networks"})
    # Validation.
    val_size: int = field(default=16, metadata={"help": "validation instances, decoded greedily"})
    val_seed: int = field(default=1_000_003, metadata={"help": "seed of the validation instances"})
    val_expert: str | None = field(
        default="exact",
        metadata={
            "help": "reference of the validation gap: exact, labels (the label experts, cached) or none (no gap)",
            "choices": ("exact", "labels"),
        },
    )
    val_expert_time_limit: float = field(default=60.0, metadata={"help": "seconds per validation label"})
    eval_every: int = field(default=1, metadata={"help": "iterations between validations"})
    checkpoint_every: int = field(default=1, metadata={"help": "iterations between checkpoints"})
    # Supervised warm start on expert labels (0 = pure ACRL): instances, each labelled for every prompt
    # of warm_start_prompts by lambo_ray.rl.labels (exact min_energy MILP with a time limit and
    # iterated local search), cached in <out>/labels.jsonl.
    warm_start_labels: int = field(
        default=0, metadata={"help": "supervised warm start on this many labelled instances first (0: pure ACRL)"}
    )
    warm_start_epochs: int = field(default=30, metadata={"help": "passes over the warm-start labels"})
    warm_start_lr: float = field(default=1e-3, metadata={"help": "learning rate of the warm start"})
    warm_start_prompts: tuple[str, ...] = field(
        default=PROMPTS, metadata={"help": "prompts each warm-start instance is labelled for", "choices": PROMPTS}
    )
    warm_start_batch_ues: int = field(
        default=4096, metadata={"help": "UE tokens per warm-start minibatch (cells of similar size batched together)"}
    )
    label_energy_time_limit: float = field(
        default=3.0, metadata={"help": "seconds per exact min_energy label of the warm start"}
    )
    label_kicks: int = field(default=20, metadata={"help": "perturbation rounds of the iterated local search labels"})
    # Self-imitation after the warm start (lambo_ray.rl.self_imitation): rounds of fresh instances labelled
    # by the policy's own search, then more epochs on all labels.
    self_imitation_rounds: int = field(
        default=0, metadata={"help": "self-imitation rounds after the warm start (0: none)"}
    )
    self_imitation_instances: int = field(
        default=256, metadata={"help": "fresh instances per self-imitation round, labelled by the policy's search"}
    )
    self_imitation_k: int = field(default=8, metadata={"help": "policy samples per instance of that search"})
    self_imitation_epochs: int = field(default=5, metadata={"help": "epochs on all labels after each round"})
    self_imitation_lr_scale: float = field(
        default=0.3, metadata={"help": "learning rate of self-imitation, as a fraction of warm_start_lr"}
    )
    driver_threads: int = field(  # the driver hosts the learner
        default=1, metadata={"help": "torch threads of the driver"}
    )
    # Learners and throughput.
    num_learners: int = field(
        default=0,
        metadata={"help": "learner actors (data-parallel, gradients averaged); 0 = one learner inside the driver"},
    )
    num_gpus_per_learner: float = field(
        default=0.0, metadata={"help": "GPUs per learner (env runners never take one); > 0 trains on cuda"}
    )
    num_cpus_per_learner: float = field(default=1.0, metadata={"help": "CPUs reserved per learner actor"})
    precision: str = field(
        default="fp32",
        metadata={
            "help": "learner precision: fp32, bf16 (autocast; CPU or GPU) or fp16 (autocast + loss scaling; GPU)"
        },
    )
    overlap: bool = field(
        default=True,
        metadata={
            "help": "sample the next batch on the env runners while the learners update on this one "
            "(the batch is then one update behind; needs num_env_runners >= 1)"
        },
    )
    trim_padding: bool = field(
        default=True, metadata={"help": "run the network only up to the largest real N and M of each chunk of rows"}
    )
    chunk_rows: int = field(
        default=16,
        metadata={"help": "rows per size-sorted chunk (sampling and training), each cut to its own largest cell"},
    )

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
        problems += self._resource_problems()
        if self.iterations < 0:
            problems.append(f"iterations must be >= 0 (got {self.iterations})")
        for name in (
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

    def _resource_problems(self) -> list[str]:
        """Learner, precision and group-baseline settings that RLlib would reject late or silently."""
        problems = []
        if self.baseline not in BASELINES:
            problems.append(f"baseline must be one of {', '.join(BASELINES)} (got {self.baseline!r})")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)} (got {self.precision!r})")
        elif self.precision == "fp16" and self.num_gpus_per_learner <= 0:
            problems.append("precision fp16 needs GPU learners (--num-gpus-per-learner > 0); use bf16 on CPU")
        if self.num_learners < 0 or self.num_gpus_per_learner < 0 or self.num_cpus_per_learner < 0:
            problems.append("num_learners, num_gpus_per_learner and num_cpus_per_learner must be >= 0")
        if self.chunk_rows < 0:
            problems.append(f"chunk_rows must be >= 0 (got {self.chunk_rows})")
        k = max(1, int(self.num_learners))
        if self.train_batch_size % k or self.minibatch_size % k:
            problems.append(
                f"train_batch_size {self.train_batch_size} and minibatch_size {self.minibatch_size} must be "
                f"divisible by num_learners {k} (each learner takes an equal share)"
            )
        if self.baseline == "group":
            g = int(self.group_size)
            per_env = self.train_batch_size / (max(1, self.num_env_runners) * self.num_envs_per_env_runner)
            if g < 2:
                problems.append(f"group_size must be >= 2 with baseline=group (got {g})")
            elif self.instances_per_episode % g or per_env % g:
                problems.append(
                    f"with baseline=group, instances_per_episode ({self.instances_per_episode}) and the steps "
                    f"each env takes per iteration (train_batch_size / (env runners x envs) = {per_env:g}) must "
                    f"be multiples of group_size {g}, so that no group is cut in two"
                )
        return problems

    def learner_batch_sizes(self) -> tuple[int, int]:
        """(train batch, minibatch) per learner: RLlib sizes both per learner, we size them per iteration."""
        k = max(1, int(self.num_learners))
        return self.train_batch_size // k, self.minibatch_size // k

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
            group_size=int(self.group_size) if self.baseline == "group" else 1,
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
