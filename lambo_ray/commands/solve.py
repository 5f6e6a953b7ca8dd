"""`lambo solve`: decide every instance of a file with one method; decisions + a summary table."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from lambo_ray.errors import LamboInputError
from lambo_ray.mec.instance import PROMPTS, Decision, Instance
from lambo_ray.mec.io import read_instances, write_decisions
from lambo_ray.results import print_table

METHODS = (
    "exact",
    "de",
    "droo",
    "are",
    "greedy",
    "local_search",
    "all_local",
    "all_offload",
    "brute_force",
    "lambo",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--prompt", required=True, help=f"one of {', '.join(PROMPTS)}")
    p.add_argument("--in", dest="inp", type=Path, required=True, help="instances .jsonl")
    p.add_argument("--out", type=Path, required=True, help="decisions .jsonl (same order)")
    p.add_argument("--time-limit", type=float, default=None, help="seconds per instance (exact, de)")
    p.add_argument("--seed", type=int, default=0, help="seed of stochastic methods")
    p.add_argument("--checkpoint", type=Path, help="lambo: pretrained checkpoint directory; droo/are: a saved expert")
    p.add_argument("--decoder", type=Path, help="lambo: decoder-only checkpoint (from `lambo finetune`)")
    p.add_argument("--decode", default="greedy", help="lambo: decode mode (greedy, sample, best_of_k, refine)")
    p.add_argument("--k", type=int, default=16, help="lambo best_of_k: samples per instance")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def solve_all(
    method: str,
    instances: list[Instance],
    prompt: str,
    *,
    time_limit: float | None = None,
    seed: int = 0,
    checkpoint: Path | None = None,
    decoder: Path | None = None,
    decode: str = "greedy",
    k: int = 16,
    progress: bool = True,
) -> list[Decision]:
    """Decisions of one method for a list of instances (the function benchmarks and the report reuse)."""
    if method == "lambo":
        return _solve_lambo(instances, prompt, checkpoint, decoder, decode, k, seed)
    from lambo_ray.experts import get_expert

    kwargs = {"seed": seed} if method in ("de", "droo", "are", "all_offload") else {}
    if method in ("droo", "are") and checkpoint is not None:
        kwargs["checkpoint"] = checkpoint  # a saved online expert (`save(path)`) instead of a fresh warm-up
    expert = get_expert(method, **kwargs)
    iterator = instances
    if progress:
        from rich.progress import track

        iterator = track(instances, description=f"{method} {prompt}", transient=True)
    return [expert.solve(inst, prompt, time_limit) for inst in iterator]


def _solve_lambo(instances, prompt, checkpoint, decoder, decode, k, seed) -> list[Decision]:
    if checkpoint is None:
        raise LamboInputError("--method lambo needs --checkpoint DIR (from `lambo pretrain`)")
    from lambo_ray.policy.checkpoint import load_decoder, load_policy, resolve_policy_dir
    from lambo_ray.policy.decoding import decide

    policy, _ = load_policy(resolve_policy_dir(checkpoint))
    if decoder is not None:
        load_decoder(policy, decoder)
    return decide(policy, instances, prompt, mode=decode, k=k, seed=seed)


def summarize(decisions: list[Decision]) -> dict:
    objs = np.array([d.objective for d in decisions], dtype=float)
    feas = np.array([bool(d.stats.get("feasible", True)) for d in decisions])
    wall = np.array([float(d.stats.get("wall_s", np.nan)) for d in decisions])
    row = {
        "method": decisions[0].method,
        "prompt": decisions[0].prompt,
        "instances": len(decisions),
        "mean_objective": float(np.nanmean(objs)),
        "feasible_rate": float(feas.mean()),
        "mean_wall_s": float(np.nanmean(wall)),
        "p95_wall_s": float(np.nanpercentile(wall, 95)),
    }
    gaps = [d.stats.get("gap") for d in decisions if d.stats.get("gap") is not None]
    if gaps:
        row["max_certified_gap"] = float(np.max(gaps))
        row["proven_optimal"] = int(sum(bool(d.stats.get("proven_optimal")) for d in decisions))
    return row


def run(args: argparse.Namespace) -> int:
    if args.prompt not in PROMPTS:
        raise LamboInputError(f"unknown prompt {args.prompt!r}; expected one of {', '.join(PROMPTS)}", where="--prompt")
    if args.time_limit is not None and not args.time_limit > 0:
        raise LamboInputError(f"--time-limit must be > 0 (got {args.time_limit})")
    instances = read_instances(args.inp)
    start = time.perf_counter()
    decisions = solve_all(
        args.method,
        instances,
        args.prompt,
        time_limit=args.time_limit,
        seed=args.seed,
        checkpoint=args.checkpoint,
        decoder=args.decoder,
        decode=args.decode,
        k=args.k,
        progress=not args.quiet,
    )
    write_decisions(args.out, decisions)
    row = summarize(decisions)
    print_table([row], title=f"lambo solve ({time.perf_counter() - start:.1f} s) -> {args.out}")
    return 0
