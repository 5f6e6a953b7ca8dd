"""ACRL with the two-headed critic vs the group baseline, from the same warm-started policy.

One supervised warm start on expert labels (paper scenario, LAMBO-S), then ACRL iterations twice from
that same policy and the same seeds: once with ``baseline="critic"`` (advantage = reward part minus the
critic head's value) and once with ``baseline="group"`` (each instance decided ``group_size`` times;
advantage = reward part minus the mean over its group). Both decide the same number of instances per
iteration. Reported per iteration: the validation gap of greedy decoding per prompt (to the label experts:
exact for min_energy, iterated local search for min_latency), and the sampled reward.

    python benchmarks/acrl_baselines.py                        # 256 labels, 10 iterations each
    python benchmarks/acrl_baselines.py --quick                # smoke run
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from lambo_ray.mec.instance import PROMPTS
from lambo_ray.results import print_table, write_results
from lambo_ray.rl.config import PretrainConfig


def base_config(args: argparse.Namespace, **kw: Any) -> PretrainConfig:
    values = dict(
        scale="S",
        iterations=args.iterations,
        num_env_runners=args.runners,
        num_envs_per_env_runner=32,
        instances_per_episode=64,
        train_batch_size=args.train_batch_size,
        minibatch_size=128,
        num_epochs=4,
        val_size=args.val_size,
        val_expert="labels",
        warm_start_labels=args.labels,
        warm_start_epochs=args.warm_start_epochs,
        seed=args.seed,
    )
    values.update(kw)
    return PretrainConfig(**values)


def warm_start(args: argparse.Namespace, root: Path) -> tuple[Any, list[dict[str, Any]]]:
    """The shared starting point: untrained policy -> supervised warm start; returns it and its history."""
    from lambo_ray.rl.pretrain import Pretrainer

    trainer = Pretrainer(base_config(args), root / "warm", progress=True)
    try:
        history = trainer.start()
        return trainer.policy(), history
    finally:
        trainer.close()


def acrl(args: argparse.Namespace, root: Path, policy: Any, baseline: str) -> list[dict[str, Any]]:
    """``args.iterations`` ACRL iterations from ``policy`` (critic freshly initialised, same seed)."""
    from lambo_ray.rl.pretrain import Pretrainer

    cfg = base_config(args, warm_start_labels=0, baseline=baseline, group_size=args.group_size)
    out = root / baseline
    out.mkdir(parents=True)
    for cached in root.glob("warm/val_labels*"):  # the validation set's reference objectives, solved once
        shutil.copy(cached, out / cached.name)
    trainer = Pretrainer(cfg, out, progress=True)
    try:
        trainer.set_policy(policy)
        trainer.warm_started = True
        return trainer.run()
    finally:
        trainer.close()


def trajectory_rows(baseline: str, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for h in history:
        row = {"baseline": baseline, "iteration": h["iteration"], "phase": h["phase"]}
        for p in PROMPTS:
            if f"val/{p}/gap" in h:
                row[f"gap_pct_{p}"] = 100 * h[f"val/{p}/gap"]
        if all(f"gap_pct_{p}" in row for p in PROMPTS):
            row["gap_pct_mean"] = float(np.mean([row[f"gap_pct_{p}"] for p in PROMPTS]))
        row["train_reward"] = h.get("train/batch_reward_mean", float("nan"))
        row["time_s"] = h.get("time_s", float("nan"))
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/acrl_baselines.json"))
    p.add_argument("--labels", type=int, default=256, help="warm-start instances (labelled for both prompts)")
    p.add_argument("--warm-start-epochs", type=int, default=30)
    p.add_argument("--iterations", type=int, default=10, help="ACRL iterations per baseline")
    p.add_argument("--train-batch-size", type=int, default=512, help="instances decided per iteration")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--runners", type=int, default=1)
    p.add_argument("--val-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.labels, args.warm_start_epochs, args.iterations, args.val_size = 16, 2, 2, 8
        args.train_batch_size = 256
    import ray
    import torch

    torch.set_num_threads(1)
    start, load_before = time.perf_counter(), os.getloadavg()
    ray.init(num_cpus=2 + args.runners, include_dashboard=False, log_to_driver=False)
    root = Path(tempfile.mkdtemp(prefix="lambo-acrl-baselines-"))
    try:
        policy, warm_history = warm_start(args, root)
        histories = {b: acrl(args, root, policy, b) for b in ("critic", "group")}
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    rows = trajectory_rows("warm start", warm_history)
    for baseline, history in histories.items():
        rows += trajectory_rows(baseline, [h for h in history if h["phase"] == "acrl"])
    print_table(rows, title="Validation gap (%) per iteration, paper scenario, LAMBO-S")
    final = {b: trajectory_rows(b, [h for h in hist if h["phase"] == "acrl"])[-1] for b, hist in histories.items()}
    write_results(
        args.out,
        rows,
        final=final,
        settings={k: v for k, v in vars(args).items() if k != "out"},
        config=base_config(args).to_dict(),
        load_average_before=list(load_before),
        load_average_after=list(os.getloadavg()),
        total_wall_s=time.perf_counter() - start,
    )
    print(f"wrote {args.out} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
