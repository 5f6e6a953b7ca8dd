"""Differential evolution: feasibility, reproducibility, budget, brute-force optimum, batch shares."""

from __future__ import annotations

import numpy as np
import pytest

from lambo_ray.errors import LamboInputError
from lambo_ray.experts import get_expert
from lambo_ray.experts.bruteforce import brute_force
from lambo_ray.experts.de import DEConfig, population_shares, violation
from lambo_ray.mec.drift import apply_drift
from lambo_ray.mec.evaluator import evaluate
from lambo_ray.mec.generator import generate_many
from lambo_ray.mec.instance import PROMPTS
from lambo_ray.mec.scenario import ScenarioConfig
from lambo_ray.mec.shares import optimal_shares

FAST = {"generations": 150}  # 7.5k evaluations: enough for feasibility checks, keeps the suite fast


@pytest.fixture(scope="module")
def deadline_instances():
    insts = generate_many(apply_drift(ScenarioConfig(), "deadline"), 3, seed=11)
    assert all((~inst.local_feasible()).sum() >= 5 for inst in insts)
    return insts


@pytest.fixture(scope="module")
def outage_instances():
    return generate_many(apply_drift(ScenarioConfig(), "outage"), 2, seed=11)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_feasible_on_paper_and_drifted(paper_instances, deadline_instances, outage_instances, prompt):
    de = get_expert("de", seed=1, **FAST)
    for inst in [*paper_instances, *deadline_instances, *outage_instances]:
        d = de.solve(inst, prompt)
        ev = evaluate(inst, d.target, d.share)
        assert ev.feasible, ev.violations
        assert d.objective == pytest.approx(ev.objective(prompt), rel=1e-12)
        assert d.stats["generations"] == FAST["generations"]
        assert d.stats["evaluations"] == DEConfig().population * FAST["generations"]


def test_reproducible_for_a_seed(paper_instances):
    inst = paper_instances[2]
    a = get_expert("de", seed=7, **FAST).solve(inst, "min_latency")
    b = get_expert("de", seed=7, **FAST).solve(inst, "min_latency")
    c = get_expert("de", seed=8, **FAST).solve(inst, "min_latency")
    np.testing.assert_array_equal(a.target, b.target)
    np.testing.assert_array_equal(a.share, b.share)
    assert a.objective == b.objective
    assert not np.array_equal(a.target, c.target)  # the seed matters


@pytest.mark.parametrize("prompt", PROMPTS)
def test_finds_brute_force_optimum_on_tiny_instances(small_instances, prompt):
    de = get_expert("de", seed=0, population=20, generations=100)
    for inst in small_instances:
        _, _, opt, _ = brute_force(inst, prompt)
        d = de.solve(inst, prompt)
        assert d.stats["feasible"]
        assert d.objective == pytest.approx(opt, rel=1e-9)


def test_population_shares_match_water_filling_and_violation(paper_instances, deadline_instances):
    rng = np.random.default_rng(0)
    n_feasible = n_bind = n_compared = 0
    for inst in (paper_instances[0], deadline_instances[0]):
        k = 300
        # Mostly-local populations, so that many are feasible and some minimum shares bind.
        targets = np.where(
            rng.random((k, inst.n_ues)) < rng.uniform(0.4, 0.95, (k, 1)),
            0,
            rng.integers(1, inst.n_servers + 1, (k, inst.n_ues)),
        )
        a_min = inst.min_share()
        shares = population_shares(inst, targets, a_min)
        viol = violation(inst, targets, a_min, inst.local_feasible())
        for row in range(k):
            ref = optimal_shares(inst, targets[row])
            feasible = ref is not None and (inst.local_feasible() | (targets[row] > 0)).all()
            assert (viol[row] == 0) == feasible
            if ref is not None:
                np.testing.assert_allclose(shares[row], ref, rtol=1e-12, atol=1e-15)
                n_feasible += feasible
                n_compared += 1
                n_bind += bool(
                    np.any(
                        np.isclose(ref[targets[row] > 0], a_min[targets[row] > 0, targets[row][targets[row] > 0] - 1])
                    )
                )
    # The comparison covered feasible assignments and binding deadlines, not only the easy case.
    assert n_compared > 100 and n_feasible > 20 and n_bind > 5


def test_time_limit_and_budget(paper_instances):
    inst = paper_instances[0]
    d = get_expert("de", seed=0, generations=10_000).solve(inst, "min_energy", time_limit=0.2)
    assert d.stats["status"] == "time_limit" and d.stats["generations"] < 10_000 and d.stats["feasible"]
    d = get_expert("de", seed=0, population=10, generations=7).solve(inst, "min_energy")
    assert d.stats["evaluations"] == 70 and d.stats["status"] == "heuristic"


def test_falls_back_to_greedy_when_nothing_feasible_was_seen(deadline_instances):
    """Four random individuals essentially never keep every must-offload UE off its UE."""
    inst = deadline_instances[0]
    d = get_expert("de", seed=0, population=4, generations=1).solve(inst, "min_energy")
    g = get_expert("greedy").solve(inst, "min_energy")
    assert d.stats["fallback"] == "greedy" and d.stats["feasible"]
    np.testing.assert_array_equal(d.target, g.target)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_seeded_init_never_worse_than_greedy(deadline_instances, prompt):
    inst = deadline_instances[1]
    d = get_expert("de", seed=0, init="seeded", generations=20).solve(inst, prompt)
    assert d.objective <= get_expert("greedy").solve(inst, prompt).objective * (1 + 1e-12)


def test_bad_config_is_an_input_error():
    with pytest.raises(LamboInputError, match="population"):
        get_expert("de", population=2)
    with pytest.raises(LamboInputError, match="crossover"):
        get_expert("de", crossover=1.5)
    with pytest.raises(LamboInputError, match="init"):
        DEConfig(init="lhs")
    with pytest.raises(LamboInputError, match="option"):
        get_expert("de", strategy="best1bin")
