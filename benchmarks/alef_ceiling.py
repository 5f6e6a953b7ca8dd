"""How far can fine-tuning take LAMBO-S's greedy decisions on a drift when labels are not scarce?

ALEF (``benchmarks/alef.py``) ends above 1.5x the undrifted gap on several drifts with <= 192 expert
labels. This probe asks whether labels are what is missing. It labels ``--train`` drifted arrivals
(the stream ALEF sees) with the policy's own ``search`` decode, which the search benchmark puts
within ~0.01 % of the optimum and which costs no expert time, fine-tunes on them for several rounds
far beyond ALEF's budget (decoder only, as ALEF does; ``full``: the whole model, as a control;
``dagger``: decoder only, and every round also trains on DAgger-style relabels of the current policy's
own greedy decisions, see :func:`prefix_completions`; ``rl``: decoder only, every round's imitation
followed by a short policy-gradient phase on the drifted arrivals,
:func:`lambo_ray.alef.policy_gradient.policy_gradient_phase`),
and reports after every round the greedy gap on

* the first ``--fit`` training instances themselves, to their labels (``fit``: can it fit them at all?),
* held-out drifted instances and held-out undrifted ones, to the exact expert (ALEF's reference sets:
  same scenario, drift and seeds).

If the fit gap stays where the held-out one is, the limit is what greedy decoding of this model
can express on the drift, not how many labels it was shown or which ones the query picked.

    python benchmarks/alef_ceiling.py                                   # five drifts, min_energy
    python benchmarks/alef_ceiling.py --prompts min_latency --drifts deadline
    python benchmarks/alef_ceiling.py --drifts mobility deadline --variants decoder dagger --out ...  # DAgger
    python benchmarks/alef_ceiling.py --markdown benchmarks/results/alef_ceiling.json   # the README table

The JSON keeps every round of every variant.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lambo_ray.alef.buffer import Example, LabelBuffer
from lambo_ray.alef.config import AlefConfig, run_seeds
from lambo_ray.alef.environment import drift_stream, snapshot_set
from lambo_ray.alef.metrics import labelled_gap
from lambo_ray.alef.policy_gradient import policy_gradient_phase
from lambo_ray.alef.training import make_optimizer, train_decoder
from lambo_ray.errors import LamboInputError
from lambo_ray.mec.drift import DRIFTS, apply_drift
from lambo_ray.mec.instance import PROMPTS, Instance
from lambo_ray.results import markdown_table, print_table, write_results
from lambo_ray.runtime import limit_compute_threads

OUT = Path("benchmarks/results/alef_ceiling.json")
VARIANTS = ("decoder", "full", "dagger", "rl")
PREFIX_TIME_LIMIT_S = 2.0  # per completion; min_energy sub-models of N <= 200 solve in well under it
COLUMNS = [
    "drift",
    "prompt",
    "seed",
    "variant",
    "round",
    "labels",
    "fit_gap_pct",
    "drifted_gap_pct",
    "undrifted_gap_pct",
    "target_pct",
    "within_1_5x",
]


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per drift x prompt: held-out gaps before and after the last round of each variant, its
    best round (rounds swing by a few tenths of a point), the last round's fit gaps and the 1.5x target
    (the README table)."""
    cells: dict[tuple[str, str, int], dict[tuple[str, int], dict[str, Any]]] = {}
    for r in rows:
        cells.setdefault((r["drift"], r["prompt"], r.get("seed", 0)), {})[(r["variant"], r["round"])] = r
    out = []
    for (drift, prompt, seed), runs in cells.items():
        last = max(k[1] for k in runs)
        first = next(r for (v, rnd), r in runs.items() if rnd == 0)
        row: dict[str, Any] = {"drift": drift, "prompt": prompt, "seed": seed}
        row["drifted before %"] = first["drifted_gap_pct"]
        for variant in VARIANTS:
            if (variant, last) in runs:
                row[f"after, {variant} %"] = runs[(variant, last)]["drifted_gap_pct"]
                row[f"best round, {variant} %"] = min(
                    r["drifted_gap_pct"] for (v, rnd), r in runs.items() if v == variant and rnd > 0
                )
                row[f"fit after, {variant} %"] = runs[(variant, last)]["fit_gap_pct"]
        row["undrifted before %"] = first["undrifted_gap_pct"]
        row["1.5x target %"] = first["target_pct"]
        out.append(row)
    return out


