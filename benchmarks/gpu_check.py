"""GPU check (at most ~10 minutes): train LAMBO-M for a few iterations on one GPU learner; record
throughput, the sampling / learning split and the learner's peak GPU memory to JSON.

Ready to run on a machine with one CUDA GPU (nothing else to set up beyond this package):

    python benchmarks/gpu_check.py                                  # M, bf16, 4 timed iterations
    python benchmarks/gpu_check.py --precision fp32 --out benchmarks/results/gpu_check_fp32.json
    python benchmarks/gpu_check.py --cpu-dry-run --scale S          # the same code path on CPU, no GPU

Set-up: one remote learner actor with 1 GPU (``num_gpus_per_learner=1``, so the learner's module and
batches live on cuda:0), env runners on the remaining CPUs (they never take a GPU), the default scenario
distribution (N 10-200, M 2-10), sampling overlapped with learning. The run stops starting iterations
once ``--budget-s`` is spent.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from lambo_ray.results import print_table, write_results
from lambo_ray.rl.config import PretrainConfig

GROUP_SIZE = PretrainConfig.__dataclass_fields__["group_size"].default  # steps per env replica and iteration


def learner_device_info(trainer: Any) -> dict[str, Any]:
    """The learner actor's device, GPU name and peak allocated GPU memory (GB) so far."""

    def probe(learner: Any) -> dict[str, Any]:
        import torch

        info: dict[str, Any] = {"device": str(learner._device)}
        if torch.cuda.is_available() and learner._device.type == "cuda":
            info["gpu_name"] = torch.cuda.get_device_name(learner._device)
            info["peak_allocated_gb"] = torch.cuda.max_memory_allocated(learner._device) / 1e9
            info["peak_reserved_gb"] = torch.cuda.max_memory_reserved(learner._device) / 1e9
            info["total_gb"] = torch.cuda.get_device_properties(learner._device).total_memory / 1e9
        return info

    return next(iter(trainer.algo.learner_group.foreach_learner(probe))).get()


def check_config(args: argparse.Namespace, runners: int) -> Any:
    return PretrainConfig(
        scale=args.scale,
        scenario_dist={},
        iterations=10_000,
        num_env_runners=runners,
        num_envs_per_env_runner=args.envs or max(1, args.train_batch_size // (runners * GROUP_SIZE)),
        instances_per_episode=64,
        train_batch_size=args.train_batch_size,
        minibatch_size=args.minibatch_size,
        num_epochs=args.epochs,
        num_learners=1,
        num_gpus_per_learner=0 if args.cpu_dry_run else 1,
        num_cpus_per_learner=args.learner_cpus,
        precision=args.precision,
        val_size=1,
        val_expert=None,
        eval_every=10_000,
        seed=0,
    )


def run_check(args: argparse.Namespace, runners: int) -> tuple[list[dict[str, Any]], dict[str, Any], float]:
    from lambo_ray.rl.pretrain import Pretrainer

    root = Path(tempfile.mkdtemp(prefix="lambo-gpu-check-"))
    t0 = time.perf_counter()
    trainer = Pretrainer(check_config(args, runners), root / "run", progress=True)
    build_s = time.perf_counter() - t0
    iterations: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + args.budget_s - build_s
        while len(iterations) < args.warmup + args.iterations:
            m = trainer.train_iteration()
            iterations.append({k: v for k, v in m.items() if isinstance(v, (int, float, str))})
            spent = iterations[-1]["time_s"]
            if time.monotonic() + 1.5 * spent > deadline:
                break
        device = learner_device_info(trainer)
    finally:
        trainer.close()
        shutil.rmtree(root, ignore_errors=True)
    return iterations, device, build_s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_check.json"))
    p.add_argument("--scale", default="M", choices=("S", "M", "L"))
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--iterations", type=int, default=4, help="timed iterations (after --warmup)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--train-batch-size", type=int, default=512)
    p.add_argument("--minibatch-size", type=int, default=64, help="M at N=200: ~0.17 GB of fp32 activations per row")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--envs", type=int, default=None, help="env replicas per env runner (default: one group each)")
    p.add_argument("--learner-cpus", type=float, default=2.0)
    p.add_argument("--budget-s", type=float, default=540.0, help="stop starting iterations after this")
    p.add_argument("--cpu-dry-run", action="store_true", help="no GPU: a CPU learner runs the same path")
    args = p.parse_args()
    import ray
    import torch

    gpus = torch.cuda.device_count()
    if gpus < 1 and not args.cpu_dry_run:
        print("gpu_check: no CUDA GPU visible (torch.cuda.device_count() == 0); nothing measured", file=sys.stderr)
        return 2
    if args.precision == "fp16" and args.cpu_dry_run:
        args.precision = "bf16"
    cpus = os.cpu_count() or 2
    free = max(1, min(8, cpus - 1 - int(args.learner_cpus)))
    runners = 1 << (free.bit_length() - 1)  # 1, 2, 4 or 8: the batch splits evenly over the env replicas
    torch.set_num_threads(1)
    start = time.perf_counter()
    ray.init(num_cpus=max(cpus, runners + int(args.learner_cpus) + 1), include_dashboard=False, log_to_driver=False)
    try:
        iterations, device, build_s = run_check(args, runners)
    finally:
        ray.shutdown()
    timed = [m for m in iterations[args.warmup :] if m.get("instances")] or iterations[-1:]
    wall = sum(m["time_s"] for m in timed)
    summary = {
        "scale": args.scale,
        "precision": args.precision,
        "env_runners": runners,
        "instances_per_s": sum(m["instances"] for m in timed) / wall,
        "learn_s_per_iteration": float(np.mean([m.get("timers/lambo_learn_s", np.nan) for m in timed])),
        "sample_wait_s_per_iteration": float(np.mean([m.get("timers/lambo_sample_wait_s", np.nan) for m in timed])),
        "timed_iterations": len(timed),
        "build_s": build_s,
        **device,
    }
    print_table([summary], title="GPU check")
    write_results(
        args.out,
        [summary],
        iterations=iterations,
        settings={k: v for k, v in vars(args).items() if k != "out"},
        total_wall_s=time.perf_counter() - start,
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
