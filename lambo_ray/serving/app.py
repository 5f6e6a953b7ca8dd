"""The Ray Serve application: ``serve run serve/config.yaml`` or ``lambo serve --checkpoint DIR``.

Three deployments:

* ``LamboIngress`` (FastAPI, OpenAPI docs at /docs): parses and validates bodies (byte limit, JSON,
  schema, N limit) so bad requests never reach the policy, evaluates decisions with the one evaluator
  and turns :class:`LamboInputError` into 422 / 404 / 409 / 413 responses.
* ``PolicyDeployment``: holds the shared encoder once per replica (:class:`PolicyEngine`), decoders by id
  in a bounded LRU cache, and groups concurrent ``/v1/decide`` callers with ``@serve.batch``; within a
  batch, instances with the same decoder and decode mode go through the policy in one call.
  The policy runs *on* the replica's user event loop, not in a worker thread: decoding is a Python loop
  of small torch ops that holds the GIL, so a worker thread starved the loop thread and requests
  trickled into the batch queue (mean batch 3 at 32 concurrent callers); blocking the loop instead lets
  Serve's separate system loop buffer the arrivals, which all join the next batch (batches of 11-16,
  measured with direct handle calls on the 2-core machine).
* ``DecoderCatalog`` (one replica, no CPU reserved): the app-wide id -> checkpoint mapping, so a decoder
  registered through any replica is servable by all of them without a restart; see
  :mod:`lambo_ray.serving.decoders` for why ids are immutable and why this is not ``@serve.multiplexed``.

Replica-to-replica calls return :class:`Failure` values instead of raising: exceptions crossing a Ray
handle lose their attributes (the HTTP status), and a failing item must not fail a whole batch.
"""

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from lambo_ray.errors import LamboInputError
from lambo_ray.mec.instance import Decision, Instance
from lambo_ray.serving import api
from lambo_ray.serving.config import ServeConfig
from lambo_ray.serving.decoders import DecoderCatalog, DecoderEntry, is_decoder_checkpoint, public_meta

if TYPE_CHECKING:
    from lambo_ray.serving.engine import DecideItem


@dataclass(frozen=True)
class Failure:
    """A user error carried across a deployment handle (picklable, keeps the HTTP status)."""

    status: int
    message: str

    @classmethod
    def of(cls, err: LamboInputError) -> "Failure":
        return cls(err.status, str(err))

    def error(self) -> LamboInputError:
        return LamboInputError(self.message, status=self.status)


def _unwrap(value: Any) -> Any:
    if isinstance(value, Failure):
        raise value.error()
    return value


# ---------------------------------------------------------------------------------------------- catalog
@serve.deployment(name="DecoderCatalog", num_replicas=1, ray_actor_options={"num_cpus": 0})
class CatalogDeployment:
    def __init__(self, cfg: ServeConfig, default: DecoderEntry) -> None:
        self._catalog = DecoderCatalog(default, cfg.decoders_dir, is_decoder_checkpoint)

    def resolve(self, decoder_id: str) -> DecoderEntry | None:
        return self._catalog.resolve(decoder_id)

    def register(self, entry: DecoderEntry) -> bool | Failure:
        try:
            return self._catalog.register(entry)
        except LamboInputError as err:
            return Failure.of(err)

    def entries(self) -> list[dict[str, Any]]:
        return [e.to_dict() for e in self._catalog.entries()]


