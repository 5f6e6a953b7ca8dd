"""Pretraining benchmark: LAMBO-S trained on the paper scenario within a stated budget on 2 CPU cores.

Reports, on held-out paper-scenario instances labelled by the exact expert (both prompts):
the mean gap of the policy decoded greedily and best-of-k, for pure ACRL and for ACRL after a
supervised warm start, next to greedy and local search on the same instances and DE from the
expert benchmark; plus env-runner sampling throughput with 1 and 2 env runners.

    python benchmarks/pretrain.py                      # full: 200 held-out instances
    python benchmarks/pretrain.py --heldout 20 --acrl-iterations 2 --quick   # smoke run

The exact labels of the held-out set are cached (``--labels-cache``), since min_latency labels cost
seconds each; they are computed by the ALEF expert pool (2 Ray actors).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lambo_ray.mec.evaluator import relative_gap
from lambo_ray.mec.generator import generate_many
from lambo_ray.mec.instance import PROMPTS, Instance
from lambo_ray.mec.scenario import ScenarioConfig
from lambo_ray.policy.decoding import decide
from lambo_ray.results import print_table, write_results
from lambo_ray.rl.config import PretrainConfig
from lambo_ray.rl.pretrain import Pretrainer
from lambo_ray.runtime import init_ray
from lambo_ray.solving import solve_all

HELDOUT_SEED = 9000


def exact_labels(instances: list[Instance], cache: Path, time_limit: float, experts: int) -> dict[str, list[float]]:
    key = {"seed": HELDOUT_SEED, "count": len(instances), "time_limit": time_limit}
    if cache.exists():
        doc = json.loads(cache.read_text())
        if doc.get("key") == key:
            return doc["objective"]
    from lambo_ray.alef.expert_pool import ExpertPool

    objective: dict[str, list[float]] = {}
    start = time.perf_counter()
    with ExpertPool(experts, time_limit=time_limit) as pool:
        for p in PROMPTS:
            labels = pool.label(instances, p, list(range(len(instances))))
            objective[p] = [float(lab.objective) for lab in labels]
            print(
                f"  exact labels {p}: {len(labels)} in {time.perf_counter() - start:.0f} s "
                f"(sources: {sorted({lab.source for lab in labels})})",
                flush=True,
            )
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "objective": objective}))
    return objective


def score(objs: list[float], feasible: list[bool], ref: list[float]) -> dict[str, float]:
    gaps = np.array([relative_gap(o, r) for o, r in zip(objs, ref)])
    feas = np.array(feasible)
    return {
        "gap_pct": float(100 * gaps[feas].mean()) if feas.any() else float("nan"),
        "feasible_rate": float(feas.mean()),
    }


def evaluate_policy(policy, instances, labels, k: int) -> list[dict[str, Any]]:
    rows = []
    for prompt in PROMPTS:
        for mode in ("greedy", "best_of_k"):
            t0 = time.perf_counter()
            decisions = decide(policy, instances, prompt, mode=mode, k=k)
            ms = 1000 * (time.perf_counter() - t0) / len(instances)
            rows.append(
                {
                    "prompt": prompt,
                    "decode": mode,
                    "decision_ms": ms,
                    **score(
                        [d.objective for d in decisions],
                        [d.stats["feasible"] for d in decisions],
                        labels[prompt],
                    ),
                }
            )
    return rows


def throughput(runners: int, base: PretrainConfig, iterations: int) -> dict[str, float]:
    cfg = PretrainConfig(
        **{
            **base.to_dict(),
            "num_env_runners": runners,
            "iterations": iterations,
            "val_expert": None,
            "val_size": 2,
            "warm_start_labels": 0,
            "overlap": False,  # sample, then learn: the sampling wait is then the whole sampling time
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Pretrainer(cfg, Path(tmp) / "run", progress=False)
        try:
            hist = [trainer.train_iteration() for _ in range(iterations)]
        finally:
            trainer.close()
    last = hist[1:] or hist  # the first iteration includes start-up
    inst = sum(m["instances"] for m in last)
    sampling = sum(m.get("timers/lambo_sample_wait_s", float("nan")) for m in last)
    wall = sum(m["time_s"] for m in last)
    return {
        "env_runners": runners,
        "instances_per_iteration": inst / len(last),
        "sampling_instances_per_s": inst / sampling,
        "iteration_instances_per_s": inst / wall,
    }


def train_variant(name: str, cfg: PretrainConfig, out: Path) -> tuple[Any, dict[str, Any]]:
    t0 = time.perf_counter()
    trainer = Pretrainer(cfg, out / name, progress=True)
    try:
        history = trainer.run()
        policy = trainer.policy()
    finally:
        trainer.close()
    return policy, {"variant": name, "train_wall_s": time.perf_counter() - t0, "history": history}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heldout", type=int, default=200)
    p.add_argument("--acrl-iterations", type=int, default=15)
    p.add_argument("--warm-start-labels", type=int, default=1024)
    p.add_argument("--warm-start-epochs", type=int, default=40)
    p.add_argument("--train-batch-size", type=int, default=512)
    p.add_argument("--num-env-runners", type=int, default=2)
    p.add_argument("--k", type=int, default=16, help="best-of-k samples")
    p.add_argument("--label-time-limit", type=float, default=60.0)
    p.add_argument("--labels-cache", type=Path, default=Path("runs/bench_pretrain_labels.json"))
    p.add_argument("--runs", type=Path, default=Path("runs/bench_pretrain"), help="checkpoints of the variants")
    p.add_argument("--variants", nargs="+", default=["acrl", "warm_start+acrl"], choices=["acrl", "warm_start+acrl"])
    p.add_argument("--quick", action="store_true", help="skip the throughput measurement")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/pretrain.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    init_ray(num_cpus=2)
    start = time.perf_counter()
    instances = generate_many(ScenarioConfig(), args.heldout, HELDOUT_SEED)
    labels = exact_labels(instances, args.labels_cache, args.label_time_limit, experts=2)
    base = PretrainConfig(
        scale="S",
        iterations=args.acrl_iterations,
        num_env_runners=args.num_env_runners,
        train_batch_size=args.train_batch_size,
        val_size=8,
        seed=0,
    )

    rows: list[dict[str, Any]] = []
    for method in ("greedy", "local_search"):
        for prompt in PROMPTS:
            ds = solve_all(method, instances, prompt, progress=False)
            rows.append(
                {
                    "method": method,
                    "prompt": prompt,
                    "decode": "-",
                    "decision_ms": 1000 * float(np.mean([d.stats["wall_s"] for d in ds])),
                    **score([d.objective for d in ds], [d.stats["feasible"] for d in ds], labels[prompt]),
                }
            )
    experts_json = Path("benchmarks/results/experts.json")
    if experts_json.exists():
        for r in json.loads(experts_json.read_text())["rows"]:
            if r["method"] == "de":
                rows.append(
                    {
                        "method": "de (experts.json, 50 inst.)",
                        "prompt": r["prompt"],
                        "decode": "-",
                        "decision_ms": 1000 * r["mean_wall_s"],
                        "gap_pct": r["mean_gap_pct"],
                        "feasible_rate": r["feasible_rate"],
                    }
                )
    variants = []
    for name in args.variants:
        warm = args.warm_start_labels if name == "warm_start+acrl" else 0
        cfg = PretrainConfig(
            **{
                **base.to_dict(),
                "warm_start_labels": warm,
                "warm_start_epochs": args.warm_start_epochs,
                "warm_start_prompts": tuple(PROMPTS),
            }
        )
        policy, info = train_variant(name, cfg, args.runs)
        variants.append(info)
        for r in evaluate_policy(policy, instances, labels, args.k):
            rows.append({"method": f"lambo-S {name}", **r, "train_wall_s": info["train_wall_s"]})
    thr = [] if args.quick else [throughput(r, base, 3) for r in (1, 2)]
    columns = ["method", "prompt", "decode", "gap_pct", "feasible_rate", "decision_ms", "train_wall_s"]
    print_table(rows, columns, title=f"Gap to exact on {args.heldout} held-out paper instances (seed {HELDOUT_SEED})")
    if thr:
        print_table(thr, title="Env-runner sampling throughput (instances = env steps, N=50, M=4)")
    write_results(
        args.out,
        rows,
        throughput=thr,
        heldout=args.heldout,
        config=base.to_dict(),
        variants=[{k: v for k, v in v_.items()} for v_ in variants],
        total_wall_s=time.perf_counter() - start,
    )
    print(f"wrote {args.out} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
