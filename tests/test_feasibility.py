"""Feasible by construction: on random small instances with tight deadlines (deadline factor down to
0.5 x the local time, capacities shrunk so that some instances have no feasible decision at all), every
LAMBO decode mode and both heuristics return a feasible decision exactly when brute force finds a
feasible assignment, and say so plainly when there is none."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lambo_ray.experts import get_expert
from lambo_ray.experts.bruteforce import brute_force
from lambo_ray.mec.evaluator import evaluate
from lambo_ray.mec.generator import build_instance
from lambo_ray.mec.packing import first_fit_decreasing, pack_must_offload, pack_rows
from lambo_ray.mec.scenario import ScenarioConfig
from lambo_ray.policy import LamboPolicy, PolicyConfig, decide

MODES = ("greedy", "sample", "best_of_k", "refine", "search")
TINY = PolicyConfig(d_model=16, n_heads=2, enc_layers=1)


def tight_instance(seed: int):
    """N in 3..6, M in 1..3, deadlines 0.5-1.3 x local time, capacities scaled by 0.05-1.5."""
    rng = np.random.default_rng(seed)
    n, m = int(rng.integers(3, 7)), int(rng.integers(1, 4))
    cfg = ScenarioConfig(
        n_ues=n, n_servers=m, capacities_cps=tuple([1.5e10, 3e10, 5e10][:m]), deadline_factor=(0.5, 1.3)
    )
    inst = build_instance(
        cfg, rng, rng.uniform(0, 50, (n, 2)), rng.uniform(0, 50, (m, 2)), np.array(cfg.capacities_cps)
    )
    return dataclasses.replace(inst, capacity_cps=inst.capacity_cps * rng.uniform(0.05, 1.5, m))


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    return LamboPolicy(TINY).eval()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1))
def test_every_mode_is_feasible_exactly_when_brute_force_is(policy, seed):
    inst = tight_instance(seed)
    prompt = ("min_latency", "min_energy")[seed % 2]
    _, _, best, n_feasible = brute_force(inst, prompt)
    exists = n_feasible > 0
    assert pack_must_offload(inst).feasible == exists
    decisions = [decide(policy, [inst], prompt, mode, k=4, seed=seed)[0] for mode in MODES]
    decisions += [get_expert(name).solve(inst, prompt) for name in ("greedy", "local_search")]
    for d in decisions:
        ev = evaluate(inst, d.target, d.share)
        assert ev.feasible == exists, (d.method, d.stats.get("decode"), ev.violations)
        assert d.stats["feasible"] == exists
        if exists:
            assert d.objective >= best * (1 - 1e-9)
        else:
            assert d.stats["status"] == "infeasible" and d.stats["infeasible_reason"]


def test_infeasibility_reason_is_plain():
    """Two UEs that must offload, each needing 60% of the only server: proven impossible, and said so."""
    packing = pack_rows(np.array([[0.6], [0.6]]), np.array([True, True]))
    assert packing.status == "infeasible" and "cannot all fit" in packing.reason


def test_milp_finds_packings_first_fit_misses():
    """Both greedy packings strand a UE here; the exact model finds the packing that exists."""
    a_min = np.array([[0.328, 0.51], [0.374, 0.462], [0.596, 0.585], [0.376, 0.433]])
    must = np.ones(4, dtype=bool)
    assert first_fit_decreasing(a_min, np.ones(2)) is None
    packing = pack_rows(a_min, must)
    assert packing.status == "milp"
    load = np.zeros(2)
    np.add.at(load, packing.plan, a_min[np.arange(4), packing.plan])
    assert np.all(load <= 1 + 1e-12)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1))
def test_search_is_never_worse_than_local_search_even_when_the_budget_cuts_it_short(policy, seed):
    """With the heuristic start on, the local_search baseline's decision is a floor of ``search``: an
    untrained policy's proposals and a budget too short to polish them still give a decision at least
    as good as local search's (by the evaluator)."""
    from lambo_ray.mec.generator import generate_many

    rng = np.random.default_rng(seed)
    n, m = int(rng.integers(20, 61)), int(rng.integers(2, 5))
    cfg = ScenarioConfig(n_ues=n, n_servers=m, capacities_cps=tuple([1.5e10, 3e10, 5e10, 1.5e10][:m]))
    inst = generate_many(cfg, 1, seed)[0]
    prompt = ("min_latency", "min_energy")[seed % 2]
    floor = get_expert("local_search").solve(inst, prompt)
    got = decide(policy, [inst], prompt, "search", k=2, seed=seed, time_budget_s=1e-4)[0]
    assert evaluate(inst, got.target, got.share).feasible
    assert got.objective <= floor.objective * (1 + 1e-9), (got.stats, floor.objective)


def test_the_decoders_must_offload_plan_is_local_searchs_placement():
    """min_energy: where UEs must offload, the plan the decoder reserves capacity on is local search's
    placement of exactly those UEs (and the decision says so); min_latency keeps the packing chain's
    plan; without such UEs there is nothing to plan."""
    from lambo_ray.experts.heuristics import local_search_assignment
    from lambo_ray.experts.placement import build_tables
    from lambo_ray.mec.drift import apply_drift
    from lambo_ray.mec.generator import generate_many
    from lambo_ray.mec.scenario import PAPER
    from lambo_ray.policy.decoding import decode_packing

    torch.manual_seed(0)
    policy = LamboPolicy(TINY).eval()
    for inst in generate_many(apply_drift(PAPER, "deadline"), 3, 5):
        must = ~inst.local_feasible()
        assert must.any()
        packing, found = decode_packing(inst, "min_energy")
        placed = local_search_assignment(build_tables(inst, "min_energy")).target
        assert packing.status == "local_search" and packing.feasible and np.array_equal(found.target, placed)
        assert np.array_equal(packing.plan, np.where(must, placed - 1, -1))
        decision = decide(policy, [inst], "min_energy", "greedy")[0]
        assert decision.stats["packing"] == "local_search" and evaluate(inst, decision.target, decision.share).feasible
        assert decode_packing(inst, "min_latency")[0].status in ("first_fit", "regret_fit", "milp")
    relaxed = generate_many(PAPER, 1, 5)[0]
    assert decode_packing(relaxed, "min_energy")[0].status == "none_needed"
