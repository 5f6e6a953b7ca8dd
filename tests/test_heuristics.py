"""Heuristic baselines and the incremental placement model, checked against the evaluator and brute force."""

from __future__ import annotations

import numpy as np
import pytest

from lambo_ray.errors import LamboInputError
from lambo_ray.experts import get_expert
from lambo_ray.experts.bruteforce import brute_force
from lambo_ray.experts.heuristics import equal_shares, improve
from lambo_ray.experts.placement import Assignment, build_tables
from lambo_ray.mec.drift import apply_drift
from lambo_ray.mec.evaluator import evaluate
from lambo_ray.mec.generator import generate_many
from lambo_ray.mec.instance import PROMPTS
from lambo_ray.mec.scenario import ScenarioConfig
from lambo_ray.mec.shares import optimal_shares

FEASIBLE_METHODS = ("greedy", "local_search")


@pytest.fixture(scope="module")
def drifted_instances():
    out = {name: generate_many(apply_drift(ScenarioConfig(), name), 3, seed=11) for name in ("deadline", "outage")}
    # The deadline drift must really force offloading, else the test below proves nothing.
    assert all((~inst.local_feasible()).sum() >= 5 for inst in out["deadline"])
    return out


def _objective(inst, target, prompt):
    """The evaluator's objective of an assignment at water-filled shares (inf if none exist)."""
    share = optimal_shares(inst, target)
    if share is None:
        return np.inf
    ev = evaluate(inst, target, share)
    return ev.objective(prompt) if ev.feasible else np.inf


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("method", FEASIBLE_METHODS)
def test_feasible_on_paper_and_drifted(paper_instances, drifted_instances, method, prompt):
    expert = get_expert(method)
    for inst in [*paper_instances, *drifted_instances["deadline"], *drifted_instances["outage"]]:
        d = expert.solve(inst, prompt)
        ev = evaluate(inst, d.target, d.share)
        assert ev.feasible, ev.violations
        assert d.objective == pytest.approx(ev.objective(prompt), rel=1e-12)
        # The incremental model's own value is the evaluator's value.
        assert d.stats["model_objective"] == pytest.approx(ev.objective(prompt), rel=1e-9)


def test_all_local_feasible_unless_some_ue_must_offload(paper_instances, drifted_instances):
    expert = get_expert("all_local")
    for inst in [*paper_instances, *drifted_instances["outage"], *drifted_instances["deadline"]]:
        d = expert.solve(inst, "min_energy")
        assert np.all(d.target == 0) and np.all(d.share == 0)
        assert d.stats["feasible"] == bool(inst.local_feasible().all())


@pytest.mark.parametrize("prompt", PROMPTS)
def test_local_search_never_worse_than_greedy(paper_instances, drifted_instances, prompt):
    greedy, ls = get_expert("greedy"), get_expert("local_search")
    for inst in [*paper_instances, *drifted_instances["deadline"], *drifted_instances["outage"]]:
        g, s = greedy.solve(inst, prompt), ls.solve(inst, prompt)
        assert s.objective <= g.objective * (1 + 1e-12)
        assert s.stats["start_objective"] == pytest.approx(g.objective, rel=1e-9)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_against_brute_force(small_instances, prompt):
    greedy, ls = get_expert("greedy"), get_expert("local_search")
    for inst in small_instances:
        _, _, opt, _ = brute_force(inst, prompt)
        g, s = greedy.solve(inst, prompt), ls.solve(inst, prompt)
        assert g.stats["feasible"] and s.stats["feasible"]
        assert g.objective >= opt * (1 - 1e-9)
        assert opt * (1 - 1e-9) <= s.objective <= opt * 1.03


