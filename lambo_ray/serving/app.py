"""The Ray Serve application: ``serve run serve/config.yaml`` or ``lambo serve``.

Two deployments:

* ``LamboIngress`` (FastAPI, OpenAPI docs at /docs): parses and bounds bodies (size, nesting, integers,
  N, M, N*M, batch, k, time budget: 413 before any policy work), holds the policy
  (:class:`~lambo_ray.serving.service.PolicyService`: shared encoder, decoders by id, cross-caller
  batching), evaluates decisions with the one evaluator and turns :class:`LamboInputError` into JSON
  401 / 403 / 404 / 409 / 413 / 422 / 503 answers. Anything unexpected is a JSON 500 without a traceback.
* ``DecoderCatalog`` (one replica, no CPU reserved): the app-wide id -> checkpoint mapping, so a decoder
  registered through any replica is servable by all of them without a restart; see
  :mod:`lambo_ray.serving.decoders` for why ids are immutable and why this is not ``@serve.multiplexed``.

Overload is shed before it queues: each replica works on at most ``max_ongoing_requests`` requests, at
most ``max_queued_requests`` wait for one, and the rest get 503 with Retry-After at once; every request
also ends within ``request_timeout_s`` (an HTTP option of Serve, set by ``lambo serve`` and in
``serve/config.yaml``). :mod:`lambo_ray.serving.proxy` words those answers, and a lost replica, as JSON.
"""

import logging
import os
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.handle import DeploymentHandle

from lambo_ray.errors import LamboInputError
from lambo_ray.serving import api, limits
from lambo_ray.serving.auth import check_admin
from lambo_ray.serving.config import ServeConfig
from lambo_ray.serving.decoders import DecoderCatalog, DecoderEntry, is_decoder_checkpoint, public_meta
from lambo_ray.serving.engine import ItemError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- catalog
@serve.deployment(name="DecoderCatalog", num_replicas=1, ray_actor_options={"num_cpus": 0})
class CatalogDeployment:
    def __init__(self, cfg: ServeConfig, default: DecoderEntry) -> None:
        self._catalog = DecoderCatalog(default, cfg.decoders_dir, is_decoder_checkpoint)

    def resolve(self, decoder_id: str) -> DecoderEntry | None:
        return self._catalog.resolve(decoder_id)

    def register(self, entry: DecoderEntry) -> bool | ItemError:
        try:
            return self._catalog.register(entry)
        except LamboInputError as err:
            return ItemError.of(err)

    def entries(self) -> list[dict[str, Any]]:
        return [e.to_public() for e in self._catalog.entries()]


# ---------------------------------------------------------------------------------------------- ingress
fastapi_app = FastAPI(
    title="LAMBO offloading policy",
    description="Decides where every UE's task runs (local or one edge server) and its CPU share. "
    "Bodies follow lambo.instance/1 and lambo.decision/1; limits answer 413, overload 503 with Retry-After.",
    version="1",
)
RETRY_AFTER_HEADER = "Retry-After"


@fastapi_app.exception_handler(LamboInputError)
async def _input_error(request: Request, err: LamboInputError) -> JSONResponse:
    headers = dict(getattr(err, "headers", None) or {})
    if err.status == 503:
        headers[RETRY_AFTER_HEADER] = str(getattr(request.app.state, "retry_after_s", 1))
    return JSONResponse(status_code=err.status, content=api.error_body(err), headers=headers)


@fastapi_app.exception_handler(Exception)
async def _unexpected(request: Request, err: Exception) -> JSONResponse:
    log.exception("unexpected error on %s", request.url.path)
    return JSONResponse(
        status_code=500, content={"detail": "internal server error (logged on the server)", "status": 500}
    )


