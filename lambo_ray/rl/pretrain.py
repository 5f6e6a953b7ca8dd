"""ACRL pretraining of the LAMBO policy on RLlib: config, training loop, validation, checkpoints, resume.

One :class:`PretrainConfig` holds every hyperparameter of a run (it is logged in the checkpoint and in
TensorBoard), and :class:`Pretrainer` reads like the algorithm:

    (optional) supervised warm start on expert labels          -> :meth:`Pretrainer.warm_start`
    repeat:  env runners sample K-instance episodes (both prompts mixed)
             learner: one-step advantages per critic head, PPO-clipped ACRL loss   -> algo.train()
             validation: greedy decisions on a fixed seeded set, mean objective and gap to the exact
             expert per prompt                                                     -> :meth:`validate`
             atomic checkpoint                                                     -> :meth:`save`

Run directory (``out``), which is also the checkpoint::

    out/policy/        the policy in its own format (:func:`lambo_ray.policy.checkpoint.save_policy`): what
                       `lambo solve --method lambo --checkpoint out`, `lambo finetune` and Serve load; no
                       RLlib needed
    out/rllib/         the RLlib Algorithm (learner, optimizer, env-runner connector state) plus
                       ``lambo_state.json``: the run state it belongs to (the source of truth on resume)
    out/state.json     a copy of that run state (iteration, config, metrics history) for people and tools
    out/tb/            TensorBoard scalars
    out/val_labels.json  exact-expert objectives of the validation set (computed once, cached)

Saving is crash-safe: ``rllib/`` is written complete into a temporary sibling and swapped in, the
previous one kept as ``.rllib.old`` until the swap is done (:func:`resolve_checkpoint` falls back to it);
``policy/`` is swapped the same way by ``save_policy``, and ``state.json`` is replaced last. A crash can
only leave ``policy/`` one iteration behind ``rllib/``, and the next save rewrites it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lambo_ray.configs import reject_unknown_keys
from lambo_ray.mec.errors import LamboInputError
from lambo_ray.mec.evaluator import relative_gap
from lambo_ray.mec.generator import generate_many
from lambo_ray.mec.instance import PROMPTS, Instance, check_prompt
from lambo_ray.mec.scenario import ScenarioConfig
from lambo_ray.policy import SCALES, LamboPolicy, PolicyConfig, featurize, scale_config
from lambo_ray.policy.model import claims_from_shares
from lambo_ray.rl.env import MecEnvConfig
from lambo_ray.rl.learner import critic_heads

STATE_FORMAT = "lambo.pretrain/1"
STATE_FILE, RLLIB_STATE_FILE, POLICY_DIR, RLLIB_DIR = "state.json", "lambo_state.json", "policy", "rllib"
TB_DIR, LABELS_FILE = "tb", "val_labels.json"
MODULE_ID = "default_policy"
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
        default_factory=lambda: {"min_energy": "exact", "min_latency": "local_search"})
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
        for name in ("iterations", "num_envs_per_env_runner", "instances_per_episode", "train_batch_size",
                     "minibatch_size", "num_epochs", "val_size", "eval_every", "checkpoint_every", "driver_threads"):
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
            raise LamboInputError(f"warm_start_experts names no expert for {', '.join(missing)}",
                                  where="pretrain config")
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
        return MecEnvConfig(scenario=dict(self.scenario), drift=self.drift, prompts=self.prompts,
                            n_max=int(self.n_max), m_max=int(self.m_max),
                            instances_per_episode=self.instances_per_episode, penalty=self.penalty, seed=self.seed)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["prompts"], d["warm_start_prompts"] = list(self.prompts), list(self.warm_start_prompts)
        d["scenario"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.scenario.items()}
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PretrainConfig":
        reject_unknown_keys(cls, data, "pretrain config")
        return cls(**data)


def build_algo_config(cfg: PretrainConfig) -> Any:
    """The PPOConfig of a run: our env, RLModule, learner and connector piece (see notes/RLLIB.md)."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from lambo_ray.rl.env import MecEnv
    from lambo_ray.rl.learner import AcrlLearner, AddRewardParts
    from lambo_ray.rl.module import LamboRLModule, module_model_config

    return (
        PPOConfig()
        .environment(MecEnv, env_config=cfg.env_config().to_dict(),
                     normalize_actions=False, clip_actions=False)  # the module already emits valid actions (P1)
        .env_runners(num_env_runners=cfg.num_env_runners, num_envs_per_env_runner=cfg.num_envs_per_env_runner)
        .learners(num_learners=0,  # local learner in the driver (P4: a learner actor hangs on 2 CPUs)
                  learner_class=AcrlLearner,
                  learner_connector=lambda obs_space, act_space: AddRewardParts(),
                  learner_config_dict={"critic": cfg.critic, "ratio": cfg.ratio,
                                       "share_credit": cfg.share_credit, "entropy_bonus": cfg.entropy_bonus,
                                       "entropy_coeff_target": cfg.entropy_coeff_target,
                                       "entropy_coeff_share": cfg.entropy_coeff_share})
        .rl_module(rl_module_spec=RLModuleSpec(
            module_class=LamboRLModule,
            model_config=module_model_config(cfg.policy_config(), critic_heads(cfg.critic))))
        .training(lr=cfg.lr, gamma=0.0, lambda_=1.0, train_batch_size_per_learner=cfg.train_batch_size,
                  minibatch_size=cfg.minibatch_size, num_epochs=cfg.num_epochs, entropy_coeff=0.0,
                  use_kl_loss=False, clip_param=cfg.clip_param, vf_clip_param=10.0,
                  vf_loss_coeff=cfg.vf_loss_coeff, grad_clip=cfg.grad_clip)
        .debugging(seed=cfg.seed)
    )


