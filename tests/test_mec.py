"""System model: evaluator against hand-computed values, water-filling against closed forms,
generator reproducibility, drift and mobility."""

from __future__ import annotations

import numpy as np
import pytest

from lambo_ray.errors import LamboInputError
from lambo_ray.mec.channel import channel_gain, uplink_rate
from lambo_ray.mec.drift import DRIFTS, apply_drift
from lambo_ray.mec.evaluator import evaluate, objectives_batch, relative_gap
from lambo_ray.mec.generator import generate_many, generate_series
from lambo_ray.mec.instance import Instance
from lambo_ray.mec.mobility import RandomWaypoint
from lambo_ray.mec.scenario import ScenarioConfig
from lambo_ray.mec.shares import optimal_shares, water_fill


def hand_instance() -> Instance:
    """3 UEs, 2 servers, round numbers so every latency/energy below is computed by hand."""
    return Instance(
        data_bits=np.array([1e6, 2e6, 4e6]),
        cycles=np.array([1e9, 4e9, 9e9]),
        deadline_s=np.array([2.0, 10.0, 20.0]),
        local_cps=np.array([1e9, 1e9, 1e9]),
        rate_bps=np.array([[1e6, 2e6], [1e6, 4e6], [2e6, 1e6]]),
        capacity_cps=np.array([1e10, 2e10]),
        tx_w=0.5,
        local_w=2.0,
    )


def test_evaluator_hand_computed():
    inst = hand_instance()
    # UE0 local; UE1 -> server 2 with share 0.5; UE2 -> server 1 with share 1.0
    ev = evaluate(inst, np.array([0, 2, 1]), np.array([0.0, 0.5, 1.0]))
    # UE0: 1e9/1e9 = 1 s, 2 W * 1 s = 2 J
    # UE1: 2e6/4e6 + 4e9/(0.5*2e10) = 0.5 + 0.4 = 0.9 s; 0.5 W * 0.5 s = 0.25 J
    # UE2: 4e6/2e6 + 9e9/(1.0*1e10) = 2 + 0.9 = 2.9 s; 0.5 W * 2 s = 1 J
    np.testing.assert_allclose(ev.latency_s, [1.0, 0.9, 2.9])
    np.testing.assert_allclose(ev.energy_j, [2.0, 0.25, 1.0])
    assert ev.mean_latency_s == pytest.approx((1.0 + 0.9 + 2.9) / 3)
    assert ev.total_energy_j == pytest.approx(3.25)
    assert ev.feasible and ev.violations == []
    assert ev.objective("min_latency") == pytest.approx(1.6)
    assert ev.objective("min_energy") == pytest.approx(3.25)


def test_evaluator_reports_each_violation_with_size():
    inst = hand_instance()
    # UE0 offloaded to server 1 with a tiny share: 1 + 1e9/(0.01*1e10) = 11 s > 2 s deadline.
    # Server 1 load 0.01 + 1.0 = 1.01 > 1. UE2 local with a nonzero share.
    ev = evaluate(inst, np.array([1, 0, 1]), np.array([0.01, 0.3, 1.0]))
    kinds = {v["constraint"] for v in ev.violations}
    assert kinds == {"deadline", "capacity", "share_local_zero"}
    dl = next(v for v in ev.violations if v["constraint"] == "deadline")
    assert dl["ue"] == 0 and dl["excess_s"] == pytest.approx(11.0 - 2.0)
    cap = next(v for v in ev.violations if v["constraint"] == "capacity")
    assert cap["server"] == 1 and cap["excess"] == pytest.approx(0.01)
    assert not ev.feasible
    zero = evaluate(inst, np.array([1, 0, 0]), np.array([0.0, 0.0, 0.0]))
    assert any(v["constraint"] == "share_positive" for v in zero.violations)