# ---------------------------------------------------------------------------------------------- policy
@serve.deployment(name="PolicyDeployment")
class PolicyDeployment:
    def __init__(self, cfg: ServeConfig, catalog: DeploymentHandle) -> None:
        from lambo_ray.serving.engine import PolicyEngine  # torch only in the replicas that run it

        self._cfg = cfg
        self._engine = PolicyEngine(cfg)
        self._catalog = catalog
        self._known: dict[str, DecoderEntry] = {cfg.default_decoder: self._engine.default_entry}
        self._batched.set_max_batch_size(cfg.max_batch_size)
        self._batched.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self.batches = 0

    async def _entry(self, decoder_id: str | None) -> DecoderEntry:
        decoder_id = decoder_id or self._cfg.default_decoder
        entry = self._known.get(decoder_id)
        if entry is None:
            entry = await self._catalog.resolve.remote(decoder_id)
            if entry is None:
                raise LamboInputError(
                    f"unknown decoder {decoder_id!r} (GET /v1/decoders lists the servable ones)",
                    where="decoder",
                    status=404,
                )
            self._known[decoder_id] = entry  # ids are immutable: safe to keep forever
        return entry

    async def decide(
        self, inst: Instance, prompt: str, decoder: str | None, decode: str, k: int, seed: int
    ) -> Decision | Failure:
        try:
            entry = await self._entry(decoder)
        except LamboInputError as err:
            return Failure.of(err)
        from lambo_ray.serving.engine import DecideItem

        item = DecideItem(inst, prompt, entry.id, decode, k, seed)
        if self._cfg.batching:
            return await self._batched(item)
        return (await self._compute([item]))[0]

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)  # overridden from the config in __init__
    async def _batched(self, items: list["DecideItem"]) -> list[Decision | Failure]:
        return await self._compute(items)

    async def _compute(self, items: list["DecideItem"]) -> list[Decision | Failure]:
        self.batches += 1
        entries = {item.decoder: self._known[item.decoder] for item in items}
        results = self._engine.decide_items(items, entries)  # on the loop thread: see the module docstring
        return [Failure.of(r) if isinstance(r, LamboInputError) else r for r in results]

    async def decide_many(
        self, instances: list[Instance], prompt: str, decoder: str | None, decode: str, k: int, seed: int
    ) -> tuple[str, list[Decision]] | Failure:
        """The /v1/decide_batch path: already a batch, so it bypasses the cross-caller queue; decided in
        chunks of max_batch_size so one huge request cannot allocate without bound."""
        try:
            entry = await self._entry(decoder)
            out: list[Decision] = []
            step = self._cfg.max_batch_size
            for lo in range(0, len(instances), step):
                out += self._engine.decide(instances[lo : lo + step], prompt, entry, decode, k, seed)
                await asyncio.sleep(0)  # let queued /v1/decide batches interleave between chunks
            return entry.id, out
        except LamboInputError as err:
            return Failure.of(err)

    async def register(self, decoder_id: str, path: str) -> dict[str, Any] | Failure:
        """Validate a decoder checkpoint on this replica (exists, is a decoder, matches our encoder), then
        publish it in the catalog; only after the catalog accepted the id is it cached here."""
        try:
            resolved = str(Path(path).expanduser().resolve())
            known = await self._catalog.resolve.remote(decoder_id)
            if known is not None and known.path != resolved:
                raise LamboInputError(
                    f"decoder id {decoder_id!r} is already registered for {known.path}; decoder "
                    "ids are immutable, register the new checkpoint under a new id",
                    where="id",
                    status=409,
                )
            view, meta = self._engine.load_view(resolved)
            entry = DecoderEntry(decoder_id, resolved, "registered", meta)
            created = _unwrap(await self._catalog.register.remote(entry))
            if created:
                self._engine.adopt(decoder_id, view)
                self._known[decoder_id] = entry
            return {"id": decoder_id, "path": resolved, "created": bool(created), "meta": meta}
        except LamboInputError as err:
            return Failure.of(err)

    def info(self) -> dict[str, Any]:
        return {
            "default_decoder": self._cfg.default_decoder,
            "loaded_decoders": self._engine.loaded_decoders(),
            "batching": {
                "enabled": self._cfg.batching,
                "max_batch_size": self._cfg.max_batch_size,
                "batch_wait_timeout_s": self._cfg.batch_wait_timeout_s,
                "batches": self.batches,
            },
            "checkpoint": self._engine.default_entry.meta,
        }


# ---------------------------------------------------------------------------------------------- ingress
fastapi_app = FastAPI(
    title="LAMBO offloading policy",
    description="Decides where every UE's task runs (local or one edge server) and its CPU share. "
    "Bodies follow lambo.instance/1 and lambo.decision/1 (SPEC, interface contract).",
    version="1",
)


@fastapi_app.exception_handler(LamboInputError)
async def _input_error(request: Request, err: LamboInputError) -> JSONResponse:
    return JSONResponse(status_code=err.status, content=api.error_body(err))


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) past ``limit`` bytes without buffering more than that."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise LamboInputError(f"request body of {declared} bytes exceeds the limit of {limit} bytes", status=413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise LamboInputError(f"request body exceeds the limit of {limit} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1e3


def _json(content: dict[str, Any]) -> JSONResponse:
    """Already JSON-safe (plain lists and floats): skip FastAPI's recursive jsonable_encoder pass."""
    return JSONResponse(content)