# ----------------------------------------------------------------------------------------------
# Checkpoint files
# ----------------------------------------------------------------------------------------------
def read_state(run: Path) -> tuple[Path, dict[str, Any]]:
    """The RLlib checkpoint of a run directory and the run state stored in it; LamboInputError when it is
    missing, incomplete or not ours."""
    run = Path(run)
    rllib = resolve_checkpoint(run)
    if rllib is None:
        raise LamboInputError(f"no checkpoint: {RLLIB_DIR}/ is missing", where=str(run))
    state_file = rllib / RLLIB_STATE_FILE
    if not state_file.exists():
        raise LamboInputError(f"incomplete checkpoint: {RLLIB_DIR}/{RLLIB_STATE_FILE} is missing", where=str(run))
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as err:
        raise LamboInputError(f"unreadable {state_file.name}: {err}", where=str(rllib)) from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise LamboInputError(f"{state_file.name} is not a {STATE_FORMAT} document", where=str(rllib))
    for key in ("iteration", "config", "history"):
        if key not in state:
            raise LamboInputError(f"{state_file.name} lacks {key!r}", where=str(rllib))
    return rllib, state


def check_compatible(saved: dict[str, Any], cfg: PretrainConfig, where: Path) -> None:
    """A checkpoint resumes only into the same architecture (scale, critic heads, padding)."""
    now = cfg.to_dict()
    diffs = [f"{k}: checkpoint has {saved.get(k)!r}, requested {now[k]!r}" for k in ARCHITECTURE_FIELDS
             if saved.get(k) != now[k]]
    if diffs:
        raise LamboInputError("checkpoint does not match the requested run (" + "; ".join(diffs) + ")",
                              where=str(where))


def resolve_checkpoint(run: Path) -> Path | None:
    """``run/rllib``, or the previous one if a save crashed between its two renames; None if neither."""
    run = Path(run)
    for cand in (run / RLLIB_DIR, run / f".{RLLIB_DIR}.old"):
        if cand.exists():
            return cand
    return None


