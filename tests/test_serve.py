"""The Serve app over real HTTP: one local Serve for the module, every endpoint and every error.

Served decisions are compared with ``decide(...)`` run locally on the same checkpoint, and served
evaluations with the evaluator applied to the returned decision. The policy is an untrained S model
saved with ``save_policy`` (serving does not care whether it was trained), decoders are perturbed copies
saved with ``save_decoder``.
"""

from __future__ import annotations

import asyncio
import json
import socket
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
from lambo_ray.policy.decoding import available_strategies, decide
from lambo_ray.policy.model import LamboPolicy
from lambo_ray.serving.config import DECODE_MODES, ServeConfig
from lambo_ray.serving.decoders import DecoderCatalog, DecoderEntry, LRUCache

httpx = pytest.importorskip("httpx")

MAX_UES = 60
MAX_BODY = 300_000
SHARE_ATOL = 1e-6  # float32 padding round-off between batch compositions (targets must match exactly)


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
    save_policy(root / "ckpt", base, {"note": "untrained, for tests"})
    save_decoder(root / "decoders" / "drift_a", _perturbed(load_policy(root / "ckpt")[0], 1), "drift_a")
    save_decoder(root / "late", _perturbed(load_policy(root / "ckpt")[0], 2), "late")
    save_decoder(root / "late_copy", _perturbed(load_policy(root / "ckpt")[0], 3), "late")
    torch.manual_seed(99)
    save_decoder(root / "alien", LamboPolicy(scale_config("S")), "alien")  # another encoder
    return root


@pytest.fixture(scope="module")
def served(ray_session, setup):
    from ray import serve

    from lambo_ray.serving.app import build_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ServeConfig.from_dict(
        {
            "checkpoint": str(setup / "ckpt"),
            "decoders_dir": str(setup / "decoders"),
            "max_ues": MAX_UES,
            "max_body_bytes": MAX_BODY,
            "max_batch_instances": 8,
            "max_batch_size": 8,
            "batch_wait_timeout_s": 0.02,
            "policy_num_cpus": 0,
            "decoder_cache_size": 2,
        }
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="lambo-test", route_prefix="/", blocking=False)
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
        for name, path in (("drift_a", root / "decoders" / "drift_a"), ("late", root / "late")):
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


# ------------------------------------------------------------------------------------------ no Serve
def test_decode_modes_match_policy_strategies():
    assert set(DECODE_MODES) == set(available_strategies())


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
    assert cat.register(DecoderEntry("x", "/a", "registered")) is True
    assert cat.register(DecoderEntry("x", "/a", "registered")) is False
    with pytest.raises(LamboInputError) as err:
        cat.register(DecoderEntry("x", "/b", "registered"))
    assert err.value.status == 409


def test_engine_views_share_the_encoder_and_decide_like_load_decoder(setup, local, instances):
    from lambo_ray.errors import LamboInputError
    from lambo_ray.serving.engine import PolicyEngine

    engine = PolicyEngine(ServeConfig.from_dict({"checkpoint": str(setup / "ckpt"), "decoder_cache_size": 1}))
    view, meta = engine.load_view(str(setup / "decoders" / "drift_a"))
    assert meta["base_fingerprint"] == engine.fingerprint
    assert view.embedding is engine.policy.embedding and view.encoder is engine.policy.encoder
    assert view.decoder is not engine.policy.decoder
    ours = {id(p) for p in view.decoder.parameters()}
    assert not ours & {id(p) for p in engine.policy.decoder.parameters()}
    entry = DecoderEntry("drift_a", str(setup / "decoders" / "drift_a"), "decoders_dir")
    for inst in instances[:2]:
        got = engine.decide([inst], "min_energy", entry, "greedy", 1, 0)[0]
        want = local.decide("drift_a", inst, "min_energy")
        np.testing.assert_array_equal(got.target, want.target)
        np.testing.assert_allclose(got.share, want.share, atol=SHARE_ATOL)
    engine.decide(instances[:1], "min_energy", DecoderEntry("late", str(setup / "late"), "registered"), "greedy", 1, 0)
    assert engine.loaded_decoders() == [
        "default",
        "late",
    ]  # cache of 1 besides the pinned default: LRU evicted
    with pytest.raises(LamboInputError, match="encoder"):
        engine.load_view(str(setup / "alien"))


def test_config_rejects_bad_values():
    from lambo_ray.errors import LamboInputError

    with pytest.raises(LamboInputError, match="unknown key"):
        ServeConfig.from_dict({"checkpoint": "x", "max_batch": 3})
    with pytest.raises(LamboInputError, match="max_batch_size"):
        ServeConfig.from_dict({"checkpoint": "x", "max_batch_size": 0})
    with pytest.raises(LamboInputError, match="checkpoint"):
        ServeConfig.from_dict({})


