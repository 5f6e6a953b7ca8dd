"""The main job end to end on a tiny scenario (the README's `lambo demo`, seconds-long variant)."""

from __future__ import annotations

import json

import numpy as np

from lambo_ray.cli import main
from lambo_ray.mec.evaluator import evaluate
from lambo_ray.mec.io import read_instances


def test_demo_tiny_pipeline(ray_session, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--tiny", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Comparison (gap to exact in %)" in printed and "Demo finished" in printed
    report = json.loads((out / "report" / "report.json").read_text())
    methods = {r["method"] for r in report["comparison"]}
    assert {
        "exact",
        "lambo",
        "lambo_best_of_k",
        "local_search",
        "greedy",
        "de",
        "droo",
        "are",
        "all_local",
        "all_offload",
    } <= methods
    assert any(r["method"] == "lambo+alef" for r in report["drift"])
    # The exact row of the report is optimal: no method beats it on any prompt.
    for prompt in ("min_latency", "min_energy"):
        rows = [r for r in report["comparison"] if r["prompt"] == prompt]
        assert all(r["gap_pct"] >= -1e-6 for r in rows)
    # all_local's latency in the report equals the evaluator's on the held-out file
    insts = read_instances(out / "heldout.jsonl")
    local = np.mean([evaluate(i, np.zeros(i.n_ues, int), np.zeros(i.n_ues)).mean_latency_s for i in insts])
    row = next(r for r in report["comparison"] if r["method"] == "all_local" and r["prompt"] == "min_latency")
    assert abs(row["mean_latency_s"] - local) < 1e-9
    for f in ("fig5_latency.png", "fig6_energy.png", "drift.png", "report.md"):
        assert (out / "report" / f).exists()
    assert (out / "pretrain" / "policy").is_dir() and (out / "decoder_outage" / "metrics.json").exists()
    # Re-running into the same directory without --overwrite refuses and keeps what is there.
    before = sorted(p.name for p in (out / "pretrain").iterdir())
    assert main(["demo", "--tiny", "--out", str(out)]) == 2
    assert sorted(p.name for p in (out / "pretrain").iterdir()) == before
