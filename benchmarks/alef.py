"""ALEF benchmark: decoder fine-tuning under every drift and both prompts, query strategies compared at
equal labels over several seeds.

For every drift x prompt x seed: the reference sets (held-out drifted and undrifted instances, the
pre-drift replay set) are labelled once and shared by the runs of every query strategy, each of which
starts from the same pretrained weights and buys the same number of labels. Per drift x prompt x
strategy the table shows mean and 95 % confidence interval (Student t over seeds) of the greedy gap
to the expert on held-out drifted instances before and after fine-tuning, the undrifted gap before
and after (forgetting), labels spent, skipped labels and how many rounds the gate kept. Per drift x
prompt, every strategy is compared with ``random`` on the same seeds (paired difference of the gap
after). Each run's shipped decoder is also compared with the one it started from on
``--check-instances`` fresh drifted and undrifted instances (paired change of the greedy objective,
no labels: the labelled held-out sets are small and per-instance changes heavy-tailed), with how many
runs it shows worse. Prints the tables and writes the JSON (command, git revision, machine, date, every run).

    python benchmarks/alef.py                                        # full: shipped LAMBO-S, paper scenario
    python benchmarks/alef.py --checkpoint runs/pretrain --resume    # another policy; skip runs already written
    python benchmarks/alef.py --quick                                # smoke: tiny cells, a few minutes
    python benchmarks/alef.py --markdown RESULTS.json [...]          # the README table of result files
    python benchmarks/alef.py --merge OUT.json A.json B.json [...]  # one table from invocations with equal settings

``--quick`` writes ``runs/benchmarks/alef_quick.json`` (not the committed results file). The JSON is
rewritten after every run, so a long benchmark that is stopped keeps what it finished; ``--resume``
reads it back and runs only what is missing (same settings required: they are compared). Cost of the
full run on 2 cores: dominated by exact ``min_latency`` labels at N = 50 (seconds each, capped by
``--time-limit``): about (2 heldout + replay) labels per drift x prompt x seed plus budget per run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lambo_ray.alef.config import AlefConfig, make_pool, run_seeds
from lambo_ray.alef.environment import cycle_prompts, snapshot_set
from lambo_ray.alef.finetune import AlefResult, prepare_references, run_alef
from lambo_ray.alef.gate import confidence_z, paired_change
from lambo_ray.alef.online import greedy_objectives
from lambo_ray.alef.query import query_strategies
from lambo_ray.alef.store import with_later_defaults
from lambo_ray.alef.worker import fallback_names
from lambo_ray.flags import DataclassFlags
from lambo_ray.mec.drift import DRIFTS, apply_drift
from lambo_ray.mec.instance import PROMPTS, Instance
from lambo_ray.mec.scenario import ScenarioConfig, default_capacities
from lambo_ray.results import print_table, run_metadata, write_results
from lambo_ray.runtime import init_ray

FULL_OUT = Path("benchmarks/results/alef.json")
QUICK_OUT = Path("runs/benchmarks/alef_quick.json")  # smoke numbers never overwrite the committed ones


def load_base_policy(checkpoint: Path | None, untrained: bool, seed: int) -> tuple[torch.nn.Module, str]:
    if not untrained:
        from lambo_ray.policy.checkpoint import default_checkpoint, load_policy, resolve_policy_dir

        path = checkpoint if checkpoint is not None else default_checkpoint()
        policy, _ = load_policy(resolve_policy_dir(path))
        return policy, str(checkpoint) if checkpoint is not None else f"shipped {path.name}"
    from lambo_ray.policy import LamboPolicy, scale_config

    torch.manual_seed(seed)
    return LamboPolicy(scale_config("S")).eval(), "untrained S policy (no --checkpoint)"


# AlefConfig fields every run takes unchanged from the command line: flag, default and help come from the
# field (lambo finetune's flags are made the same way).
PASSED_THROUGH = (
    "epochs",
    "lr",
    "query_samples",
    "gate_instances",
    "gate_confidence",
    "pg_epochs",
    "pg_lr_scale",
    "label_plan",
    "replay_fraction",
)


def config_flags() -> DataclassFlags:
    return DataclassFlags(
        AlefConfig, exclude=[f.name for f in dataclasses.fields(AlefConfig) if f.name not in PASSED_THROUGH]
    )


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
            batch_size=16,
        )
    common = dict(
        drift="outage",
        prompts=("min_energy",),
        query="entropy",
        experts=args.experts,
        label_time_limit=args.time_limit,
        label_fallbacks=tuple(args.fallbacks),
        scenario=scenario,
    )
    return AlefConfig(**{**common, **config_flags().values(args), **sizes})  # --quick's sizes win


def run_row(drift: str, prompt: str, seed: int, query: str, res: AlefResult) -> dict[str, Any]:
    """One fine-tuning run, flattened."""
    sources: Counter[str] = Counter()
    diagnoses: Counter[str] = Counter()
    for r in res.rounds:
        sources.update(r.label_sources)
        if not r.accepted:
            diagnoses[r.gate.get("diagnosis") or "?"] += 1
    return {
        "drift": drift,
        "prompt": prompt,
        "seed": seed,
        "query": query,
        "gap_before": res.before["drifted"]["gap"],
        "gap_after": res.after["drifted"]["gap"],
        "feasible_before": res.before["drifted"]["feasible"],
        "feasible_after": res.after["drifted"]["feasible"],
        "undrifted_gap_before": res.before["undrifted"]["gap"],
        "undrifted_gap_after": res.after["undrifted"]["gap"],
        "labels": res.labels_used,
        "skipped": res.skipped,
        "rounds_kept": sum(r.accepted for r in res.rounds),
        "rounds": len(res.rounds),
        "label_sources": dict(sources),
        "rollback_diagnoses": dict(diagnoses),
        "wall_s": res.wall_s,
    }


def check_sets(cfg: AlefConfig, count: int) -> dict[str, tuple[list[Instance], list[str]]]:
    """Fresh drifted and undrifted instances from a seed of their own (no run sees them), on which the
    decoder a run ships is compared with the one it started from. The held-out sets are labelled and
    so small; per-instance changes are heavy-tailed, and whether a run shipped a worse decoder needs
    no label, only many instances."""
    seed = run_seeds(cfg.seed)["check"]
    prompts = cycle_prompts(cfg.prompts, count)
    return {
        "drifted": (snapshot_set(apply_drift(cfg.scenario, cfg.drift), count, seed), prompts),
        "undrifted": (snapshot_set(cfg.scenario, count, seed + 1), prompts),
    }


def shipped_change(
    start: dict[str, np.ndarray], policy: torch.nn.Module, sets: dict[str, tuple[list[Instance], list[str]]]
) -> dict[str, float]:
    """Paired change of the greedy objective from the starting decoder (``start``: its objectives on
    ``sets``) to ``policy``'s: mean relative change and its standard error per set."""
    out: dict[str, float] = {}
    for name, (instances, prompts) in sets.items():
        c = paired_change(start[name], greedy_objectives(policy, instances, prompts))
        out[f"change_{name}"] = math.inf if c.new_infeasible else c.mean
        out[f"change_{name}_se"] = c.se
    return out


