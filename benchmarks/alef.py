"""ALEF benchmark: decoder fine-tuning under every drift scenario, entropy query vs random query.

Per drift: greedy gap to the expert on held-out drifted instances before fine-tuning, after
fine-tuning with the entropy query and with the random query at the same label budget, labels
used, the gap on held-out *undrifted* instances before/after (forgetting), and the wall time of
the entropy run with 1 and with 2 expert actors (same seeds, so both runs give the same decoder
whenever no label hits the time limit: the benchmark reports whether they did; with time-limited
labels, which of exact's incumbent and DE wins can depend on timing). Reference labels (held-out
sets, replay set) are labelled once per drift and shared by all runs of that drift. Prints a table,
writes benchmarks/results/alef.json.

    python benchmarks/alef.py --checkpoint runs/pretrain            # full (paper scenario)
    python benchmarks/alef.py --quick                                # untrained S policy, tiny cells

Cost of the full run on 2 cores: dominated by exact ``min_latency`` labels at N = 50 (seconds
each, capped by ``--time-limit``); about (2 n_heldout + n_replay + 4 budget) labels per drift.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from lambo_ray.alef.expert_pool import ExpertPool
from lambo_ray.alef.finetune import AlefConfig, AlefResult, References, prepare_references, run_alef
from lambo_ray.mec.drift import DRIFTS
from lambo_ray.mec.scenario import ScenarioConfig, default_capacities
from lambo_ray.results import print_table, write_results
from lambo_ray.runtime import init_ray


def load_base_policy(checkpoint: Path | None, seed: int) -> tuple[torch.nn.Module, str]:
    if checkpoint is not None:
        from lambo_ray.policy.checkpoint import load_policy, resolve_policy_dir

        policy, _ = load_policy(resolve_policy_dir(checkpoint))
        return policy, str(checkpoint)
    from lambo_ray.policy import LamboPolicy, scale_config

    torch.manual_seed(seed)
    return LamboPolicy(scale_config("S")).eval(), "untrained S policy (no --checkpoint)"


def base_config(args: argparse.Namespace) -> AlefConfig:
    if args.quick:
        scenario = ScenarioConfig(n_ues=10, n_servers=2, capacities_cps=default_capacities(2))
        sizes = dict(rounds=2, pool_size=16, budget=16, n_heldout=8, n_replay=4, epochs=4, batch_size=8)
    else:
        scenario = ScenarioConfig()
        sizes = dict(
            rounds=args.rounds,
            pool_size=args.pool_size,
            budget=args.budget,
            n_heldout=args.heldout,
            n_replay=args.n_replay,
            epochs=args.epochs,
            batch_size=16,
        )
    return AlefConfig(
        drift="outage",
        prompts=tuple(args.prompts),
        query="entropy",
        experts=2,
        label_time_limit=args.time_limit,
        lr=args.lr,
        seed=args.seed,
        scenario=scenario,
        **sizes,
    )


def fine_tune(base: torch.nn.Module, cfg: AlefConfig, pool: ExpertPool, refs: References) -> AlefResult:
    policy = copy.deepcopy(base)  # every run starts from the same pretrained weights
    start = time.perf_counter()
    res = run_alef(policy, cfg, pool, references=refs)
    res.wall_s = time.perf_counter() - start
    return res


def summarise(drift: str, refs: References, runs: dict[str, AlefResult], actors: list[int]) -> dict[str, Any]:
    main_n = max(actors)
    ent, rnd = runs[f"entropy@{main_n}"], runs[f"random@{main_n}"]
    row: dict[str, Any] = {
        "drift": drift,
        "gap_before": ent.before["drifted"]["gap"],
        "gap_entropy": ent.after["drifted"]["gap"],
        "gap_random": rnd.after["drifted"]["gap"],
        "feasible_before": ent.before["drifted"]["feasible"],
        "feasible_entropy": ent.after["drifted"]["feasible"],
        "feasible_random": rnd.after["drifted"]["feasible"],
        "labels_entropy": ent.labels_used,
        "labels_random": rnd.labels_used,
        "undrifted_gap_before": ent.before["undrifted"]["gap"],
        "undrifted_gap_entropy": ent.after["undrifted"]["gap"],
        "undrifted_gap_random": rnd.after["undrifted"]["gap"],
        "reference_label_s": refs.label_s,
        "reference_sources": refs.sources(),
        "query_sources": {
            k: sum(r.label_sources.get(k, 0) for r in ent.rounds) for k in ("exact", "exact_time_limit", "de")
        },
    }
    for n in sorted(set(actors)):
        r = runs[f"entropy@{n}"]
        row[f"wall_s_{n}_actors"] = r.wall_s
        row[f"label_s_{n}_actors"] = sum(x.label_s for x in r.rounds)
        if n != main_n:
            # Same seeds and deterministic labels: any number of actors must train the same decoder.
            row[f"same_result_{n}_vs_{main_n}"] = r.after == ent.after
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, help="pretrained policy (DIR or DIR/policy); default: untrained S")
    p.add_argument("--quick", action="store_true", help="tiny cells and budgets (minutes on 2 cores)")
    p.add_argument("--drifts", nargs="+", default=list(DRIFTS), choices=list(DRIFTS))
    p.add_argument("--prompts", nargs="+", default=["min_latency", "min_energy"])
    p.add_argument("--budget", type=int, default=96)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pool-size", type=int, default=48)
    p.add_argument("--heldout", type=int, default=24)
    p.add_argument("--n-replay", type=int, default=16)
    p.add_argument("--epochs", type=int, default=AlefConfig.epochs)
    p.add_argument("--lr", type=float, default=AlefConfig.lr)
    p.add_argument("--time-limit", type=float, default=10.0, help="seconds per label (exact, then DE)")
    p.add_argument("--actors", nargs="+", type=int, default=[2, 1], help="expert actor counts to time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/alef.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    base, source = load_base_policy(args.checkpoint, args.seed)
    cfg0 = base_config(args)
    init_ray()
    configs = {d: dataclasses.replace(cfg0, drift=d) for d in args.drifts}
    refs: dict[str, References] = {}
    runs: dict[str, dict[str, AlefResult]] = {d: {} for d in args.drifts}
    main_actors = max(args.actors)
    for n_actors in sorted(set(args.actors), reverse=True):
        with ExpertPool(n_actors, time_limit=cfg0.label_time_limit) as pool:
            pool.warm_up()
            for drift, cfg in configs.items():
                cfg = dataclasses.replace(cfg, experts=n_actors)
                if drift not in refs:
                    refs[drift] = prepare_references(cfg, pool)
                queries = ("entropy", "random") if n_actors == main_actors else ("entropy",)
                for q in queries:
                    res = fine_tune(base, dataclasses.replace(cfg, query=q), pool, refs[drift])
                    runs[drift][f"{q}@{n_actors}"] = res
                    print(
                        f"  {drift:9s} {q:7s} {n_actors} actor(s): gap {res.before['drifted']['gap']:.4f} -> "
                        f"{res.after['drifted']['gap']:.4f}, {res.labels_used} labels, {res.wall_s:.1f} s",
                        flush=True,
                    )
    rows = [summarise(d, refs[d], runs[d], args.actors) for d in args.drifts]
    columns = [
        "drift",
        "gap_before",
        "gap_entropy",
        "gap_random",
        "labels_entropy",
        "undrifted_gap_before",
        "undrifted_gap_entropy",
        "undrifted_gap_random",
        *[f"wall_s_{n}_actors" for n in sorted(set(args.actors))],
        *[f"same_result_{n}_vs_{main_actors}" for n in sorted(set(args.actors)) if n != main_actors],
    ]
    print_table(rows, columns, title=f"ALEF on {source}: greedy gap to the expert before / after fine-tuning")
    write_results(
        args.out,
        rows,
        policy=source,
        config=cfg0.to_dict(),
        quick=args.quick,
        actors=args.actors,
        runs={d: {k: r.to_dict() for k, r in rs.items()} for d, rs in runs.items()},
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
