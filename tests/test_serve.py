"""The Serve app over real HTTP: one local Serve for the module, every endpoint and every error.

Served decisions are compared with ``decide(...)`` run locally on the same checkpoint, and served
evaluations with the evaluator applied to the returned decision. The policy is an untrained S model
saved with ``save_policy`` (serving does not care whether it was trained), decoders are perturbed copies
saved with ``save_decoder``. A second app with tiny capacity limits ("/shed") is flooded, timed out and
has its replica killed, to check that failures stay small: fast JSON 503s with Retry-After, and the
service answers again afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lambo_ray.mec.evaluator import evaluate
from lambo_ray.mec.generator import generate_many
from lambo_ray.mec.io import instance_to_dict
from lambo_ray.mec.scenario import ScenarioConfig
from lambo_ray.policy.checkpoint import (
    load_decoder,
    load_policy,
    policy_fingerprint,
    save_decoder,
    save_policy,
)
from lambo_ray.policy.config import scale_config
from lambo_ray.policy.decoding import decide
from lambo_ray.policy.model import LamboPolicy
from lambo_ray.serving.config import ServeConfig
from lambo_ray.serving.decoders import NOT_A_DECODER_DIR, DecoderCatalog, DecoderEntry, LRUCache

httpx = pytest.importorskip("httpx")

MAX_UES = 60
MAX_BODY = 2_000_000
SHARE_ATOL = 1e-6  # float32 round-off between batch compositions (targets must match exactly)
TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _perturbed(policy: LamboPolicy, seed: int) -> LamboPolicy:
    """Same encoder, a different decoder (what ALEF fine-tuning produces)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.decoder.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return policy


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    base = LamboPolicy(scale_config("S"))
    save_policy(root / "ckpt", base, {"note": "untrained, for tests", "run_dir": str(root / "ckpt")})
    decoders = root / "decoders"
    save_decoder(decoders / "drift_a", _perturbed(load_policy(root / "ckpt")[0], 1), "drift_a")
    # Under staged/ (no manifest there, so not listed by itself): only servable once registered.
    save_decoder(decoders / "staged" / "late", _perturbed(load_policy(root / "ckpt")[0], 2), "late")
    save_decoder(decoders / "staged" / "late_copy", _perturbed(load_policy(root / "ckpt")[0], 3), "late")
    torch.manual_seed(99)
    save_decoder(decoders / "staged" / "alien", LamboPolicy(scale_config("S")), "alien")  # another encoder
    save_decoder(decoders / "broken", _perturbed(load_policy(root / "ckpt")[0], 4), "broken")
    weights = decoders / "broken" / "decoder.pt"
    weights.write_bytes(weights.read_bytes()[:500])  # listed (it has a manifest), fails when loaded
    return root


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_session, setup):
    from ray import serve

    from lambo_ray.serving.app import build_app
    from lambo_ray.serving.proxy import start_serve

    port = _port()
    cfg = ServeConfig.from_dict(
        {
            "checkpoint": str(setup / "ckpt"),
            "decoders_dir": str(setup / "decoders"),
            "max_ues": MAX_UES,
            "max_servers": 8,
            "max_pairs": 300,
            "max_body_bytes": MAX_BODY,
            "max_batch_instances": 8,
            "max_batch_size": 8,
            "batch_wait_timeout_s": 0.02,
            "policy_num_cpus": 0,
            "decoder_cache_size": 2,
        }
    )
    shed = ServeConfig.from_dict(
        {
            "checkpoint": str(setup / "ckpt"),
            "max_batch_instances": 16,
            "batching": False,
            "max_ongoing_requests": 1,
            "max_queued_requests": 1,
            "retry_after_s": 2,
            "policy_num_cpus": 0,
        }
    )
    previous = os.environ.get("LAMBO_ADMIN_TOKEN")
    os.environ["LAMBO_ADMIN_TOKEN"] = TOKEN  # read when the app is built: only its digest reaches the replicas
    try:
        start_serve("127.0.0.1", port, request_timeout_s=60.0)
        serve.run(build_app(cfg), name="lambo-test", route_prefix="/", blocking=False)
    finally:
        if previous is None:
            os.environ.pop("LAMBO_ADMIN_TOKEN")
        else:
            os.environ["LAMBO_ADMIN_TOKEN"] = previous
    serve.run(build_app(shed), name="lambo-shed", route_prefix="/shed", blocking=False)
    try:
        yield f"http://127.0.0.1:{port}", cfg
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def client(served):
    with httpx.Client(base_url=served[0], timeout=60) as c:
        yield c