_ERRORS = {s: {"model": api.ErrorOut} for s in (404, 409, 413, 422)}


@serve.deployment(name="LamboIngress")
@serve.ingress(fastapi_app)
class LamboIngress:
    def __init__(self, cfg: ServeConfig, policy: DeploymentHandle, catalog: DeploymentHandle) -> None:
        self._cfg = cfg
        self._policy = policy
        self._catalog = catalog

    @fastapi_app.post(
        "/v1/decide",
        responses={200: {"model": api.DecideOut}, **_ERRORS},
        openapi_extra=api.openapi_body(api.DECIDE_DOC),
    )
    async def decide(self, request: Request) -> JSONResponse:
        """Decide one instance. Concurrent callers are batched on the policy replica."""
        start = time.perf_counter()
        req = api.parse_decide(await read_body(request, self._cfg.max_body_bytes), self._cfg)
        inst = req.instances[0]
        decision = _unwrap(await self._policy.decide.remote(inst, req.prompt, req.decoder, req.decode, req.k, req.seed))
        body = api.decide_result(inst, decision, req.decoder or self._cfg.default_decoder, timing_ms=0.0)
        body["timing_ms"] = _ms(start)  # the whole request: parse, queue, batch, policy, evaluation
        return _json(body)

    @fastapi_app.post(
        "/v1/decide_batch",
        responses={200: {"model": api.DecideBatchOut}, **_ERRORS},
        openapi_extra=api.openapi_body(api.DECIDE_BATCH_DOC),
    )
    async def decide_batch(self, request: Request) -> JSONResponse:
        """Decide many instances in order, in one policy call per chunk (the bulk path)."""
        start = time.perf_counter()
        req = api.parse_decide_batch(await read_body(request, self._cfg.max_body_bytes), self._cfg)
        decoder, decisions = _unwrap(
            await self._policy.decide_many.remote(req.instances, req.prompt, req.decoder, req.decode, req.k, req.seed)
        )
        per_item = _ms(start) / len(decisions)
        results = [api.decide_result(inst, dec, decoder, per_item) for inst, dec in zip(req.instances, decisions)]
        return _json({"results": results, "timing_ms": _ms(start)})

    @fastapi_app.get("/v1/decoders")
    async def decoders(self) -> dict[str, Any]:
        """Every servable decoder id (pretrained default, decoders_dir, registered)."""
        return {"default": self._cfg.default_decoder, "decoders": await self._catalog.entries.remote()}

    @fastapi_app.post(
        "/v1/decoders",
        responses={200: {"description": "registered (or already identical)"}, **_ERRORS},
        openapi_extra=api.openapi_body(api.RegisterDecoderBody),
    )
    async def register_decoder(self, request: Request) -> dict[str, Any]:
        """Make a decoder-only checkpoint servable under a new id, without a restart."""
        body = api.parse_register(await read_body(request, self._cfg.max_body_bytes), self._cfg)
        return _unwrap(await self._policy.register.remote(body.id, body.path))

    @fastapi_app.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """Liveness of the whole path: answers only when a policy replica answers."""
        return {"status": "ok", "policy": await self._policy.info.remote()}

    @fastapi_app.post("/v1/echo")
    async def echo(self, request: Request) -> dict[str, Any]:
        """Reads the body and answers its size: the bare Serve HTTP path, the load benchmark's yardstick."""
        return {"bytes": len(await read_body(request, self._cfg.max_body_bytes))}


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


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve application builder (``import_path: lambo_ray.serving.app:build_app``; ``args`` = ServeConfig keys)."""
    cfg = args if isinstance(args, ServeConfig) else ServeConfig.from_dict(args)
    default = check_checkpoint(cfg)
    catalog = CatalogDeployment.bind(cfg, default)
    policy_opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": cfg.policy_num_cpus},
        "max_ongoing_requests": cfg.max_ongoing_requests,
    }
    if cfg.policy_replicas is not None:
        policy_opts["num_replicas"] = cfg.policy_replicas
    ingress_opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": 0},
        "max_ongoing_requests": 4 * cfg.max_ongoing_requests,
    }
    if cfg.ingress_replicas is not None:
        ingress_opts["num_replicas"] = cfg.ingress_replicas
    policy = PolicyDeployment.options(**policy_opts).bind(cfg, catalog)
    return LamboIngress.options(**ingress_opts).bind(cfg, policy, catalog)
