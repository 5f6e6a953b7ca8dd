"""`lambo solve`: decide every instance of a file with one method, streaming and crash-safe.

The input is checked in one pass first (a bad line is exit 2 before any work), then read again one
instance at a time; every decision is appended to a part file and fsynced as soon as it is made, and
the part file becomes ``--out`` (atomic rename) after the last one. A run killed midway continues
with ``--resume``: it keeps what is on disk, skips those instances and produces the same file as an
uninterrupted run (same targets, shares, objectives and methods; the wall times in ``stats`` are those
of the runs that made each decision). Resuming with other parameters than the interrupted run's
(method, prompt, input contents, time limit, seed, checkpoint, decoding) is refused.

"The same file" holds for deterministic methods: all of them for a fixed ``--seed``, except that a
method which stops at ``--time-limit`` (exact, DE) or ``--time-budget-ms`` returns what it had found
by then, which depends on the machine's speed. The online learners (droo, are) replay the instances
already decided to rebuild their memory before they continue.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from lambo_ray.flags import LazyChoices
from lambo_ray.mec.instance import PROMPTS, Decision
from lambo_ray.mec.io import file_digest, iter_decisions, iter_instances
from lambo_ray.mec.journal import DecisionJournal
from lambo_ray.results import print_table
from lambo_ray.solving import METHODS, SolveOptions, Solver, make_solver, solve_stream


def _decode_strategies() -> list[str]:
    from lambo_ray.policy.decoding import available_strategies

    return list(available_strategies())


def add_arguments(p: argparse.ArgumentParser) -> None:
    methods = "; ".join(f"{m.name}: {m.help}" for m in METHODS.values())
    p.add_argument("--method", required=True, choices=list(METHODS), metavar="METHOD", help=methods)
    p.add_argument("--prompt", required=True, choices=PROMPTS, help="the objective to minimise")
    p.add_argument("--in", dest="inp", type=Path, required=True, metavar="FILE", help="instances .jsonl")
    p.add_argument("--out", type=Path, required=True, help="decisions .jsonl, in the order of the instances")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run of the same command (its decisions so far are kept)",
    )
    p.add_argument("--time-limit", type=float, default=None, help="seconds per instance (exact, de)")
    p.add_argument("--seed", type=int, default=0, help="seed of the stochastic methods (de, droo, are, lambo, ...)")
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="lambo: pretrained checkpoint directory (default: the shipped LAMBO-S); droo/are: a saved expert",
    )
    p.add_argument("--decoder", type=Path, help="lambo: decoder-only checkpoint (from `lambo finetune`)")
    p.add_argument(
        "--decode",
        default="greedy",
        choices=LazyChoices(_decode_strategies),
        metavar="STRATEGY",
        help="lambo: decoding strategy, one of %(choices)s",
    )
    p.add_argument("--k", type=int, default=16, help="lambo: samples per instance of the sampling strategies")
    p.add_argument(
        "--time-budget-ms",
        type=float,
        default=None,
        metavar="FLOAT",
        help="lambo: wall-time cap per instance on the polishing of the refine and search strategies",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def options_from_args(args: argparse.Namespace) -> SolveOptions:
    return SolveOptions(
        method=args.method,
        prompt=args.prompt,
        time_limit=args.time_limit,
        seed=args.seed,
        checkpoint=None if args.checkpoint is None else str(args.checkpoint),
        decoder=None if args.decoder is None else str(args.decoder),
        decode=args.decode,
        k=args.k,
        time_budget_ms=args.time_budget_ms,
    )


def summarize(decisions: Iterable[Decision]) -> dict:
    """One table row over a stream of decisions (only a few numbers per decision are kept)."""
    objs, feas, wall, gaps, proven = [], [], [], [], 0
    method = prompt = None
    for d in decisions:
        method, prompt = d.method, d.prompt
        objs.append(np.nan if d.objective is None else d.objective)
        feas.append(bool(d.stats.get("feasible", True)))
        wall.append(float(d.stats.get("wall_s", np.nan)))
        if d.stats.get("gap") is not None:
            gaps.append(float(d.stats["gap"]))
            proven += bool(d.stats.get("proven_optimal"))
    row = {
        "method": method,
        "prompt": prompt,
        "instances": len(objs),
        "mean_objective": float(np.nanmean(objs)),
        "feasible_rate": float(np.mean(feas)),
        "mean_wall_s": float(np.nanmean(wall)),
        "p95_wall_s": float(np.nanpercentile(wall, 95)),
    }
    if gaps:
        row["max_certified_gap"] = float(np.max(gaps))
        row["proven_optimal"] = proven
    return row


def run(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    count = sum(1 for _ in iter_instances(args.inp))  # the whole file is checked before any work
    solver = make_solver(opts)  # a bad checkpoint or option fails here, before anything is written
    record = {**opts.record(), "input_path": str(args.inp.resolve()), "input_sha256": file_digest(args.inp)}
    record["instances"] = count
    journal = DecisionJournal.open(args.out, record, resume=args.resume, align=opts.batch)
    start = time.perf_counter()
    try:
        if args.resume:
            done = f"resuming after {journal.done} of {count} decisions" if journal.done else "nothing to resume"
            print(f"lambo solve: {done}", file=sys.stderr)
        _solve_rest(opts, solver, args.inp, journal, count, progress=not args.quiet)
        journal.commit()
    finally:
        journal.close()
    row = summarize(iter_decisions(args.out))
    print_table([row], title=f"lambo solve ({time.perf_counter() - start:.1f} s) -> {args.out}")
    return 0


def _solve_rest(
    opts: SolveOptions, solver: Solver, inp: Path, journal: DecisionJournal, count: int, *, progress: bool
) -> None:
    """Decide the instances after the ``journal.done`` already on disk, appending each decision."""
    if journal.done >= count:
        return
    if METHODS[opts.method].online and journal.done:
        for _ in solve_stream(solver, itertools.islice(iter_instances(inp), journal.done), opts.batch):
            pass  # the online learners rebuild their memory from the instances they saw before the crash
    stream = solve_stream(solver, iter_instances(inp, start=journal.done), opts.batch)
    if progress:
        from rich.progress import track

        stream = track(stream, total=count - journal.done, description=f"{opts.method} {opts.prompt}", transient=True)
    for decision in stream:
        journal.append(decision)