class LocalPolicies:
    """The served checkpoints loaded in the test process; ``decide`` memoised per request signature."""

    def __init__(self, root) -> None:
        self.policies = {"default": load_policy(root / "ckpt")[0]}
        for name, path in (("drift_a", root / "decoders" / "drift_a"), ("late", root / "decoders" / "staged" / "late")):
            p = load_policy(root / "ckpt")[0]
            load_decoder(p, path)
            self.policies[name] = p
        self._memo: dict = {}

    def decide(self, decoder: str, inst, prompt: str, **kw):
        key = (decoder, id(inst), prompt, tuple(sorted(kw.items())))
        if key not in self._memo:
            self._memo[key] = decide(self.policies[decoder], [inst], prompt, **kw)[0]
        return self._memo[key]


@pytest.fixture(scope="module")
def local(setup):
    # One intra-op thread: with Serve's processes on the same 2 cores, more threads only thrash (10x slower).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield LocalPolicies(setup)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def instances():
    big = generate_many(ScenarioConfig(), 4, seed=11)
    small = generate_many(ScenarioConfig(n_ues=20, n_servers=3, capacities_cps=(1.5e10, 3e10, 5e10)), 3, seed=12)
    return [big[0], small[0], big[1], small[1], big[2], small[2], big[3]]


def _check_result(res: dict, inst, expected) -> None:
    """A served result against a locally computed Decision and the evaluator."""
    dec = res["decision"]
    assert dec["schema"] == "lambo.decision/1" and dec["prompt"] == expected.prompt
    target, share = np.array(dec["target"]), np.array(dec["share"])
    np.testing.assert_array_equal(target, expected.target)
    np.testing.assert_allclose(share, expected.share, rtol=0, atol=SHARE_ATOL)
    ev = evaluate(inst, target, share)  # the evaluation must be the evaluator's, of the served decision
    assert res["evaluation"]["feasible"] == ev.feasible
    assert res["evaluation"]["objective"] == pytest.approx(ev.objective(expected.prompt), rel=1e-12)
    np.testing.assert_allclose(res["evaluation"]["latency_s"], ev.latency_s, rtol=1e-12)
    np.testing.assert_allclose(res["evaluation"]["energy_j"], ev.energy_j, rtol=1e-12)
    assert dec["objective"] == pytest.approx(expected.objective, rel=1e-6)
    assert res["timing_ms"] > 0


def _no_absolute_paths(text: str, setup: Path) -> None:
    assert str(setup) not in text and "/tmp/" not in text, text[:300]


# ------------------------------------------------------------------------------------------ no Serve
def test_lru_cache_is_bounded_and_keeps_pinned():
    cache: LRUCache[str] = LRUCache(2)
    cache.pin("default", "D")
    loads = []
    for key in ["a", "b", "a", "c", "b", "default"]:
        cache.get(key, lambda k=key: loads.append(k) or k.upper())
    # a, b loaded; a hit; c evicts b (least recent); b reloaded evicts a; default never loaded nor evicted
    assert loads == ["a", "b", "c", "b"]
    assert cache.keys() == ["default", "c", "b"] and cache.evictions == 2


