"""The exact-reference cache: keyed by the instance data, resumable, shared between processes."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from lambo_ray.errors import LamboInputError
from lambo_ray.mec.evaluator import evaluate
from lambo_ray.mec.generator import generate_many
from lambo_ray.mec.scenario import ScenarioConfig
from lambo_ray.references import REFERENCES_FORMAT, Reference, ReferenceCache, instance_digest

SMALL = ScenarioConfig(n_ues=6, n_servers=2, capacities_cps=(1.5e10, 3e10))


@pytest.fixture(scope="module")
def insts():
    return generate_many(SMALL, 2, 7)


def _ref(**changes) -> Reference:
    base = Reference("d", "min_energy", 5.0, "exact:x", 2.0, 1.9, True, "optimal", 0.0, 0.1, [0], [0.0])
    return dataclasses.replace(base, **changes)


def test_digest_follows_the_data_not_the_geometry(insts):
    a, b = insts
    assert instance_digest(a) == instance_digest(dataclasses.replace(a, geometry={"anything": 1}))
    assert instance_digest(a) != instance_digest(b)
    for name in ("data_bits", "cycles", "deadline_s", "local_cps", "rate_bps", "capacity_cps"):
        arr = getattr(a, name).copy()
        arr.flat[0] *= 1.0 + 1e-12
        assert instance_digest(dataclasses.replace(a, **{name: arr})) != instance_digest(a), name
    assert instance_digest(dataclasses.replace(a, tx_w=2.0)) != instance_digest(a)


def test_reference_value_is_the_optimum_or_the_certified_bound():
    assert (_ref().kind, _ref().value) == ("optimal", 2.0)
    unproven = _ref(proven_optimal=False)
    assert (unproven.kind, unproven.value) == ("bound", 1.9)
    neither = _ref(proven_optimal=False, lower_bound=None)
    assert neither.kind == "none" and math.isnan(neither.value)


def test_solved_once_then_read_back_by_another_cache(tmp_path, insts, monkeypatch):
    path = tmp_path / "refs.jsonl"
    first = ReferenceCache(path, time_limit=20.0)
    other = ReferenceCache(path, time_limit=20.0)  # opened before anything was written
    ref, cached = first.get_or_solve(insts[0], "min_energy")
    assert not cached and ref.kind == "optimal" and ref.lower_bound <= ref.objective + 1e-9
    ev = evaluate(insts[0], np.array(ref.target), np.array(ref.share))
    assert ev.feasible and ev.objective("min_energy") == pytest.approx(ref.objective)

    def no_solve(*_args):
        raise AssertionError("a cached reference was solved again")

    monkeypatch.setattr(ReferenceCache, "solve", no_solve)
    for cache in (other, ReferenceCache(path, time_limit=20.0)):
        again, cached = cache.get_or_solve(insts[0], "min_energy")
        assert cached and again == ref
    with pytest.raises(AssertionError, match="solved again"):  # the key holds the prompt ...
        other.get_or_solve(insts[0], "min_latency")
    with pytest.raises(AssertionError, match="solved again"):  # ... the time limit ...
        ReferenceCache(path, time_limit=30.0).get_or_solve(insts[0], "min_energy")
    with pytest.raises(AssertionError, match="solved again"):  # ... and the instance data
        other.get_or_solve(insts[1], "min_energy")


def test_torn_last_line_is_skipped_and_cut_off(tmp_path, insts):
    path = tmp_path / "refs.jsonl"
    cache = ReferenceCache(path, time_limit=20.0)
    ref = cache.solve(insts[0], "min_energy")
    cache.add(ref)
    with open(path, "a") as fh:
        fh.write('{"digest": "half a line')  # a writer killed mid-line
    reader = ReferenceCache(path, time_limit=20.0)
    assert reader.get(insts[0], "min_energy") == ref
    reader.add(dataclasses.replace(ref, prompt="min_latency"))
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"format": REFERENCES_FORMAT}
    assert [json.loads(x)["prompt"] for x in lines[1:]] == ["min_energy", "min_latency"]


@pytest.mark.parametrize("limit", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_time_limit_is_an_input_error(tmp_path, limit):
    with pytest.raises(LamboInputError, match="time limit"):
        ReferenceCache(tmp_path / "refs.jsonl", time_limit=limit)


def test_foreign_file_or_directory_is_an_input_error(tmp_path):
    bad = tmp_path / "labels.jsonl"
    bad.write_text('{"format": "lambo.labels/1"}\n')
    with pytest.raises(LamboInputError, match="not a lambo.references/1 file"):
        ReferenceCache(bad, time_limit=10.0)
    with pytest.raises(LamboInputError, match="directory"):
        ReferenceCache(tmp_path, time_limit=10.0)


def test_unknown_prompt_is_an_input_error(tmp_path, insts):
    with pytest.raises(LamboInputError, match="unknown prompt"):
        ReferenceCache(tmp_path / "refs.jsonl", time_limit=10.0).get(insts[0], "min_cost")


def test_torn_header_is_rewritten(tmp_path):
    path = tmp_path / "refs.jsonl"
    path.write_text('{"format": "lambo.refer')  # killed while writing the very first line
    cache = ReferenceCache(path, time_limit=20.0)
    assert cache.entries == {}
    cache.add(_ref())
    assert [json.loads(x) for x in path.read_text().splitlines()][0] == {"format": REFERENCES_FORMAT}
    assert ReferenceCache(path, time_limit=5.0).entries == {_ref().key: _ref()}


def test_a_second_process_waits_for_the_first_ones_solve(tmp_path, insts, monkeypatch):
    import threading

    path = tmp_path / "refs.jsonl"
    started, release, calls = threading.Event(), threading.Event(), []
    real_solve = ReferenceCache.solve

    def slow_solve(self, inst, prompt):
        calls.append(prompt)
        started.set()
        release.wait(10)
        return real_solve(self, inst, prompt)

    monkeypatch.setattr(ReferenceCache, "solve", slow_solve)
    results = {}
    first = threading.Thread(
        target=lambda: results.update(a=ReferenceCache(path, 20.0).get_or_solve(insts[0], "min_energy"))
    )
    first.start()
    assert started.wait(10)
    second = threading.Thread(
        target=lambda: results.update(b=ReferenceCache(path, 20.0).get_or_solve(insts[0], "min_energy"))
    )
    second.start()
    second.join(0.5)
    assert second.is_alive()  # waiting on the first one's claim, not solving
    release.set()
    first.join(30)
    second.join(30)
    assert calls == ["min_energy"]
    assert results["a"] == (results["b"][0], False) and results["b"][1] is True