@pytest.mark.parametrize("prompt", PROMPTS)
def test_local_search_result_is_a_local_optimum(paper_instances, prompt):
    """No single move and no swap improves the final decision, checked by re-solving the shares and
    re-evaluating each neighbour from scratch (independent of the incremental model)."""
    inst = paper_instances[0]
    d = get_expert("local_search").solve(inst, prompt)
    base = d.objective
    n, m = inst.n_ues, inst.n_servers
    for i in range(n):
        for q in range(m + 1):
            if q == d.target[i]:
                continue
            t = d.target.copy()
            t[i] = q
            assert _objective(inst, t, prompt) >= base * (1 - 1e-9), (i, q)
    for i in range(n):
        for k in range(i + 1, n):
            if d.target[i] == d.target[k]:
                continue
            t = d.target.copy()
            t[i], t[k] = t[k], t[i]
            assert _objective(inst, t, prompt) >= base * (1 - 1e-9), (i, k)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_incremental_deltas_match_evaluator_and_bounds_hold(paper_instances, prompt):
    """Exact move/swap deltas equal the evaluator's difference; the screening bounds never exceed them."""
    inst = paper_instances[1]
    tables = build_tables(inst, prompt)
    a = Assignment(tables, get_expert("greedy").solve(inst, prompt).target)
    base = _objective(inst, a.target, prompt)
    assert a.objective == pytest.approx(base, rel=1e-9)
    moves, swaps = a.move_bounds(), a.swap_bounds()
    rng = np.random.default_rng(0)
    for _ in range(60):
        i, q = int(rng.integers(inst.n_ues)), int(rng.integers(inst.n_servers + 1))
        if q == a.target[i]:
            continue
        t = a.target.copy()
        t[i] = q
        exact = a.move_delta(i, q) * tables.scale
        truth = _objective(inst, t, prompt) - base
        assert (exact == truth == np.inf) or exact == pytest.approx(truth, abs=1e-9 * base)
        assert moves[i, q] * tables.scale <= truth + 1e-9 * base
    for _ in range(60):
        i, k = sorted(rng.choice(inst.n_ues, 2, replace=False).tolist())
        if a.target[i] == a.target[k]:
            continue
        t = a.target.copy()
        t[i], t[k] = t[k], t[i]
        truth = _objective(inst, t, prompt) - base
        exact = a.swap_delta(i, k) * tables.scale
        assert (exact == truth == np.inf) or exact == pytest.approx(truth, abs=1e-9 * base)
        assert swaps[i, k] * tables.scale <= truth + 1e-9 * base


@pytest.mark.parametrize("prompt", PROMPTS)
def test_improve_from_random_starts(drifted_instances, prompt):
    """improve() repairs infeasible starts and never worsens feasible ones."""
    rng = np.random.default_rng(3)
    for inst in drifted_instances["deadline"]:
        for _ in range(3):
            start = rng.integers(0, inst.n_servers + 1, size=inst.n_ues)
            out = improve(inst, prompt, start)
            value = _objective(inst, out, prompt)
            assert np.isfinite(value)
            assert value <= _objective(inst, start, prompt) * (1 + 1e-12)


def test_improve_respects_max_moves_and_keeps_optimum(small_instances):
    inst = small_instances[0]
    opt_t, _, opt, _ = brute_force(inst, "min_latency")
    assert _objective(inst, improve(inst, "min_latency", opt_t), "min_latency") == pytest.approx(opt, rel=1e-12)
    start = np.zeros(inst.n_ues, dtype=np.int64)
    assert np.array_equal(improve(inst, "min_latency", start, max_moves=0), start)
    one = improve(inst, "min_latency", start, max_moves=1)
    assert int((one != start).sum()) <= 2


def test_improve_rejects_bad_targets(paper_instances):
    inst = paper_instances[0]
    with pytest.raises(LamboInputError, match="target"):
        improve(inst, "min_energy", np.zeros(3, dtype=np.int64))
    with pytest.raises(LamboInputError, match="target"):
        improve(inst, "min_energy", np.full(inst.n_ues, inst.n_servers + 1))
    with pytest.raises(LamboInputError, match="prompt"):
        improve(inst, "max_fun", np.zeros(inst.n_ues, dtype=np.int64))


