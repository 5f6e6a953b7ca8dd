"""The RLlib configuration of a pretraining run, built from a :class:`~lambo_ray.rl.config.PretrainConfig`.

One place says how our pieces plug into RLlib: the env (:mod:`lambo_ray.rl.env`), the RLModule
(:mod:`lambo_ray.rl.module`), the ACRL learner and its connector piece (:mod:`lambo_ray.rl.learner`), the
overlapped training step (:mod:`lambo_ray.rl.algorithm`), and the resources: env runners on CPUs only,
learners in the driver (K = 0) or as K actors with their own CPUs and GPUs.
"""

from __future__ import annotations

from typing import Any

from lambo_ray.rl.config import PretrainConfig
from lambo_ray.rl.learner import critic_heads

MODULE_ID = "default_policy"
SAMPLE_TIMEOUT_S = 1800.0  # one env runner's share of a batch of 200-UE cells can take minutes on a busy CPU
RESTART_DELAY_S = 2.0  # pause of a failing env runner before Ray restarts it (RLlib's default: 60 s)


def build_algo_config(cfg: PretrainConfig) -> Any:
    """The RLlib config of a run: our env, RLModule, learner (and its connector piece), the learners as
    resources (K remote data-parallel learners, or one in the driver with K = 0; GPUs for learners
    only), and the overlapped training step of :class:`lambo_ray.rl.algorithm.AcrlPPO`."""
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.rllib.core.rl_module.rl_module import RLModuleSpec

    from lambo_ray.rl.algorithm import AcrlPPO
    from lambo_ray.rl.env import MecEnv
    from lambo_ray.rl.learner import AcrlLearner, AddRewardParts
    from lambo_ray.rl.module import LamboRLModule, module_model_config

    batch_per_learner, minibatch_per_learner = cfg.learner_batch_sizes()
    config = (
        PPOConfig(algo_class=AcrlPPO)
        .environment(
            MecEnv, env_config=cfg.env_config().to_dict(), normalize_actions=False, clip_actions=False
        )  # the module already emits valid actions; RLlib would otherwise rescale the shares from [-1, 1]
        .env_runners(
            num_env_runners=cfg.num_env_runners,
            num_envs_per_env_runner=cfg.num_envs_per_env_runner,
            num_gpus_per_env_runner=0,  # sampling decodes small batches: a GPU would sit idle there
            sample_timeout_s=SAMPLE_TIMEOUT_S,
        )
        .learners(
            num_learners=cfg.num_learners,
            num_gpus_per_learner=cfg.num_gpus_per_learner,
            num_cpus_per_learner=cfg.num_cpus_per_learner,
            learner_class=AcrlLearner,
            learner_connector=lambda obs_space, act_space: AddRewardParts(),
            learner_config_dict=learner_settings(cfg),
        )
        .rl_module(
            rl_module_spec=RLModuleSpec(
                module_class=LamboRLModule,
                model_config=module_model_config(
                    cfg.policy_config(), critic_heads(cfg.critic), cfg.trim_padding, cfg.chunk_rows, cfg.precision
                ),
            )
        )
        .training(
            lr=cfg.lr,
            gamma=0.0,
            lambda_=1.0,
            train_batch_size_per_learner=batch_per_learner,
            minibatch_size=minibatch_per_learner,
            num_epochs=cfg.num_epochs,
            entropy_coeff=0.0,
            use_kl_loss=False,
            clip_param=cfg.clip_param,
            vf_clip_param=10.0,
            vf_loss_coeff=cfg.vf_loss_coeff,
            grad_clip=cfg.grad_clip,
        )
        .fault_tolerance(restart_failed_env_runners=True, delay_between_env_runner_restarts_s=RESTART_DELAY_S)
        .debugging(seed=cfg.seed)
    )
    if cfg.precision == "fp16":
        import torch

        config.experimental(_torch_grad_scaler_class=torch.amp.GradScaler)
    # Our connectors hold no state (no observation filters), and syncing it after every step would wait for
    # the sample request that overlapping leaves in flight.
    config._dont_auto_sync_env_runner_states = bool(cfg.overlap)
    return config


def learner_settings(cfg: PretrainConfig) -> dict[str, Any]:
    """The learner's ``learner_config_dict`` (read by AcrlLearner and AcrlPPO)."""
    return {
        "critic": cfg.critic,
        "ratio": cfg.ratio,
        "share_credit": cfg.share_credit,
        "entropy_bonus": cfg.entropy_bonus,
        "entropy_coeff_target": cfg.entropy_coeff_target,
        "entropy_coeff_share": cfg.entropy_coeff_share,
        "baseline": cfg.baseline,
        "overlap": cfg.overlap,
    }
