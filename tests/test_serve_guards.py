"""Serving guards without a running Serve: request limits while parsing, admin auth, decoder directories,
the proxy's JSON error middleware, per-item failure isolation and time budgets in the engine, and safe
DROO/ARE checkpoints."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lambo_ray.errors import LamboInputError
from lambo_ray.mec.generator import generate_many
from lambo_ray.mec.io import instance_to_dict
from lambo_ray.mec.scenario import ScenarioConfig
from lambo_ray.serving import api, limits
from lambo_ray.serving.auth import AuthError, check_admin
from lambo_ray.serving.config import ServeConfig, decode_modes, token_digest
from lambo_ray.serving.decoders import NOT_A_DECODER_DIR, decoder_dir_inside, public_meta
from lambo_ray.serving.proxy import ServeErrorsAsJson, clean_headers

CFG = ServeConfig(checkpoint="x", max_ues=60, max_servers=8, max_pairs=300, max_batch_instances=4, max_k=16)


@pytest.fixture(scope="module")
def inst():
    return generate_many(ScenarioConfig(n_ues=20, n_servers=3, capacities_cps=(1.5e10, 3e10, 5e10)), 1, seed=3)[0]


def _body(doc: dict) -> bytes:
    return json.dumps(doc).encode()


def _status(fn, *args) -> tuple[int, str]:
    with pytest.raises(LamboInputError) as err:
        fn(*args)
    return err.value.status, str(err.value)


# ------------------------------------------------------------------------------------------ parsing limits
def test_decode_modes_are_the_policys_strategies():
    from lambo_ray.policy.decoding import available_strategies

    assert decode_modes() == tuple(available_strategies())


def test_valid_request_parses_with_defaults(inst):
    req = api.parse_decide(_body({"instance": instance_to_dict(inst), "prompt": "min_energy"}), CFG)
    assert req.options.decode == "greedy" and req.options.k == CFG.default_k and req.options.time_budget_s is None
    np.testing.assert_array_equal(req.instances[0].rate_bps, inst.rate_bps)
    refine = api.parse_decide(
        _body({"instance": instance_to_dict(inst), "prompt": "min_energy", "decode": "refine"}), CFG
    )
    assert refine.options.time_budget_s == pytest.approx(CFG.default_time_budget_ms / 1e3)


@pytest.mark.parametrize(
    "mutate, status, needle",
    [
        (
            lambda d: {**d, "instance": {**d["instance"], "servers": {"capacity_cps": [1e10] * 200_000}}},
            413,
            "max_servers",
        ),
        (
            lambda d: {**d, "instance": {**d["instance"], "ues": {**d["instance"]["ues"], "cycles": [1e9] * 61}}},
            413,
            "max_ues",
        ),
        (
            lambda d: {
                **d,
                "instance": {
                    **d["instance"],
                    "ues": {**d["instance"]["ues"], "rate_bps": [[1e6] * 9] * 20},
                },
            },
            413,
            "max_servers",
        ),
        (lambda d: {**d, "k": 17, "decode": "best_of_k"}, 413, "max_k"),
        (lambda d: {**d, "k": 0}, 422, "k=0"),
        (lambda d: {**d, "decode": "refine", "time_budget_ms": 1e9}, 413, "max_time_budget_ms"),
        (lambda d: {**d, "time_budget_ms": -5}, 422, "time_budget_ms"),
        (lambda d: {**d, "decode": "beam"}, 422, "decode"),
        (lambda d: {**d, "decodr": "x"}, 422, "decodr"),
        (lambda d: {**d, "seed": -1}, 422, "seed"),
    ],
)
def test_limits_and_bad_fields_are_named(inst, mutate, status, needle):
    doc = mutate({"instance": instance_to_dict(inst), "prompt": "min_latency"})
    got, message = _status(api.parse_decide, _body(doc), CFG)
    assert got == status and needle in message, message


def test_pairs_limit_counts_n_times_m(inst):
    doc = instance_to_dict(generate_many(ScenarioConfig(n_ues=50, n_servers=7, capacities_cps=(2e10,) * 7), 1, 1)[0])
    status, message = _status(api.parse_decide, _body({"instance": doc, "prompt": "min_latency"}), CFG)
    assert status == 413 and "350 pairs" in message and "max_pairs=300" in message


def test_batch_limits(inst):
    doc = instance_to_dict(inst)
    status, message = _status(api.parse_decide_batch, _body({"instances": [doc] * 5, "prompt": "min_latency"}), CFG)
    assert status == 413 and "max_batch_instances=4" in message
    cfg = ServeConfig(checkpoint="x", max_request_ues=50)
    status, message = _status(api.parse_decide_batch, _body({"instances": [doc] * 3, "prompt": "min_latency"}), cfg)
    assert status == 413 and "60 UEs" in message and "max_request_ues=50" in message
    bad = [doc, {"schema": "lambo.instance/1"}]
    status, message = _status(api.parse_decide_batch, _body({"instances": bad, "prompt": "min_latency"}), CFG)
    assert status == 422 and message.startswith("instances[1]")


def test_size_is_refused_before_arrays_are_built(monkeypatch, inst):
    import lambo_ray.serving.api as api_mod

    def boom(*a, **k):
        raise AssertionError("the instance validator must not run on an over-limit body")

    monkeypatch.setattr(api_mod, "instance_from_dict", boom)
    doc = {"instance": {"servers": {"capacity_cps": [1.0] * 1_000_000}}, "prompt": "min_latency"}
    status, message = _status(api.parse_decide, _body(doc), ServeConfig(checkpoint="x"))
    assert status == 413 and "1000000 servers" in message


@pytest.mark.parametrize(
    "body, status, needle",
    [
        (b"[" * 100_000, 422, "max_json_depth"),
        (b'{"a":' * 40 + b"1" + b"}" * 40, 422, "max_json_depth"),
        (b'{"prompt": "min_latency", "seed": ' + b"9" * 5000 + b"}", 422, "max_int_digits"),
        (b'{"prompt": "min_latency", "seed": ' + b"9" * 4000 + b"}", 422, "max_int_digits"),
        (b"{not json", 422, "invalid JSON"),
        (b"\xff\xfe{}", 422, "invalid JSON"),
        (b"   ", 422, "empty"),
        (b" " * (CFG.max_body_bytes + 1), 413, "max_body_bytes"),
    ],
)
def test_hostile_json_is_a_clear_4xx(body, status, needle):
    got, message = _status(limits.parse_json, body, CFG)
    assert got == status and needle in message, message


def test_float_overflow_is_a_named_field_error(inst):
    body = b'{"prompt": "min_latency", "seed": 1e999999, "instance": {}}'
    status, message = _status(api.parse_decide, body, CFG)
    assert status == 422 and "seed" in message
    doc = instance_to_dict(inst)
    doc["ues"]["cycles"][0] = "X"
    text = json.dumps({"instance": doc, "prompt": "min_latency"}).replace('"X"', "1e999999")
    status, message = _status(api.parse_decide, text.encode(), CFG)
    assert status == 422 and "ues.cycles" in message


def test_nesting_depth_scan():
    assert limits.nesting_depth(b'{"a": [[1, 2], [3]]}') == 3
    assert limits.nesting_depth(b"[" * 1000) == 1000
    assert limits.nesting_depth(b"]]]") == 0


# ------------------------------------------------------------------------------------------ auth, dirs, paths
def test_admin_token_checks():
    open_cfg = ServeConfig(checkpoint="x")
    with pytest.raises(AuthError) as err:
        check_admin("Bearer anything", open_cfg)
    assert err.value.status == 403 and "LAMBO_ADMIN_TOKEN" in str(err.value)
    cfg = ServeConfig(checkpoint="x", admin_token_sha256=token_digest("s3cret-token-of-32-characters!!"))
    for header in (None, "", "Basic abc", "Bearer ", "Bearer wrong-token"):
        with pytest.raises(AuthError) as err:
            check_admin(header, cfg)
        assert err.value.status == 401
    check_admin("Bearer s3cret-token-of-32-characters!!", cfg)


def test_admin_token_from_env_keeps_only_a_digest(monkeypatch):
    monkeypatch.setenv("LAMBO_ADMIN_TOKEN", "short")
    with pytest.raises(LamboInputError, match="at least 16"):
        ServeConfig(checkpoint="x").with_admin_token_from_env()
    monkeypatch.setenv("LAMBO_ADMIN_TOKEN", "a-long-enough-admin-token")
    cfg = ServeConfig(checkpoint="x").with_admin_token_from_env()
    assert cfg.admin_token_sha256 == token_digest("a-long-enough-admin-token")
    assert "a-long-enough-admin-token" not in json.dumps(cfg.to_dict())


def test_decoder_dirs_are_confined_with_one_uniform_error(tmp_path):
    root = tmp_path / "decoders"
    (root / "good").mkdir(parents=True)
    (root / "good" / "decoder.json").write_text("{}")
    (root / "plain").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "decoder.json").write_text("{}")
    os.symlink(outside, root / "link")
    assert decoder_dir_inside(str(root), "good") == (root / "good").resolve()
    for rel in ("../outside", str(outside), "/etc", "missing", "plain", "link", "good/..", "a\\b", "", "./good"):
        with pytest.raises(LamboInputError) as err:
            decoder_dir_inside(str(root), rel)
        assert err.value.status == 422 and str(err.value) == f"dir: {NOT_A_DECODER_DIR}", rel
    with pytest.raises(LamboInputError, match="not a decoder checkpoint"):
        decoder_dir_inside(None, "good")


def test_public_meta_drops_absolute_paths():
    meta = public_meta({"run": "/home/u/runs/pretrain", "note": "ok", "nested": {"dir": "/srv/x"}, "n": 3})
    assert meta == {"run": "pretrain", "note": "ok", "nested": {"dir": "x"}, "n": 3}


# ------------------------------------------------------------------------------------------ proxy middleware
async def _asgi(app, headers=()) -> tuple[list[dict], list]:
    sent: list[dict] = []
    seen_headers: list = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "headers": list(headers), "path": "/v1/decide"}
    await ServeErrorsAsJson(app)(scope, receive, send)
    seen_headers.extend(scope["headers"])
    return sent, seen_headers


def _plain(status: int, extra: tuple = ()):
    async def app(scope, receive, send):
        headers = [(b"content-type", b"text/plain"), *extra]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"Request dropped due to backpressure", "more_body": False})

    return app


@pytest.mark.parametrize("status", [408, 503])
def test_proxy_turns_serve_failures_into_json_503(status):
    sent, _ = asyncio.run(_asgi(_plain(status)))
    start, body = sent
    assert start["status"] == 503 and (b"retry-after", b"1") in start["headers"]
    doc = json.loads(body["body"])
    assert doc["status"] == 503 and "retry" in doc["detail"]


def test_proxy_keeps_serves_retry_after():
    sent, _ = asyncio.run(_asgi(_plain(503, ((b"retry-after", b"7"),))))
    assert (b"retry-after", b"7") in sent[0]["headers"]


def test_proxy_answers_a_lost_replica_and_passes_json_through():
    async def silent(scope, receive, send):  # what the proxy does when the replica dies mid-request
        return None

    sent, _ = asyncio.run(_asgi(silent))
    assert sent[0]["status"] == 503 and "replica" in json.loads(sent[1]["body"])["detail"]

    async def app_json(scope, receive, send):
        await send({"type": "http.response.start", "status": 503, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"detail": "ours", "status": 503}'})

    sent, _ = asyncio.run(_asgi(app_json))
    assert json.loads(sent[1]["body"])["detail"] == "ours"


def test_proxy_drops_headers_that_lift_bounds():
    headers = [
        (b"x-request-timeout-seconds", b"0"),
        (b"x-request-disconnect-disabled", b"?1"),
        (b"content-type", b"application/json"),
    ]
    assert clean_headers(headers) == [(b"content-type", b"application/json")]
    assert clean_headers([(b"x-request-timeout-seconds", b"2.5")]) == [(b"x-request-timeout-seconds", b"2.5")]
    assert clean_headers([(b"X-Request-Timeout-Seconds", b"1e9")]) == []


# ------------------------------------------------------------------------------------------ engine
@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from lambo_ray.policy.checkpoint import save_policy
    from lambo_ray.policy.config import scale_config
    from lambo_ray.policy.model import LamboPolicy
    from lambo_ray.serving.engine import PolicyEngine

    root = tmp_path_factory.mktemp("engine")
    torch.manual_seed(0)
    save_policy(root / "ckpt", LamboPolicy(scale_config("S")), {})
    threads = torch.get_num_threads()
    yield PolicyEngine(ServeConfig(checkpoint=str(root / "ckpt")))
    torch.set_num_threads(threads)


def test_one_failing_item_fails_only_its_caller(engine, monkeypatch):
    from lambo_ray.policy.decoding import decide
    from lambo_ray.serving.engine import DecideItem

    insts = generate_many(ScenarioConfig(n_ues=12, n_servers=3, capacities_cps=(1e10, 2e10, 3e10)), 5, seed=8)
    poison = insts[2]
    real_run = engine._run

    def run(view, instances, prompt, how):
        if any(i is poison for i in instances):
            raise RuntimeError("policy bug on this instance")
        return real_run(view, instances, prompt, how)

    monkeypatch.setattr(engine, "_run", run)
    items = [DecideItem(i, "min_energy", "default", "greedy", 1, 0) for i in insts]
    results = engine.decide_items(items, {"default": engine.default_entry})
    assert [type(r).__name__ for r in results] == ["Decision", "Decision", "ItemError", "Decision", "Decision"]
    assert results[2].status == 500 and "Traceback" not in results[2].message
    for inst, res in zip(insts, results):
        if inst is not poison:
            want = decide(engine.policy, [inst], "min_energy")[0]
            np.testing.assert_array_equal(res.target, want.target)
            np.testing.assert_allclose(res.share, want.share, atol=1e-6)


def test_mixed_shapes_decide_per_shape_and_keep_order(engine):
    from lambo_ray.policy.decoding import decide
    from lambo_ray.serving.engine import DecideItem, call_chunks

    small = generate_many(ScenarioConfig(n_ues=8, n_servers=2, capacities_cps=(1e10, 2e10)), 2, seed=1)
    big = generate_many(ScenarioConfig(n_ues=30), 2, seed=2)
    insts = [small[0], big[0], small[1], big[1]]
    assert sorted(map(sorted, call_chunks(insts))) == [[0, 2], [1, 3]]
    got = engine.decide(
        insts, "min_latency", engine.default_entry, DecideItem(insts[0], "min_latency", "default", "greedy", 1, 0)
    )
    for inst, dec in zip(insts, got):
        want = decide(engine.policy, [inst], "min_latency")[0]
        np.testing.assert_array_equal(dec.target, want.target)


def test_time_budget_reaches_decide_only_when_it_takes_one(engine, monkeypatch):
    import lambo_ray.policy.decoding as decoding
    from lambo_ray.serving.engine import DecideItem

    seen = {}
    real = decoding.decide

    def with_budget(policy, instances, prompt, mode="greedy", k=16, seed=0, time_budget_s=None):
        seen["budget"] = time_budget_s
        return real(policy, instances, prompt, mode=mode, k=k, seed=seed)

    inst = generate_many(ScenarioConfig(n_ues=10, n_servers=2, capacities_cps=(1e10, 2e10)), 1, seed=4)[0]
    item = DecideItem(inst, "min_latency", "default", "refine", 2, 0, 0.05)
    monkeypatch.setattr(decoding, "decide", with_budget)
    monkeypatch.setattr(engine, "time_budgets", True)
    engine.decide([inst], "min_latency", engine.default_entry, item)
    assert seen["budget"] == 0.05
    monkeypatch.setattr(engine, "time_budgets", False)
    seen.clear()
    engine.decide([inst], "min_latency", engine.default_entry, item)
    assert seen["budget"] is None


# ------------------------------------------------------------------------------------------ checkpoints
class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("method", ["droo", "are"])
def test_crafted_pickle_checkpoint_is_refused_without_running_code(method, tmp_path, capsys):
    from lambo_ray.cli import main
    from lambo_ray.mec.io import write_instances

    marker = tmp_path / "pwned"
    crafted = tmp_path / "crafted.pt"
    torch.save({"method": method, "state": _Payload(marker)}, crafted)
    inst_file = tmp_path / "i.jsonl"
    write_instances(inst_file, generate_many(ScenarioConfig(n_ues=6, n_servers=2, capacities_cps=(1e10, 2e10)), 1, 0))
    argv = ["solve", "--method", method, "--prompt", "min_energy", "--in", str(inst_file), "--out", str(tmp_path / "d")]
    assert main([*argv, "--checkpoint", str(crafted)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "only tensors and plain values" in err
    assert not marker.exists()


@pytest.mark.parametrize("method", ["droo", "are"])
def test_expert_checkpoint_saves_are_atomic(method, tmp_path, monkeypatch):
    from lambo_ray.experts.base import get_expert

    small = ScenarioConfig(n_ues=6, n_servers=2, capacities_cps=(1e10, 2e10))
    expert = get_expert(method, warmup_steps=0, seed=1)
    expert.warmup(generate_many(small, 3, seed=2), "min_energy")
    path = tmp_path / "expert.pt"
    expert.save(path)
    good = path.read_bytes()
    expert.warmup(generate_many(small, 3, seed=3), "min_energy")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        expert.save(path)
    assert path.read_bytes() == good  # the saved checkpoint survives a failed save
    assert [p.name for p in tmp_path.iterdir()] == ["expert.pt"]  # and no temp file is left behind
    loaded = get_expert(method, checkpoint=str(path), seed=1)
    assert loaded.counters["warmup_steps"] == 3


# ------------------------------------------------------------------------------------------ catalog calls
class _Method:
    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, 0

    def remote(self, *args):
        self.calls += 1
        return self.fn(*args)


class _Catalog:
    """A stand-in for the catalog deployment handle: ``resolve.remote(id)`` returns an awaitable."""

    def __init__(self, resolve) -> None:
        self.resolve = _Method(resolve)


def test_catalog_calls_time_out_as_503_and_unknown_ids_are_remembered(engine):
    from lambo_ray.serving.service import PolicyService

    cfg = ServeConfig(checkpoint=engine.cfg.checkpoint, catalog_timeout_s=0.2)

    async def hang(decoder_id):
        await asyncio.sleep(30)

    async def lost(decoder_id):
        raise ConnectionError("catalog replica died")

    async def unknown(decoder_id):
        return None

    async def run(resolve, decoder_id):
        svc = PolicyService(cfg, _Catalog(resolve), engine=engine)
        start = time.perf_counter()
        with pytest.raises(LamboInputError) as err:
            await svc.entry(decoder_id)
        return svc, err.value, time.perf_counter() - start

    _, err, wall = asyncio.run(run(hang, "x"))
    assert err.status == 503 and "did not answer within 0.2 s" in str(err) and wall < 2.0
    _, err, _ = asyncio.run(run(lost, "x"))
    assert err.status == 503 and "unavailable" in str(err)

    async def twice():
        svc, err, _ = await run(unknown, "ghost")
        assert err.status == 404
        with pytest.raises(LamboInputError):
            await svc.entry("ghost")
        assert (await svc.entry(None)).id == "default"  # the default never asks the catalog
        return svc._catalog.resolve.calls

    assert asyncio.run(twice()) == 1


# ------------------------------------------------------------------------------------------ cluster files
ROOT = Path(__file__).resolve().parents[1]


def _yaml(rel: str):
    import yaml

    return yaml.safe_load((ROOT / rel).read_text())


def test_cluster_files_use_token_auth_and_keep_admin_listeners_off_public_interfaces():
    cluster = _yaml("cluster/kuberay/raycluster.yaml")["spec"]
    job = _yaml("cluster/kuberay/rayjob-pretrain.yaml")["spec"]
    service = _yaml("cluster/kuberay/rayservice.yaml")["spec"]
    for spec in (cluster, job["rayClusterSpec"], service["rayClusterConfig"]):
        assert spec["authOptions"]["mode"] == "token"
    for spec in (cluster, job["rayClusterSpec"]):
        assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert job["submissionMode"] == "SidecarMode"  # the submitter reaches the dashboard on the pod's loopback
    assert job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["restartPolicy"] == "Never"
    launcher = _yaml("cluster/aws.yaml")
    head, workers = launcher["head_start_ray_commands"][-1], launcher["worker_start_ray_commands"][-1]
    assert "RAY_AUTH_MODE=token" in head and "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert "RAY_AUTH_MODE=token" in workers
    local = (ROOT / "cluster" / "local.sh").read_text()
    assert "export RAY_AUTH_MODE=token" in local and "0.0.0.0" not in local
    assert _yaml("serve/config.yaml")["http_options"]["host"] == "127.0.0.1"


def test_rayservice_pods_get_the_proxy_callback_admin_secret_and_network_policy():
    import yaml

    from lambo_ray.serving.proxy import PROXY_CALLBACK

    service = _yaml("cluster/kuberay/rayservice.yaml")["spec"]
    policy = _yaml("cluster/kuberay/policies/networkpolicy.yaml")
    selector = policy["spec"]["podSelector"]["matchLabels"]
    groups = [service["rayClusterConfig"]["headGroupSpec"], *service["rayClusterConfig"]["workerGroupSpecs"]]
    for group in groups:
        assert selector.items() <= group["template"]["metadata"]["labels"].items()
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in container["env"]}
            assert env["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"]["value"] == PROXY_CALLBACK
            assert env["LAMBO_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "lambo-admin"
    serve_cfg = yaml.safe_load(service["serveConfigV2"])
    assert serve_cfg["http_options"]["request_timeout_s"] == serve_cfg["applications"][0]["args"]["request_timeout_s"]
    ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule.get("ports", [])}
    assert 8000 in ports and 6379 not in ports  # GCS only from the cluster's own pods (the rule without ports)


def test_time_budget_is_bounded_per_request(inst):
    doc = instance_to_dict(inst)
    cfg = ServeConfig(checkpoint="x", max_time_budget_ms=1000, default_time_budget_ms=250)
    body = {"instances": [doc] * 8, "prompt": "min_latency", "decode": "search"}
    req = api.parse_decide_batch(_body(body), cfg)
    assert req.options.time_budget_s == pytest.approx(0.125)  # the default shrinks to fit 8 instances
    status, message = _status(api.parse_decide_batch, _body({**body, "time_budget_ms": 200}), cfg)
    assert status == 413 and "8 instances x 200 ms" in message
    ok = api.parse_decide_batch(_body({**body, "time_budget_ms": 100}), cfg)
    assert ok.options.time_budget_s == pytest.approx(0.1)
    greedy = api.parse_decide_batch(_body({**body, "decode": "greedy"}), cfg)
    assert greedy.options.time_budget_s is None
