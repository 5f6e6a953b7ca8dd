"""Search benchmark: is LAMBO worth serving on the paper cell, and is every decision feasible?

Part 1, quality and time: ``--count`` held-out paper instances (N = 50, M = 4; seeds from 75 004, never
used in training or tuning), both prompts, in one run: LAMBO greedy, best_of_k, search (k samples and
the greedy heuristic's decision polished by local search, then perturbation rounds, with a time budget)
and search without the heuristic start (what the policy alone earns), against local search, greedy, DE
and the exact expert (whose objective, or certified bound, is the reference). Part 2, feasibility:
``--feasibility-count`` instances of the ``deadline`` drift and as many with the deadline factor in
[0.6, 1.3] (many UEs must offload), every LAMBO decode mode and both heuristics: decisions that are
infeasible although a feasible one exists (an exact packing of the must-offload UEs says so).

It reuses the generalization benchmark's machinery (runners, per-instance result cache, exact reference
cache), so references computed once serve both.

    python benchmarks/search.py --checkpoint DIR             # 200 + 2 x 200 instances
    python benchmarks/search.py --count 8 --feasibility-count 16 --out /tmp/s.json   # smoke run

Writes benchmarks/results/search.json (command, git revision, machine, date) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import generalization as G  # noqa: E402  (the sibling benchmark script)

from lambo_ray.errors import LamboInputError  # noqa: E402
from lambo_ray.mec.drift import apply_drift  # noqa: E402
from lambo_ray.mec.evaluator import evaluate  # noqa: E402
from lambo_ray.mec.generator import generate_many  # noqa: E402
from lambo_ray.mec.instance import PROMPTS  # noqa: E402
from lambo_ray.mec.packing import pack_must_offload  # noqa: E402
from lambo_ray.mec.scenario import PAPER  # noqa: E402
from lambo_ray.references import ReferenceCache  # noqa: E402
from lambo_ray.results import print_table, write_results  # noqa: E402
from lambo_ray.runtime import limit_compute_threads  # noqa: E402

SEED = 70_000  # the paper cell's instances: seed 70_000 + 100 * 50 + 4
FEASIBILITY_SEED = 90_000
FEASIBILITY_SETS = {
    "deadline drift": apply_drift(PAPER, "deadline"),
    "deadline factor 0.6-1.3": PAPER.replace(deadline_factor=(0.6, 1.3)),
}
FEASIBILITY_METHODS = ("lambo_greedy", "lambo_best_of_k", "lambo_refine", "lambo_search", "local_search", "greedy")


def feasibility_rows(
    policy: Any, settings: G.DecodeSettings, count: int, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Per set, prompt and method: infeasible decisions, and those infeasible where a feasible one exists."""
    G.LAMBO_MODES.setdefault("lambo_refine", ("refine", True))
    rows = []
    for offset, (name, scenario) in enumerate(FEASIBILITY_SETS.items()):
        instances = generate_many(scenario, count, FEASIBILITY_SEED + 1_000 * offset)
        exists = [pack_must_offload(inst).feasible for inst in instances]
        must = float(np.mean([(~inst.local_feasible()).mean() for inst in instances]))
        for prompt in PROMPTS:
            for method in FEASIBILITY_METHODS:
                runner = G.make_runner(method, policy, settings)
                feasible = [evaluate(i, *_decision(runner(i, prompt))).feasible for i in instances]
                bad = sum(1 for f, e in zip(feasible, exists) if e and not f)
                rows.append(
                    {
                        "set": name,
                        "prompt": prompt,
                        "method": method,
                        "instances": count,
                        "must_offload_share": must,
                        "feasible_exists": int(sum(exists)),
                        "infeasible": int(sum(not f for f in feasible)),
                        "infeasible_where_feasible_exists": bad,
                    }
                )
                log(f"  feasibility {name:24s} {prompt:11s} {method:16s} infeasible {rows[-1]['infeasible']}")
    return rows


def _decision(d: Any) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(d.target), np.asarray(d.share)


