"""The exact expert against brute-force enumeration, the evaluator, and its own certificates.

Small instances (N <= 6, M = 2..3) are enumerated completely by the brute-force reference; the exact
expert must find the same objective (both prompts), a lower bound below it, and a feasible decision.
The instance families cover the paper scenario shrunk, the `deadline` drift (UEs that must
offload) and a tight family where minimum shares bind in the water-filling.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from lambo_ray.errors import LamboInputError
from lambo_ray.experts import get_expert
from lambo_ray.experts.bruteforce import MAX_ASSIGNMENTS, brute_force
from lambo_ray.experts.exact import ExactConfig, ExactExpert
from lambo_ray.experts.exact_model import build_model
from lambo_ray.mec.drift import apply_drift
from lambo_ray.mec.evaluator import evaluate
from lambo_ray.mec.generator import generate_many
from lambo_ray.mec.instance import PROMPTS, Instance
from lambo_ray.mec.scenario import ScenarioConfig

FAMILIES = {
    "paper_n6_m2": ScenarioConfig(n_ues=6, n_servers=2, capacities_cps=(1.5e10, 3e10)),
    "paper_n5_m3": ScenarioConfig(n_ues=5, n_servers=3, capacities_cps=(1.5e10, 3e10, 5e10)),
    "deadline_drift_n6_m3": apply_drift(
        ScenarioConfig(n_ues=6, n_servers=3, capacities_cps=(1.5e10, 1.5e10, 3e10)), "deadline"
    ),
    "tight_n6_m2": ScenarioConfig(n_ues=6, n_servers=2, capacities_cps=(5e9, 1e10), deadline_factor=(0.6, 1.0)),
}
SEEDS = (0, 1)
PER_SEED = 2
# Tight enough that "equal within 1e-6" is a statement about the optimum, not about the tolerance.
TIGHT = ExactConfig(gap_tol=1e-9)


def family(name: str, seed: int) -> list[Instance]:
    return generate_many(FAMILIES[name], PER_SEED, seed=seed)


@pytest.fixture(scope="module")
def exact_tight() -> ExactExpert:
    return ExactExpert(TIGHT)


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_exact_matches_brute_force(name: str, seed: int, prompt: str, exact_tight: ExactExpert) -> None:
    for inst in family(name, seed):
        ref = get_expert("brute_force").solve(inst, prompt)
        got = exact_tight.solve(inst, prompt)
        assert ref.stats["status"] == "optimal" and math.isfinite(ref.objective)
        assert got.stats["status"] == "optimal" and got.stats["proven_optimal"] is True
        assert got.objective == pytest.approx(ref.objective, rel=1e-6)
        ev = evaluate(inst, got.target, got.share)
        assert ev.feasible, ev.violations
        assert ev.objective(prompt) == got.objective  # the claimed value is the evaluator's
        assert got.stats["lower_bound"] <= got.objective * (1 + 1e-9)
        # The certificate is honest: its bound does not exceed the enumerated optimum either.
        assert got.stats["lower_bound"] <= ref.objective * (1 + 1e-9)


def test_families_exercise_hard_cases() -> None:
    """The brute-force comparison above is only as good as its instances: check they include UEs that
    must offload and optima whose water-filling clamps a share at its deadline minimum."""
    must = [inst for s in SEEDS for inst in family("deadline_drift_n6_m3", s) if (~inst.local_feasible()).any()]
    assert must, "the deadline drift family has no UE that must offload"
    binding = 0
    for s in SEEDS:
        for inst in family("tight_n6_m2", s):
            target, share, _, _ = brute_force(inst, "min_latency")
            off = np.flatnonzero(target > 0)
            a_min = inst.min_share()[off, target[off] - 1]
            binding += bool(np.any(np.isclose(share[off], a_min, rtol=1e-9)))
    assert binding >= 1, "no optimum in the tight family has a binding minimum share"


def test_brute_force_refuses_large_instances() -> None:
    inst = generate_many(ScenarioConfig(n_ues=12, n_servers=4), 1, seed=0)[0]
    assert MAX_ASSIGNMENTS < (4 + 1) ** 12
    with pytest.raises(LamboInputError, match="brute force"):
        get_expert("brute_force").solve(inst, "min_latency")


def test_infeasible_instance_is_reported() -> None:
    """A UE that misses its deadline locally and cannot even upload in time: no decision exists."""
    inst = Instance(
        data_bits=np.array([1e8, 1e8]),
        cycles=np.array([1e10, 1e10]),
        deadline_s=np.array([5.0, 20.0]),
        local_cps=np.array([1e9, 1e9]),
        rate_bps=np.array([[1e7], [1e7]]),
        capacity_cps=np.array([1e10]),
    )  # UE 0: local 10 s > 5 s, upload alone 10 s > 5 s
    for prompt in PROMPTS:
        got = ExactExpert().solve(inst, prompt)
        assert got.stats["status"] == "infeasible" and got.stats["proven_optimal"] is False
        assert not got.stats["feasible"]
        assert get_expert("brute_force").solve(inst, prompt).stats["status"] == "infeasible"


def test_model_structure() -> None:
    """Pairs whose deadline is unreachable get no variables; UEs that miss locally must offload."""
    inst = family("deadline_drift_n6_m3", 0)[0]
    model = build_model(inst, "min_latency")
    allowed = {(i, j) for i, j in zip(*np.nonzero(inst.min_share() <= 1.0))}
    assert set(model.P) == allowed
    for i in np.flatnonzero(~inst.local_feasible()):
        assert model.one_place[i].equality
    assert hasattr(model, "t") and not hasattr(build_model(inst, "min_energy"), "t")


# ----------------------------------------------------------------------------- paper scenario


@pytest.fixture(scope="module")
def paper_instance() -> Instance:
    return generate_many(ScenarioConfig(), 1, seed=0)[0]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_paper_scenario_proves_optimality(prompt: str, paper_instance: Instance) -> None:
    """N = 50, M = 4, default config: certified gap <= 1e-4 (about 0.05 s for min_energy and 1-3 s of
    CPU for min_latency on an idle core)."""
    got = ExactExpert().solve(paper_instance, prompt)
    assert got.stats["status"] == "optimal" and got.stats["proven_optimal"] is True
    assert 0.0 <= got.stats["gap"] <= 1e-4
    assert got.stats["lower_bound"] <= got.objective * (1 + 1e-9)
    assert got.objective <= got.stats["lower_bound"] * (1 + 1e-4) + 1e-12
    ev = evaluate(paper_instance, got.target, got.share)
    assert ev.feasible and ev.objective(prompt) == got.objective
    # Optimal is at least as good as the trivial decision (all local is feasible in this scenario).
    all_local = evaluate(paper_instance, np.zeros(50, np.int64), np.zeros(50))
    assert all_local.feasible and got.objective < all_local.objective(prompt)
    if prompt == "min_latency":
        assert got.stats["rounds"] >= 2 and got.stats["n_cuts"] > 0


def test_time_limit_returns_feasible_uncertified_decision(paper_instance: Instance) -> None:
    limit = 0.5
    start = time.perf_counter()
    got = ExactExpert().solve(paper_instance, "min_latency", time_limit=limit)
    elapsed = time.perf_counter() - start
    assert got.stats["status"] == "time_limit" and got.stats["proven_optimal"] is False
    assert got.stats["feasible"] and evaluate(paper_instance, got.target, got.share).feasible
    # Usually the first outer-approximation round ends inside the limit and certifies a bound; on a
    # loaded machine it may not (seen once in the full suite): then neither a bound nor a gap is claimed.
    if got.stats["lower_bound"] is None:
        assert got.stats["gap"] is None
    else:
        assert got.stats["gap"] is not None and got.stats["gap"] > 1e-4
        assert got.stats["lower_bound"] <= got.objective
    assert elapsed < limit + 2.0  # model build and the last HiGHS call's wind-down only


def test_config_validation_and_overrides() -> None:
    with pytest.raises(ValueError):
        ExactConfig(gap_tol=-1.0)
    with pytest.raises(LamboInputError, match="time limit"):
        ExactExpert().solve(family("paper_n6_m2", 0)[0], "min_energy", time_limit=0.0)
    expert = get_expert("exact", gap_tol=1e-3, threads=1)
    assert isinstance(expert, ExactExpert) and expert.config.gap_tol == 1e-3


@pytest.mark.slow
def test_deadline_drift_paper_size_proves_optimality() -> None:
    """N = 50 under the `deadline` drift (15 UEs must offload, minimum shares bind): the hardest
    case measured, about 20-35 s of CPU, so opt-in."""
    inst = generate_many(apply_drift(ScenarioConfig(), "deadline"), 1, seed=3)[0]
    assert (~inst.local_feasible()).sum() > 0
    got = ExactExpert().solve(inst, "min_latency", time_limit=300)
    assert got.stats["status"] == "optimal" and got.stats["gap"] <= 1e-4
    assert evaluate(inst, got.target, got.share).feasible
    assert got.stats["lower_bound"] <= got.objective


def test_a_near_optimal_mip_start_does_not_end_the_search_early():
    """HiGHS 1.16 scores a MIP start in the presolved space without the objective offset of the columns
    presolve removed: on these two tight-deadline instances, local search's decision (the exact expert's
    first incumbent) then came back "optimal" 0.6-1.3 % above the optimum. The expert must notice the
    mis-scored start, solve again without it, and prove the same optimum as a solve that had no start."""
    from lambo_ray.experts.exact import ExactConfig, ExactExpert
    from lambo_ray.mec.drift import apply_drift
    from lambo_ray.mec.generator import generate_many
    from lambo_ray.mec.scenario import ScenarioConfig, default_capacities

    cfg = apply_drift(ScenarioConfig(n_ues=50, n_servers=4, capacities_cps=default_capacities(4)), "deadline")
    instances = generate_many(cfg, 6, 80400)[4:6]
    for inst in instances:
        started = ExactExpert(ExactConfig(heuristic_start=True)).solve(inst, "min_energy", 60.0)
        cold = ExactExpert(ExactConfig(heuristic_start=False, warm_start=False)).solve(inst, "min_energy", 60.0)
        assert started.stats["status"] == cold.stats["status"] == "optimal"
        assert started.objective == pytest.approx(cold.objective, rel=1e-9)