def exact_examples(instances: list[Instance], prompt: str, time_limit: float) -> list[Example]:
    """Reference labels from the exact expert (its incumbent where the limit hits; the status says which)."""
    from lambo_ray.experts.base import get_expert

    expert = get_expert("exact")
    out = []
    for inst in instances:
        d = expert.solve(inst, prompt, time_limit=time_limit)
        out.append(Example(inst, prompt, d.target, d.share, "exact", d.objective, str(d.stats.get("status"))))
    return out


def search_examples(
    policy: torch.nn.Module, instances: list[Instance], prompt: str, k: int, budget_s: float
) -> list[Example]:
    """Labels from the policy's own ``search`` decode (self-labels: no expert involved)."""
    from lambo_ray.policy.decoding import decide

    out = []
    for lo in range(0, len(instances), 16):
        part = instances[lo : lo + 16]
        for inst, d in zip(part, decide(policy, part, prompt, mode="search", k=k, time_budget_s=budget_s)):
            out.append(Example(inst, prompt, d.target, d.share, "self_search", d.objective))
    return out


def prefix_completions(
    policy: torch.nn.Module, examples: list[Example], rng: np.random.Generator, time_limit: float
) -> list[Example]:
    """DAgger-style relabels against exposure bias (``min_energy``): decide each instance greedily with
    the current policy, keep its first ``i`` decisions in decode order (``i`` uniform per instance) and
    let the exact ``min_energy`` sub-model re-decide the rest given them. Trained with ``first_step = i``,
    the loss sees only the expert's decisions, from states the policy itself reaches."""
    from lambo_ray.alef.online import decide, inference_plan
    from lambo_ray.experts.consensus import resolve_subset
    from lambo_ray.experts.placement import build_tables
    from lambo_ray.mec.evaluator import evaluate
    from lambo_ray.mec.shares import optimal_shares
    from lambo_ray.policy.features import featurize

    insts, prompts = [e.instance for e in examples], [e.prompt for e in examples]
    if set(prompts) != {"min_energy"}:
        raise LamboInputError("the dagger variant relabels with the exact min_energy sub-model: --prompts min_energy")
    greedy = decide(policy, insts, prompts)
    order = featurize(insts, prompts, packings=[inference_plan(i, p) for i, p in zip(insts, prompts)]).order
    out = []
    for k, (inst, target) in enumerate(zip(insts, greedy.targets)):
        first = int(rng.integers(0, inst.n_ues - 1))
        free = np.sort(order[k, : inst.n_ues].numpy()[first:])
        completed = resolve_subset(build_tables(inst, "min_energy"), np.asarray(target), free, time_limit)
        share = None if completed is None else optimal_shares(inst, completed)
        if share is not None:
            energy = evaluate(inst, completed, share).objective("min_energy")
            out.append(Example(inst, "min_energy", completed, share, "prefix_exact", energy, first_step=first))
    return out


def load_policy_fresh(checkpoint: Path | None) -> torch.nn.Module:
    from lambo_ray.policy.checkpoint import default_checkpoint, load_policy, resolve_policy_dir

    policy, _ = load_policy(resolve_policy_dir(checkpoint or default_checkpoint()))
    return policy.eval()


