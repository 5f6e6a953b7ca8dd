"""The report on a tiny configuration: its numbers are checked against the evaluator and the JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lambo_ray.experts import get_expert
from lambo_ray.mec.evaluator import evaluate
from lambo_ray.mec.generator import generate_many
from lambo_ray.mec.scenario import ScenarioConfig
from lambo_ray.report import PolicySource, ReportConfig, build_report
from lambo_ray.results import fmt


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    cfg = ReportConfig(
        count=3, methods=("exact", "greedy", "all_local"), sections=("comparison",), exact_time_limit=60.0
    )
    result = build_report(out, PolicySource(None), cfg, log=lambda *_: None)
    return out, cfg, result


def test_report_numbers_match_the_evaluator(tiny_report):
    out, cfg, result = tiny_report
    instances = generate_many(ScenarioConfig(), cfg.count, cfg.seed)
    rows = {(r["prompt"], r["method"]): r for r in result["comparison"]}
    assert set(rows) == {(p, m) for p in cfg.prompts for m in cfg.methods}
    for prompt in cfg.prompts:
        exact = [get_expert("exact").solve(i, prompt, 60.0) for i in instances]
        greedy = [get_expert("greedy").solve(i, prompt) for i in instances]
        ref = np.array([evaluate(i, d.target, d.share).objective(prompt) for i, d in zip(instances, exact)])
        g = np.array([evaluate(i, d.target, d.share).objective(prompt) for i, d in zip(instances, greedy)])
        row = rows[(prompt, "greedy")]
        assert row["objective"] == pytest.approx(g.mean(), rel=1e-9)
        assert row["gap_pct"] == pytest.approx(100 * np.mean((g - ref) / ref), abs=1e-6)
        local = np.array([evaluate(i, np.zeros(i.n_ues, int), np.zeros(i.n_ues)) for i in instances])
        lrow = rows[(prompt, "all_local")]
        assert lrow["mean_latency_s"] == pytest.approx(np.mean([e.mean_latency_s for e in local]))
        assert lrow["total_energy_j"] == pytest.approx(np.mean([e.total_energy_j for e in local]))
        assert rows[(prompt, "exact")]["gap_pct"] == pytest.approx(0.0, abs=1e-9)
        assert row["gap_pct"] >= -1e-6  # exact is optimal


def test_report_files_agree(tiny_report):
    out, cfg, result = tiny_report
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["comparison"] == json.loads(json.dumps(result["comparison"]))
    md = (out / "report.md").read_text()
    for r in result["comparison"]:
        assert fmt(r["objective"]) in md or fmt(r["mean_latency_s"]) in md
    for png in ("fig5_latency.png", "fig6_energy.png"):
        assert (out / png).stat().st_size > 5000
