"""`lambo tune`: a Ray Tune sweep of LAMBO pretraining from a tune_configs/*.yaml search space.

    lambo tune --config tune_configs/small.yaml --num-samples 4 --storage runs/tune
    lambo tune --config tune_configs/small.yaml --storage runs/tune --resume     # after Ctrl+C / a crash

A failed trial is retried from its last checkpoint up to ``max_failures`` times (the file's key, or
``--max-failures``; 2 by default), so a lost worker does not end the trial.
Prints the trial table (best first) and the best config; writes ``summary.json`` into the experiment
directory next to Tune's own files. Under `ray job submit` it joins that cluster (RAY_ADDRESS).
Exit status: 0, 1 when no trial reported the metric, 2 on bad input, 130 when interrupted (Ctrl+C:
Tune saves the experiment state first, so ``--resume`` continues it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lambo_ray.errors import LamboInputError
from lambo_ray.flags import DataclassFlags


def add_arguments(p: argparse.ArgumentParser) -> None:
    from lambo_ray.tuning.spec import SweepOverrides

    p.add_argument(
        "--config",
        type=Path,
        required=True,
        metavar="FILE",
        help="search-space file (YAML), e.g. tune_configs/small.yaml; the flags below override its values",
    )
    p.add_argument(
        "--storage",
        type=Path,
        required=True,
        help="directory that holds experiments (Tune's storage_path); the sweep goes to STORAGE/NAME",
    )
    p.add_argument("--name", help="experiment name (default: the config file's name)")
    DataclassFlags(SweepOverrides).add_to(p)
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the experiment STORAGE/NAME: finished trials are kept, interrupted and "
        "errored ones continue from their last checkpoint, pending ones start",
    )
    p.add_argument("--num-cpus", type=int, help="CPUs of the embedded local Ray (ignored with RAY_ADDRESS)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    p.add_argument("--quiet", action="store_true", help="no Tune progress output")


def run(args: argparse.Namespace) -> int:
    from lambo_ray.runtime import init_ray
    from lambo_ray.tuning import (
        SPEC_FILE,
        SUMMARY_FILE,
        check_experiment,
        experiment_dir,
        format_table,
        load_tune_spec,
        run_sweep,
        summarize,
    )
    from lambo_ray.tuning.spec import SweepOverrides

    spec = load_tune_spec(args.config)  # checked before Ray starts: bad files fail in a second
    overrides = SweepOverrides(**DataclassFlags(SweepOverrides).values(args))
    name = args.name or spec.name
    exp = experiment_dir(args.storage, name)
    check_experiment(exp, resume=args.resume)
    if args.resume:
        stored = exp / SPEC_FILE
        if stored.exists() and stored.read_text() != spec.source:
            raise LamboInputError(
                f"{args.config} differs from the spec this experiment was started with "
                f"({stored}); a resume continues the stored one",
                where="--config",
            )
        if overrides != SweepOverrides():
            print(
                "lambo tune: --resume keeps the experiment's own --num-samples / --max-concurrent / --max-failures",
                file=sys.stderr,
            )
    else:
        spec = spec.with_overrides(overrides)

    init_ray(num_cpus=args.num_cpus)
    results = run_sweep(spec, args.storage, name=name, resume=args.resume, verbose=0 if args.quiet else 1)
    summary = summarize(results, spec)
    (exp / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(format_table(summary, [p.name for p in spec.params]))
        best = summary["best"]
        if best is None:
            print(f"\nno trial reported {spec.metric}", file=sys.stderr)
        else:
            print(
                f"\nbest trial {best['trial_id']}: {spec.metric} = {best['best']:.4g} with "
                + ", ".join(f"{k}={v}" for k, v in best["params"].items())
            )
            if best["checkpoint"]:
                print(
                    f"best checkpoint: {best['checkpoint']}  (a `lambo pretrain` run directory: "
                    "policy/, rllib/, state.json)"
                )
        print(f"experiment: {exp}")
    if summary["unfinished"]:  # Tune ends early only when interrupted (Ctrl+C / SIGUSR1)
        print(
            f"lambo tune: interrupted with {summary['unfinished']} trial(s) unfinished; continue with the "
            "same command plus --resume",
            file=sys.stderr,
        )
        return 130
    return 1 if summary["best"] is None else 0