def test_serve_config_yaml_is_a_valid_deploy_config(setup):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from lambo_ray.serving.app import build_app

    doc = yaml.safe_load(Path("serve/config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(doc)
    app = schema.applications[0]
    assert app.import_path == "lambo_ray.serving.app:build_app"
    args = {**app.args, "checkpoint": str(setup / "ckpt"), "decoders_dir": str(setup / "decoders")}
    build_app(args)  # every key is a ServeConfig key, and the app builds against a real checkpoint
    names = {d.name for d in app.deployments}
    assert names == {"LamboIngress", "PolicyDeployment", "DecoderCatalog"}


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


def test_stochastic_decode_is_reproducible_and_unbatched(client, local, instances):
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
    refined = client.post("/v1/decide", json={**body, "decode": "refine", "k": 1})
    assert refined.status_code == 200, refined.text
    assert refined.json()["decision"]["stats"]["decode"] == "refine"
    _check_result(refined.json(), inst, local.decide("default", inst, "min_latency", mode="refine", k=1, seed=3))


def test_decoders_listing_and_health(client, served, setup):
    r = client.get("/v1/decoders")
    assert r.status_code == 200
    body = r.json()
    ids = {d["id"]: d for d in body["decoders"]}
    assert body["default"] == "default" and {"default", "drift_a"} <= set(ids)
    assert ids["default"]["meta"]["fingerprint"] == policy_fingerprint(load_policy(setup / "ckpt")[0])
    assert ids["drift_a"]["source"] == "decoders_dir"
    h = client.get("/healthz")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    assert h.json()["policy"]["batching"]["max_batch_size"] == 8
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
        (lambda d: {**d, "prompt": "min_cost"}, 422, "prompt"),
        (lambda d: {**d, "decode": "beam"}, 422, "decode"),
        (lambda d: {**d, "k": 10_000}, 422, "k="),
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


def test_too_large_is_413_and_service_continues(client, served, instances):
    big = generate_many(ScenarioConfig(n_ues=MAX_UES + 1), 1, seed=5)[0]
    r = client.post("/v1/decide", json={"instance": instance_to_dict(big), "prompt": "min_latency"})
    assert r.status_code == 413 and f"limit of {MAX_UES}" in r.json()["detail"]
    r = client.post("/v1/decide", content=b" " * (MAX_BODY + 1), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "bytes" in r.json()["detail"]
    many = [instance_to_dict(instances[1])] * 9  # limit 8 per request
    r = client.post("/v1/decide_batch", json={"instances": many, "prompt": "min_energy"})
    assert r.status_code == 413 and "instances" in r.json()["detail"]
    bad_item = [instance_to_dict(instances[1]), {"schema": "lambo.instance/1"}]
    r = client.post("/v1/decide_batch", json={"instances": bad_item, "prompt": "min_energy"})
    assert r.status_code == 422 and "instances[1]" in r.json()["detail"]
    assert (
        client.post("/v1/decide", json={"instance": instance_to_dict(instances[1]), "prompt": "min_energy"}).status_code
        == 200
    )


def test_register_rejects_bad_checkpoints(client, setup):
    cases = [
        ({"id": "ghost", "path": str(setup / "missing")}, 422, "does not exist"),
        ({"id": "alien", "path": str(setup / "alien")}, 422, "encoder"),
        ({"id": "ckpt", "path": str(setup / "ckpt")}, 422, "not a decoder checkpoint"),
        ({"id": "bad/id", "path": str(setup / "late")}, 422, "id"),
        ({"id": "drift_a", "path": str(setup / "late")}, 409, "immutable"),
    ]
    for body, status, needle in cases:
        r = client.post("/v1/decoders", json=body)
        assert r.status_code == status, (body, r.text)
        assert needle in r.json()["detail"], r.text
    assert "alien" not in {d["id"] for d in client.get("/v1/decoders").json()["decoders"]}


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
        r = await ac.post("/v1/decoders", json={"id": "late", "path": str(setup / "late")})
        assert r.status_code == 200, r.text
        assert r.json()["created"] is True
        registered.set()

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=60) as ac:
            await asyncio.gather(swap(ac), *(caller(ac, w) for w in range(6)))
            again = await ac.post("/v1/decoders", json={"id": "late", "path": str(setup / "late")})
            assert again.status_code == 200 and again.json()["created"] is False
            other = await ac.post("/v1/decoders", json={"id": "late", "path": str(setup / "late_copy")})
            assert other.status_code == 409

    asyncio.run(go())
    failed = [r.text for *_, r in log if r.status_code != 200]
    assert not failed
    used = {d for d, *_ in log}
    assert {"late", "default", "drift_a"} <= used
    for decoder, inst, prompt, r in log:
        assert r.json()["decoder"] == decoder
        _check_result(r.json(), inst, local.decide(decoder, inst, prompt))