def shown_worse(row: dict[str, Any], z: float = confidence_z(0.95)) -> bool:
    """The shipped decoder is worse than the start with 95 % one-sided confidence on either check set."""
    return any(row[f"change_{k}"] - z * row[f"change_{k}_se"] > 0 for k in ("drifted", "undrifted"))


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95 % Student-t interval (NaN values dropped; 0 width for one value)."""
    from scipy import stats

    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if x.size == 0:
        return math.nan, math.nan
    if x.size == 1:
        return float(x[0]), 0.0
    return float(x.mean()), float(stats.t.ppf(0.975, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))


def summarise(runs: list[dict[str, Any]], queries: list[str]) -> list[dict[str, Any]]:
    """Per drift x prompt x query: means and CIs over seeds, and the paired comparison with random."""
    rows = []
    for drift, prompt in dict.fromkeys((r["drift"], r["prompt"]) for r in runs):
        group = [r for r in runs if (r["drift"], r["prompt"]) == (drift, prompt)]
        rnd = {r["seed"]: r for r in group if r["query"] == "random"}
        for q in queries:
            mine = [r for r in group if r["query"] == q]
            if not mine:  # not run yet (a partial save)
                continue
            row: dict[str, Any] = {"drift": drift, "prompt": prompt, "query": q, "seeds": len(mine)}
            for key in ("gap_before", "gap_after", "undrifted_gap_before", "undrifted_gap_after"):
                row[key], row[f"{key}_ci"] = mean_ci([r[key] for r in mine])
            # The gap is a mean over feasible decisions only: read it next to the feasibility rate.
            row["feasible_before"] = float(np.mean([r["feasible_before"] for r in mine]))
            row["feasible_after"] = float(np.mean([r["feasible_after"] for r in mine]))
            row["labels"] = float(np.mean([r["labels"] for r in mine]))
            row["skipped"] = sum(r["skipped"] for r in mine)
            row["rounds_kept"] = f"{sum(r['rounds_kept'] for r in mine)}/{sum(r['rounds'] for r in mine)}"
            row["within_1_5x_undrifted"] = bool(row["gap_after"] <= 1.5 * row["undrifted_gap_before"])
            if all("change_drifted" in r for r in mine):
                for key in ("change_drifted", "change_undrifted"):
                    row[key], row[f"{key}_ci"] = mean_ci([r[key] for r in mine])
                row["shown_worse"] = sum(shown_worse(r) for r in mine)
            if q != "random" and rnd:
                row.update(gain_vs_random(mine, rnd))
            rows.append(row)
    return rows


def gain_vs_random(mine: list[dict[str, Any]], random_runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """A strategy against random query at the same seed (same stream, held-out and check instances):
    the held-out gap it ends with below random's, and, where the runs carry the fresh-instance check,
    how much cheaper its shipped decoder is than random's on the 1024 fresh drifted instances. The
    second is the one to believe: 32 labelled held-out instances cannot resolve differences of a
    tenth of a percent, 1024 paired ones can."""
    paired = [(random_runs[r["seed"]], r) for r in mine if r["seed"] in random_runs]
    out: dict[str, Any] = {}
    out["gain_vs_random"], out["gain_vs_random_ci"] = mean_ci([rnd["gap_after"] - r["gap_after"] for rnd, r in paired])
    out["beats_random"] = bool(out["gain_vs_random"] > 0)
    if paired and all("change_drifted" in r for pair in paired for r in pair):
        fresh = [rnd["change_drifted"] - r["change_drifted"] for rnd, r in paired]
        out["fresh_gain_vs_random"], out["fresh_gain_vs_random_ci"] = mean_ci(fresh)
        out["beats_random_fresh"] = bool(out["fresh_gain_vs_random"] > 0)
    return out


def wins(rows: list[dict[str, Any]], queries: list[str], key: str = "beats_random") -> dict[str, dict[str, str]]:
    """Per prompt and strategy: on how many drifts it beat random (mean paired gain > 0) by ``key``
    (``beats_random``: held-out gap; ``beats_random_fresh``: the fresh-instance check)."""
    out: dict[str, dict[str, str]] = {}
    for prompt in dict.fromkeys(r["prompt"] for r in rows):
        out[prompt] = {}
        for q in (q for q in queries if q != "random"):
            mine = [r for r in rows if r["prompt"] == prompt and r["query"] == q and key in r]
            if mine:
                out[prompt][q] = f"{sum(r[key] for r in mine)}/{len(mine)}"
    return out


def run_key(drift: str, prompt: str, seed: int, query: str) -> str:
    return f"{drift}/{prompt}/{seed}/{query}"


def run_line(row: dict[str, Any]) -> str:
    return (
        f"  {row['drift']:9s} {row['prompt']:11s} seed {row['seed']} {row['query']:7s}: gap {row['gap_before']:.4f} "
        f"-> {row['gap_after']:.4f}, {row['labels']} labels ({row['skipped']} skipped), kept {row['rounds_kept']}/"
        f"{row['rounds']}, shipped vs start on {row['check_instances']} fresh drifted instances "
        f"{100 * row['change_drifted']:+.3f} % (se {100 * row['change_drifted_se']:.3f}), {row['wall_s']:.1f} s"
    )


def run_all(
    args: argparse.Namespace,
    base: torch.nn.Module,
    cfg0: AlefConfig,
    runs: list[dict[str, Any]],
    details: dict[str, Any],
    save: Callable[[bool], object],
) -> None:
    """Every drift x prompt x seed x query not yet in ``runs``; ``save`` is called after each run."""
    done = {run_key(r["drift"], r["prompt"], r["seed"], r["query"]) for r in runs}
    revision = run_metadata()["git_revision"]  # per run: a resumed or merged file mixes invocations
    with make_pool(cfg0) as pool:
        pool.warm_up()
        for drift in args.drifts:
            for prompt in args.prompts:
                for seed in args.seeds:
                    todo = [q for q in args.queries if run_key(drift, prompt, seed, q) not in done]
                    if not todo:
                        continue
                    cfg = dataclasses.replace(cfg0, drift=drift, prompts=(prompt,), seed=seed)
                    refs = prepare_references(cfg, pool)
                    checks = check_sets(cfg, args.check_instances)
                    start = {k: greedy_objectives(base, *v) for k, v in checks.items()}
                    for q in todo:
                        policy = copy.deepcopy(base)
                        res = run_alef(policy, dataclasses.replace(cfg, query=q), pool, references=refs)
                        row = run_row(drift, prompt, seed, q, res)
                        row |= shipped_change(start, policy, checks) | {"check_instances": args.check_instances}
                        row["reference_skipped"] = refs.skipped
                        row["git_revision"] = revision
                        runs.append(row)
                        # every served decision of a run (res.online) is too much for a committed results file:
                        # the per-round metrics and the gate's reports are kept
                        kept = {k: v for k, v in res.to_dict().items() if k not in ("online", "config")}
                        details[run_key(drift, prompt, seed, q)] = kept | {"reference_sources": refs.sources()}
                        print(run_line(row), flush=True)
                        save(False)
        details["pool_stats"] = dataclasses.asdict(pool.stats)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, help="pretrained policy (DIR or DIR/policy); default: shipped LAMBO-S")
    p.add_argument("--untrained", action="store_true", help="start from an untrained S policy instead (smoke runs)")
    p.add_argument("--resume", action="store_true", help="keep the runs already in --out and run only the missing ones")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny cells and budgets (minutes on 2 cores)")
    p.add_argument("--drifts", nargs="+", default=list(DRIFTS), choices=list(DRIFTS))
    p.add_argument("--prompts", nargs="+", default=list(PROMPTS), choices=list(PROMPTS))
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 2 (0 1 with --quick)")
    p.add_argument(
        "--queries",
        nargs="+",
        default=["entropy", "random", "gain"],
        choices=query_strategies(),
        help="every strategy is compared with random at the same seeds: include it, or --merge with a file that has it",
    )
    p.add_argument("--budget", type=int, default=192, help="labels per run (every strategy gets the same)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--pool-size", type=int, default=96)
    p.add_argument(
        "--heldout",
        type=int,
        default=32,
        help="labelled held-out drifted and undrifted instances (each); on tight-deadline cells 32 misjudged "
        "changes by a quarter of a point where 256 agreed with --check-instances (min_energy labels take ~0.1 s)",
    )
    p.add_argument("--n-replay", type=int, default=32)
    p.add_argument(
        "--check-instances",
        type=int,
        default=1024,
        help="fresh drifted and undrifted instances (unlabelled) on which each run's shipped decoder is compared "
        "with the one it started from (paired objective change)",
    )
    config_flags().add_to(p.add_argument_group("fine-tuning (passed to every run unchanged)"))
    p.add_argument("--time-limit", type=float, default=10.0, help="seconds per label (exact, then each fallback)")
    p.add_argument(
        "--fallbacks",
        nargs="*",
        default=list(AlefConfig.__dataclass_fields__["label_fallbacks"].default),
        choices=fallback_names(),
        help="experts tried when exact proves nothing within the time limit (best feasible label wins)",
    )
    p.add_argument("--experts", type=int, default=2, help="expert actors")
    p.add_argument("--out", type=Path, default=None, help=f"default: {FULL_OUT} ({QUICK_OUT} with --quick)")
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = [0, 1] if args.quick else [0, 1, 2]
    if args.quick:
        args.check_instances = min(args.check_instances, 64)
    if args.quick and args.time_limit == 10.0:
        args.time_limit = 1.0  # density's 80-UE min_latency labels: time-limited, with provenance
    return args


COLUMNS = [
    "drift",
    "prompt",
    "query",
    "gap_before",
    "gap_after",
    "gap_after_ci",
    "feasible_after",
    "undrifted_gap_before",
    "undrifted_gap_after",
    "labels",
    "skipped",
    "rounds_kept",
    "gain_vs_random",
    "gain_vs_random_ci",
    "fresh_gain_vs_random",
    "fresh_gain_vs_random_ci",
    "within_1_5x_undrifted",
    "change_drifted",
    "change_undrifted",
    "shown_worse",
]


def settings(doc: dict[str, Any]) -> dict[str, Any]:
    """A result file's policy, config and quick flag, comparable across code revisions: a config field
    the file predates counts as its default (as when resuming a run, ``with_later_defaults``), so files
    from before and after such an addition with equal settings still resume and merge."""
    config = doc.get("config")
    if isinstance(config, dict):
        config = with_later_defaults(config)
    return {"policy": doc.get("policy"), "config": config, "quick": doc.get("quick")}


def load_previous(out: Path, source: str, config: dict[str, Any]) -> tuple[list[dict], dict]:
    """Runs of an earlier, stopped invocation with the same policy and settings (else a clear error)."""
    if not out.is_file():
        return [], {}
    prev = json.loads(out.read_text())
    previous = settings(prev)
    mine = settings({"policy": source, "config": json.loads(json.dumps(config))})  # tuples -> lists, as stored
    for key in ("policy", "config"):
        if previous[key] != mine[key]:
            raise SystemExit(f"--resume: {out} was written with another {key}; use another --out")
    return list(prev.get("runs", [])), dict(prev.get("details", {}))


def merge(out: Path, paths: list[Path]) -> Path:
    """One result file from several invocations that ran different drifts, seeds or strategies with the
    same policy and settings (so that strategies run at different times are still compared at the same
    seed). Refuses mismatched settings, a run present twice and an output that is one of the inputs."""
    if out.resolve() in {p.resolve() for p in paths}:
        raise SystemExit(f"--merge: the output {out} is one of the inputs; write the merge to a new file")
    docs = []
    for path in paths:
        if not path.is_file():
            raise SystemExit(f"--merge: {path} does not exist")
        docs.append(json.loads(path.read_text()))
    first = docs[0]
    runs: list[dict[str, Any]] = []
    details: dict[str, Any] = {}
    expected = settings(first)
    for path, doc in zip(paths, docs):
        found = settings(doc)
        for key in ("policy", "config", "quick"):
            if found[key] != expected[key]:
                raise SystemExit(f"--merge: {path} was written with another {key} than {paths[0]}")
        for run in doc.get("runs", []):
            key = run_key(run["drift"], run["prompt"], run["seed"], run["query"])
            if key in details:
                raise SystemExit(f"--merge: run {key} is in more than one input ({path})")
            details[key] = doc.get("details", {}).get(key, {})
            runs.append(run)

    def union(key: str) -> list:
        return list(dict.fromkeys(v for doc in docs for v in doc.get(key) or []))

    queries = union("queries")
    rows = summarise(runs, queries)
    return write_results(
        out,
        rows,
        policy=first.get("policy"),
        config=expected["config"],
        quick=first.get("quick"),
        complete=all(doc.get("complete") for doc in docs),
        drifts=union("drifts"),
        prompts=union("prompts"),
        seeds=union("seeds"),
        queries=queries,
        wins_vs_random=wins(rows, queries),
        wins_vs_random_fresh=wins(rows, queries, "beats_random_fresh"),
        runs=runs,
        details=details,
        total_s=sum(doc.get("total_s", 0.0) for doc in docs),
        merged_from=[
            {"file": str(p), **{k: doc.get(k) for k in ("command", "git_revision", "date", "complete")}}
            for p, doc in zip(paths, docs)
        ],
    )


def pct(value: float | None, ci: float | None = None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{100 * value:.2f}" + (f" ± {100 * ci:.2f}" if ci is not None and math.isfinite(ci) and ci > 0 else "")


def signed_pct(row: dict[str, Any], key: str) -> str:
    """A relative change in % with 3 decimals and its CI over seeds; "-" in files from before the check."""
    if key not in row or not math.isfinite(row[key]):
        return "-" if key not in row else "inf"
    ci = row.get(f"{key}_ci")
    return f"{100 * row[key]:+.3f}" + (f" ± {100 * ci:.3f}" if ci and math.isfinite(ci) else "")


def markdown(paths: list[Path]) -> str:
    """The README table of one or more result files (gaps in %, 95 % CI half-widths over seeds)."""
    out = []
    for path in paths:
        doc = json.loads(path.read_text())
        cfg = doc["config"]
        out.append(
            f"`{doc['command']}` (git {doc['git_revision']}, {doc['date'][:10]}, {doc['machine'].rstrip(',')}; "
            f"policy: {doc['policy']}; seeds {doc.get('seeds')}; {cfg['budget']} labels in {cfg['rounds']} rounds, "
            f"{cfg['n_heldout']} held-out drifted and undrifted instances; "
            f"{'complete' if doc.get('complete') else 'INCOMPLETE: the runs finished so far'}):\n"
        )
        for source in doc.get("merged_from", []):
            out.append(f"* runs of `{source['command']}` (git {source['git_revision']}, {source['date'][:10]})")
        if doc.get("merged_from"):
            out.append("")
        out.append(
            "| drift | prompt | query | seeds | gap before % | gap after % | undrifted before % | undrifted after % "
            "| feasible after | rounds kept | gain vs random (pp) | within 1.5x undrifted "
            "| shipped vs start, drifted % | shipped vs start, undrifted % | runs shown worse "
            "| fresh gain vs random (pp) |"
        )
        out.append("|" + "---|" * 16)
        for r in doc["rows"]:
            gain = pct(r.get("gain_vs_random"), r.get("gain_vs_random_ci")) if "gain_vs_random" in r else "-"
            fresh = signed_pct(r, "fresh_gain_vs_random")
            out.append(
                f"| {r['drift']} | {r['prompt']} | {r['query']} | {r['seeds']} | {pct(r['gap_before'])} "
                f"| {pct(r['gap_after'], r['gap_after_ci'])} | {pct(r['undrifted_gap_before'])} "
                f"| {pct(r['undrifted_gap_after'], r['undrifted_gap_after_ci'])} | {r['feasible_after']:.3f} "
                f"| {r['rounds_kept']} | {gain} | {'yes' if r['within_1_5x_undrifted'] else 'no'} "
                f"| {signed_pct(r, 'change_drifted')} | {signed_pct(r, 'change_undrifted')} "
                f"| {r.get('shown_worse', '-')} | {fresh} |"
            )
        line = f"\nDrifts where a strategy beat random, held-out gap: {doc.get('wins_vs_random')}"
        if doc.get("wins_vs_random_fresh"):
            line += f"; on the fresh drifted instances: {doc['wins_vs_random_fresh']}"
        out.append(line + "\n")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        import sys

        argv = sys.argv[1:]
    if argv[:1] == ["--markdown"]:
        print(markdown([Path(a) for a in argv[1:]]))
        return
    if argv[:1] == ["--merge"]:
        if len(argv) < 4:
            raise SystemExit("usage: alef.py --merge OUT.json IN.json IN.json [...]")
        print(f"wrote {merge(Path(argv[1]), [Path(a) for a in argv[2:]])}")
        return
    args = parse_args(argv)
    out = args.out or (QUICK_OUT if args.quick else FULL_OUT)
    torch.set_num_threads(1)
    base, source = load_base_policy(args.checkpoint, args.untrained, 0)
    cfg0 = base_config(args)
    runs, details = load_previous(out, source, cfg0.to_dict()) if args.resume else ([], {})
    if runs:
        print(f"--resume: {len(runs)} runs already in {out}", flush=True)
    init_ray()
    start = time.perf_counter()

    def save(complete: bool) -> list[dict[str, Any]]:
        rows = summarise(runs, args.queries)
        write_results(
            out,
            rows,
            policy=source,
            config=cfg0.to_dict(),
            quick=args.quick,
            complete=complete,
            drifts=args.drifts,
            prompts=args.prompts,
            seeds=args.seeds,
            queries=args.queries,
            wins_vs_random=wins(rows, args.queries),
            wins_vs_random_fresh=wins(rows, args.queries, "beats_random_fresh"),
            runs=runs,
            details=details,
            total_s=time.perf_counter() - start,
        )
        return rows

    run_all(args, base, cfg0, runs, details, save)
    rows = save(True)
    title = f"ALEF on {source}: greedy gap to the expert, mean over seeds {args.seeds} (95% CI half-widths)"
    print_table(rows, COLUMNS, title=title)
    if "random" in args.queries:
        print(f"drifts where a strategy beat random (per prompt), held-out gap: {wins(rows, args.queries)}")
        print(f"  and on the fresh drifted instances: {wins(rows, args.queries, 'beats_random_fresh')}")
    else:
        print("no random runs here: --merge this file with one that has them (same settings) to compare")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
