"""The generalization benchmark: stable held-out cells, honest acceptance marks, cached reruns."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

from lambo_ray.errors import LamboInputError
from lambo_ray.policy import LamboPolicy, save_policy, scale_config
from lambo_ray.references import ReferenceCache

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def gen():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("generalization")
    finally:
        sys.path.remove(str(BENCH))


def test_cell_seeds_do_not_depend_on_the_other_cells(gen):
    full = {c.label: c.seed for c in gen.grid_cells((20, 50, 100, 200), (2, 4, 8), list(gen.DRIFTS), 50_000)}
    part = {c.label: c.seed for c in gen.grid_cells((200,), (8,), ["density"], 50_000)}
    assert len(set(full.values())) == len(full) == 17
    assert part == {k: full[k] for k in part}
    assert min(full.values()) >= 50_000
    with pytest.raises(LamboInputError, match="unknown drift 'rain'"):
        gen.grid_cells((20,), (2,), ["rain"], 50_000)


def _row(cell, prompt, method, gap, feasible=1.0, ms=10.0, to_bound=None, drift=None):
    return {
        "cell": cell,
        "prompt": prompt,
        "method": method,
        "drift": drift,
        "gap_pct": gap,
        "gap_to_bound_pct": gap if to_bound is None else to_bound,
        "feasible_rate": feasible,
        "instances": 8,
        "decision_ms": ms,
        "decision_cpu_ms": ms,
    }


def _rows(over=None):
    """A table that meets every target; ``over`` replaces single rows by (cell, method)."""
    rows = []
    for cell, drift in (("N50-M4", None), ("N200-M8", None), ("drift:density", "density")):
        rows.append(_row(cell, "min_energy", "exact", 0.0, ms=60_000.0, drift=drift))
        rows.append(_row(cell, "min_energy", "lambo_greedy", 0.5, drift=drift))
        rows.append(_row(cell, "min_energy", "lambo_search", 0.1, ms=100.0, drift=drift))
        rows.append(_row(cell, "min_energy", "local_search", 0.2, drift=drift))
    for r in rows:
        r.update((over or {}).get((r["cell"], r["method"]), {}))
    return rows


def _verdicts(gen, rows):
    return {c["check"]: c["pass"] for c in gen.acceptance_checks(rows)}


def test_acceptance_targets_pass_and_fail(gen):
    assert all(_verdicts(gen, _rows()).values())
    cases = [
        (("N50-M4", "lambo_greedy"), {"gap_pct": 1.2}, "LAMBO greedy gap, N=50 M=4 (%)"),
        (("N200-M8", "lambo_greedy"), {"gap_pct": 3.5}, "LAMBO greedy gap, other sizes (%)"),
        (("drift:density", "lambo_greedy"), {"gap_pct": 3.1}, "LAMBO greedy gap, density drift (%)"),
        (("N50-M4", "lambo_search"), {"gap_pct": 0.3}, "search gap minus local search gap (pp)"),
        (("drift:density", "lambo_search"), {"feasible_rate": 7 / 8}, "infeasible LAMBO decisions"),
        (("N200-M8", "lambo_search"), {"gap_to_bound_pct": 0.6}, "search gap to bound, N=200 M=8 (%)"),
        (("N200-M8", "lambo_search"), {"decision_ms": 700.0}, "search time / exact time, N=200 M=8 (wall)"),
        (("N200-M8", "lambo_greedy"), {"gap_pct": None}, "LAMBO greedy gap, other sizes (%)"),
    ]
    for key, change, check in cases:
        verdicts = _verdicts(gen, _rows({key: change}))
        assert verdicts[check] is False, (key, change)
        assert sum(v is False for v in verdicts.values()) == 1, verdicts


def test_unmeasured_targets_are_not_passed(gen):
    rows = [r for r in _rows() if r["cell"] == "N50-M4"]
    verdicts = _verdicts(gen, rows)
    assert verdicts["search gap to bound, N=200 M=8 (%)"] is None
    assert verdicts["LAMBO greedy gap, density drift (%)"] is None


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--count", "0"], "--count must be >= 1"),
        (["--methods", "lambo_beam"], "unknown method"),
        (["--search-budget", "0"], "--search-budget"),
        (["--prompts", "min_cost"], "unknown prompt"),
        (["--quick", "--update-readme"], "do not go into the README"),
    ],
)
def test_bad_flags_are_one_clear_error(gen, argv, message):
    with pytest.raises(LamboInputError, match=message):
        gen.check_args(gen.parse_args(argv))


def test_small_run_end_to_end_then_rerun_from_the_caches(gen, tmp_path, monkeypatch):
    torch.manual_seed(0)
    save_policy(tmp_path / "policy", LamboPolicy(scale_config("S")))
    names = {"cache": "refs.jsonl", "runs-cache": "runs.jsonl", "out": "r.json", "markdown": "r.md", "plot": "r.png"}
    files = {k: tmp_path / name for k, name in names.items()}
    argv = ["--checkpoint", str(tmp_path / "policy"), "--count", "1", "--n-ues", "6", "--n-servers", "2"]
    argv += ["--drifts", "--methods", "lambo_greedy", "lambo_search", "local_search", "--exact-time-limit", "20"]
    for k, path in files.items():
        argv += [f"--{k}", str(path)]
    assert gen.main(argv) == 0
    doc = json.loads(files["out"].read_text())
    assert {r["method"] for r in doc["rows"]} == {"exact", "lambo_greedy", "lambo_search", "local_search"}
    assert all(r["feasible_rate"] == 1.0 for r in doc["rows"])
    assert doc["checkpoint"]["scale"] == "S" and doc["settings"]["search_budget_s"] == 0.4
    assert files["plot"].stat().st_size > 0 and "Acceptance targets" in files["markdown"].read_text()

    def must_not_run(*_args, **_kwargs):
        raise AssertionError("a cached result was computed again")

    monkeypatch.setattr(ReferenceCache, "solve", must_not_run)
    monkeypatch.setattr(gen, "run_one", must_not_run)
    assert gen.main(argv) == 0
    again = json.loads(files["out"].read_text())
    assert [r["gap_pct"] for r in again["rows"]] == [r["gap_pct"] for r in doc["rows"]]