def test_evaluator_rejects_wrong_shapes_and_targets():
    inst = hand_instance()
    with pytest.raises(LamboInputError, match="target has shape"):
        evaluate(inst, np.array([0, 0]), np.zeros(3))
    with pytest.raises(LamboInputError, match="outside 0..2"):
        evaluate(inst, np.array([0, 3, 0]), np.zeros(3))
    with pytest.raises(LamboInputError, match="NaN"):
        evaluate(inst, np.array([0, 0, 0]), np.array([0, np.nan, 0]))


def test_objectives_batch_matches_evaluate(paper_instances):
    rng = np.random.default_rng(0)
    inst = paper_instances[0]
    targets = rng.integers(0, inst.n_servers + 1, size=(20, inst.n_ues))
    shares = np.where(targets > 0, rng.uniform(0.01, 0.2, size=targets.shape), 0.0)
    for prompt in ("min_latency", "min_energy"):
        obj, feas = objectives_batch(inst, targets, shares, prompt)
        for k in range(20):
            ev = evaluate(inst, targets[k], shares[k])
            assert obj[k] == pytest.approx(ev.objective(prompt), rel=1e-12)
            assert feas[k] == ev.feasible


def test_water_fill_closed_form_without_binding_deadlines():
    c = np.array([1.0, 4.0, 9.0])
    s = water_fill(np.sqrt(c), np.zeros(3))
    np.testing.assert_allclose(s, np.sqrt(c) / np.sqrt(c).sum())
    # server term sum c/a equals (sum sqrt c)^2
    assert (c / s).sum() == pytest.approx(np.sqrt(c).sum() ** 2)


def test_water_fill_kkt_with_binding_minimum(rng):
    for _ in range(50):
        n = rng.integers(1, 8)
        c = rng.uniform(0.5, 2.0, n)
        amin = rng.uniform(0, 1.0 / n, n) * rng.integers(0, 2, n)
        s = water_fill(np.sqrt(c), amin)
        assert s is not None
        assert s.sum() == pytest.approx(1.0)
        assert np.all(s >= amin - 1e-12)
        # KKT: free shares share one multiplier: c_i / a_i^2 equal on unclamped entries, and
        # clamped entries have c_i / a_i^2 <= that multiplier.
        free = s > amin + 1e-12
        if free.any():
            lam = c[free] / s[free] ** 2
            assert np.allclose(lam, lam[0])
            assert np.all(c[~free] / s[~free] ** 2 <= lam[0] * (1 + 1e-9))
        # no perturbation that keeps feasibility improves the objective
        for _ in range(5):
            d = rng.normal(size=n) * 1e-3
            d -= d.mean()
            t = s + d
            if np.all(t >= amin):
                assert (c / t).sum() >= (c / s).sum() - 1e-9
    assert water_fill(np.ones(2), np.array([0.6, 0.5])) is None


def test_optimal_shares_meet_deadlines(paper_instances):
    inst = paper_instances[1]
    target = np.argmax(inst.rate_bps, axis=1) + 1
    target[12:] = 0  # 12 UEs offloaded: fits, servers hold ~5-10 UEs each at these deadlines
    share = optimal_shares(inst, target)
    assert share is not None
    ev = evaluate(inst, target, share)
    assert ev.feasible
    for j in range(inst.n_servers):
        on = target == j + 1
        if on.any():
            assert share[on].sum() == pytest.approx(1.0)


def test_channel_rate_closed_form():
    cfg = ScenarioConfig(fading=False)
    g = channel_gain(np.array([10.0, 0.2]), cfg, np.random.default_rng(0))
    expected = 4.11 * (3e8 / (4 * np.pi * 915e6 * 10.0)) ** 2.8
    assert g[0] == pytest.approx(expected)
    assert g[1] == pytest.approx(4.11 * (3e8 / (4 * np.pi * 915e6 * 1.0)) ** 2.8)  # clamped to 1 m
    noise = 10 ** (-174 / 10) * 1e-3 * 2e6
    assert uplink_rate(g[:1], cfg)[0] == pytest.approx(2e6 * np.log2(1 + expected / noise))