def test_catalog_ids_are_immutable(setup):
    from lambo_ray.errors import LamboInputError
    from lambo_ray.policy import checkpoint
    from lambo_ray.serving.decoders import DECODER_MANIFEST, is_decoder_checkpoint

    assert DECODER_MANIFEST == checkpoint.DECODER_MANIFEST

    cat = DecoderCatalog(DecoderEntry("default", None, "checkpoint"), str(setup / "decoders"), is_decoder_checkpoint)
    assert cat.resolve("drift_a").path == str((setup / "decoders" / "drift_a").resolve())
    assert cat.resolve("drift_a").to_public()["dir"] == "drift_a" and cat.resolve("staged") is None
    assert cat.register(DecoderEntry("x", "/a", "registered")) is True
    assert cat.register(DecoderEntry("x", "/a", "registered")) is False
    with pytest.raises(LamboInputError) as err:
        cat.register(DecoderEntry("x", "/b", "registered"))
    assert err.value.status == 409 and "/a" not in str(err.value)


def test_engine_views_share_the_encoder_and_decide_like_load_decoder(setup, local, instances):
    from lambo_ray.errors import LamboInputError
    from lambo_ray.serving.engine import DecideItem, PolicyEngine

    engine = PolicyEngine(ServeConfig.from_dict({"checkpoint": str(setup / "ckpt"), "decoder_cache_size": 1}))
    entry = DecoderEntry("drift_a", str(setup / "decoders" / "drift_a"), "decoders_dir", dir="drift_a")
    view, meta = engine.load_view(entry)
    assert meta["base_fingerprint"] == engine.fingerprint
    assert view.embedding is engine.policy.embedding and view.encoder is engine.policy.encoder
    assert view.decoder is not engine.policy.decoder
    ours = {id(p) for p in view.decoder.parameters()}
    assert not ours & {id(p) for p in engine.policy.decoder.parameters()}
    for inst in instances[:2]:
        got = engine.decide([inst], "min_energy", entry, DecideItem(inst, "min_energy", "drift_a", "greedy", 1, 0))[0]
        want = local.decide("drift_a", inst, "min_energy")
        np.testing.assert_array_equal(got.target, want.target)
        np.testing.assert_allclose(got.share, want.share, atol=SHARE_ATOL)
    late = DecoderEntry("late", str(setup / "decoders" / "staged" / "late"), "registered", dir="staged/late")
    engine.decide(instances[:1], "min_energy", late, DecideItem(instances[0], "min_energy", "late", "greedy", 1, 0))
    assert engine.loaded_decoders() == ["default", "late"]  # cache of 1 besides the pinned default: LRU evicted
    alien = DecoderEntry("alien", str(setup / "decoders" / "staged" / "alien"), "registered", dir="staged/alien")
    with pytest.raises(LamboInputError, match="encoder") as err:
        engine.load_view(alien)
    _no_absolute_paths(str(err.value), setup)


def test_config_rejects_bad_values():
    from lambo_ray.errors import LamboInputError

    with pytest.raises(LamboInputError, match="unknown key"):
        ServeConfig.from_dict({"checkpoint": "x", "max_batch": 3})
    with pytest.raises(LamboInputError, match="max_batch_size"):
        ServeConfig.from_dict({"checkpoint": "x", "max_batch_size": 0})
    with pytest.raises(LamboInputError, match="max_ongoing_requests"):
        ServeConfig.from_dict({"checkpoint": "x", "max_batch_size": 64, "max_ongoing_requests": 64})
    with pytest.raises(LamboInputError, match="request_timeout_s"):
        ServeConfig.from_dict({"checkpoint": "x", "request_timeout_s": 0})
    with pytest.raises(LamboInputError, match="checkpoint"):
        ServeConfig.from_dict({})