def targets(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each marked pass / FAIL from this run's rows."""
    by = {(r["prompt"], r["method"]): r for r in rows}
    out = []
    for prompt in PROMPTS:
        s, nh, g = (
            by.get((prompt, "lambo_search")),
            by.get((prompt, "lambo_search_noheur")),
            by.get((prompt, "lambo_greedy")),
        )
        ls, de = by.get((prompt, "local_search")), by.get((prompt, "de"))
        if not (s and nh and g and ls and de):
            continue
        checks = [
            ("search gap <= 0.01%", s["gap_pct"] <= 0.01),
            ("search gap < local search and DE", s["gap_pct"] < min(ls["gap_pct"], de["gap_pct"])),
            ("search time <= 1/10 of DE", s["decision_ms"] <= de["decision_ms"] / 10),
            ("search without heuristic start < local search", nh["gap_pct"] < ls["gap_pct"]),
            ("greedy gap <= 1%", g["gap_pct"] <= 1.0),
        ]
        out += [{"prompt": prompt, "target": t, "result": "pass" if ok else "FAIL"} for t, ok in checks]
    return out


LABELS = {
    "exact": "exact (reference)",
    "lambo_greedy": "LAMBO-S greedy",
    "lambo_best_of_k": "LAMBO-S best-of-k",
    "lambo_search": "**LAMBO-S search**",
    "lambo_search_noheur": "LAMBO-S search, no heuristic start",
    "local_search": "local search",
    "greedy": "greedy heuristic",
    "de": "DE",
}


def _budget(seconds: float | None) -> str:
    return "none (exact polish capped at 0.2 s)" if seconds is None else f"{1e3 * seconds:g} ms"


def readme_tables(doc: dict) -> str:
    """The README's tables of a results file: gap (max) and ms per method and prompt, then the targets."""
    by = {(r["prompt"], r["method"]): r for r in doc["rows"]}
    lines = [
        f"`{doc['command']}` (git {doc['git_revision']}, {doc['date'][:10]}, {doc['machine']}; k = "
        f"{doc['settings']['k']}, search budget {_budget(doc['settings']['search_budget_s'])}):",
        "",
        "| method | min_latency gap % (max) | ms | budget hits | min_energy gap % (max) | ms | budget hits |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, label in LABELS.items():
        cells = []
        for prompt in PROMPTS:
            r = by.get((prompt, method))
            if r is None:
                cells += ["-", "-", "-"]
                continue
            cells += [f"{r['gap_pct']:.4f} ({r['gap_max_pct']:.2f})", f"{r['decision_ms']:.0f}", str(r["budget_hits"])]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| prompt | target | result |", "|---|---|---|"]
    lines += [f"| {t['prompt']} | {t['target']} | {t['result']} |" for t in doc["targets"]]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, help="LAMBO policy checkpoint (default: the shipped model)")
    p.add_argument("--count", type=int, default=200, help="held-out paper instances")
    p.add_argument("--feasibility-count", type=int, default=200, help="instances per feasibility set")
    p.add_argument("--k", type=int, default=8, help="LAMBO best_of_k and search: samples per instance")
    p.add_argument(
        "--search-budget",
        type=float,
        default=0.1,
        help="LAMBO search: polishing seconds per instance; 0 = none (the CLI default: the min_energy exact "
        "polish is then capped at 0.2 s)",
    )
    p.add_argument("--decode-seed", type=int, default=0, help="seed of LAMBO's sampling and of DE")
    p.add_argument("--exact-time-limit", type=float, default=60.0, help="seconds per exact solve")
    p.add_argument("--cache", type=Path, default=Path("benchmarks/cache/references.jsonl"), help="exact references")
    p.add_argument("--runs-cache", type=Path, default=Path("benchmarks/cache/search_runs.jsonl"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/search.json"))
    p.add_argument("--markdown", type=Path, help="print the README tables of a results file and exit")
    args = p.parse_args(argv)
    if args.count < 1 or args.feasibility_count < 1 or args.k < 1:
        raise LamboInputError("--count, --feasibility-count and --k must be >= 1")
    if not (args.search_budget >= 0 and math.isfinite(args.search_budget)):
        raise LamboInputError(f"--search-budget must be >= 0 seconds (got {args.search_budget})")
    args.search_budget = args.search_budget or None
    args.prompts, args.methods = list(PROMPTS), list(G.METHODS)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.markdown is not None:
        print(readme_tables(json.loads(args.markdown.read_text())))
        return 0
    limit_compute_threads(1)  # decision times comparable with the single-threaded baselines
    lambo = G.load_lambo(args.checkpoint)
    cache = ReferenceCache(args.cache, args.exact_time_limit)
    cell = G.Cell("paper N50-M4", 50, 4, None, SEED + 100 * 50 + 4)
    rows = G.benchmark_rows([cell], args, cache, {}, lambo, log=print)
    settings = G.DecodeSettings(args.k, args.search_budget, args.decode_seed)
    feas = feasibility_rows(lambo[0], settings, args.feasibility_count, log=print)
    marks = targets(rows)
    print_table(rows, ["prompt", "method", "gap_pct", "gap_max_pct", "feasible_rate", "decision_ms", "budget_hits"])
    print_table(feas, ["set", "prompt", "method", "infeasible", "infeasible_where_feasible_exists", "feasible_exists"])
    print_table(marks, ["prompt", "target", "result"])
    write_results(
        args.out,
        rows,
        feasibility=feas,
        targets=marks,
        policy=lambo[1],
        settings={"k": args.k, "search_budget_s": args.search_budget, "exact_time_limit_s": args.exact_time_limit},
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LamboInputError as err:
        print(f"benchmarks/search.py: error: {err}", file=sys.stderr)
        sys.exit(2)
