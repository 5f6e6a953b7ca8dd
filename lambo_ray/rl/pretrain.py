"""ACRL pretraining of the LAMBO policy on RLlib: the training loop, validation and checkpoints.

:class:`Pretrainer` reads like the algorithm (hyperparameters: :class:`lambo_ray.rl.config.PretrainConfig`):

    (optional) supervised warm start on expert labels          -> :mod:`lambo_ray.rl.warm_start`
    repeat:  env runners sample K-instance episodes (both prompts mixed), the next batch while the
             learners train on this one                                   -> :mod:`lambo_ray.rl.algorithm`
             learner(s): one-step advantages per critic head (or per group), PPO-clipped ACRL loss
                                                                          -> :mod:`lambo_ray.rl.learner`
             validation: greedy decisions on a fixed seeded set, mean objective and gap to the exact
             expert per prompt                                                     -> :func:`validate`
             atomic checkpoint into the run directory                             -> :mod:`lambo_ray.rl.run_dir`

Learners are resources: ``num_learners = 0`` keeps one learner in the driver; K >= 1 learner actors
(``num_cpus_per_learner`` / ``num_gpus_per_learner`` each) train data-parallel, each on 1/K of the batch,
gradients all-reduced (gloo on CPU, NCCL on GPU). A run killed at any point resumes with ``resume=True``
from its last checkpoint at the iteration after it; an env runner that dies is restarted by Ray and
brought back by RLlib, and the iteration still trains on a full batch.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lambo_ray.errors import LamboInputError
from lambo_ray.mec.evaluator import relative_gap
from lambo_ray.mec.instance import Instance
from lambo_ray.mec.io import jsonable, swap_in_dir, write_json
from lambo_ray.policy import LamboPolicy
from lambo_ray.rl.algo_config import MODULE_ID, build_algo_config
from lambo_ray.rl.config import PretrainConfig
from lambo_ray.rl.labels import build_labels, training_instance
from lambo_ray.rl.run_dir import (
    LABELS_FILE,
    POLICY_DIR,
    RLLIB_DIR,
    RLLIB_STATE_FILE,
    STATE_FILE,
    STATE_FORMAT,
    TB_DIR,
    check_run_dir,
)
from lambo_ray.rl.warm_start import label_config, supervised_warm_start


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
def _quiet(_: str) -> None:
    pass


@dataclass
class ValidationSet:
    """A fixed seeded set of instances, with (optional, cached) expert objectives per prompt."""

    instances: list[Instance]
    expert_objective: dict[str, list[float]] | None

    @classmethod
    def build(cls, cfg: PretrainConfig, cache: Path | None) -> ValidationSet:
        """``val_size`` instances of the training distribution (seed ``val_seed``) and their reference
        objectives: the exact expert's (``val_expert="exact"``, cached in ``cache``) or the label experts'
        (``"labels"``, cached beside it as JSONL)."""
        dist = cfg.training_distribution()
        insts = [training_instance(dist, cfg.val_seed, i) for i in range(cfg.val_size)]
        if cfg.val_expert is None:
            return cls(insts, None)
        if cfg.val_expert == "labels":
            path = (cache or Path(".")).with_suffix(".jsonl")
            labels = build_labels(dist, cfg.val_seed, cfg.val_size, path, label_config(cfg), cfg.prompts, log=_quiet)
            by_key = {(lab.index, lab.prompt): lab.objective for lab in labels}
            objective = {p: [by_key.get((i, p), float("nan")) for i in range(cfg.val_size)] for p in cfg.prompts}
            return cls(insts, objective)
        key = {
            "distribution": dist.to_dict(),
            "val_size": cfg.val_size,
            "val_seed": cfg.val_seed,
            "expert": cfg.val_expert,
            "prompts": list(cfg.prompts),
        }
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
        objective = {
            p: [float(expert.solve(inst, p, cfg.val_expert_time_limit).objective) for inst in insts]
            for p in cfg.prompts
        }
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
                refs = vset.expert_objective[p]
                gaps = [relative_gap(o, r) for o, r, f in zip(obj, refs, feas) if f and math.isfinite(r)]
                out[f"val/{p}/gap"] = float(np.mean(gaps)) if gaps else float("nan")
    policy.train(was_training)
    return out


# ----------------------------------------------------------------------------------------------
# The trainer
# ----------------------------------------------------------------------------------------------
class Pretrainer:
    """Owns one RLlib Algorithm and the run directory; ``Ray`` must be initialised by the caller."""

    def __init__(
        self, cfg: PretrainConfig, out: str | os.PathLike[str], resume: bool = False, progress: bool = True
    ) -> None:
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
            raise LamboInputError(
                f"cannot restore the RLlib state: {type(err).__name__}: {err}", where=str(rllib_dir)
            ) from None
        # Env runners hold inference-only copies: push the restored weights to them now.
        self.algo.env_runner_group.sync_weights(
            from_worker_or_learner_group=self.algo.learner_group, inference_only=True, timeout_seconds=60.0
        )
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
        policy.load_state_dict({k[len(prefix) :]: v for k, v in self.learner_state().items() if k.startswith(prefix)})
        return policy.eval()

    def set_policy(self, policy: LamboPolicy) -> None:
        """Put ``policy``'s weights into the learner (critic kept) and push them to every env runner."""
        state = {k: v.numpy() for k, v in self.learner_state().items()}
        state.update({f"policy.{k}": v.detach().cpu().numpy() for k, v in policy.state_dict().items()})
        self.algo.learner_group.set_weights({MODULE_ID: state})
        self.algo.env_runner_group.sync_weights(
            from_worker_or_learner_group=self.algo.learner_group, inference_only=True, timeout_seconds=60.0
        )

    # -- the loop -------------------------------------------------------------------------------
    def warm_start(self) -> dict[str, float]:
        """Supervised warm start once per run (skipped on resume and when warm_start_labels = 0)."""
        if self.cfg.warm_start_labels <= 0 or self.warm_started:
            return {}
        # A fresh policy seeded by the config, not the learner's copy: RLlib builds the module with its own
        # random state, and the warm-started weights must depend on the config alone (configs/lambo-s.yaml
        # reproduces the shipped checkpoint).
        torch.manual_seed(self.cfg.seed)
        policy = LamboPolicy(self.cfg.policy_config())
        metrics = supervised_warm_start(policy, self.cfg, self.out, log=self._say)
        self.set_policy(policy)
        self.warm_started = True
        metrics.update(validate(self.policy(), self.vset, self.cfg.prompts))
        metrics = {"iteration": self.iteration, "phase": "warm_start", **metrics}
        self.history.append(jsonable(metrics))
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
        m: dict[str, Any] = {
            "iteration": self.iteration,
            "phase": "acrl",
            "time_s": wall,
            "instances": instances,
            "instances_per_s": instances / wall if wall > 0 else float("nan"),
        }
        for key in (
            "batch_reward_mean",
            "batch_r_off_mean",
            "batch_r_alloc_mean",
            "batch_feasible",
            "policy_loss",
            "policy_loss_target",
            "policy_loss_share",
            "vf_off_loss",
            "vf_alloc_loss",
            "vf_loss",
            "vf_explained_var",
            "entropy_target",
            "entropy_share",
            "approx_kl",
            "approx_kl_per_ue",
            "clip_fraction",
            "total_loss",
            "group_singletons",
        ):
            if key in learner:
                m[f"train/{key}"] = float(np.asarray(learner[key]))
        for p in self.cfg.prompts:
            key = f"batch_reward_mean/{p}"
            if key in learner:
                m[f"train/{key}"] = float(np.asarray(learner[key]))
        m.update(iteration_timers(res))
        m.update(fault_tolerance_metrics(res))
        if self.iteration % self.cfg.eval_every == 0 or self.iteration == self.cfg.iterations:
            t1 = time.perf_counter()
            m.update(validate(self.policy(), self.vset, self.cfg.prompts))
            m["val/time_s"] = time.perf_counter() - t1
        self.history.append(jsonable(m))
        self._log(m, step=self.iteration)
        return m

    def start(self) -> list[dict[str, Any]]:
        """Before the first iteration: validate the untrained policy, then the warm start (if asked and not
        done); a no-op for a resumed run."""
        if self.iteration == 0 and not self.history:
            init = {"iteration": 0, "phase": "init", **validate(self.policy(), self.vset, self.cfg.prompts)}
            self.history.append(jsonable(init))
            self._log(init, step=0)
        if self.iteration == 0:
            self.warm_start()
        return self.history

    def run(self) -> list[dict[str, Any]]:
        """Warm start (if asked and not done), then iterate up to ``cfg.iterations`` in total (a resumed
        run continues where its checkpoint stopped), checkpointing every ``checkpoint_every``; with
        ``iterations = 0`` the run is the warm start alone and saves once after it."""
        self.start()
        if self.cfg.iterations == 0:  # warm start only: the checkpoint is the imitation-trained policy
            self.save()
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
        state = jsonable(
            {
                "format": STATE_FORMAT,
                "iteration": self.iteration,
                "config": self.cfg.to_dict(),
                "warm_started": self.warm_started,
                "history": self.history,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        )
        tmp = self.out / f".{RLLIB_DIR}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            self.algo.save_to_path(str(tmp.resolve()))
            write_json(tmp / RLLIB_STATE_FILE, state)
            swap_in_dir(tmp, self.out / RLLIB_DIR)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        save_policy(
            self.out / POLICY_DIR,
            self.policy(),
            scale=None if self.cfg.policy_overrides else self.cfg.scale,
            meta={
                "trained_by": "lambo pretrain",
                "iteration": self.iteration,
                "n_max": self.cfg.n_max,
                "m_max": self.cfg.m_max,
                "prompts": list(self.cfg.prompts),
            },
        )
        write_json(self.out / STATE_FILE, state)
        return self.out

    # -- logging ----------------------------------------------------------------------------------
    def _say(self, line: str) -> None:
        if self.progress:
            from rich.console import Console

            Console(stderr=True, soft_wrap=True).print(line, highlight=False)

    def _log(self, metrics: dict[str, Any], step: int) -> None:
        if self._writer is None:
            from tensorboardX import SummaryWriter

            # On resume, drop what a killed run logged after its last checkpoint: those iterations are redone.
            purge = self.iteration + 1 if self.iteration > 0 else None
            self._writer = SummaryWriter(str(self.out / TB_DIR), purge_step=purge)
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


def iteration_timers(res: dict[str, Any]) -> dict[str, float]:
    """This iteration's sampling wait and learner update (AcrlPPO's timers; RLlib's own are smoothed)."""
    from lambo_ray.rl.algorithm import LEARN_TIMER, SAMPLE_WAIT_TIMER

    timers = res.get("timers", {})
    return {f"timers/{k}": float(timers[k]) for k in (SAMPLE_WAIT_TIMER, LEARN_TIMER) if k in timers}


def fault_tolerance_metrics(res: dict[str, Any]) -> dict[str, float]:
    """Env-runner restarts so far and healthy env runners now (RLlib's fault-tolerance stats)."""
    ft = res.get("fault_tolerance", {})
    out = {}
    if "num_remote_worker_restarts" in ft:
        out["ft/env_runner_restarts"] = float(ft["num_remote_worker_restarts"])
    if "num_healthy_workers" in ft:
        out["ft/healthy_env_runners"] = float(ft["num_healthy_workers"])
    return out


def progress_line(m: dict[str, Any], cfg: PretrainConfig) -> str:
    parts = [f"iter {m.get('iteration', '-')}/{cfg.iterations} {m.get('phase', '')}".rstrip()]
    if "time_s" in m:
        parts.append(f"{m['time_s']:.1f}s {m['instances_per_s']:.0f} inst/s")
    if "train/batch_reward_mean" in m:
        parts.append(f"reward {m['train/batch_reward_mean']:+.4f}")
    if "train/entropy_target" in m:
        parts.append(f"H(t) {m['train/entropy_target']:.3f}")
    if m.get("ft/env_runner_restarts"):
        parts.append(f"env-runner restarts {m['ft/env_runner_restarts']:.0f}")
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