def test_all_offload_equal_shares_and_seeded(paper_instances):
    inst = paper_instances[0]
    a, b = (
        get_expert("all_offload", seed=5).solve(inst, "min_energy"),
        get_expert("all_offload", seed=5).solve(inst, "min_energy"),
    )
    assert np.array_equal(a.target, b.target) and np.all(a.target > 0)
    load = np.bincount(a.target, weights=a.share, minlength=inst.n_servers + 1)[1:]
    used = np.bincount(a.target, minlength=inst.n_servers + 1)[1:] > 0
    np.testing.assert_allclose(load[used], 1.0)
    for j in range(1, inst.n_servers + 1):  # equal within a server
        on_j = a.share[a.target == j]
        assert on_j.size == 0 or np.ptp(on_j) == 0.0
    best = get_expert("all_offload", server="best_rate").solve(inst, "min_latency")
    np.testing.assert_array_equal(best.target, np.argmax(inst.rate_bps, axis=1) + 1)
    np.testing.assert_allclose(equal_shares(np.array([0, 1, 1, 2]), 2), [0, 0.5, 0.5, 1.0])
    with pytest.raises(LamboInputError, match="server"):
        get_expert("all_offload", server="nearest_star")


def test_local_search_options(paper_instances):
    inst = paper_instances[0]
    with pytest.raises(LamboInputError, match="start"):
        get_expert("local_search", start="random")
    with pytest.raises(LamboInputError, match="option"):
        get_expert("local_search", tabu=True)
    d = get_expert("local_search", start="all_local", swaps=False).solve(inst, "min_energy")
    assert d.stats["feasible"] and d.stats["swaps"] == 0
    assert d.objective < get_expert("all_local").solve(inst, "min_energy").objective


@pytest.mark.parametrize("prompt", ["min_energy", "min_latency"])
def test_chain_bounds_are_lower_bounds_and_exact_for_energy(prompt):
    """Every screened ejection chain's bound is below its exact cost change (equal for min_energy, whose
    objective ignores shares), and descending with chains never ends worse than without."""
    from lambo_ray.experts.chains import _server_bounds, chain_delta
    from lambo_ray.experts.heuristics import descend, greedy_assignment
    from lambo_ray.experts.placement import build_tables
    from lambo_ray.mec.generator import generate_many
    from lambo_ray.mec.scenario import ScenarioConfig

    for inst in generate_many(ScenarioConfig(n_ues=30), 3, seed=17):
        tables = build_tables(inst, prompt)
        a, _ = greedy_assignment(tables)
        checked = 0
        for j in range(1, inst.n_servers + 1):
            bounds, ins, ks = _server_bounds(a, j)
            for (ii, kk, ll), bound in np.ndenumerate(bounds):
                exact = chain_delta(a, int(ins[ii]), j, int(ks[kk]), ll)
                assert np.isfinite(bound) == np.isfinite(exact)
                if np.isfinite(exact):
                    checked += 1
                    assert bound <= exact + 1e-9
                    if prompt == "min_energy":
                        assert bound == pytest.approx(exact, abs=1e-9)
        assert checked > 50
        plain, with_chains = greedy_assignment(tables)[0], greedy_assignment(tables)[0]
        descend(plain)
        descend(with_chains, chains=True)
        assert with_chains.cost <= plain.cost * (1 + 1e-12) and with_chains.feasible