def test_serve_config_yaml_is_a_valid_deploy_config(setup):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from lambo_ray.serving.app import build_app

    doc = yaml.safe_load(Path("serve/config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(doc)
    assert schema.http_options.host == "127.0.0.1"  # exposing the API is an explicit decision
    assert schema.http_options.request_timeout_s is not None
    app = schema.applications[0]
    assert app.import_path == "lambo_ray.serving.app:build_app"
    args = {**app.args, "checkpoint": str(setup / "ckpt"), "decoders_dir": str(setup / "decoders")}
    cfg = ServeConfig.from_dict(args)
    build_app(args)  # every key is a ServeConfig key, and the app builds against a real checkpoint
    deployments = {d.name: d for d in app.deployments}
    assert set(deployments) == {"LamboIngress", "DecoderCatalog"}
    ingress = deployments["LamboIngress"]
    assert ingress.max_queued_requests == cfg.max_queued_requests
    assert ingress.max_ongoing_requests == cfg.max_ongoing_requests


def test_cli_refuses_missing_or_corrupt_checkpoint_before_starting(setup, tmp_path, capsys):
    from lambo_ray.cli import main

    assert main(["serve", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "policy.json").write_text((setup / "ckpt" / "policy.json").read_text())
    (bad / "policy.pt").write_bytes((setup / "ckpt" / "policy.pt").read_bytes()[:1000])  # truncated
    assert main(["serve", "--checkpoint", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "corrupt" in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------------ over HTTP
def test_decide_equals_local_decide_and_evaluator(client, local, instances):
    for inst, prompt in zip(instances[:4], ["min_latency", "min_energy", "min_energy", "min_latency"]):
        r = client.post("/v1/decide", json={"instance": instance_to_dict(inst), "prompt": prompt})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["decoder"] == "default"
        _check_result(body, inst, local.decide("default", inst, prompt))


def test_decide_batch_in_order(client, local, instances):
    r = client.post(
        "/v1/decide_batch",
        json={
            "instances": [instance_to_dict(i) for i in instances],
            "prompt": "min_energy",
            "decoder": "drift_a",
        },
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(instances)
    for res, inst in zip(results, instances):
        assert res["decoder"] == "drift_a" and len(res["decision"]["target"]) == inst.n_ues
        _check_result(res, inst, local.decide("drift_a", inst, "min_energy"))
    # One batched pass per cell shape: the 4 paper-sized instances were decided together.
    sizes = {res["decision"]["stats"]["serve_batch_size"] for res in results}
    assert sizes == {len(instances)}


def test_concurrent_callers_are_batched(client, served, local, instances):
    url = served[0]
    jobs = [(instances[i % len(instances)], ("min_latency", "min_energy")[i % 2]) for i in range(16)]

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=60) as ac:
            return await asyncio.gather(
                *(ac.post("/v1/decide", json={"instance": instance_to_dict(inst), "prompt": p}) for inst, p in jobs)
            )

    responses = asyncio.run(go())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    sizes = []
    for r, (inst, prompt) in zip(responses, jobs):
        body = r.json()
        _check_result(body, inst, local.decide("default", inst, prompt))
        sizes.append(body["decision"]["stats"]["serve_batch_size"])
    assert max(sizes) > 1, "concurrent greedy requests should share policy calls"


def test_failing_decoder_fails_only_its_callers(client, served, local, instances):
    """Callers of a decoder that cannot be loaded get 422 in the same batches as callers who get 200."""
    url = served[0]
    jobs = [(instances[i % 3], "broken" if i % 4 == 0 else None) for i in range(12)]

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=60) as ac:
            return await asyncio.gather(
                *(
                    ac.post(
                        "/v1/decide",
                        json={
                            "instance": instance_to_dict(inst),
                            "prompt": "min_latency",
                            **({"decoder": d} if d else {}),
                        },
                    )
                    for inst, d in jobs
                )
            )

    responses = asyncio.run(go())
    for r, (inst, decoder) in zip(responses, jobs):
        if decoder == "broken":
            assert r.status_code == 422 and "broken" in r.json()["detail"], r.text
            assert "corrupt" in r.json()["detail"]
            _no_absolute_paths(r.text, Path(served[1].decoders_dir))
        else:
            assert r.status_code == 200, r.text
            _check_result(r.json(), inst, local.decide("default", inst, "min_latency"))


def test_stochastic_and_search_decodes_are_reproducible(client, local, instances):
    inst = instances[0]
    body = {
        "instance": instance_to_dict(inst),
        "prompt": "min_latency",
        "decode": "best_of_k",
        "k": 4,
        "seed": 3,
    }
    first, second = client.post("/v1/decide", json=body), client.post("/v1/decide", json=body)
    assert first.status_code == second.status_code == 200, first.text
    assert first.json()["decision"]["target"] == second.json()["decision"]["target"]
    _check_result(first.json(), inst, local.decide("default", inst, "min_latency", mode="best_of_k", k=4, seed=3))
    refined = client.post("/v1/decide", json={**body, "decode": "refine", "k": 1, "time_budget_ms": 2000})
    assert refined.status_code == 200, refined.text
    assert refined.json()["decision"]["stats"]["decode"] == "refine"
    _check_result(refined.json(), inst, local.decide("default", inst, "min_latency", mode="refine", k=1, seed=3))
    small = instances[1]  # search with a budget it does not exhaust: deterministic for the seed
    body = {"instance": instance_to_dict(small), "prompt": "min_energy", "decode": "search", "k": 2, "seed": 3}
    searched = client.post("/v1/decide", json={**body, "time_budget_ms": 2000})
    assert searched.status_code == 200, searched.text
    stats = searched.json()["decision"]["stats"]
    assert stats["decode"] == "search" and stats["budget_hit"] is False
    want = local.decide("default", small, "min_energy", mode="search", k=2, seed=3, time_budget_s=2.0)
    _check_result(searched.json(), small, want)


def test_decoders_listing_and_health_show_no_server_paths(client, served, setup):
    r = client.get("/v1/decoders")
    assert r.status_code == 200
    body = r.json()
    ids = {d["id"]: d for d in body["decoders"]}
    assert body["default"] == "default" and {"default", "drift_a", "broken"} <= set(ids)
    assert ids["default"]["meta"]["fingerprint"] == policy_fingerprint(load_policy(setup / "ckpt")[0])
    assert ids["default"]["meta"]["run_dir"] == "ckpt"  # an absolute path in the meta keeps its last part only
    assert ids["drift_a"]["source"] == "decoders_dir" and ids["drift_a"]["dir"] == "drift_a"
    assert "path" not in ids["drift_a"]
    _no_absolute_paths(r.text, setup)
    h = client.get("/healthz")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    assert h.json()["policy"]["batching"]["max_batch_size"] == 8
    _no_absolute_paths(h.text, setup)
    assert client.post("/v1/echo", content=b'{"x": 1}').json() == {"bytes": 8}
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/decide", "/v1/decide_batch", "/v1/decoders", "/healthz"} <= set(paths)
    assert "instance" in json.dumps(paths["/v1/decide"]["post"]["requestBody"])


def _inst_doc(inst) -> dict:
    return instance_to_dict(inst)


@pytest.mark.parametrize(
    "mutate, status, needle",
    [
        (lambda d: "{not json", 422, "invalid JSON"),
        (lambda d: "[" * 100_000, 422, "nested"),
        (lambda d: json.dumps(d)[:-1] + ', "seed": ' + "9" * 5000 + "}", 422, "digits"),
        (lambda d: {**d, "prompt": "min_cost"}, 422, "prompt"),
        (lambda d: {**d, "decode": "beam"}, 422, "decode"),
        (lambda d: {**d, "k": 10_000}, 413, "max_k"),
        (lambda d: {**d, "decode": "refine", "time_budget_ms": 10**7}, 413, "max_time_budget_ms"),
        (lambda d: {**d, "decodr": "x"}, 422, "decodr"),
        (lambda d: {"prompt": "min_latency"}, 422, "instance"),
        (
            lambda d: {
                **d,
                "instance": {
                    **d["instance"],
                    "ues": {**d["instance"]["ues"], "rate_bps": d["instance"]["ues"]["rate_bps"][:-1]},
                },
            },
            422,
            "rate_bps",
        ),
        (
            lambda d: json.dumps(d).replace(str(d["instance"]["ues"]["cycles"][2]), "NaN", 1),
            422,
            "ues.cycles",
        ),
        (lambda d: {**d, "decoder": "no_such_decoder"}, 404, "no_such_decoder"),
    ],
)
def test_bad_requests_are_refused_with_the_field_named(client, local, instances, mutate, status, needle):
    inst = instances[1]
    doc = {"instance": _inst_doc(inst), "prompt": "min_latency"}
    body = mutate(doc)
    r = client.post(
        "/v1/decide",
        content=body if isinstance(body, str) else json.dumps(body),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"] and r.json()["status"] == status
    ok = client.post("/v1/decide", json=doc)  # and the deployment keeps serving
    assert ok.status_code == 200
    _check_result(ok.json(), inst, local.decide("default", inst, "min_latency"))


def test_too_large_is_413_before_policy_work_while_others_are_served(client, served, local, instances):
    url = served[0]
    doc = _inst_doc(instances[1])
    huge_m = {"instance": {**doc, "servers": {"capacity_cps": [1] * 200_000}}, "prompt": "min_latency"}
    pairs = _inst_doc(generate_many(ScenarioConfig(n_ues=50, n_servers=7, capacities_cps=(2e10,) * 7), 1, 5)[0])
    too_many_pairs = {"instance": pairs, "prompt": "min_latency"}
    big = generate_many(ScenarioConfig(n_ues=MAX_UES + 1), 1, seed=5)[0]
    before = client.get("/healthz").json()["policy"]["batching"]["batches"]

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=60) as ac:
            huge = ac.post("/v1/decide", content=json.dumps(huge_m), headers={"content-type": "application/json"})
            return await asyncio.gather(
                huge,
                ac.post("/v1/decide", json=too_many_pairs),
                ac.post("/v1/decide", json={"instance": _inst_doc(big), "prompt": "min_latency"}),
                ac.post("/v1/decide", json={"instance": doc, "prompt": "min_latency"}),
            )

    r_huge, r_pairs, r_big, r_ok = asyncio.run(go())
    assert r_huge.status_code == 413 and "max_servers" in r_huge.json()["detail"], r_huge.text[:300]
    assert r_pairs.status_code == 413 and "max_pairs=300" in r_pairs.json()["detail"]
    assert r_big.status_code == 413 and f"max_ues={MAX_UES}" in r_big.json()["detail"]
    assert r_ok.status_code == 200
    _check_result(r_ok.json(), instances[1], local.decide("default", instances[1], "min_latency"))
    after = client.get("/healthz").json()["policy"]["batching"]["batches"]
    assert after - before == 1  # only the normal caller reached the policy
    r = client.post("/v1/decide", content=b" " * (MAX_BODY + 1), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "bytes" in r.json()["detail"]
    many = [doc] * 9  # limit 8 per request
    r = client.post("/v1/decide_batch", json={"instances": many, "prompt": "min_energy"})
    assert r.status_code == 413 and "instances" in r.json()["detail"]
    bad_item = [doc, {"schema": "lambo.instance/1"}]
    r = client.post("/v1/decide_batch", json={"instances": bad_item, "prompt": "min_energy"})
    assert r.status_code == 422 and "instances[1]" in r.json()["detail"]


def test_register_needs_the_admin_token(client):
    body = {"id": "late2", "dir": "staged/late"}
    r = client.post("/v1/decoders", json=body)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert "token" in r.json()["detail"]
    r = client.post("/v1/decoders", json=body, headers={"Authorization": "Bearer not-the-token"})
    assert r.status_code == 401
    assert "late2" not in {d["id"] for d in client.get("/v1/decoders").json()["decoders"]}


def test_register_refuses_paths_outside_the_decoders_dir_uniformly(client, setup):
    outside = setup / "outside"
    save_decoder(outside, load_policy(setup / "ckpt")[0], "outside")
    details = set()
    for rel in ("../outside", str(outside), "/etc", "missing", "staged", "staged/../../outside", "..", "drift_a/."):
        r = client.post("/v1/decoders", json={"id": "evil", "dir": rel}, headers=AUTH)
        assert r.status_code == 422, (rel, r.text)
        details.add(r.json()["detail"])
    assert details == {f"dir: {NOT_A_DECODER_DIR}"}  # one answer: it never tells whether a path exists
    cases = [
        ({"id": "alien", "dir": "staged/alien"}, 422, "encoder"),
        ({"id": "bad/id", "dir": "staged/late"}, 422, "id"),
        ({"id": "x", "path": str(setup / "decoders" / "drift_a")}, 422, "unknown field 'path'"),
        ({"id": "drift_a", "dir": "staged/late"}, 409, "immutable"),
    ]
    for body, status, needle in cases:
        r = client.post("/v1/decoders", json=body, headers=AUTH)
        assert r.status_code == status, (body, r.text)
        assert needle in r.json()["detail"], r.text
        _no_absolute_paths(r.text, setup)
    assert {"alien", "evil"}.isdisjoint({d["id"] for d in client.get("/v1/decoders").json()["decoders"]})


def test_hot_swap_during_concurrent_stream(served, setup, local, instances):
    """Register a new decoder while requests stream in: none fails, and later requests use the new id."""
    url = served[0]
    registered = asyncio.Event()
    log: list[tuple[str, object, str, httpx.Response]] = []

    async def caller(ac, worker: int):
        # Stream until the swap is done and three more requests went out (every other one to "late").
        after, step = 0, 0
        while after < 3 and step < 200:
            after += registered.is_set()
            inst = instances[(worker + step) % len(instances)]
            decoder = "late" if registered.is_set() and step % 2 else ("drift_a" if worker % 2 else None)
            body = {"instance": instance_to_dict(inst), "prompt": "min_latency"}
            if decoder:
                body["decoder"] = decoder
            log.append((decoder or "default", inst, "min_latency", await ac.post("/v1/decide", json=body)))
            step += 1

    async def swap(ac):
        await asyncio.sleep(0.2)  # requests are in flight when the new decoder is registered
        r = await ac.post("/v1/decoders", json={"id": "late", "dir": "staged/late"}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["created"] is True and r.json()["dir"] == "staged/late"
        registered.set()

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=60) as ac:
            await asyncio.gather(swap(ac), *(caller(ac, w) for w in range(6)))
            again = await ac.post("/v1/decoders", json={"id": "late", "dir": "staged/late"}, headers=AUTH)
            assert again.status_code == 200 and again.json()["created"] is False
            other = await ac.post("/v1/decoders", json={"id": "late", "dir": "staged/late_copy"}, headers=AUTH)
            assert other.status_code == 409

    asyncio.run(go())
    failed = [r.text for *_, r in log if r.status_code != 200]
    assert not failed
    used = {d for d, *_ in log}
    assert {"late", "default", "drift_a"} <= used
    for decoder, inst, prompt, r in log:
        assert r.json()["decoder"] == decoder
        _check_result(r.json(), inst, local.decide(decoder, inst, prompt))


# ------------------------------------------------------------------------------------------ failures stay small
def _slow_batch(instances) -> dict:
    """A /v1/decide_batch body that keeps the /shed replica busy for a while (best-of-64 on 16 instances)."""
    docs = [instance_to_dict(instances[i % len(instances)]) for i in range(16)]
    return {"instances": docs, "prompt": "min_latency", "decode": "best_of_k", "k": 64}


def _is_json_503(r: httpx.Response, retry_after: str = "2") -> bool:
    return (
        r.status_code == 503
        and r.headers.get("retry-after") == retry_after
        and r.headers.get("content-type", "").startswith("application/json")
        and r.json()["status"] == 503
    )


def test_overload_is_shed_fast_with_retry_after_and_the_service_recovers(served, instances, local):
    """One request in work and one queued: a flood beyond that gets 503 + Retry-After at once, not a queue."""
    url = served[0] + "/shed"
    slow = _slow_batch(instances)

    async def timed(ac, body, path):
        start = time.perf_counter()
        r = await ac.post(path, json=body)
        return r, time.perf_counter() - start

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=64)) as ac:
            return await asyncio.gather(*(timed(ac, slow, "/v1/decide_batch") for _ in range(24)))

    results = asyncio.run(go())
    shed = [(r, dt) for r, dt in results if r.status_code == 503]
    served_ok = [r for r, _ in results if r.status_code == 200]
    assert len(shed) >= 12 and served_ok, [r.status_code for r, _ in results]
    assert all(r.status_code in (200, 503) for r, _ in results)
    for r, dt in shed:
        assert _is_json_503(r), (r.headers, r.text)
        assert dt < 1.0, f"a shed request took {dt:.2f} s"
    inst = instances[1]
    r = httpx.post(url + "/v1/decide", json={"instance": instance_to_dict(inst), "prompt": "min_latency"}, timeout=60)
    assert r.status_code == 200
    _check_result(r.json(), inst, local.decide("default", inst, "min_latency"))


def test_request_timeout_is_a_json_503_and_a_client_cannot_lift_it(client, instances):
    body = {"instances": [instance_to_dict(instances[0])] * 8, "prompt": "min_latency", "decode": "best_of_k", "k": 64}
    start = time.perf_counter()
    r = client.post("/v1/decide_batch", json=body, headers={"x-request-timeout-seconds": "0.02"})
    assert time.perf_counter() - start < 1.0
    assert _is_json_503(r, retry_after="1") and "time limit" in r.json()["detail"], r.text
    disabled = client.post(
        "/v1/decide",
        json={"instance": instance_to_dict(instances[1]), "prompt": "min_latency"},
        headers={"x-request-timeout-seconds": "0", "x-request-disconnect-disabled": "?1"},
    )
    assert disabled.status_code == 200  # the headers were dropped: the server's own timeout applies


@pytest.mark.slow
def test_replica_lost_mid_request_is_a_json_503_and_serve_recovers(served, instances, local):
    url = served[0] + "/shed"
    pid = httpx.get(url + "/healthz", timeout=30).json()["pid"]

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=120) as ac:
            pending = asyncio.ensure_future(ac.post("/v1/decide_batch", json=_slow_batch(instances)))
            await asyncio.sleep(0.3)  # the request is being decided
            os.kill(pid, signal.SIGKILL)
            return await pending

    r = asyncio.run(go())
    assert r.status_code == 503 and r.headers.get("retry-after") and r.json()["status"] == 503, r.text
    assert "replica" in r.json()["detail"]
    deadline = time.time() + 120
    inst = instances[1]
    while time.time() < deadline:  # Serve replaces the replica; the app answers again
        try:
            h = httpx.get(url + "/healthz", timeout=10)
            if h.status_code == 200 and h.json()["pid"] != pid:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    r = httpx.post(url + "/v1/decide", json={"instance": instance_to_dict(inst), "prompt": "min_latency"}, timeout=60)
    assert r.status_code == 200, r.text
    _check_result(r.json(), inst, local.decide("default", inst, "min_latency"))


def test_cli_serve_without_checkpoint_says_when_the_shipped_policy_is_missing(capsys, monkeypatch, tmp_path):
    """An installation without the shipped checkpoint (e.g. a stripped wheel): one clear line, exit 2."""
    from lambo_ray.cli import main
    from lambo_ray.policy import checkpoint

    monkeypatch.setattr(checkpoint, "DEFAULT_CHECKPOINT", tmp_path / "lambo-s")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "default checkpoint is missing" in err and err.count("\n") == 1
