"""DROO and ARE: feasibility on paper and deadline-drifted instances, the order-preserving quantiser
against hand-worked and paper-formula results, ARE's equal split, learning from a warm-up, shape
checks and checkpoint round trips. Every objective and feasibility verdict comes from the evaluator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lambo_ray.errors import LamboInputError
from lambo_ray.experts import get_expert
from lambo_ray.experts.are import ARE, AREConfig, _Fitness, equal_shares, refine_to_local
from lambo_ray.experts.droo import DROO, DROOConfig, order_preserving_quantise, project_feasible
from lambo_ray.experts.online import fallback_assignment, fits_equal, fits_optimal
from lambo_ray.mec.drift import apply_drift
from lambo_ray.mec.evaluator import evaluate
from lambo_ray.mec.generator import generate_many
from lambo_ray.mec.instance import PROMPTS
from lambo_ray.mec.scenario import ScenarioConfig
from lambo_ray.mec.shares import optimal_shares

torch.set_num_threads(1)

SMALL = ScenarioConfig(n_ues=10, n_servers=2, capacities_cps=(1.5e10, 3e10))


@pytest.fixture(scope="module")
def deadline_instance():
    inst = generate_many(apply_drift(ScenarioConfig(), "deadline"), 1, seed=3)[0]
    assert (~inst.local_feasible()).sum() >= 5, "the drifted instance should have must-offload UEs"
    return inst


def _experts():
    # Short warm-ups keep the test fast; feasibility must hold whatever the training state.
    return {"droo": DROO(DROOConfig(warmup_steps=20)), "are": ARE(AREConfig(warmup_steps=10, damp_steps=10))}


# --- feasibility ---------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["droo", "are"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_decisions_are_feasible_and_scored_by_the_evaluator(method, prompt, paper_instances, deadline_instance):
    expert = _experts()[method]
    for inst in [*paper_instances, deadline_instance]:
        d = expert.solve(inst, prompt)
        ev = evaluate(inst, d.target, d.share)
        assert ev.feasible, (method, prompt, ev.violations[:3])
        assert d.objective == pytest.approx(ev.objective(prompt), rel=1e-12)
        assert d.stats["feasible"] and d.method == method
    if method == "are":
        assert expert.counters["fallbacks"] < expert.counters["steps"]  # SA found feasible decisions itself


def test_are_shares_are_exact_equal_splits(paper_instances, deadline_instance):
    expert = ARE(AREConfig(warmup_steps=10, damp_steps=10))
    for inst in [*paper_instances, deadline_instance]:
        d = expert.solve(inst, "min_latency")
        assert d.stats["fallback"] != "water_filling"
        offloaded = np.flatnonzero(d.target > 0)
        assert offloaded.size > 0
        for j in np.unique(d.target[offloaded]):
            on_j = d.target == j
            assert np.all(d.share[on_j] == 1.0 / on_j.sum())  # exactly 1/n_j, not water-filled
        assert np.all(d.share[d.target == 0] == 0.0)


@pytest.mark.parametrize("rule", ["optimal", "equal"])
def test_fallback_places_every_must_offload_ue_feasibly(rule, deadline_instance):
    inst = deadline_instance
    target = fallback_assignment(inst, fits_optimal if rule == "optimal" else fits_equal)
    assert target is not None
    must = ~inst.local_feasible()
    assert np.all(target[must] > 0) and np.all(target[~must] == 0)
    share = optimal_shares(inst, target) if rule == "optimal" else equal_shares(inst, target)
    assert evaluate(inst, target, share).feasible


def test_are_local_refinement_never_worsens_a_feasible_decision(paper_instances):
    rng = np.random.default_rng(0)
    for inst in paper_instances[:3]:
        for prompt in PROMPTS:
            fit = _Fitness(inst, prompt, penalty=100.0)
            # A feasible start: UEs offloaded to their best-rate server, 4 per server at most.
            target = np.zeros(inst.n_ues, dtype=np.int64)
            for i in rng.permutation(inst.n_ues)[: 4 * inst.n_servers]:
                target[i] = 1 + int(np.argmax(inst.rate_bps[i]))
            before = evaluate(inst, target, equal_shares(inst, target))
            if not before.feasible:
                continue
            refined = refine_to_local(fit, target)
            after = evaluate(inst, refined, equal_shares(inst, refined))
            assert after.feasible
            assert after.objective(prompt) <= before.objective(prompt) + 1e-12
            assert np.all(refined[target == 0] == 0)  # only moves towards local


def test_projection_unloads_servers_by_largest_consumer_only_as_far_as_needed(paper_instances):
    rng = np.random.default_rng(2)
    for inst in paper_instances:
        a_min = inst.min_share()
        for _ in range(5):
            target = rng.integers(1, inst.n_servers + 1, inst.n_ues)  # everything offloaded: overloads
            projected = project_feasible(inst, target)
            moved = projected != target
            assert np.all(projected[moved] == 0)
            share = optimal_shares(inst, projected)
            assert share is not None and evaluate(inst, projected, share).feasible
            for j in range(1, inst.n_servers + 1):
                kept = np.flatnonzero(projected == j)
                removed = np.flatnonzero(moved & (target == j))
                removed = removed[np.isfinite(a_min[removed, j - 1])]  # unreachable ones always go
                if removed.size:
                    # the removed ones are the largest consumers, and putting the smallest back overloads
                    assert a_min[removed, j - 1].min() >= a_min[kept, j - 1].max(initial=0)
                    assert a_min[kept, j - 1].sum() + a_min[removed, j - 1].min() > 1.0


# --- order-preserving quantisation ---------------------------------------------------------------


def test_order_preserving_quantisation_hand_worked():
    prob = np.array(
        [
            [0.70, 0.20, 0.10],  # best 0, second 1, margin .5
            [0.10, 0.50, 0.40],  # best 1, second 2, margin .1
            [0.50, 0.30, 0.20],  # best 0, second 1, margin .2
            [0.30, 0.60, 0.10],  # best 1, second 0, margin .3
        ]
    )
    expected = np.array(
        [
            [0, 1, 0, 1],  # argmax
            [0, 2, 0, 1],  # pivot UE1 (margin .1): UEs with best 1 and margin <= .1 -> second choice
            [0, 1, 1, 1],  # pivot UE2 (margin .2): best 0 and margin <= .2
            [0, 2, 0, 0],  # pivot UE3 (margin .3): best 1 and margin <= .3 -> UE1 and UE3 move
            [1, 1, 1, 1],  # pivot UE0 (margin .5): best 0 and margin <= .5 -> UE0 and UE2 move
        ]
    )
    np.testing.assert_array_equal(order_preserving_quantise(prob, 4), expected[:4])
    np.testing.assert_array_equal(order_preserving_quantise(prob, 10), expected)  # at most N + 1
    np.testing.assert_array_equal(order_preserving_quantise(prob, 1), expected[:1])


def test_order_preserving_quantisation_reduces_to_droo_binary_formula():
    """Two options: the paper's eq. (8)-(9) as in revenol/DROO (knm), computed independently."""
    rng = np.random.default_rng(1)
    for _ in range(20):
        m = rng.uniform(0.01, 0.99, 12)
        k = int(rng.integers(1, 13))
        expected = [1 * (m > 0.5)]
        for idx in np.argsort(np.abs(m - 0.5))[: k - 1]:
            expected.append(1 * (m - m[idx] > 0) if m[idx] > 0.5 else 1 * (m - m[idx] >= 0))
        got = order_preserving_quantise(np.column_stack([1 - m, m]), k)
        np.testing.assert_array_equal(got, np.array(expected))


