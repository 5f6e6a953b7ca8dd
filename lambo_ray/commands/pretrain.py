"""`lambo pretrain`: ACRL pretraining of the LAMBO policy on RLlib.

    lambo pretrain --scale S --iterations 50 --num-env-runners 2 --out runs/pretrain
    ray job submit --working-dir . -- lambo pretrain --scale S --iterations 50 --out runs/pretrain

Without RAY_ADDRESS an embedded local Ray is started; under `ray job submit` (RAY_ADDRESS set) the run
joins the cluster, the driver hosts the learner and the env runners spread over the cluster's CPUs.
``--out DIR`` is the run directory and checkpoint (``DIR/policy`` loads with `lambo solve --method lambo
--checkpoint DIR`); ``--resume`` continues from it up to ``--iterations`` in total.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from lambo_ray.commands.common import add_scenario_arguments, init_ray, scenario_from_args
from lambo_ray.mec.instance import PROMPTS
from lambo_ray.mec.scenario import PAPER


def add_arguments(p: argparse.ArgumentParser) -> None:
    from lambo_ray.rl.config import PretrainConfig

    d = {k: f.default for k, f in PretrainConfig.__dataclass_fields__.items()}
    p.add_argument("--out", type=Path, required=True, help="run directory (checkpoint, TensorBoard logs)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the checkpoint in --out (a fresh run if it holds none)",
    )
    p.add_argument("--scale", default=d["scale"], help="model scale: S, M or L")
    p.add_argument("--iterations", type=int, default=d["iterations"], help="training iterations in total")
    p.add_argument("--num-env-runners", type=int, default=d["num_env_runners"])
    p.add_argument("--num-envs-per-env-runner", type=int, default=d["num_envs_per_env_runner"])
    p.add_argument("--instances-per-episode", type=int, default=d["instances_per_episode"])
    p.add_argument("--train-batch-size", type=int, default=d["train_batch_size"], help="instances per iteration")
    p.add_argument("--minibatch-size", type=int, default=d["minibatch_size"])
    p.add_argument("--epochs", type=int, default=d["num_epochs"], help="passes over each training batch")
    p.add_argument("--lr", type=float, default=d["lr"])
    p.add_argument("--clip-param", type=float, default=d["clip_param"])
    p.add_argument("--entropy-coeff-target", type=float, default=d["entropy_coeff_target"])
    p.add_argument("--entropy-coeff-share", type=float, default=d["entropy_coeff_share"])
    p.add_argument("--no-entropy-bonus", action="store_true", help="ablation: no entropy bonus on either head")
    p.add_argument(
        "--critic",
        choices=("two_head", "single_head"),
        default=d["critic"],
        help="ablation: single_head values the whole reward with one advantage",
    )
    p.add_argument(
        "--ratio",
        choices=("per_ue", "joint"),
        default=d["ratio"],
        help="ablation: PPO ratio per UE decision (default) or of the whole decision",
    )
    p.add_argument(
        "--share-credit",
        choices=("total", "alloc"),
        default=d["share_credit"],
        help="ablation: advantage of the share log-probs, A_off + A_alloc (default) or A_alloc only",
    )
    p.add_argument("--penalty", type=float, default=d["penalty"], help="reward penalty per constraint violation")
    p.add_argument("--prompt", nargs="+", default=list(PROMPTS), help="prompts mixed in the episodes")
    p.add_argument("--n-max", type=int, default=None, help="padded UEs (default: the scenario's N)")
    p.add_argument("--m-max", type=int, default=None, help="padded servers (default: the scenario's M)")
    p.add_argument("--seed", type=int, default=d["seed"])
    p.add_argument("--val-size", type=int, default=d["val_size"], help="validation instances (greedy)")
    p.add_argument(
        "--val-expert",
        default=d["val_expert"],
        help="expert whose objectives define the validation gap; 'none' to skip",
    )
    p.add_argument("--eval-every", type=int, default=d["eval_every"])
    p.add_argument("--checkpoint-every", type=int, default=d["checkpoint_every"])
    p.add_argument(
        "--warm-start-labels",
        type=int,
        default=d["warm_start_labels"],
        help="supervised warm start on this many exact min_energy labels first (0: pure ACRL)",
    )
    p.add_argument("--warm-start-epochs", type=int, default=d["warm_start_epochs"])
    p.add_argument(
        "--warm-start-prompts",
        nargs="+",
        default=list(d["warm_start_prompts"]),
        help="prompts of the warm-start labels (min_energy: exact, min_latency: local search)",
    )
    p.add_argument("--threads", type=int, default=d["driver_threads"], help="torch threads of the driver")
    p.add_argument("--quiet", action="store_true", help="no per-iteration progress line")
    add_scenario_arguments(p)


def config_from_args(args: argparse.Namespace):
    from lambo_ray.rl.config import PretrainConfig

    scenario = scenario_from_args(args)
    # Store only what differs from the paper (short, readable configs); --drift is already applied.
    base = {k: v for k, v in scenario.to_dict().items() if v != getattr(PAPER, k)}
    val_expert = None if str(args.val_expert).lower() == "none" else args.val_expert
    return PretrainConfig(
        scale=args.scale,
        critic=args.critic,
        ratio=args.ratio,
        share_credit=args.share_credit,
        iterations=args.iterations,
        num_env_runners=args.num_env_runners,
        num_envs_per_env_runner=args.num_envs_per_env_runner,
        instances_per_episode=args.instances_per_episode,
        train_batch_size=args.train_batch_size,
        minibatch_size=args.minibatch_size,
        num_epochs=args.epochs,
        lr=args.lr,
        clip_param=args.clip_param,
        entropy_bonus=not args.no_entropy_bonus,
        entropy_coeff_target=args.entropy_coeff_target,
        entropy_coeff_share=args.entropy_coeff_share,
        penalty=args.penalty,
        scenario=base,
        prompts=tuple(args.prompt),
        n_max=args.n_max,
        m_max=args.m_max,
        seed=args.seed,
        val_size=args.val_size,
        val_expert=val_expert,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        warm_start_labels=args.warm_start_labels,
        warm_start_epochs=args.warm_start_epochs,
        warm_start_prompts=tuple(args.warm_start_prompts),
        driver_threads=args.threads,
    )


def run(args: argparse.Namespace) -> int:
    from lambo_ray.rl.pretrain import Pretrainer
    from lambo_ray.rl.run_dir import check_run_dir

    cfg = config_from_args(args)  # validate everything before starting Ray
    check_run_dir(args.out, cfg, args.resume)

    init_ray(num_cpus=None if os.environ.get("RAY_ADDRESS") else max(os.cpu_count() or 1, cfg.num_env_runners))
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