def _atomic_replace(tmp: Path, path: Path) -> None:
    old = path.parent / f".{path.name}.old"
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _write_json_atomic(path: Path, doc: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        x = x.item()
    if torch.is_tensor(x):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def check_run_dir(out: Path, cfg: PretrainConfig, resume: bool) -> tuple[Path | None, dict[str, Any] | None]:
    """Cheap checks before anything starts: an existing checkpoint needs ``resume`` and a matching
    architecture; returns (rllib checkpoint dir, run state) to resume from, or (None, None)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LamboInputError(f"{out} exists and is not a directory", where="out")
    if resolve_checkpoint(out) is None:
        if resume and (out / STATE_FILE).exists():
            raise LamboInputError(f"incomplete checkpoint: {STATE_FILE} present but {RLLIB_DIR}/ missing",
                                  where=str(out))
        return None, None
    if not resume:
        raise LamboInputError(f"{out} already holds a checkpoint; pass --resume to continue it or choose "
                              "another --out", where="out")
    rllib, state = read_state(out)
    check_compatible(state["config"], cfg, rllib)
    return rllib, state


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
@dataclass
class ValidationSet:
    """A fixed seeded set of instances, with (optional, cached) expert objectives per prompt."""

    instances: list[Instance]
    expert_objective: dict[str, list[float]] | None

    @classmethod
    def build(cls, cfg: PretrainConfig, cache: Path | None) -> "ValidationSet":
        insts = generate_many(cfg.scenario_config(), cfg.val_size, cfg.val_seed)
        if cfg.val_expert is None:
            return cls(insts, None)
        key = {"scenario": cfg.scenario_config().to_dict(), "val_size": cfg.val_size, "val_seed": cfg.val_seed,
               "expert": cfg.val_expert, "prompts": list(cfg.prompts)}
        key = json.loads(json.dumps(key))
        if cache is not None and cache.exists():
            try:
                doc = json.loads(cache.read_text())
                if doc.get("key") == key:
                    return cls(insts, doc["objective"])
            except (OSError, ValueError, KeyError):
                pass  # stale or broken cache: recompute below
        from lambo_ray.experts import get_expert

        expert = get_expert(cfg.val_expert)
        objective = {p: [float(expert.solve(inst, p, cfg.val_expert_time_limit).objective) for inst in insts]
                     for p in cfg.prompts}
        if cache is not None:
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps({"key": key, "objective": objective}))
            os.replace(tmp, cache)
        return cls(insts, objective)


def validate(policy: LamboPolicy, vset: ValidationSet, prompts: tuple[str, ...]) -> dict[str, float]:
    """Greedy decisions on the validation set: mean objective, feasibility and mean gap per prompt."""
    from lambo_ray.policy.decoding import decide

    was_training = policy.training
    policy.eval()
    out: dict[str, float] = {}
    with torch.no_grad():
        for p in prompts:
            decisions = decide(policy, vset.instances, p, "greedy")
            obj = np.array([d.objective for d in decisions], dtype=float)
            feas = np.array([bool(d.stats.get("feasible")) for d in decisions])
            out[f"val/{p}/objective"] = float(obj.mean())
            out[f"val/{p}/feasible"] = float(feas.mean())
            if vset.expert_objective is not None:
                gaps = [relative_gap(o, ref) for o, ref, f in zip(obj, vset.expert_objective[p], feas) if f]
                out[f"val/{p}/gap"] = float(np.mean(gaps)) if gaps else float("nan")
    policy.train(was_training)
    return out


# ----------------------------------------------------------------------------------------------
# Supervised warm start
# ----------------------------------------------------------------------------------------------
def expert_labels(cfg: PretrainConfig) -> tuple[list[Instance], list[str], np.ndarray, np.ndarray]:
    """Expert targets on fresh instances (``warm_start_experts`` per prompt), with the water-filled
    optimal shares for them (min_energy ignores shares, so the latency-optimal feasible ones are the
    natural share label)."""
    from lambo_ray.experts import get_expert
    from lambo_ray.mec.shares import optimal_shares

    insts = generate_many(cfg.scenario_config(), cfg.warm_start_labels, cfg.seed + 7_777_777)
    experts = {p: get_expert(cfg.warm_start_experts[p]) for p in cfg.warm_start_prompts}
    prompts, targets, shares = [], [], []
    for k, inst in enumerate(insts):
        p = cfg.warm_start_prompts[k % len(cfg.warm_start_prompts)]
        d = experts[p].solve(inst, p, cfg.val_expert_time_limit)
        s = optimal_shares(inst, d.target)
        t = np.zeros(cfg.n_max, np.int64)
        sh = np.zeros(cfg.n_max)
        t[: inst.n_ues] = d.target
        sh[: inst.n_ues] = s if s is not None else d.share
        prompts.append(p)
        targets.append(t)
        shares.append(sh)
    return insts, prompts, np.stack(targets), np.stack(shares)


def supervised_warm_start(policy: LamboPolicy, cfg: PretrainConfig) -> dict[str, float]:
    """Maximum likelihood of expert decisions under teacher forcing: cross-entropy of the targets plus
    the log-likelihood of the shares (the share head's Beta on the labelled share)."""
    insts, prompts, targets, shares = expert_labels(cfg)
    batch = featurize(insts, prompts, cfg.n_max, cfg.m_max)
    t_all, s_all = torch.from_numpy(targets), torch.from_numpy(shares)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.warm_start_lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    n_real = batch.ue_mask.sum(-1).clamp_min(1)
    policy.train()
    first = last = float("nan")
    for epoch in range(cfg.warm_start_epochs):
        perm = torch.randperm(len(insts), generator=gen)
        losses = []
        for lo in range(0, len(insts), cfg.minibatch_size):
            idx = perm[lo: lo + cfg.minibatch_size]
            pb = batch.index(idx)
            # Imitate the decode-time claims behind the expert's shares, not the shares themselves
            # (see claims_from_shares: raw full-server shares teach early UEs to starve later ones).
            claims = claims_from_shares(t_all[idx], s_all[idx], pb.amin)
            tf = policy.teacher_forced(pb, policy.encode(pb), t_all[idx], claims)
            # Labels outside the policy's feasibility masks (round-off at exactly full servers) would
            # give -1e9 logits: such UEs are left out rather than blowing up the loss.
            ok = tf.logp_target > -50.0
            nll = -(torch.where(ok, tf.logp_target + tf.logp_share, 0.0)).sum(-1) / n_real[idx]
            loss = nll.mean()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
        if epoch == 0:
            first = float(np.mean(losses))
        last = float(np.mean(losses))
    policy.eval()
    return {"warm_start/labels": float(len(insts)), "warm_start/nll_first_epoch": first,
            "warm_start/nll_last_epoch": last}


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------
class Pretrainer:
    """Owns one RLlib Algorithm and the run directory; ``Ray`` must be initialised by the caller."""

    def __init__(self, cfg: PretrainConfig, out: str | os.PathLike[str], resume: bool = False,
                 progress: bool = True) -> None:
        self.cfg = cfg
        self.out = Path(out)
        self.progress = progress
        self.iteration = 0
        self.history: list[dict[str, Any]] = []
        self.warm_started = False
        torch.set_num_threads(cfg.driver_threads)
        existing, saved = check_run_dir(self.out, cfg, resume)
        self.out.mkdir(parents=True, exist_ok=True)
        self.algo = build_algo_config(cfg).build_algo()
        if saved is not None:
            self.restore(existing, saved)
        try:
            self.vset = ValidationSet.build(cfg, self.out / LABELS_FILE)
        except BaseException:
            self.algo.stop()  # do not leak env-runner actors when the expert labels fail
            raise
        self._writer = None
        self._lifetime_steps = self._sampled_lifetime({})

    def restore(self, rllib_dir: Path, state: dict[str, Any]) -> None:
        """Load a checkpoint's RLlib state (weights, optimizer, connector state) and run state."""
        try:
            self.algo.restore_from_path(str(Path(rllib_dir).resolve()))
        except Exception as err:  # RLlib raises assorted types for broken files
            self.algo.stop()
            raise LamboInputError(f"cannot restore the RLlib state: {type(err).__name__}: {err}",
                                  where=str(rllib_dir)) from None
        # Env runners hold inference-only copies: push the restored weights to them now.
        self.algo.env_runner_group.sync_weights(from_worker_or_learner_group=self.algo.learner_group,
                                                inference_only=True, timeout_seconds=60.0)
        self.iteration = int(state["iteration"])
        self.history = list(state["history"])
        self.warm_started = bool(state.get("warm_started", False))

    # -- weights ----------------------------------------------------------------------------------
    def learner_state(self) -> dict[str, torch.Tensor]:
        weights = self.algo.learner_group.get_weights()[MODULE_ID]
        return {k: torch.as_tensor(np.asarray(v)) for k, v in weights.items()}

    def policy(self) -> LamboPolicy:
        """A plain-torch copy of the learner's current policy (the actor), in eval mode."""
        policy = LamboPolicy(self.cfg.policy_config())
        prefix = "policy."
        policy.load_state_dict({k[len(prefix):]: v for k, v in self.learner_state().items() if k.startswith(prefix)})
        return policy.eval()

    def set_policy(self, policy: LamboPolicy) -> None:
        """Put ``policy``'s weights into the learner (critic kept) and push them to every env runner."""
        state = {k: v.numpy() for k, v in self.learner_state().items()}
        state.update({f"policy.{k}": v.detach().cpu().numpy() for k, v in policy.state_dict().items()})
        self.algo.learner_group.set_weights({MODULE_ID: state})
        self.algo.env_runner_group.sync_weights(from_worker_or_learner_group=self.algo.learner_group,
                                                inference_only=True, timeout_seconds=60.0)

    # -- the loop -------------------------------------------------------------------------------
    def warm_start(self) -> dict[str, float]:
        """Supervised warm start once per run (skipped on resume and when warm_start_labels = 0)."""
        if self.cfg.warm_start_labels <= 0 or self.warm_started:
            return {}
        policy = self.policy()
        metrics = supervised_warm_start(policy, self.cfg)
        self.set_policy(policy)
        self.warm_started = True
        metrics.update(validate(self.policy(), self.vset, self.cfg.prompts))
        metrics = {"iteration": self.iteration, "phase": "warm_start", **metrics}
        self.history.append(_jsonable(metrics))
        self._log(metrics, step=self.iteration)
        return metrics

    def _sampled_lifetime(self, res: dict[str, Any]) -> int:
        from ray.rllib.utils.metrics import ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME

        v = res.get(ENV_RUNNER_RESULTS, {}).get(NUM_ENV_STEPS_SAMPLED_LIFETIME)
        if v is None:
            v = self.algo.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME), default=0)
        return int(v)

    def train_iteration(self) -> dict[str, Any]:
        """One RLlib iteration (sample + ACRL update), then validation when due; returns the metrics."""
        t0 = time.perf_counter()
        res = self.algo.train()
        wall = time.perf_counter() - t0
        self.iteration += 1
        lifetime = self._sampled_lifetime(res)
        instances = lifetime - self._lifetime_steps
        self._lifetime_steps = lifetime
        learner = res.get("learners", {}).get(MODULE_ID, {})
        m: dict[str, Any] = {"iteration": self.iteration, "phase": "acrl", "time_s": wall, "instances": instances,
                             "instances_per_s": instances / wall if wall > 0 else float("nan")}
        for key in ("batch_reward_mean", "batch_r_off_mean", "batch_r_alloc_mean", "batch_feasible",
                    "policy_loss", "policy_loss_target", "policy_loss_share", "vf_off_loss", "vf_alloc_loss",
                    "vf_loss", "vf_explained_var", "entropy_target", "entropy_share", "approx_kl", "approx_kl_per_ue",
                    "clip_fraction", "total_loss"):
            if key in learner:
                m[f"train/{key}"] = float(np.asarray(learner[key]))
        for p in self.cfg.prompts:
            key = f"batch_reward_mean/{p}"
            if key in learner:
                m[f"train/{key}"] = float(np.asarray(learner[key]))
        timers = res.get("timers", {})
        for key in ("env_runner_sampling_timer", "learner_update_timer"):
            if key in timers:
                m[f"timers/{key}"] = float(timers[key])
        if self.iteration % self.cfg.eval_every == 0 or self.iteration == self.cfg.iterations:
            t1 = time.perf_counter()
            m.update(validate(self.policy(), self.vset, self.cfg.prompts))
            m["val/time_s"] = time.perf_counter() - t1
        self.history.append(_jsonable(m))
        self._log(m, step=self.iteration)
        return m

    def run(self) -> list[dict[str, Any]]:
        """Warm start (if asked and not done), then iterate up to ``cfg.iterations`` in total (a resumed
        run continues where its checkpoint stopped), checkpointing every ``checkpoint_every``."""
        if self.iteration == 0 and not self.history:
            init = {"iteration": 0, "phase": "init", **validate(self.policy(), self.vset, self.cfg.prompts)}
            self.history.append(_jsonable(init))
            self._log(init, step=0)
        if self.iteration == 0:
            self.warm_start()
        while self.iteration < self.cfg.iterations:
            self.train_iteration()
            if self.iteration % self.cfg.checkpoint_every == 0 or self.iteration == self.cfg.iterations:
                self.save()
        return self.history

    # -- checkpoints ------------------------------------------------------------------------------
    def save(self) -> Path:
        """Checkpoint into the run directory (layout and crash safety: module docstring)."""
        from lambo_ray.policy.checkpoint import save_policy

        self.out.mkdir(parents=True, exist_ok=True)
        state = _jsonable({"format": STATE_FORMAT, "iteration": self.iteration, "config": self.cfg.to_dict(),
                           "warm_started": self.warm_started, "history": self.history,
                           "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        tmp = self.out / f".{RLLIB_DIR}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self.algo.save_to_path(str(tmp.resolve()))
            (tmp / RLLIB_STATE_FILE).write_text(json.dumps(state, indent=1))
            _atomic_replace(tmp, self.out / RLLIB_DIR)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        save_policy(self.out / POLICY_DIR, self.policy(),
                    scale=None if self.cfg.policy_overrides else self.cfg.scale,
                    meta={"trained_by": "lambo pretrain", "iteration": self.iteration,
                          "n_max": self.cfg.n_max, "m_max": self.cfg.m_max, "prompts": list(self.cfg.prompts)})
        _write_json_atomic(self.out / STATE_FILE, state)
        return self.out

    # -- logging ----------------------------------------------------------------------------------
    def _log(self, metrics: dict[str, Any], step: int) -> None:
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(self.out / TB_DIR))
            self._writer.add_text("config", json.dumps(self.cfg.to_dict(), indent=1), 0)
        for k, v in metrics.items():
            if k != "iteration" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self._writer.add_scalar(k, v, step)
        self._writer.flush()
        if self.progress:
            from rich.console import Console

            Console(stderr=True, soft_wrap=True).print(progress_line(metrics, self.cfg), highlight=False)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self.algo.stop()


def progress_line(m: dict[str, Any], cfg: PretrainConfig) -> str:
    parts = [f"iter {m.get('iteration', '-')}/{cfg.iterations} {m.get('phase', '')}".rstrip()]
    if "time_s" in m:
        parts.append(f"{m['time_s']:.1f}s {m['instances_per_s']:.0f} inst/s")
    if "train/batch_reward_mean" in m:
        parts.append(f"reward {m['train/batch_reward_mean']:+.4f}")
    if "train/entropy_target" in m:
        parts.append(f"H(t) {m['train/entropy_target']:.3f}")
    for p in cfg.prompts:
        if f"val/{p}/objective" in m:
            s = f"{p} {m[f'val/{p}/objective']:.4g}"
            gap = m.get(f"val/{p}/gap")
            if gap is not None and math.isfinite(gap):
                s += f" (gap {100 * gap:.2f}%)"
            s += f" feas {m[f'val/{p}/feasible']:.2f}"
            parts.append(s)
    if "warm_start/nll_last_epoch" in m:
        parts.append(f"warm start nll {m['warm_start/nll_first_epoch']:.3f} -> {m['warm_start/nll_last_epoch']:.3f}")
    return " | ".join(parts)