def optimizer_for(policy: torch.nn.Module, cfg: AlefConfig, variant: str) -> torch.optim.Optimizer:
    if variant != "full":
        return make_optimizer(policy, cfg)  # ALEF's own: only the decoder's parameters
    for p in policy.parameters():
        p.requires_grad_(True)
    return torch.optim.Adam(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def probe(args: argparse.Namespace, drift: str, prompt: str) -> list[dict[str, Any]]:
    """Every variant x round of one drift and prompt (the labels are made once, by the base policy)."""
    cfg = AlefConfig(
        drift=drift, prompts=(prompt,), epochs=args.epochs, lr=args.lr, share_weight=args.share_weight, seed=args.seed
    )
    seeds = run_seeds(cfg.seed)
    base = load_policy_fresh(args.checkpoint)
    t0 = time.perf_counter()
    held = exact_examples(
        snapshot_set(apply_drift(cfg.scenario, drift), args.heldout, seeds["heldout_drifted"]), prompt, args.time_limit
    )
    undrifted = exact_examples(
        snapshot_set(cfg.scenario, args.heldout, seeds["heldout_undrifted"]), prompt, args.time_limit
    )
    stream = drift_stream(cfg.scenario, drift, seeds["stream"], cfg.series_dt_s, cfg.mobility_cells)
    train = list(itertools.islice(stream, args.train))
    replay = snapshot_set(cfg.scenario, max(32, args.train // 4), seeds["replay"])
    budget_s = args.search_budget_ms / 1e3
    labels = LabelBuffer()
    labels.add(search_examples(base, train, prompt, args.search_k, budget_s))
    replay_labels = LabelBuffer()
    replay_labels.add(search_examples(base, replay, prompt, args.search_k, budget_s))
    print(f"{drift} / {prompt}: labels and references in {time.perf_counter() - t0:.0f} s", flush=True)
    fit_set = labels.examples[: args.fit]
    undrifted_before = 100 * labelled_gap(base, undrifted)
    rows = []
    for variant in args.variants:
        policy = load_policy_fresh(args.checkpoint)
        opt = optimizer_for(policy, cfg, variant)
        rng = np.random.default_rng(cfg.seed)
        for round_no in range(args.rounds + 1):
            if round_no:
                train_set = labels
                if variant == "dagger":
                    relabels = prefix_completions(policy, labels.examples, rng, PREFIX_TIME_LIMIT_S)
                    train_set = LabelBuffer(labels.examples + relabels)
                train_decoder(policy, opt, train_set, replay_labels, cfg, rng, train_encoder=variant == "full")
                if variant == "rl":
                    prompts = [prompt] * len(train)
                    pg = policy_gradient_phase(policy, opt, train, prompts, rng, args.rl_epochs, args.rl_k)
                    print(f"  round {round_no}: policy-gradient phase, group spread {pg['pg_group_spread']:.4f}")
            drifted = 100 * labelled_gap(policy, held)
            row = {
                "drift": drift,
                "prompt": prompt,
                "seed": args.seed,
                "variant": variant,
                "round": round_no,
                "labels": len(labels.examples),
                "fit_gap_pct": 100 * labelled_gap(policy, fit_set),
                "drifted_gap_pct": drifted,
                "undrifted_gap_pct": 100 * labelled_gap(policy, undrifted),
                "target_pct": 1.5 * undrifted_before,
                "within_1_5x": bool(drifted <= 1.5 * undrifted_before),
            }
            rows.append(row)
            print_table([row], COLUMNS)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drifts", nargs="+", default=list(DRIFTS), choices=list(DRIFTS))
    ap.add_argument("--prompts", nargs="+", default=["min_energy"], choices=list(PROMPTS))
    ap.add_argument("--variants", nargs="+", default=["decoder", "full"], choices=list(VARIANTS))
    ap.add_argument("--train", type=int, default=384, help="drifted arrivals labelled by search (self-labels)")
    ap.add_argument("--fit", type=int, default=64, help="training instances the fit gap is measured on")
    ap.add_argument("--heldout", type=int, default=32, help="held-out drifted and undrifted instances each")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=10, help="passes over the labels per round")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--share-weight", type=float, default=0.1, help="weight of the share term of the loss")
    ap.add_argument("--rl-epochs", type=int, default=2, help="rl variant: policy-gradient passes per round")
    ap.add_argument("--rl-k", type=int, default=8, help="rl variant: samples per instance (the group)")
    ap.add_argument("--search-k", type=int, default=8)
    ap.add_argument("--search-budget-ms", type=float, default=20.0)
    ap.add_argument("--time-limit", type=float, default=5.0, help="exact expert's limit per reference label (s)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="policy to probe (default: the shipped LAMBO-S)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--markdown", type=Path, default=None, help="print the table of a results file and exit")
    args = ap.parse_args(argv)
    if args.markdown is not None:
        doc = json.loads(args.markdown.read_text())
        print(f"`{doc['command']}` (git {doc['git_revision']}, {doc['date'][:10]}, {doc['machine']}):\n")
        print(markdown_table(summary(doc["rows"])))
        return
    if "dagger" in args.variants and args.prompts != ["min_energy"]:
        ap.error("the dagger variant relabels with the exact min_energy sub-model: use --prompts min_energy")
    limit_compute_threads(1)
    torch.manual_seed(args.seed)
    rows: list[dict[str, Any]] = []
    for prompt in args.prompts:
        for drift in args.drifts:
            rows += probe(args, drift, prompt)
            write_results(args.out, rows, settings={k: str(v) for k, v in vars(args).items()})
    print_table(summary(rows), title="held-out drifted gap before and after the last round")


if __name__ == "__main__":
    main()
