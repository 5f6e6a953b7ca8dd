"""`lambo generate`: seeded instances of a (drifted) scenario into a .jsonl file."""

from __future__ import annotations

import argparse
from pathlib import Path

from lambo_ray.commands.common import add_scenario_arguments, scenario_from_args
from lambo_ray.errors import LamboInputError
from lambo_ray.mec.generator import generate_many, generate_series
from lambo_ray.mec.io import write_instances


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--count", type=int, default=100, help="number of instances")
    p.add_argument("--seed", type=int, default=0, help="instance k depends only on (scenario, seed, k)")
    p.add_argument("--out", type=Path, required=True, help="output .jsonl file (written atomically)")
    p.add_argument(
        "--series",
        action="store_true",
        help="one cell over time (fixed servers, UEs walking) instead of independent snapshots",
    )
    p.add_argument("--dt", type=float, default=60.0, help="seconds between snapshots with --series")
    add_scenario_arguments(p)


def run(args: argparse.Namespace) -> int:
    cfg = scenario_from_args(args)
    if args.count < 1:
        raise LamboInputError(f"--count must be >= 1 (got {args.count})")
    if args.series:
        if args.dt <= 0:
            raise LamboInputError(f"--dt must be > 0 (got {args.dt})")
        instances = list(generate_series(cfg, args.count, args.dt, args.seed))
    else:
        instances = generate_many(cfg, args.count, args.seed)
    write_instances(args.out, instances)
    print(
        f"wrote {len(instances)} instances (N={cfg.n_ues}, M={cfg.n_servers}"
        f"{', drift ' + args.drift if args.drift else ''}) to {args.out}"
    )
    return 0
