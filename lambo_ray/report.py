"""Reproduction report: the paper's Fig. 5 and Fig. 6 (latency and energy of every method) and beyond.

Three sections, each a list of rows computed with the one evaluator, written as JSON, Markdown
tables and matplotlib PNGs:

* ``comparison``: every method on one seeded held-out set of the paper scenario, both prompts:
  mean latency per UE (Fig. 5), total energy (Fig. 6), 95% confidence intervals, gap to exact,
  feasibility rate, decision time.
* ``drift``: LAMBO before/after ALEF on each drift scenario, next to exact/local search.
* ``scaling``: decision time and gap versus N and M for LAMBO, greedy, DE and exact (exact with
  its time limit; its gap there is the certified one it reports).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lambo_ray.mec.drift import DRIFTS, apply_drift
from lambo_ray.mec.evaluator import evaluate, relative_gap
from lambo_ray.mec.generator import generate_many
from lambo_ray.mec.instance import PROMPTS, Decision, Instance
from lambo_ray.mec.io import atomic_write_text, write_json
from lambo_ray.mec.scenario import ScenarioConfig, default_capacities
from lambo_ray.results import markdown_table, mean_ci95, run_metadata
from lambo_ray.solving import METHODS, solve_all

PROMPT_METRIC = {
    "min_latency": ("mean_latency_s", "mean latency per UE (s)"),
    "min_energy": ("total_energy_j", "total UE energy (J)"),
}


# What the report can run: every solving method, the policy with other decode modes, and the shipped
# LAMBO-S (greedy) beside a freshly trained policy.
LAMBO_DECODES = {"lambo": "greedy", "lambo_best_of_k": "best_of_k", "lambo_refine": "refine", "lambo_search": "search"}
REPORT_METHODS: tuple[str, ...] = (*METHODS, "lambo_best_of_k", "lambo_refine", "lambo_search", "lambo_shipped")
SECTIONS: tuple[str, ...] = ("comparison", "drift", "scaling")


def _f(default: Any, help_text: str, choices: tuple[str, ...] | None = None) -> Any:
    meta: dict[str, Any] = {"help": help_text}
    if choices is not None:
        meta["choices"] = choices
    return field(default=default, metadata=meta)


@dataclass
class ReportConfig:
    """What the reproduction report runs; the ``lambo report`` flags are generated from these fields."""

    count: int = _f(30, "held-out instances per prompt (comparison)")
    seed: int = _f(5000, "seed of the held-out instances (training and validation use other seeds)")
    methods: tuple[str, ...] = _f(
        (
            "exact",
            "lambo",
            "lambo_best_of_k",
            "lambo_search",
            "lambo_shipped",
            "local_search",
            "greedy",
            "de",
            "droo",
            "are",
            "all_local",
            "all_offload",
        ),
        "methods of the comparison",
        REPORT_METHODS,
    )
    prompts: tuple[str, ...] = _f(("min_latency", "min_energy"), "prompts of the comparison", PROMPTS)
    exact_time_limit: float = _f(60.0, "seconds per instance of the exact expert (the reference)")
    drifts: tuple[str, ...] = _f(
        ("mobility", "load", "outage", "density", "deadline"), "drifts of the drift section", tuple(DRIFTS)
    )
    drift_count: int = _f(20, "held-out instances per drift")
    scaling_n: tuple[int, ...] = _f((20, 50, 100, 200), "UE counts of the scaling section")
    scaling_m: tuple[int, ...] = _f((2, 4, 8), "server counts of the scaling section")
    scaling_count: int = _f(5, "instances per (N, M) of the scaling section")
    scaling_methods: tuple[str, ...] = _f(
        ("exact", "lambo", "greedy", "de"), "methods of the scaling section", REPORT_METHODS
    )
    scaling_exact_time_limit: float = _f(30.0, "seconds per instance of exact in the scaling section")
    best_of_k: int = _f(16, "samples per instance of lambo_best_of_k")
    sections: tuple[str, ...] = _f(SECTIONS, "sections to build", SECTIONS)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig, metadata={"help": "the undrifted held-out regime"})


@dataclass
class PolicySource:
    """A pretrained checkpoint and, optionally, ALEF decoders by drift name."""

    checkpoint: Path | None
    decoders: dict[str, Path] = field(default_factory=dict)


def run_method(
    method: str,
    instances: list[Instance],
    prompt: str,
    policy: PolicySource,
    cfg: ReportConfig,
    *,
    time_limit: float | None = None,
    decoder: Path | None = None,
) -> list[Decision]:
    if method.startswith("lambo"):
        shipped = method == "lambo_shipped"
        return solve_all(
            "lambo",
            instances,
            prompt,
            checkpoint=None if shipped else policy.checkpoint,  # None: the shipped LAMBO-S
            decoder=None if shipped else decoder,
            decode=LAMBO_DECODES.get(method, "greedy"),
            k=cfg.best_of_k,
            progress=False,
        )
    return solve_all(method, instances, prompt, time_limit=time_limit, progress=False)


def summarize_method(
    instances: Sequence[Instance],
    decisions: Sequence[Decision],
    prompt: str,
    reference: Sequence[float] | None,
) -> dict[str, Any]:
    """Everything is recomputed from the decisions by the evaluator (claims are not trusted)."""
    evals = [evaluate(i, d.target, d.share) for i, d in zip(instances, decisions)]
    lat = [e.mean_latency_s for e in evals]
    en = [e.total_energy_j for e in evals]
    obj = [e.objective(prompt) for e in evals]
    wall = [float(d.stats.get("wall_s", np.nan)) for d in decisions]
    row: dict[str, Any] = {"prompt": prompt, "method": decisions[0].method if decisions else None}
    row["mean_latency_s"], row["mean_latency_ci95"] = mean_ci95(lat)
    row["total_energy_j"], row["total_energy_ci95"] = mean_ci95(en)
    row["objective"] = float(np.mean(obj))
    if reference is not None:
        gaps = [100 * relative_gap(o, r) for o, r in zip(obj, reference)]
        row["gap_pct"], row["gap_ci95"] = mean_ci95(gaps)
    row["feasible_rate"] = float(np.mean([e.feasible for e in evals]))
    row["decision_ms"] = float(np.nanmean(wall) * 1000)
    return row


def comparison_section(
    instances: list[Instance],
    policy: PolicySource,
    cfg: ReportConfig,
    label: str = "paper",
    decoder: Path | None = None,
    methods: Sequence[str] | None = None,
    log=print,
) -> list[dict[str, Any]]:
    rows = []
    for prompt in cfg.prompts:
        reference = None
        for method in methods or cfg.methods:
            decisions = run_method(
                method, instances, prompt, policy, cfg, time_limit=cfg.exact_time_limit, decoder=decoder
            )
            if not decisions:
                continue
            if method == "exact":
                reference = [d.objective for d in decisions]
            row = summarize_method(instances, decisions, prompt, reference)
            row.update(method=method, set=label)
            rows.append(row)
            log(
                f"  [{label}] {prompt:11s} {method:16s} objective {row['objective']:.5g}"
                + (f"  gap {row['gap_pct']:.2f}%" if "gap_pct" in row else "")
            )
    return rows


def drift_section(policy: PolicySource, cfg: ReportConfig, log=print) -> list[dict[str, Any]]:
    rows = []
    for drift in cfg.drifts:
        instances = generate_many(apply_drift(cfg.scenario, drift), cfg.drift_count, cfg.seed + 1)
        methods = ["exact", "local_search", "greedy", "lambo"]
        part = comparison_section(instances, policy, cfg, label=drift, methods=methods, log=log)
        for r in part:
            r["phase"] = "before ALEF" if r["method"] == "lambo" else "-"
        rows += part
        if drift in policy.decoders:
            trained_for = decoder_prompts(policy.decoders[drift])
            sub = ReportConfig(**{**cfg.__dict__, "prompts": tuple(p for p in cfg.prompts if p in trained_for)})
            after = comparison_section(
                instances,
                policy,
                sub,
                label=drift,
                decoder=policy.decoders[drift],
                methods=["exact", "lambo"],
                log=log,
            )
            for r in after:
                if r["method"] == "lambo":
                    r["method"], r["phase"] = "lambo+alef", "after ALEF"
                    rows.append(r)
    return rows


def decoder_prompts(decoder_dir: Path) -> tuple[str, ...]:
    """The prompts an ALEF decoder was fine-tuned on (its metrics.json); all prompts if unknown.

    A decoder fine-tuned on min_energy labels only is reported after ALEF for min_energy only."""
    import json

    try:
        prompts = json.loads((Path(decoder_dir) / "metrics.json").read_text())["config"]["prompts"]
        return tuple(prompts)
    except (OSError, ValueError, KeyError, TypeError):
        return ("min_latency", "min_energy")


def scaling_section(policy: PolicySource, cfg: ReportConfig, log=print) -> list[dict[str, Any]]:
    rows = []
    grid = [(n, 4) for n in cfg.scaling_n] + [(50, m) for m in cfg.scaling_m if m != 4]
    for n, m in grid:
        scen = ScenarioConfig(n_ues=n, n_servers=m, capacities_cps=default_capacities(m))
        instances = generate_many(scen, cfg.scaling_count, cfg.seed + 2)
        for prompt in cfg.prompts:
            exact = run_method("exact", instances, prompt, policy, cfg, time_limit=cfg.scaling_exact_time_limit)
            lower = [d.stats.get("lower_bound", d.objective) for d in exact]
            for method in cfg.scaling_methods:
                decisions = exact if method == "exact" else run_method(method, instances, prompt, policy, cfg)
                if not decisions:
                    continue
                objs = [evaluate(i, d.target, d.share).objective(prompt) for i, d in zip(instances, decisions)]
                rows.append(
                    {
                        "n_ues": n,
                        "n_servers": m,
                        "prompt": prompt,
                        "method": method,
                        "gap_to_bound_pct": float(np.mean([100 * relative_gap(o, lb) for o, lb in zip(objs, lower)])),
                        "feasible_rate": float(np.mean([bool(d.stats.get("feasible")) for d in decisions])),
                        "decision_ms": float(np.mean([d.stats["wall_s"] for d in decisions]) * 1000),
                        "exact_proven": int(sum(bool(d.stats.get("proven_optimal")) for d in exact)),
                    }
                )
                log(
                    f"  [scaling N={n} M={m}] {prompt:11s} {method:8s} gap {rows[-1]['gap_to_bound_pct']:.2f}% "
                    f"time {rows[-1]['decision_ms']:.0f} ms"
                )
    return rows


# ----------------------------------------------------------------------------------------- plots
def plot_comparison(rows: list[dict[str, Any]], prompt: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, label = PROMPT_METRIC[prompt]
    sel = [r for r in rows if r["prompt"] == prompt]
    if not sel:
        return
    fig, ax = plt.subplots(figsize=(8, 4))
    names = [r["method"] for r in sel]
    vals = [r[metric] for r in sel]
    err = [r[_ci_key(metric)] for r in sel]
    colors = ["#2b6cb0" if n.startswith("lambo") else ("#2f855a" if n == "exact" else "#a0aec0") for n in names]
    bars = ax.bar(names, vals, yerr=err, capsize=4, color=colors)
    for bar, r in zip(bars, sel):
        if r["feasible_rate"] < 1.0:  # infeasible decisions are reported, not repaired: mark them
            bar.set_hatch("//")
            bar.set_edgecolor("#c53030")
    from matplotlib.patches import Patch

    ax.legend(
        handles=[
            Patch(color="#2f855a", label="exact (Pyomo + HiGHS)"),
            Patch(color="#2b6cb0", label="LAMBO"),
            Patch(color="#a0aec0", label="baselines"),
            Patch(facecolor="white", edgecolor="#c53030", hatch="//", label="some decisions infeasible"),
        ],
        fontsize=8,
        loc="upper left",
    )
    ax.set_ylabel(label)
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=30)
    lo = min(v - e for v, e in zip(vals, err))
    ax.set_ylim(bottom=max(0.0, lo * 0.9))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ci_key(metric: str) -> str:
    return {"mean_latency_s": "mean_latency_ci95", "total_energy_j": "total_energy_ci95"}[metric]


def plot_scaling(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for prompt, ax in zip(("min_latency", "min_energy"), axes):
        for method in sorted({r["method"] for r in rows}):
            pts = sorted(
                (r["n_ues"], r["decision_ms"])
                for r in rows
                if r["prompt"] == prompt and r["method"] == method and r["n_servers"] == 4
            )
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.set_xlabel("number of UEs N (M = 4)")
        ax.set_ylabel("decision time per instance (ms)")
        ax.set_yscale("log")
        ax.set_title(prompt)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_drift(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for prompt, ax in zip(("min_latency", "min_energy"), axes):
        drifts = sorted({r["set"] for r in rows if r["prompt"] == prompt})
        width = 0.25
        for k, (method, name) in enumerate(
            (
                ("local_search", "local search"),
                ("lambo", "LAMBO before ALEF"),
                ("lambo+alef", "LAMBO after ALEF"),
            )
        ):
            vals = [
                next(
                    (
                        r["gap_pct"]
                        for r in rows
                        if r["set"] == d and r["prompt"] == prompt and r["method"] == method and "gap_pct" in r
                    ),
                    np.nan,
                )
                for d in drifts
            ]
            ax.bar(np.arange(len(drifts)) + (k - 1) * width, vals, width, label=name)
        ax.set_xticks(np.arange(len(drifts)), drifts)
        ax.set_ylabel("gap to exact (%)")
        ax.set_title(f"{prompt} under drift")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------- driver
COMPARISON_COLUMNS = [
    "prompt",
    "method",
    "mean_latency_s",
    "mean_latency_ci95",
    "total_energy_j",
    "total_energy_ci95",
    "gap_pct",
    "gap_ci95",
    "feasible_rate",
    "decision_ms",
]
DRIFT_COLUMNS = ["set", "prompt", "method", "phase", "objective", "gap_pct", "feasible_rate", "decision_ms"]
SCALING_COLUMNS = [
    "n_ues",
    "n_servers",
    "prompt",
    "method",
    "gap_to_bound_pct",
    "feasible_rate",
    "decision_ms",
    "exact_proven",
]


def build_report(
    out: Path, policy: PolicySource, cfg: ReportConfig, log=print, instances: list[Instance] | None = None
) -> dict[str, Any]:
    """Run the configured sections and write report.json, report.md and the PNGs into ``out``.

    ``instances`` replaces the generated held-out set of the comparison section (e.g. a file).
    """
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        **run_metadata(),
        "config": {**cfg.__dict__, "scenario": cfg.scenario.to_dict()},
        "checkpoint": str(policy.checkpoint) if policy.checkpoint else "the shipped LAMBO-S",
    }
    md = [
        "# LAMBO reproduction report",
        "",
        f"Held-out set: {len(instances) if instances else cfg.count} instances of the scenario "
        f"(N={cfg.scenario.n_ues}, M={cfg.scenario.n_servers}) (seed {cfg.seed}); every number below is "
        "recomputed from the decisions by `lambo_ray.mec.evaluator`. Gaps are relative to the exact "
        "expert (Pyomo + HiGHS, certified). CI95 = half-width of a 95% normal confidence interval.",
        "",
    ]
    if "comparison" in cfg.sections:
        if instances is None:
            instances = generate_many(cfg.scenario, cfg.count, cfg.seed)
        rows = comparison_section(instances, policy, cfg, log=log)
        result["comparison"] = rows
        plot_comparison(
            rows,
            "min_latency",
            out / "fig5_latency.png",
            "Fig. 5: mean latency per UE under min_latency (paper scenario)",
        )
        plot_comparison(
            rows,
            "min_energy",
            out / "fig6_energy.png",
            "Fig. 6: total energy under min_energy (paper scenario)",
        )
        md += [
            "## Paper scenario: every method, both prompts",
            "",
            markdown_table(rows, COMPARISON_COLUMNS),
            "![Fig. 5](fig5_latency.png)",
            "",
            "![Fig. 6](fig6_energy.png)",
            "",
        ]
    if "drift" in cfg.sections:
        rows = drift_section(policy, cfg, log=log)
        result["drift"] = rows
        plot_drift(rows, out / "drift.png")
        md += [
            "## Drift scenarios, before and after ALEF",
            "",
            markdown_table(rows, DRIFT_COLUMNS),
            "![drift](drift.png)",
            "",
        ]
    if "scaling" in cfg.sections:
        rows = scaling_section(policy, cfg, log=log)
        result["scaling"] = rows
        plot_scaling(rows, out / "scaling.png")
        md += [
            "## Scaling with N and M",
            "",
            "Gap is measured against the exact expert's certified lower bound (so exact's own gap is its "
            "certified gap when its time limit stops it).",
            "",
            markdown_table(rows, SCALING_COLUMNS),
            "![scaling](scaling.png)",
            "",
        ]
    write_json(out / "report.json", result)
    atomic_write_text(out / "report.md", "\n".join(md))
    return result