def test_lp_relaxation_bounds_the_optimum_and_lp_guided_rounds_only_improve(small_instances):
    """min_energy's LP relaxation: a fractional assignment (one unit per UE, within capacity) whose value
    is at most the brute-force optimum; the neighbourhoods it guides keep a start's feasibility and never
    make it worse, and from the all-local-where-possible start they reach the optimum on these tiny cells
    (every UE the LP places elsewhere is freed, and the sub-model is exact)."""
    from lambo_ray.experts.consensus import lp_guided_rounds, lp_relaxation
    from lambo_ray.experts.exact import fallback_assignment

    reached = 0
    for inst in small_instances:
        tables = build_tables(inst, "min_energy")
        _, _, opt, _ = brute_force(inst, "min_energy")
        relaxed = lp_relaxation(tables)
        x, bound = relaxed.x, relaxed.value
        assert np.allclose(x.sum(axis=1), 1.0) and x.min() >= -1e-9
        load = (x[:, 1:] * np.where(np.isfinite(tables.a_min), tables.a_min, 0.0)).sum(axis=0)
        assert np.all(load <= 1.0 + 1e-7)
        assert bound == pytest.approx(float((x * tables.fixed).sum()), rel=1e-9)
        assert bound <= opt * (1 + 1e-9)
        start = fallback_assignment(inst)
        assert start is not None
        before = Assignment(tables, start)
        target, wins = lp_guided_rounds(tables, start, relaxed, np.random.default_rng(0), lambda: None, rounds=8)
        after = Assignment(tables, target)
        assert after.feasible and after.cost <= before.cost * (1 + 1e-12)
        assert (wins > 0) == (after.cost < before.cost * (1 - 1e-12))
        reached += after.objective <= opt * (1 + 1e-9)
    assert reached == len(small_instances), reached


def test_exact_polish_proves_the_brute_force_optimum_after_reduced_cost_fixing(small_instances):
    """The whole min_energy model after reduced-cost fixing: from every start (all-local-where-possible,
    and the optimum itself) it ends at the brute-force optimum and says it proved it, so the columns the
    fixing drops never hold a better assignment; from the optimum it returns None (nothing better)."""
    from lambo_ray.experts.consensus import exact_polish, lp_relaxation
    from lambo_ray.experts.exact import fallback_assignment

    dropped = 0
    for inst in small_instances:
        tables = build_tables(inst, "min_energy")
        opt_target, _, opt, _ = brute_force(inst, "min_energy")
        relaxed = lp_relaxation(tables)
        start = fallback_assignment(inst)
        assert start is not None
        start_cost = Assignment(tables, start).objective
        found, proved = exact_polish(tables, start, relaxed, None)
        assert proved
        final = Assignment(tables, start if found is None else found)
        assert final.feasible and final.objective == pytest.approx(opt, rel=1e-6)
        assert (found is None) == (start_cost <= opt * (1 + 1e-9))
        again, proved = exact_polish(tables, np.asarray(opt_target), relaxed, None)
        assert again is None and proved
        slack = Assignment(tables, np.asarray(opt_target)).cost - relaxed.value
        dropped += int(np.sum(np.isfinite(relaxed.reduced) & (relaxed.reduced > slack + 1e-9)))
    assert dropped > 0  # the fixing did drop columns somewhere, so the test covers it


def test_exact_polish_from_local_search_reaches_the_exact_experts_optimum(paper_instances):
    """Paper cells, where the LP relaxation is fractional and the fixing drops about half the columns:
    from local search's decision the polish proves the optimum the full exact expert (Pyomo on HiGHS, no
    fixing) finds, so the dropped columns held no better assignment."""
    from lambo_ray.experts import get_expert
    from lambo_ray.experts.consensus import exact_polish, lp_relaxation
    from lambo_ray.experts.heuristics import local_search_assignment

    for inst in paper_instances[:3]:
        tables = build_tables(inst, "min_energy")
        start = local_search_assignment(tables)
        relaxed = lp_relaxation(tables)
        slack = start.cost - relaxed.value
        assert np.sum(np.isfinite(relaxed.reduced) & (relaxed.reduced > slack)) > 0
        found, proved = exact_polish(tables, start.target, relaxed, None)
        final = Assignment(tables, start.target if found is None else found)
        reference = get_expert("exact").solve(inst, "min_energy", 30)
        assert proved and reference.stats.get("proven_optimal")
        assert final.feasible and final.objective == pytest.approx(reference.objective, rel=2e-4)