def test_generator_seeded_and_prefix_stable():
    cfg = ScenarioConfig()
    a = generate_many(cfg, 10, seed=3)
    b = generate_many(cfg, 4, seed=3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.rate_bps, y.rate_bps)
        np.testing.assert_array_equal(x.cycles, y.cycles)
    c = generate_many(cfg, 4, seed=4)
    assert not np.array_equal(a[0].cycles, c[0].cycles)


def test_paper_defaults_respected():
    insts = generate_many(ScenarioConfig(), 20, seed=0)
    for inst in insts:
        assert inst.n_ues == 50 and inst.n_servers == 4
        np.testing.assert_array_equal(inst.capacity_cps, [1.5e10, 1.5e10, 3e10, 5e10])
        assert np.all((inst.cycles >= 0.5e10) & (inst.cycles <= 1.5e10))
        assert np.all((inst.data_bits >= 1e8) & (inst.data_bits <= 3e8))
        ratio = inst.deadline_s / inst.local_latency()
        assert np.all((ratio >= 1.0) & (ratio <= 1.3))
        assert np.all(inst.local_feasible())  # every paper instance is feasible (all local)


def test_drifts_change_what_they_document():
    base = ScenarioConfig()
    load = generate_many(apply_drift(base, "load"), 20, 0)
    assert np.mean([i.cycles.mean() for i in load]) == pytest.approx(1.5e10, rel=0.05)
    outage = generate_many(apply_drift(base, "outage"), 20, 0)
    for inst in outage:
        reduced = np.flatnonzero(inst.capacity_cps < np.array(base.capacities_cps))
        assert reduced.size == 1
        assert inst.capacity_cps[reduced[0]] == pytest.approx(0.3 * base.capacities_cps[reduced[0]])
    assert generate_many(apply_drift(base, "density"), 1, 0)[0].n_ues == 80
    tight = generate_many(apply_drift(base, "deadline"), 20, 0)
    must_offload = np.mean([np.mean(~i.local_feasible()) for i in tight])
    assert 0.2 < must_offload < 0.5
    for inst in tight:  # every UE that misses locally can make it on some server
        assert np.all(inst.local_feasible() | np.isfinite(inst.min_share()).any(axis=1))
    mob = generate_many(apply_drift(base, "mobility"), 20, 0)
    centre = np.array([0.15, 0.15]) * base.area_m
    d_mob = np.mean([np.linalg.norm(np.array(i.geometry["ue_xy"]) - centre, axis=1).mean() for i in mob])
    d_base = np.mean(
        [np.linalg.norm(np.array(i.geometry["ue_xy"]) - centre, axis=1).mean() for i in generate_many(base, 20, 0)]
    )
    assert d_mob < 0.6 * d_base  # the crowd gathered near the hotspot
    with pytest.raises(LamboInputError, match="unknown drift"):
        apply_drift(base, "earthquake")
    assert set(DRIFTS) == {"mobility", "load", "outage", "density", "deadline"}


def test_mobility_speed_bound_and_series():
    cfg = ScenarioConfig()
    rng = np.random.default_rng(0)
    start = rng.uniform(0, 50, size=(200, 2))
    walker = RandomWaypoint(cfg, start.copy(), rng)
    prev = start.copy()
    for _ in range(20):
        pos = walker.step(5.0).copy()
        assert np.all(np.linalg.norm(pos - prev, axis=1) <= 1.2 * 5.0 + 1e-9)
        assert np.all((pos >= 0) & (pos <= 50))
        prev = pos
    series = list(generate_series(cfg, 3, 30.0, seed=1))
    assert len(series) == 3
    assert series[0].geometry["server_xy"] == series[2].geometry["server_xy"]
    assert series[0].geometry["ue_xy"] != series[2].geometry["ue_xy"]


def test_relative_gap():
    assert relative_gap(1.01, 1.0) == pytest.approx(0.01)
