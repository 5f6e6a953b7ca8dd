"""The shipped LAMBO-S loads, matches the numbers its model card states, and is what commands use."""

from __future__ import annotations

import numpy as np
import pytest

from lambo_ray.experts import get_expert
from lambo_ray.mec.generator import generate_many
from lambo_ray.mec.scenario import ScenarioConfig
from lambo_ray.policy import decide
from lambo_ray.policy.checkpoint import DEFAULT_CHECKPOINT, default_checkpoint, load_policy


def test_shipped_checkpoint_matches_its_model_card():
    policy, meta = load_policy(default_checkpoint())
    card = meta["card_check"]
    assert (DEFAULT_CHECKPOINT / "MODEL_CARD.md").is_file()
    insts = generate_many(ScenarioConfig(), 8, seed=4242)
    exact = [get_expert("exact").solve(i, card["prompt"], 30) for i in insts]
    assert all(d.stats["proven_optimal"] for d in exact)
    for mode, key in (("greedy", "greedy_gap_pct"), ("search", "search_gap_pct")):
        got = decide(policy, insts, card["prompt"], mode, k=card["search_k"])
        assert all(d.stats["feasible"] for d in got)
        gap = 100 * np.mean([(d.objective - e.objective) / e.objective for d, e in zip(got, exact)])
        assert gap == pytest.approx(card[key], abs=0.05), (mode, gap)


def test_missing_default_checkpoint_is_a_clear_error(monkeypatch, tmp_path):
    from lambo_ray.errors import LamboInputError
    from lambo_ray.policy import checkpoint

    monkeypatch.setattr(checkpoint, "DEFAULT_CHECKPOINT", tmp_path / "nothing")
    with pytest.raises(LamboInputError, match="default checkpoint is missing"):
        checkpoint.default_checkpoint()


def test_refine_reaches_the_optimum_where_local_search_packs_must_offload_ues_badly():
    """A tight-deadline paper cell (15 of 50 UEs must offload) on which local search's packing of those
    UEs leaves the big server nearly full: local search ends > 10 % above the proven optimum; refine,
    polishing with the search engine (an exact solve after reduced-cost fixing for min_energy), ends at it."""
    policy, _ = load_policy(default_checkpoint())
    inst = generate_many(ScenarioConfig(deadline_factor=(0.6, 1.3)), 8, seed=991)[6]
    exact = get_expert("exact").solve(inst, "min_energy", 30)
    assert exact.stats["proven_optimal"]
    local = get_expert("local_search").solve(inst, "min_energy")
    assert local.objective > 1.10 * exact.objective
    refined = decide(policy, [inst], "min_energy", "refine", k=1)[0]
    assert refined.stats["feasible"]
    assert refined.objective == pytest.approx(exact.objective, rel=2e-4)
