"""PPO's training step with sampling overlapped with learning (``overlap=True``).

RLlib's PPO samples, then updates, then syncs weights: while the learner works, the env runners idle,
and while they sample, the learner idles. On a machine where both take a core, an iteration then costs
sampling + learning instead of the larger of the two. :class:`AcrlPPO` asks the env runners for the
*next* batch (asynchronously, through RLlib's fault-tolerant actor manager) before it updates on the
current one:

    iteration t:  wait for batch t  ->  push weights w_{t-1} to the env runners
                  -> env runners start sampling batch t+1 with w_{t-1}   (in their own processes)
                  -> learner(s) update on batch t: w_{t-1} -> w_t         (meanwhile)

So a batch is one update older than the weights it trains (batch t was sampled with w_{t-2}). PPO's
loss already uses the behaviour policy's log-probabilities stored with each step, so the ratios and
their clipping stay correct; only the trust region starts one update away (APPO and IMPALA run with
the same kind of lag). Without env-runner actors (``num_env_runners=0``) sampling runs in the driver and
the step is PPO's own (sample, update, sync), as it is with ``overlap=False``.

Fault tolerance is RLlib's: an env runner that dies is marked unhealthy when its request fails, the
batch is topped up from the healthy ones, and Ray restarts the actor (``max_restarts``), which
``Algorithm.restore_env_runners`` brings back with the current weights. When *no* env runner is left, the
step waits for the restart and samples again, so that every iteration still trains on a full batch.

Every iteration logs ``timers/lambo_sample_wait_s`` (time the driver waited for samples) and
``timers/lambo_learn_s`` (the learner update), so the split is visible with and without overlap.
"""

from __future__ import annotations

import time
from typing import Any

from ray.rllib.algorithms.ppo import PPO
from ray.rllib.execution.rollout_ops import synchronous_parallel_sample
from ray.rllib.utils.metrics import (
    ALL_MODULES,
    ENV_RUNNER_RESULTS,
    LEARNER_RESULTS,
    NUM_ENV_STEPS_SAMPLED_LIFETIME,
    NUM_MODULE_STEPS_TRAINED_LIFETIME,
    TIMERS,
)

SAMPLE_TAG = "lambo_next_batch"
RESTART_WAIT_S = 300.0  # an actor restart re-creates the env runner: seconds, minutes on a crowded node
SAMPLE_WAIT_TIMER, LEARN_TIMER = "lambo_sample_wait_s", "lambo_learn_s"


def _sample_with_metrics(runner: Any) -> tuple[list, Any]:
    return runner.sample(), runner.get_metrics()


class AcrlPPO(PPO):
    """PPO whose env runners sample the next batch while the learners train on this one."""

    _pending = False  # a sample request is in flight on the env runners
    _weights_stale = False  # the env runners have not yet received the last update

    def _overlap(self) -> bool:
        lc = self.config.learner_config_dict or {}
        return bool(lc.get("overlap", False)) and self.env_runner_group.num_remote_env_runners() > 0

    def training_step(self) -> None:
        """PPO's step (sample, update, sync weights), with the next batch requested before the update
        when overlapping; the sampling wait and the update are timed either way."""
        overlap = self._overlap()
        t0 = time.perf_counter()
        episodes, runner_metrics = self._collect()
        if not episodes and self.env_runner_group.num_remote_env_runners() > 0:
            episodes, runner_metrics = self._collect_after_restart()
        self.metrics.log_value((TIMERS, SAMPLE_WAIT_TIMER), time.perf_counter() - t0, window=1)
        if not episodes:
            return  # still none: Algorithm.train() tries restoring them again next iteration
        self.metrics.aggregate(runner_metrics, key=ENV_RUNNER_RESULTS)
        if overlap:
            self._sync_weights()
            self._launch_sampling()
        t1 = time.perf_counter()
        self._update(episodes)
        self._weights_stale = True
        self.metrics.log_value((TIMERS, LEARN_TIMER), time.perf_counter() - t1, window=1)
        if not overlap:
            self._sync_weights()

    # -- pieces ---------------------------------------------------------------------------------
    def _collect(self) -> tuple[list, list]:
        """The batch requested last iteration (or a fresh synchronous one), topped up from the healthy
        env runners when a runner failed and left it short."""
        episodes: list = []
        metrics: list = []
        if self._pending:
            self._pending = False
            ready = self.env_runner_group.fetch_ready_async_reqs(
                tags=SAMPLE_TAG, timeout_seconds=self.config.sample_timeout_s
            )
            for _, (eps, m) in ready:
                episodes.extend(eps)
                metrics.append(m)
        steps = sum(e.env_steps() for e in episodes)
        need = self.config.total_train_batch_size - steps
        if need > 0:
            if episodes:
                self._sync_weights()  # a short batch: top it up with the current weights
            more, more_metrics = synchronous_parallel_sample(
                worker_set=self.env_runner_group,
                max_env_steps=need,
                sample_timeout_s=self.config.sample_timeout_s,
                _uses_new_env_runners=True,
                _return_metrics=True,
            )
            episodes.extend(more)
            metrics.extend(more_metrics)
        return episodes, metrics

    def _collect_after_restart(self) -> tuple[list, list]:
        """Every env runner failed: wait (up to RESTART_WAIT_S) for Ray to restart them, bring them back with
        the current weights and sample again, so that an iteration still trains on a full batch."""
        deadline = time.monotonic() + RESTART_WAIT_S
        while time.monotonic() < deadline:
            self.restore_env_runners(self.env_runner_group)
            if self.env_runner_group.num_healthy_remote_env_runners() > 0:
                episodes, metrics = self._collect()
                if episodes:
                    return episodes, metrics
            time.sleep(1.0)
        return [], []

    def _launch_sampling(self) -> None:
        sent = self.env_runner_group.foreach_env_runner_async(_sample_with_metrics, tag=SAMPLE_TAG)
        self._pending = sent > 0

    def _sync_weights(self) -> None:
        if self._weights_stale:
            self.env_runner_group.sync_weights(from_worker_or_learner_group=self.learner_group, inference_only=True)
            self._weights_stale = False

    def _update(self, episodes: list) -> None:
        learner_results = self.learner_group.update(
            episodes=episodes,
            timesteps={
                NUM_ENV_STEPS_SAMPLED_LIFETIME: self.metrics.peek((ENV_RUNNER_RESULTS, NUM_ENV_STEPS_SAMPLED_LIFETIME)),
                NUM_MODULE_STEPS_TRAINED_LIFETIME: self.metrics.peek(
                    (LEARNER_RESULTS, ALL_MODULES, NUM_MODULE_STEPS_TRAINED_LIFETIME), default=0
                ),
            },
            num_epochs=self.config.num_epochs,
            minibatch_size=self.config.minibatch_size,
            shuffle_batch_per_epoch=self.config.shuffle_batch_per_epoch,
        )
        self.metrics.aggregate(learner_results, key=LEARNER_RESULTS)

    def cleanup(self) -> None:
        """Drop an in-flight sample request before the actors go away."""
        self._pending = False
        super().cleanup()