def test_the_compiled_latency_term_equals_water_filled_shares():
    """The compiled server term (local search's inner loop) against the reference ``water_fill``: random
    server groups, many with clamped minimum shares, some over capacity or with an impossible UE."""
    from lambo_ray.experts.placement import CAP_TOL
    from lambo_ray.experts.server_kernel import latency_term
    from lambo_ray.mec.shares import water_fill

    rng = np.random.default_rng(3)
    clamped = infeasible = 0
    for _ in range(400):
        n = int(rng.integers(0, 12))
        sqrt_c = rng.uniform(0.1, 3.0, n)
        a_min = rng.uniform(0.0, 2.5 / max(n, 1), n) * rng.choice([0.0, 1.0], n, p=[0.3, 0.7])
        if n and rng.random() < 0.05:
            a_min[int(rng.integers(n))] = np.inf
        work = rng.uniform(0.01, 1.0, n)
        shares = water_fill(sqrt_c, a_min)
        got = latency_term(sqrt_c, a_min, work, CAP_TOL)
        if shares is None:
            infeasible += 1
            assert got == np.inf
        else:
            clamped += int(np.any(np.isclose(shares, a_min) & (a_min > 0)))
            assert got == pytest.approx(float((work / shares).sum()) if n else 0.0, rel=1e-12)
    assert clamped > 20 and infeasible > 20


def test_repair_succeeds_whenever_brute_force_finds_a_feasible_assignment():
    """Repair from bad starts (every UE on one server; random targets) on small tight-deadline cells: it
    makes the start feasible exactly when some feasible assignment exists (brute force), even when the
    start's offloaders crowd out the UEs that must offload."""
    from lambo_ray.experts.bruteforce import brute_force as enumerate_all
    from lambo_ray.experts.heuristics import repair

    cfg = ScenarioConfig(n_ues=7, n_servers=2, capacities_cps=(4e9, 6e9), deadline_factor=(0.5, 1.1))
    rng = np.random.default_rng(5)
    checked = 0
    for inst in generate_many(cfg, 40, seed=77):
        exists = enumerate_all(inst, "min_energy")[3] > 0
        tables = build_tables(inst, "min_energy")
        starts = [np.full(inst.n_ues, j + 1) for j in range(inst.n_servers)]
        starts += [rng.integers(0, inst.n_servers + 1, inst.n_ues) for _ in range(3)]
        for start in starts:
            a = Assignment(tables, start.astype(np.int64))
            if a.feasible:
                continue
            checked += 1
            assert repair(a) == exists
            assert a.feasible == exists
            if exists:
                assert evaluate(inst, a.target, optimal_shares(inst, a.target)).feasible
    assert checked > 100


def test_large_cell_branch_rounds_the_lp_and_stays_feasible(paper_instances, drifted_instances, monkeypatch):
    """With the exact polish ruled out (as in cells too large for it), step 2 starts from the rounded LP
    optimum: on paper and tight-deadline cells the result is feasible, never worse than the start, never
    below the LP bound, and the rounded start wins somewhere (so the branch is exercised)."""
    from lambo_ray.experts import ils
    from lambo_ray.experts.consensus import lp_relaxation
    from lambo_ray.experts.heuristics import local_search_assignment

    monkeypatch.setattr(ils, "EXACT_MAX_FREE", 0)
    winners = []
    for inst in list(paper_instances) + list(drifted_instances["deadline"]):
        tables = build_tables(inst, "min_energy")
        start = local_search_assignment(tables)
        res = ils.iterated_local_search(tables, [("ls", start.target)], np.random.default_rng(0), kicks=0)
        final = Assignment(tables, res.target)
        assert final.feasible
        assert final.cost == pytest.approx(res.cost, rel=1e-9)
        assert res.cost <= start.cost * (1 + 1e-12)
        assert res.cost >= lp_relaxation(tables).value * (1 - 1e-9)
        assert evaluate(inst, res.target, optimal_shares(inst, res.target)).feasible
        winners.append(res.winner)
    assert "lp_round" in winners, winners
