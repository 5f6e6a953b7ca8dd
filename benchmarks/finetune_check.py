"""Did a `lambo finetune` run ship a better or a worse decoder than it started from?

A run reports greedy gaps on its 32 labelled held-out instances per set; per-instance changes are
heavy-tailed, so that mean moves by tenths of a point between samples of the same distribution. This
check needs no label: the run's base policy and its shipped decoder decide the same fresh drifted and
undrifted instances (a seed no run uses, ``run_seeds(seed)["check"]``), and the table shows the mean
relative change of the greedy objective with its standard error, next to what the run itself
reported. Writes the JSON (one row per run, with each run's command, revision and date).

    lambo finetune --drift outage --out runs/ft0 && lambo finetune --drift outage --seed 1 --out runs/ft1
    python benchmarks/finetune_check.py runs/ft0 runs/ft1 --out benchmarks/results/finetune_outage.json
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from alef import check_sets, shipped_change, shown_worse

from lambo_ray.alef.config import AlefConfig
from lambo_ray.alef.online import greedy_objectives
from lambo_ray.errors import LamboInputError
from lambo_ray.policy.checkpoint import load_decoder, load_policy, resolve_policy_dir
from lambo_ray.results import print_table, write_results

COLUMNS = [
    "run",
    "seed",
    "pool_size",
    "pg_epochs",
    "rounds_kept",
    "drifted_gap_before_pct",
    "drifted_gap_after_pct",
    "undrifted_gap_before_pct",
    "undrifted_gap_after_pct",
    "change_drifted_pct",
    "change_drifted_se_pct",
    "change_undrifted_pct",
    "change_undrifted_se_pct",
    "shown_worse",
    "total_s",
]


def check_run(run_dir: Path, count: int) -> dict[str, Any]:
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise LamboInputError("not a `lambo finetune` output directory (no metrics.json)", where=str(run_dir))
    m = json.loads(metrics_path.read_text())
    cfg = AlefConfig.from_dict(m["config"])
    base, _ = load_policy(resolve_policy_dir(m["checkpoint"]))
    shipped = copy.deepcopy(base)
    load_decoder(shipped, run_dir)
    sets = check_sets(cfg, count)
    start = {k: greedy_objectives(base, *v) for k, v in sets.items()}
    change = shipped_change(start, shipped, sets)
    row: dict[str, Any] = {
        "run": str(run_dir),
        "command": m["command"],
        "git_revision": m["git_revision"],
        "date": m["date"],
        "drift": cfg.drift,
        "seed": cfg.seed,
        "pool_size": cfg.pool_size,
        "pg_epochs": cfg.pg_epochs,
        "rounds_kept": [r["round"] for r in m["rounds"] if r["accepted"]],
        "labels": m["labels_used"],
        "total_s": m["total_s"],
        "check_instances": count,
        "shown_worse": shown_worse(change),
    }
    for part in ("drifted", "undrifted"):
        row[f"{part}_gap_before_pct"] = 100 * m["before"][part]["gap"]
        row[f"{part}_gap_after_pct"] = 100 * m["after"][part]["gap"]
        row[f"change_{part}_pct"] = 100 * change[f"change_{part}"]
        row[f"change_{part}_se_pct"] = 100 * change[f"change_{part}_se"]
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="`lambo finetune --out` directories")
    p.add_argument("--instances", type=int, default=1024, help="fresh drifted and undrifted instances per run")
    p.add_argument("--out", type=Path, required=True, help="JSON to write")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for run_dir in args.runs:
        try:
            rows.append(check_run(run_dir, args.instances))
        except LamboInputError as err:
            raise SystemExit(f"finetune_check: {err}") from None
        print(f"  {run_dir}: shipped vs start {rows[-1]['change_drifted_pct']:+.3f} % drifted", flush=True)
    write_results(args.out, rows, instances=args.instances)
    print_table(rows, COLUMNS, title="lambo finetune runs: held-out gaps (the run's own) and shipped vs start")
    print(f"mean drifted change {np.mean([r['change_drifted_pct'] for r in rows]):+.3f} %; wrote {args.out}")


if __name__ == "__main__":
    main()
