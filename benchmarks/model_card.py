"""Write the shipped checkpoint's model card from its manifest and the generalization benchmark's JSON.

    python benchmarks/model_card.py            # -> lambo_ray/checkpoints/lambo-s/MODEL_CARD.md

Every number in the card comes from benchmarks/results/generalization.json (which says how it was
measured) or from the checkpoint's own manifest; nothing is typed in by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lambo_ray.policy.checkpoint import DEFAULT_CHECKPOINT, read_manifest

CARD = """# LAMBO-S (shipped default)

The model every `lambo` command uses when no `--checkpoint` is given (`lambo solve --method lambo`,
`lambo serve`, `lambo finetune`, `lambo report`). One set of weights for cells of 10-200 UEs and 2-10
servers, both prompts (`min_latency`, `min_energy`), the drifted regimes included.

| | |
|---|---|
| architecture | LAMBO-S: d_model {d_model}, {enc_layers} encoder layers, {n_heads} heads, {dec_layers} decoder layer, {n_params:,} parameters |
| fingerprint | `{fingerprint}` (embedding + encoder weights; ALEF decoders are tied to it) |
| feature version | {feature_version} |
| trained by | `{trained_by}` |
| data | {data}; instances drawn from the default scenario distribution (docs/training.md) |
| budget | {epochs} epochs of imitation on 2 CPU cores (about 40 minutes; labels about 45 minutes) |
| intended use | task offloading decisions for MEC cells within the distribution above; use `search` decoding where decision quality matters more than a few hundred milliseconds |
| limits | not trained beyond N = 200 or M = 10; greedy decoding is 1-3% from optimal on large cells (`search` closes most of it); feasibility holds by construction whenever the instance has a feasible decision |

## Measured quality (held-out instances, never used in training)

From `{command}` ({date}, git {rev}), {count} instances per cell, gap to the exact expert's optimum
(or, where it did not prove optimality within {limit:g} s, to its certified lower bound, so the gap is an
upper bound), mean over instances; every decision feasible.

{table}

## Self-check

`tests/test_default_checkpoint.py` recomputes, on {check_instances}, the {check_prompt} gap to the exact
expert: greedy {greedy_gap:.3f}%, search (k = {search_k}) {search_gap:.3f}%.
"""


def cell_table(doc: dict) -> str:
    rows = {(r["cell"], r["prompt"], r["method"]): r for r in doc["rows"]}
    cells = list(dict.fromkeys(r["cell"] for r in doc["rows"]))
    lines = [
        "| cell | greedy min_latency | greedy min_energy | search min_latency | search min_energy |",
        "|---|---|---|---|---|",
    ]
    for cell in cells:
        vals = []
        for method in ("lambo_greedy", "lambo_search"):
            for prompt in ("min_latency", "min_energy"):
                r = rows.get((cell, prompt, method))
                vals.append("-" if r is None or r["gap_pct"] is None else f"{r['gap_pct']:.2f}%")
        lines.append(f"| {cell} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=Path("benchmarks/results/generalization.json"))
    p.add_argument("--out", type=Path, default=DEFAULT_CHECKPOINT / "MODEL_CARD.md")
    args = p.parse_args(argv)
    doc = json.loads(args.results.read_text())
    manifest = read_manifest(DEFAULT_CHECKPOINT)
    if doc["checkpoint"].get("fingerprint") != manifest["fingerprint"]:
        print("the results were measured on another checkpoint; rerun benchmarks/generalization.py", file=sys.stderr)
        return 2
    meta, cfg, check = manifest["meta"], manifest["config"], manifest["meta"]["card_check"]
    text = CARD.format(
        **cfg,
        n_params=manifest["n_params"],
        fingerprint=manifest["fingerprint"],
        feature_version=manifest["feature_version"],
        trained_by=meta.get("trained_by", "-"),
        data=meta.get("data", "-"),
        epochs=meta.get("epochs", "-"),
        command=doc["command"],
        date=doc["date"],
        rev=doc["git_revision"],
        count=doc["settings"].get("count", "-"),
        limit=doc["settings"].get("exact_time_limit_s", 60),
        table=cell_table(doc),
        check_instances=check["instances"],
        check_prompt=check["prompt"],
        greedy_gap=check["greedy_gap_pct"],
        search_gap=check["search_gap_pct"],
        search_k=check["search_k"],
    )
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
