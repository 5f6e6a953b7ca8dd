"""ACRL pretraining of the LAMBO policy on RLlib's new API stack.

Public API:

* :class:`lambo_ray.rl.config.PretrainConfig`, :class:`lambo_ray.rl.pretrain.Pretrainer`
  (``run()``, ``train_iteration()``, ``save()``, ``policy()``, ``close()``), ``build_algo_config(cfg)``
* :class:`lambo_ray.rl.env.MecEnv` / ``MecEnvConfig`` and :func:`lambo_ray.rl.env.reward_parts`
  (the reward and its split r = r_off + r_alloc)
* :class:`lambo_ray.rl.module.LamboRLModule`, :class:`lambo_ray.rl.learner.AcrlLearner`

Modules are imported lazily by callers: importing this package does not import Ray or RLlib.
"""
