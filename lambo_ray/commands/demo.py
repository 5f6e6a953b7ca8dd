"""`lambo demo`: the whole small pipeline on an embedded local Ray, in about 10 minutes on 2 cores.

Each step is the same code path as the sub-command it names (the commands are printed, so every
step can be re-run by hand):

1. ``lambo generate``   held-out instances of the paper scenario and of a drifted one
2. ``lambo pretrain``   a small (S) policy: supervised warm start on expert labels (exact for
                        ``min_energy``, local search for ``min_latency``), then ACRL iterations on
                        RLlib (2 env runners)
3. ``lambo finetune``   ALEF under the drift: entropy query, a pool of 2 exact-expert actors,
                        decoder-only updates
4. ``lambo report``     every method (exact, LAMBO, local search, greedy, DE, DROO, ARE, all-local,
                        all-offload) on the held-out set, both prompts, and LAMBO before/after ALEF
                        under the drift; comparison table, Fig. 5/6-style plots, JSON
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

from lambo_ray.errors import LamboInputError
from lambo_ray.mec.drift import DRIFTS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory")
    p.add_argument("--drift", default="outage", choices=list(DRIFTS), help="drift for fine-tuning")
    p.add_argument("--count", type=int, default=10, help="held-out instances per prompt in the report")
    p.add_argument("--iterations", type=int, default=3, help="ACRL iterations after the warm start")
    p.add_argument("--warm-start-labels", type=int, default=384, help="expert labels for the warm start")
    p.add_argument("--budget", type=int, default=24, help="ALEF expert labels")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="a seconds-long smoke run on N=6, M=2 instances (what the tests use)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory's runs")


def _step(title: str, argv: list[str]) -> None:
    from lambo_ray.commands import build_parser, command_module

    print(f"\n=== {title}\n$ lambo {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    args = build_parser(argv[0]).parse_args(argv)
    code = command_module(argv[0]).run(args)
    if code:
        raise LamboInputError(f"step '{title}' failed with exit code {code}")
    print(f"--- {title}: {time.perf_counter() - start:.0f} s", flush=True)


def _flags(**values: object) -> list[str]:
    """``--key value`` pairs (underscores become dashes; a list value gives several arguments)."""
    out: list[str] = []
    for key, value in values.items():
        out.append("--" + key.replace("_", "-"))
        out += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    return out


def _settings(args: argparse.Namespace) -> dict[str, list[str]]:
    """Arguments of each step: the seconds-long smoke run (``--tiny``) or the ~10-minute demo."""
    runners = {"num_env_runners": 2, "num_envs_per_env_runner": 2}
    if args.tiny:
        return {
            "scenario": _flags(n_ues=6, n_servers=2),
            "pretrain": _flags(
                iterations=2,
                **runners,
                instances_per_episode=16,
                train_batch_size=64,
                minibatch_size=32,
                val_size=4,
                warm_start_labels=32,
                warm_start_epochs=5,
            ),
            "finetune": _flags(budget=6, rounds=2, pool_size=8, n_replay=4, heldout=4, experts=2, time_limit=5),
            "report": _flags(count=3, drift_count=3, exact_time_limit=10),
        }
    return {
        "scenario": [],
        "pretrain": _flags(
            iterations=args.iterations,
            **runners,
            instances_per_episode=32,
            train_batch_size=128,
            minibatch_size=64,
            val_size=8,
            warm_start_labels=args.warm_start_labels,
            warm_start_epochs=20,
            warm_start_prompts=["min_energy", "min_latency"],
        ),
        "finetune": _flags(
            budget=args.budget, rounds=2, pool_size=24, n_replay=12, heldout=8, experts=2, time_limit=10
        ),
        "report": _flags(count=args.count, drift_count=max(4, args.count // 2), exact_time_limit=30),
    }


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    pretrain_dir, decoder_dir = out / "pretrain", out / f"decoder_{args.drift}"
    if not args.overwrite:
        for d in (pretrain_dir, decoder_dir):
            if d.exists():
                raise LamboInputError(f"{d} exists from an earlier run; pass --overwrite or another --out")
    start = time.perf_counter()
    from lambo_ray.runtime import init_ray

    init_ray(num_cpus=2)
    opts = _settings(args)
    scen, rep = opts["scenario"], opts["report"]
    overwrite = ["--overwrite"] if args.overwrite else []
    _step(
        "1/4 generate held-out instances of the paper scenario",
        ["generate", "--count", rep[1], "--seed", "5000", "--out", str(out / "heldout.jsonl"), *scen],
    )
    if pretrain_dir.exists():
        import shutil

        shutil.rmtree(pretrain_dir)
    _step(
        "2/4 pretrain LAMBO-S (warm start + ACRL on RLlib)",
        ["pretrain", "--scale", "S", "--out", str(pretrain_dir), "--quiet", *opts["pretrain"], *scen],
    )
    _step(
        f"3/4 ALEF fine-tuning under drift '{args.drift}'",
        ["finetune", "--checkpoint", str(pretrain_dir), "--drift", args.drift, "--query", "entropy"]
        + ["--out", str(decoder_dir), *opts["finetune"], *overwrite, *scen],
    )
    _step(
        "4/4 report: every method, both prompts, drift before/after ALEF",
        ["report", "--out", str(out / "report"), "--checkpoint", str(pretrain_dir), "--sections", "comparison"]
        + ["drift", "--instances", str(out / "heldout.jsonl"), "--decoders", f"{args.drift}={decoder_dir}"]
        + [*rep, "--drifts", args.drift, *scen],
    )
    print(
        f"\nDemo finished in {time.perf_counter() - start:.0f} s. Report: {out / 'report' / 'report.md'}; "
        f"plots: {out / 'report'}/*.png"
    )
    return 0
