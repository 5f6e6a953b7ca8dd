"""The MEC environment for ACRL: one env step decides one whole instance (formulation (a)).

Why one step per instance: the policy decodes all N UEs autoregressively inside one forward pass
(encoder once, decoder batched over instances), so the env only has to score a complete decision.
Why K instances per episode with gamma = 0: instances are independent, so the return of a step is
its own reward; chaining K of them in one episode avoids gymnasium's autoreset step and RLlib's
bootstrap row after every single instance (measured: 2x the instances per second of one-instance
episodes, since half of those env steps and train rows were autoreset and bootstrap padding).

With ``group_size`` G > 1 (the group baseline) each instance is decided G times in a row and every step
reports the instance's ``group_id``, so the learner can compare the G rollouts of one instance.

Reward (scale-free, so both prompts and every cell size are comparable):

    r = clip((obj_ref - obj) / obj_ref, -1, 1) - penalty * sum_v (1 + size_v)

with obj_ref the all-local objective, obj the decision's objective, and v the evaluator's constraint
violations (size_v: relative deadline excess or capacity excess, capped at 1). It splits exactly as
r = r_off + r_alloc for the two-headed critic:

* r_off: the reward the chosen *targets* earn with the best shares for them (water-filling,
  :func:`lambo_ray.mec.shares.optimal_shares`), i.e. the value of the offloading decision alone;
* r_alloc = r - r_off: what the share head lost against those best shares (<= 0 whenever the
  targets admit feasible shares; for ``min_energy``, whose objective ignores shares, only the
  deadline/capacity penalty).

All objectives come from :func:`lambo_ray.mec.evaluator.evaluate`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np

from lambo_ray.errors import LamboInputError
from lambo_ray.mec.distribution import ScenarioDistribution
from lambo_ray.mec.drift import apply_drift
from lambo_ray.mec.evaluator import Evaluation, evaluate
from lambo_ray.mec.generator import generate
from lambo_ray.mec.instance import PROMPTS, Instance, check_prompt
from lambo_ray.mec.scenario import ScenarioConfig
from lambo_ray.mec.shares import optimal_shares

INFO_R_OFF = "r_off"
INFO_R_ALLOC = "r_alloc"
INFO_GROUP = "group_id"  # the instance a step decides: equal for the group_size rollouts of one instance


@dataclass(frozen=True)
class MecEnvConfig:
    """Everything an env replica needs; travels to the env runners as a plain dict (``env_config``)."""

    scenario: dict[str, Any] = field(default_factory=dict)  # ScenarioConfig fields (defaults: the paper)
    drift: str | None = None
    scenario_dist: dict[str, Any] | None = None  # ScenarioDistribution fields: each instance draws a scenario
    prompts: tuple[str, ...] = PROMPTS  # one drawn uniformly per instance
    n_max: int = 50  # padded observation / action sizes
    m_max: int = 4
    instances_per_episode: int = 64
    penalty: float = 0.1  # per violation: penalty * (1 + relative size)
    seed: int = 0  # combined with RLlib's reset seed and the worker index
    group_size: int = 1  # consecutive steps that decide the same instance (the group baseline's K rollouts)

    def __post_init__(self) -> None:
        for p in self.prompts:
            check_prompt(p)
        if not self.prompts:
            raise LamboInputError("at least one prompt is needed", where="env.prompts")
        if self.instances_per_episode < 1:
            raise LamboInputError("instances_per_episode must be >= 1", where="env.instances_per_episode")
        if self.penalty < 0:
            raise LamboInputError("penalty must be >= 0", where="env.penalty")
        if self.group_size < 1 or self.instances_per_episode % self.group_size:
            raise LamboInputError(
                f"group_size {self.group_size} must be >= 1 and divide instances_per_episode "
                f"{self.instances_per_episode}",
                where="env.group_size",
            )
        n_big, m_big = self.distribution().max_size
        if n_big > self.n_max or m_big > self.m_max:
            raise LamboInputError(
                f"scenario has up to N={n_big}, M={m_big} but the policy is padded to "
                f"n_max={self.n_max}, m_max={self.m_max}",
                where="env",
            )

    def scenario_config(self) -> ScenarioConfig:
        return apply_drift(ScenarioConfig.from_dict(dict(self.scenario)), self.drift)

    def distribution(self) -> ScenarioDistribution:
        """The scenario distribution instances are drawn from (a one-point one without ``scenario_dist``)."""
        if self.scenario_dist is None:
            return ScenarioDistribution(paper_prob=1.0, base=self.scenario_config().to_dict())
        return ScenarioDistribution.from_dict(dict(self.scenario_dist))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["prompts"] = list(self.prompts)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MecEnvConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in dict(data).items() if k in known}  # RLlib adds e.g. num_envs
        if "prompts" in kwargs:
            kwargs["prompts"] = tuple(kwargs["prompts"])
        return cls(**kwargs)


@dataclass(frozen=True)
class RewardParts:
    reward: float
    r_off: float
    r_alloc: float
    objective: float
    reference: float
    feasible: bool
    n_violations: int


def violation_measure(ev: Evaluation) -> float:
    """sum_v (1 + size_v): every violation costs at least 1, plus its relative size (capped at 1)."""
    total = 0.0
    for v in ev.violations:
        if v["constraint"] == "deadline":
            size = v["excess_s"] / v["deadline_s"]
        elif v["constraint"] == "capacity":
            size = v["excess"]
        else:  # share_positive, share_at_most_one, share_local_zero: malformed, full size
            size = 1.0
        total += 1.0 + min(float(size), 1.0)
    return total


def score(
    inst: Instance, prompt: str, target: np.ndarray, share: np.ndarray, reference: float, penalty: float
) -> tuple[float, Evaluation]:
    """Scale-free reward of one decision (module docstring) and its evaluation."""
    ev = evaluate(inst, target, share)
    obj = ev.objective(prompt)
    gain = (reference - obj) / reference if np.isfinite(obj) else -1.0
    return float(np.clip(gain, -1.0, 1.0)) - penalty * violation_measure(ev), ev


def best_shares(inst: Instance, target: np.ndarray) -> np.ndarray:
    """Best shares for fixed targets: water-filling with the deadline minimums on every server where
    they fit; where they cannot, the split proportional to sqrt(c_i), so r_off stays a function of the
    targets alone (:func:`lambo_ray.mec.shares.optimal_shares` with ``overflow="sqrt_split"``)."""
    return optimal_shares(inst, target, overflow="sqrt_split")


def all_local_objective(inst: Instance, prompt: str) -> float:
    zeros = np.zeros(inst.n_ues)
    return evaluate(inst, zeros.astype(np.int64), zeros).objective(prompt)


def reward_parts(
    inst: Instance, prompt: str, target: np.ndarray, share: np.ndarray, penalty: float, reference: float | None = None
) -> RewardParts:
    """r, and its split r = r_off + r_alloc (module docstring); ``reference``: the all-local objective
    when already known (the env computes it once per instance)."""
    target = np.asarray(target, dtype=np.int64)
    share = np.asarray(share, dtype=np.float64)
    ref = all_local_objective(inst, prompt) if reference is None else float(reference)
    r, ev = score(inst, prompt, target, share, ref, penalty)
    r_off, _ = score(inst, prompt, target, best_shares(inst, target), ref, penalty)
    return RewardParts(
        reward=r,
        r_off=r_off,
        r_alloc=r - r_off,
        objective=ev.objective(prompt),
        reference=ref,
        feasible=ev.feasible,
        n_violations=len(ev.violations),
    )


class MecEnv(gym.Env):
    """K independent instances per episode; observation = the policy's features of the current one.

    Observations are the policy's own padded features (``featurize(...).to_numpy_dict()`` of a batch of
    one), so the RLModule consumes exactly what the plain-torch policy consumes at serving time.
    Actions: ``{"target": MultiDiscrete([m_max + 1] * n_max), "share": Box(0, 1, (n_max,))}``; entries
    past the instance's N are padding and ignored, and so is the share of a UE that runs locally. RLlib
    hands actions over as float32 (``convert_to_numpy`` reduces float64); the policy's float32
    observation of a_min is rounded up, so the shares still meet the deadlines within the evaluator's
    tolerance, and the learner gets the exact Beta samples ``u`` from the module's extra outputs.
    """

    metadata: dict[str, Any] = {}

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.cfg = MecEnvConfig.from_dict(config or {})
        self.distribution = self.cfg.distribution()
        self.prompts = list(self.cfg.prompts)
        # RLlib seeds every sub-env with (config.seed + worker_index + i), which collides across
        # workers; mixing the worker index in again makes each (worker, sub-env) stream distinct.
        self._worker = int(getattr(config, "worker_index", 0) or 0)
        self._rng = np.random.default_rng(np.random.SeedSequence([self.cfg.seed, self._worker]))
        self.observation_space = observation_space(self.cfg.n_max, self.cfg.m_max)
        self.action_space = gym.spaces.Dict(
            {
                "target": gym.spaces.MultiDiscrete([self.cfg.m_max + 1] * self.cfg.n_max),
                "share": gym.spaces.Box(0.0, 1.0, (self.cfg.n_max,), np.float32),
            }
        )
        self.instance: Instance | None = None
        self.prompt: str = self.prompts[0]
        self._k = 0
        self._obs: dict[str, np.ndarray] | None = None
        # Group ids only need to differ between instances of one batch (any sub-env, any worker): drawn from
        # OS entropy, apart from the seeded stream, so they change no instance and no decision.
        self._ids = np.random.default_rng()
        self._group_id = 0
        self._reference = float("nan")

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._rng = np.random.default_rng(np.random.SeedSequence([self.cfg.seed, self._worker, seed]))
        self._k = 0
        self._obs = None
        return self._next_observation(), {}

    def _next_observation(self) -> dict[str, np.ndarray]:
        """A fresh instance every ``group_size`` steps; in between the same one again (its K rollouts)."""
        if self._obs is not None and self._k % self.cfg.group_size != 0:
            return self._obs
        self.instance = generate(self.distribution.sample(self._rng), self._rng)
        self.prompt = self.prompts[int(self._rng.integers(len(self.prompts)))]
        self._group_id = int(self._ids.integers(1, 2**62))
        self._reference = all_local_objective(self.instance, self.prompt)
        self._obs = observe(self.instance, self.prompt, self.cfg.n_max, self.cfg.m_max)
        self._order = self._obs["order"]
        return self._obs

    def step(self, action: dict[str, np.ndarray]):
        if self.instance is None:
            raise RuntimeError("step() before reset()")
        n = self.instance.n_ues
        # Actions come per decode position (the observation's order); the evaluator wants UE order.
        order = self._order[:n]
        target = np.zeros(n, dtype=np.int64)
        target[order] = np.asarray(action["target"], dtype=np.int64)[:n]
        share = np.zeros(n)
        share[order] = np.asarray(action["share"], dtype=np.float64)[:n]
        share = np.where(target > 0, share, 0.0)
        parts = reward_parts(self.instance, self.prompt, target, share, self.cfg.penalty, self._reference)
        info = {
            INFO_GROUP: self._group_id,
            INFO_R_OFF: parts.r_off,
            INFO_R_ALLOC: parts.r_alloc,
            "objective": parts.objective,
            "reference": parts.reference,
            "feasible": parts.feasible,
            "prompt": self.prompt,
        }
        self._k += 1
        truncated = self._k >= self.cfg.instances_per_episode
        return self._next_observation(), parts.reward, False, truncated, info


def observe(inst: Instance, prompt: str, n_max: int, m_max: int) -> dict[str, np.ndarray]:
    """The policy's features of ``inst``, with the must-offload plan users' decisions are decoded with
    (:func:`~lambo_ray.policy.decoding.decode_packing`: local search's for ``min_energy``), so RL trains
    the decoder on the capacity reservations it meets in ``lambo solve`` and Serve."""
    from lambo_ray.policy import featurize
    from lambo_ray.policy.decoding import decode_packing

    plan = decode_packing(inst, prompt)[0]
    batch = featurize([inst], [prompt], n_max, m_max, packings=[plan]).to_numpy_dict()
    return {k: np.array(v[0]) for k, v in batch.items()}  # np.array keeps 0-d fields (prompt) arrays


def observation_space(n_max: int, m_max: int) -> gym.spaces.Dict:
    """Box spaces matching the policy's padded features (shapes/dtypes taken from a real featurize call,
    so this never drifts from the policy's feature layout)."""
    probe = generate(ScenarioConfig(n_ues=1, n_servers=1, capacities_cps=(1e10,)), np.random.default_rng(0))
    spaces = {}
    for key, v in observe(probe, PROMPTS[0], n_max, m_max).items():
        if v.dtype == np.bool_:
            spaces[key] = gym.spaces.Box(False, True, v.shape, np.bool_)
        elif np.issubdtype(v.dtype, np.integer):
            info = np.iinfo(v.dtype)
            spaces[key] = gym.spaces.Box(info.min, info.max, v.shape, v.dtype)
        else:
            spaces[key] = gym.spaces.Box(-np.inf, np.inf, v.shape, v.dtype)
    return gym.spaces.Dict(spaces)