async def read_body(request: Request, cfg: ServeConfig) -> bytes:
    """The body, refusing (413) past ``max_body_bytes`` without buffering more than that."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and len(declared) < 20:
        limits.check_body_size(int(declared), cfg)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        limits.check_body_size(size, cfg)
        chunks.append(chunk)
    return b"".join(chunks)


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1e3


_ERRORS = {s: {"model": api.ErrorOut} for s in (404, 413, 422, 503)}
_ADMIN_ERRORS = {s: {"model": api.ErrorOut} for s in (401, 403, 409, 413, 422, 503)}


@serve.deployment(name="LamboIngress")
@serve.ingress(fastapi_app)
class LamboIngress:
    def __init__(self, cfg: ServeConfig, catalog: DeploymentHandle) -> None:
        from lambo_ray.serving.service import PolicyService  # torch only in the replicas

        self._cfg = cfg
        self._svc = PolicyService(cfg, catalog)
        self._catalog = catalog
        fastapi_app.state.retry_after_s = cfg.retry_after_s

    @fastapi_app.post(
        "/v1/decide",
        responses={200: {"model": api.DecideOut}, **_ERRORS},
        openapi_extra=api.openapi_body(api.DECIDE_DOC),
    )
    async def decide(self, request: Request) -> JSONResponse:
        """Decide one instance. Concurrent callers are batched on the replica."""
        start = time.perf_counter()
        req = api.parse_decide(await read_body(request, self._cfg), self._cfg)
        inst = req.instances[0]
        decision = await self._svc.decide_one(inst, req.options)
        body = api.decide_result(inst, decision, req.options.decoder or self._cfg.default_decoder, timing_ms=0.0)
        body["timing_ms"] = _ms(start)  # the whole request: parse, queue, batch, policy, evaluation
        return JSONResponse(body)

    @fastapi_app.post(
        "/v1/decide_batch",
        responses={200: {"model": api.DecideBatchOut}, **_ERRORS},
        openapi_extra=api.openapi_body(api.DECIDE_BATCH_DOC),
    )
    async def decide_batch(self, request: Request) -> JSONResponse:
        """Decide many instances in order, in one batched policy pass (the bulk path)."""
        start = time.perf_counter()
        req = api.parse_decide_batch(await read_body(request, self._cfg), self._cfg)
        decoder, decisions = await self._svc.decide_many(req.instances, req.options)
        per_item = _ms(start) / len(decisions)
        results = [api.decide_result(inst, dec, decoder, per_item) for inst, dec in zip(req.instances, decisions)]
        return JSONResponse({"results": results, "timing_ms": _ms(start)})

    @fastapi_app.get("/v1/decoders")
    async def decoders(self) -> dict[str, Any]:
        """Every servable decoder id (pretrained default, decoders directory, registered); no server paths."""
        entries = await self._svc.call_catalog("entries")
        return {"default": self._cfg.default_decoder, "decoders": entries}

    @fastapi_app.post(
        "/v1/decoders",
        responses={200: {"description": "registered (or already identical)"}, **_ADMIN_ERRORS},
        openapi_extra=api.openapi_body(api.RegisterDecoderBody),
    )
    async def register_decoder(self, request: Request) -> dict[str, Any]:
        """Make a decoder checkpoint of the decoders directory servable under a new id, without a restart.
        Needs ``Authorization: Bearer <admin token>``."""
        check_admin(request.headers.get("authorization"), self._cfg)
        body = api.parse_register(await read_body(request, self._cfg), self._cfg)
        return await self._svc.register(body.id, body.dir)

    @fastapi_app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """Liveness of this replica and its policy."""
        ctx = serve.get_replica_context()
        return {"status": "ok", "replica": ctx.replica_id.unique_id, "pid": os.getpid(), "policy": self._svc.info()}

    @fastapi_app.post("/v1/echo")
    async def echo(self, request: Request) -> dict[str, Any]:
        """Reads the body and answers its size: the bare Serve HTTP path, the load benchmark's yardstick."""
        return {"bytes": len(await read_body(request, self._cfg))}


# ---------------------------------------------------------------------------------------------- builder
def check_checkpoint(cfg: ServeConfig, *, load_weights: bool = False) -> DecoderEntry:
    """Fail fast, before Serve starts replicas that would crash-loop on a bad checkpoint.

    The manifest (exists, format, feature version, config) is always checked; ``load_weights`` also
    loads the weights once (truncated files, mismatched shapes), which ``lambo serve`` does before
    starting Ray; the app builder skips it because an L checkpoint is gigabytes.
    """
    from lambo_ray.policy.checkpoint import POLICY_WEIGHTS, load_policy, read_manifest, resolve_policy_dir

    directory = resolve_policy_dir(cfg.checkpoint)
    manifest = read_manifest(directory)
    if not (directory / POLICY_WEIGHTS).is_file():
        raise LamboInputError(f"missing {POLICY_WEIGHTS}", where=str(directory))
    meta = load_policy(directory)[1] if load_weights else dict(manifest.get("meta") or {})
    if cfg.decoders_dir is not None and not Path(cfg.decoders_dir).is_dir():
        raise LamboInputError(f"decoders directory not found: {cfg.decoders_dir}", where="decoders_dir")
    return DecoderEntry(
        cfg.default_decoder,
        None,
        "checkpoint",
        {
            **public_meta(meta),
            "fingerprint": manifest.get("fingerprint"),
            "scale": manifest.get("scale"),
            "n_params": manifest.get("n_params"),
        },
    )


def deployment_options(cfg: ServeConfig) -> dict[str, Any]:
    """Serve options of the policy-holding ingress: capacity, load shedding (503 + Retry-After), CPUs."""
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cfg.policy_num_cpus},
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=cfg.retry_after_s),
    }
    if cfg.policy_replicas is not None:
        opts["num_replicas"] = cfg.policy_replicas
    return opts


def build_app(args: dict[str, Any] | ServeConfig) -> serve.Application:
    """Serve application builder (``import_path: lambo_ray.serving.app:build_app``; ``args`` = ServeConfig keys)."""
    cfg = args if isinstance(args, ServeConfig) else ServeConfig.from_dict(args)
    cfg = cfg.with_admin_token_from_env()
    default = check_checkpoint(cfg)
    catalog = CatalogDeployment.bind(cfg, default)
    return LamboIngress.options(**deployment_options(cfg)).bind(cfg, catalog)
