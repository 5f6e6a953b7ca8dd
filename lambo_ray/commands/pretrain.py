"""`lambo pretrain`: ACRL pretraining of the LAMBO policy on RLlib.

    lambo pretrain --scale S --iterations 50 --num-env-runners 2 --out runs/pretrain
    ray job submit --working-dir . -- lambo pretrain --scale S --iterations 50 --out runs/pretrain

Without RAY_ADDRESS an embedded local Ray is started; under `ray job submit` (RAY_ADDRESS set) the run
joins the cluster and the env runners spread over the cluster's CPUs. The learner runs in the driver
(``--num-learners 0``) or as K data-parallel learner actors, each with ``--num-cpus-per-learner`` CPUs and
``--num-gpus-per-learner`` GPUs (env runners never take a GPU).
``--out DIR`` is the run directory and checkpoint (``DIR/policy`` loads with `lambo solve --method lambo
--checkpoint DIR`); ``--resume`` continues from it up to ``--iterations`` in total. Every setting is a
PretrainConfig field: flags override a ``--config FILE`` (YAML/JSON of the same keys), which overrides
the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from lambo_ray.commands.common import (
    add_config_argument,
    add_scenario_arguments,
    config_file_values,
    init_ray,
    scenario_values,
)
from lambo_ray.flags import DataclassFlags, Flag


def pretrain_flags() -> DataclassFlags:
    """One flag per PretrainConfig field; the scenario has its own group and ``--drift``."""
    from lambo_ray.rl.config import PretrainConfig

    return DataclassFlags(
        PretrainConfig,
        exclude=("scenario", "drift"),
        flags={
            "num_epochs": Flag(names=("--epochs", "--num-epochs")),
            "prompts": Flag(names=("--prompt", "--prompts")),
            "driver_threads": Flag(names=("--threads", "--driver-threads")),
        },
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="run directory (checkpoint, TensorBoard logs)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the checkpoint in --out (a fresh run if it holds none)",
    )
    p.add_argument("--quiet", action="store_true", help="no per-iteration progress line")
    add_config_argument(p, "pretraining (PretrainConfig)")
    pretrain_flags().add_to(p.add_argument_group("pretraining"))
    add_scenario_arguments(p)


def config_from_args(args: argparse.Namespace):
    """PretrainConfig from the defaults, then ``--config FILE``, then the flags given."""
    from lambo_ray.rl.config import PretrainConfig

    values = config_file_values(args, PretrainConfig)
    values.update(pretrain_flags().values(args))
    values["scenario"] = scenario_values(args, values.get("scenario"))
    if getattr(args, "drift", None) is not None:
        values["drift"] = args.drift
    return PretrainConfig.from_dict(values)


def local_cpus(cfg) -> int:
    """Logical CPUs of an embedded Ray: the machine's, or enough for every env runner and learner actor
    (Ray schedules by logical CPUs; a learner actor waits forever for a CPU that is not there)."""
    import math

    need = cfg.num_env_runners + math.ceil(cfg.num_learners * cfg.num_cpus_per_learner)
    return max(os.cpu_count() or 1, need)


def run(args: argparse.Namespace) -> int:
    from lambo_ray.rl.pretrain import Pretrainer
    from lambo_ray.rl.run_dir import check_run_dir

    cfg = config_from_args(args)  # validate everything before starting Ray
    check_run_dir(args.out, cfg, args.resume)

    init_ray(num_cpus=None if os.environ.get("RAY_ADDRESS") else local_cpus(cfg))
    trainer = Pretrainer(cfg, args.out, resume=args.resume, progress=not args.quiet)
    try:
        history = trainer.run()
    finally:
        trainer.close()
    last = history[-1] if history else {}
    summary = {
        "out": str(args.out),
        "iterations": trainer.iteration,
        **{k: v for k, v in last.items() if k.startswith("val/") or k in ("instances_per_s", "time_s")},
    }
    print(json.dumps(summary))
    return 0
