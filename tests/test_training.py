"""The training data path: scenario distribution, cached expert labels, size-bucketed imitation,
self-imitation; and the acceptance check that one model learns two cell sizes at once."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lambo_ray.errors import LamboInputError
from lambo_ray.mec.distribution import ScenarioDistribution
from lambo_ray.mec.evaluator import evaluate
from lambo_ray.mec.shares import optimal_shares
from lambo_ray.policy import LamboPolicy, PolicyConfig, decide
from lambo_ray.rl.config import PretrainConfig
from lambo_ray.rl.labels import LabelCache, LabelConfig, build_labels, label_instance, training_instance
from lambo_ray.rl.warm_start import examples_from_labels, size_batches, train_on_examples

TWO_SIZES = {"n_ues": [8, 30], "n_servers": [2, 3], "paper_prob": 0.0, "walk_prob": 0.0}


def test_distribution_draws_within_its_ranges_and_validates():
    dist = ScenarioDistribution(n_ues=(10, 40), n_servers=(2, 5), paper_prob=0.0)
    rng = np.random.default_rng(0)
    draws = [dist.sample(rng) for _ in range(200)]
    assert {d.n_servers for d in draws} == {2, 3, 4, 5}
    assert all(10 <= d.n_ues <= 40 for d in draws) and len({d.n_ues for d in draws}) > 15
    assert any(d.outage_factor < 1 for d in draws) and any(d.deadline_factor[0] < 1 for d in draws)
    point = ScenarioDistribution(paper_prob=1.0)
    assert point.sample(rng) == point.base_config() and point.max_size == (50, 4)
    assert ScenarioDistribution().max_size == (200, 10)
    with pytest.raises(LamboInputError, match="n_ues"):
        ScenarioDistribution(n_ues=(50, 10))
    with pytest.raises(LamboInputError, match="unknown key"):
        ScenarioDistribution.from_dict({"n_ue": [1, 2]})


@pytest.mark.parametrize("prompt", ["min_energy", "min_latency"])
def test_labels_are_feasible_and_scored_by_the_evaluator(prompt):
    dist = ScenarioDistribution.from_dict(TWO_SIZES)
    for index in range(3):
        inst = training_instance(dist, 7, index)
        target, obj, source, _ = label_instance(inst, prompt, LabelConfig(energy_exact_time_limit=5.0), seed=index)
        ev = evaluate(inst, target, optimal_shares(inst, target))
        assert ev.feasible and ev.objective(prompt) == pytest.approx(obj, rel=1e-9)
        if prompt == "min_energy":
            assert source == "exact"  # small cells: the MILP proves optimality within the limit


def test_label_cache_resumes_refuses_other_keys_and_survives_a_torn_line(tmp_path):
    dist = ScenarioDistribution.from_dict(TWO_SIZES)
    path = tmp_path / "labels.jsonl"
    first = build_labels(dist, 3, 4, path, LabelConfig(kicks=2), prompts=("min_energy",), log=lambda s: None)
    assert len(first) == 4
    with open(path, "a") as fh:
        fh.write('{"index": 9, "prompt": "min_ener')  # a killed writer
    seen = []
    again = build_labels(dist, 3, 5, path, LabelConfig(kicks=2), prompts=("min_energy",), log=seen.append)
    assert [lab.index for lab in again] == [0, 1, 2, 3, 4]
    assert any("4 cached, 1 to compute" in s for s in seen)  # nothing labelled twice
    assert [json.loads(line)["index"] for line in path.read_text().splitlines()[1:]] == [0, 1, 2, 3, 4]
    with pytest.raises(LamboInputError, match="other settings"):
        LabelCache(path, {"something": "else"})


def test_size_batches_cover_every_example_once_within_the_budget():
    class E:
        def __init__(self, n):
            self.size = n

    sizes = [10, 200, 37, 37, 120, 15, 15, 15, 64, 199]
    examples = [E(n) for n in sizes]
    batches = size_batches(examples, ue_budget=256, rng=np.random.default_rng(0))
    assert sorted(i for b in batches for i in b) == list(range(len(sizes)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(sizes[i] for i in b) <= 256


def _gap(policy, insts, refs, prompt):
    got = decide(policy, insts, prompt, "greedy")
    return float(np.mean([(d.objective - r) / r for d, r in zip(got, refs)]))


@pytest.mark.slow
def test_one_model_learns_two_cell_sizes(tmp_path):
    """A tiny model imitates labels of a two-size distribution (8 and 30 UEs) for a few epochs; its greedy
    gap to the labels' experts drops on both sizes against the untrained policy."""
    cfg = PretrainConfig.from_dict(
        {"scenario_dist": TWO_SIZES, "warm_start_labels": 96, "val_expert": None, "prompts": ["min_energy"],
         "warm_start_prompts": ["min_energy"], "label_energy_time_limit": 5.0, "label_kicks": 2}
    )  # fmt: skip
    dist = cfg.training_distribution()
    labels = build_labels(dist, 11, 96, tmp_path / "l.jsonl", LabelConfig(energy_exact_time_limit=5.0, kicks=2),
                          prompts=("min_energy",), log=lambda s: None)  # fmt: skip
    examples = examples_from_labels(cfg, labels, 11)
    test = {n: [] for n in (8, 30)}
    for index in range(200):
        inst = training_instance(dist, 999, index)
        if inst.n_ues in test and len(test[inst.n_ues]) < 6:
            test[inst.n_ues].append(inst)
    refs = {n: [label_instance(i, "min_energy", LabelConfig())[1] for i in insts] for n, insts in test.items()}
    torch.manual_seed(0)
    policy = LamboPolicy(PolicyConfig(d_model=32, n_heads=4, enc_layers=2))
    before = {n: _gap(policy, test[n], refs[n], "min_energy") for n in test}
    train_on_examples(policy, examples, epochs=12, lr=2e-3, ue_budget=2048, seed=0, log=lambda s: None)
    after = {n: _gap(policy, test[n], refs[n], "min_energy") for n in test}
    for n in test:
        assert after[n] < 0.5 * before[n], (n, before[n], after[n])