def test_order_preserving_quantisation_never_moves_to_a_masked_option():
    prob = np.array([[0.6, 0.4, 0.0], [1.0, 0.0, 0.0], [0.2, 0.0, 0.8]])
    cands = order_preserving_quantise(prob, 5)
    assert np.all(prob[np.arange(3)[None, :].repeat(len(cands), 0), cands] > 0)
    assert len(np.unique(cands, axis=0)) == len(cands) == 3  # argmax + one move each for UE0, UE2


# --- learning ------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", PROMPTS)
def test_droo_warmup_beats_its_untrained_self(prompt):
    """The DNN's own decision (K = 1, no candidate search) after 300 warm-up steps on a small cell."""
    test = generate_many(SMALL, 10, seed=5)
    untrained = DROO(DROOConfig(seed=0, warmup_steps=0, online=False))
    untrained.check_shape(test[0])
    untrained.fix_k(prompt, 1)
    trained = DROO(DROOConfig(seed=0, warmup_steps=0, online=False))
    trained.warmup(generate_many(SMALL, 300, seed=100), prompt)
    trained.fix_k(prompt, 1)
    before = np.mean([untrained.solve(i, prompt).objective for i in test])
    after = np.mean([trained.solve(i, prompt).objective for i in test])
    assert after < 0.98 * before, (before, after)


