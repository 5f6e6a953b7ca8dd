"""Expert benchmark: every method on the same seeded paper-scenario instances, both prompts.

Per method and prompt: mean objective, mean gap to the exact expert, feasibility rate, mean and p95
wall time per instance. Prints a table and writes benchmarks/results/experts.json.

    python benchmarks/experts.py --count 50
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from lambo_ray.mec.evaluator import relative_gap
from lambo_ray.mec.generator import generate_many
from lambo_ray.mec.scenario import ScenarioConfig
from lambo_ray.results import print_table, write_results
from lambo_ray.solving import solve_all

DEFAULT_METHODS = ["exact", "local_search", "greedy", "de", "droo", "are", "all_local", "all_offload"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=50)
    p.add_argument("--seed", type=int, default=1000, help="seed of the instance set (held out from training seeds)")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    p.add_argument("--prompts", nargs="+", default=["min_latency", "min_energy"])
    p.add_argument("--time-limit", type=float, default=120.0, help="exact: seconds per instance")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/experts.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    instances = generate_many(ScenarioConfig(), args.count, args.seed)
    rows = []
    for prompt in args.prompts:
        reference = None
        for method in args.methods:
            start = time.perf_counter()
            decisions = solve_all(method, instances, prompt, time_limit=args.time_limit if method == "exact" else None)
            objs = np.array([d.objective for d in decisions])
            wall = np.array([d.stats["wall_s"] for d in decisions])
            feasible = np.array([d.stats["feasible"] for d in decisions])
            if method == "exact":
                reference = objs
            row = {
                "prompt": prompt,
                "method": method,
                "mean_objective": float(objs.mean()),
                "mean_gap_pct": (
                    float(np.mean([relative_gap(o, r) for o, r in zip(objs, reference)])) * 100
                    if reference is not None
                    else None
                ),
                "feasible_rate": float(feasible.mean()),
                "mean_wall_s": float(wall.mean()),
                "p95_wall_s": float(np.percentile(wall, 95)),
            }
            if method == "exact":
                row["proven_optimal"] = int(sum(bool(d.stats.get("proven_optimal")) for d in decisions))
                row["max_certified_gap"] = float(max(d.stats.get("gap", 0.0) for d in decisions))
            rows.append(row)
            print(f"  {prompt:12s} {method:13s} done in {time.perf_counter() - start:7.1f} s", flush=True)
    columns = [
        "prompt",
        "method",
        "mean_objective",
        "mean_gap_pct",
        "feasible_rate",
        "mean_wall_s",
        "p95_wall_s",
        "proven_optimal",
    ]
    print_table(rows, columns, title=f"Experts on {args.count} paper-scenario instances (seed {args.seed})")
    write_results(args.out, rows, count=args.count, seed=args.seed, time_limit=args.time_limit)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