def test_droo_adaptive_k_shrinks_from_n():
    expert = DROO(DROOConfig(seed=0, warmup_steps=0, k_update_interval=8))
    expert.warmup(generate_many(SMALL, 64, seed=9), "min_energy")
    agent = expert.agent("min_energy")
    assert agent.k_max == SMALL.n_ues
    assert 2 <= agent.k <= SMALL.n_ues
    assert agent.memory.count == 64 and len(agent.losses) == 64 // expert.config.train_interval


def test_are_warmup_beats_its_untrained_self(paper_instances):
    """Same short SA budget (cooling 0.85 throughout) for both: the learned starting point matters."""
    cfg = dict(seed=0, warmup_steps=0, online=False, damp_steps=0, damp_end=0.85)
    untrained, trained = ARE(AREConfig(**cfg)), ARE(AREConfig(**cfg))
    trained.warmup(generate_many(ScenarioConfig(), 40, seed=100), "min_energy")
    before = np.mean([untrained.solve(i, "min_energy").objective for i in paper_instances[:3]])
    after = np.mean([trained.solve(i, "min_energy").objective for i in paper_instances[:3]])
    assert after < 0.95 * before, (before, after)


# --- shapes, configs, checkpoints ----------------------------------------------------------------


@pytest.mark.parametrize("method", ["droo", "are"])
def test_shape_mismatch_raises(method, paper_instances):
    expert = get_expert(method, warmup_steps=0)
    expert.solve(generate_many(SMALL, 1, seed=0)[0], "min_energy")
    with pytest.raises(LamboInputError, match="N=10 UEs and M=2 servers"):
        expert.solve(paper_instances[0], "min_energy")
    other_m = generate_many(ScenarioConfig(n_ues=10, n_servers=3, capacities_cps=(1e10, 2e10, 3e10)), 1, 0)[0]
    with pytest.raises(LamboInputError, match="M=3"):
        expert.solve(other_m, "min_latency")


@pytest.mark.parametrize("method", ["droo", "are"])
def test_checkpoint_round_trip_reproduces_decisions(method, tmp_path):
    insts = generate_many(SMALL, 3, seed=11)
    expert = get_expert(method, warmup_steps=0, seed=4)
    expert.warmup(generate_many(SMALL, 20, seed=12), "min_latency")
    path = tmp_path / f"{method}.pt"
    expert.save(path)
    loaded = get_expert(method, checkpoint=str(path), seed=4)
    for inst in insts:
        a, b = expert.solve(inst, "min_latency"), loaded.solve(inst, "min_latency")
        np.testing.assert_array_equal(a.target, b.target)
        np.testing.assert_array_equal(a.share, b.share)
    with pytest.raises(LamboInputError, match="not found"):
        get_expert(method, checkpoint=str(tmp_path / "missing.pt"))
    other = "are" if method == "droo" else "droo"
    with pytest.raises(LamboInputError, match="checkpoint is for method"):
        get_expert(other, checkpoint=str(path))


def test_solve_auto_warms_up_on_a_stream_of_the_same_shape():
    inst = generate_many(SMALL, 1, seed=21)[0]
    expert = get_expert("droo", warmup_steps=15)
    d = expert.solve(inst, "min_energy")
    assert d.stats["auto_warmup_steps"] == 15 and expert.counters["warmup_steps"] == 15
    assert "auto_warmup_steps" not in expert.solve(inst, "min_energy").stats  # only once per prompt


def test_bad_configs_are_input_errors():
    with pytest.raises(LamboInputError, match="batch_size"):
        DROOConfig(batch_size=0)
    with pytest.raises(LamboInputError, match="damp"):
        AREConfig(damp_end=1.2)
    with pytest.raises(LamboInputError, match="no_such_option"):
        get_expert("droo", no_such_option=1)
