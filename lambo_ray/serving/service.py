"""What one replica does with the policy, without HTTP: resolve decoders, batch callers, decide, register.

The replica that parses a request also holds the policy (:class:`~lambo_ray.serving.engine.PolicyEngine`):
a separate policy deployment cost a second Serve hop per request (a handle call each way, pickling the
instance and the decision), which measured as much as Serve's whole HTTP path at one caller.

The policy runs *on* the replica's event loop, not in a worker thread. A worker thread looks better on
paper (the decoder's TorchScript step loop releases the GIL, so the loop could keep parsing while a
batch is decided), but the rest of a policy call holds the GIL in short bursts, the loop thread then
waits for it, and requests trickle into the batch queue: in alternating runs at 32 callers a policy
thread gave mean batches of 4.2-6.5 and 0.25-0.40 of the echo rate, the loop 12.8-13.9 and 0.43-0.48;
at 8 callers batches of 2.0-2.6 against 4.8-5.7 (with a 0.5 ms GIL switch interval the thread did no
better). Blocking the loop lets Serve's separate system loop buffer the arrivals, which all join the
next ``@serve.batch`` call. It also serialises decoder loads with decisions, which the engine needs (it
is not thread-safe).

The only deployment-to-deployment calls left go to the decoder catalog (unknown ids, registrations),
and every one has a timeout: a slow or lost catalog answers 503 with Retry-After instead of hanging
requests. Ids the catalog does not know are remembered for a second, so a stream of requests naming
made-up decoders does not turn into a stream of catalog calls.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import Any

from ray import serve

from lambo_ray.errors import LamboInputError
from lambo_ray.mec.instance import Decision, Instance
from lambo_ray.serving.api import DecodeOptions
from lambo_ray.serving.config import ServeConfig
from lambo_ray.serving.decoders import DecoderEntry, decoder_dir_inside
from lambo_ray.serving.engine import DecideItem, ItemError, PolicyEngine

UNKNOWN_ID_TTL_S = 1.0
MAX_REMEMBERED_UNKNOWN = 1024


def unavailable(message: str) -> LamboInputError:
    """503: the request was fine, a part of the service was not (the app adds Retry-After)."""
    return LamboInputError(message, status=503)


def unwrap(value: Any) -> Any:
    if isinstance(value, ItemError):
        raise value.error()
    return value


class PolicyService:
    """Decoder resolution (local cache, then the catalog), cross-caller batching, the bulk path, registration."""

    def __init__(self, cfg: ServeConfig, catalog: Any, engine: PolicyEngine | None = None) -> None:
        self.cfg = cfg
        self.engine = engine or PolicyEngine(cfg)
        self._catalog = catalog
        self._known: dict[str, DecoderEntry] = {cfg.default_decoder: self.engine.default_entry}
        self._unknown: OrderedDict[str, float] = OrderedDict()
        self._batched.set_max_batch_size(cfg.max_batch_size)
        self._batched.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self.batches = 0

    # -- the catalog, with timeouts ----------------------------------------------------------------
    async def call_catalog(self, method: str, *args: Any) -> Any:
        try:
            return await asyncio.wait_for(getattr(self._catalog, method).remote(*args), self.cfg.catalog_timeout_s)
        except asyncio.TimeoutError:
            raise unavailable(f"the decoder catalog did not answer within {self.cfg.catalog_timeout_s:g} s") from None
        except Exception as err:  # noqa: BLE001 - a lost catalog replica (RayActorError, ...) is an outage
            raise unavailable(f"the decoder catalog is unavailable ({type(err).__name__})") from None

    async def entry(self, decoder_id: str | None) -> DecoderEntry:
        decoder_id = decoder_id or self.cfg.default_decoder
        entry = self._known.get(decoder_id)
        if entry is not None:
            return entry
        missing = LamboInputError(
            f"unknown decoder {decoder_id!r} (GET /v1/decoders lists the servable ones)", where="decoder", status=404
        )
        seen = self._unknown.get(decoder_id)
        if seen is not None and time.monotonic() - seen < UNKNOWN_ID_TTL_S:
            raise missing
        entry = await self.call_catalog("resolve", decoder_id)
        if entry is None:
            self._unknown[decoder_id] = time.monotonic()
            self._unknown.move_to_end(decoder_id)
            while len(self._unknown) > MAX_REMEMBERED_UNKNOWN:
                self._unknown.popitem(last=False)
            raise missing
        self._known[decoder_id] = entry  # ids are immutable: safe to keep forever
        self._unknown.pop(decoder_id, None)
        return entry

    # -- deciding ------------------------------------------------------------------------------------
    async def decide_one(self, inst: Instance, opt: DecodeOptions) -> Decision:
        """/v1/decide: concurrent callers join one policy call when batching is on."""
        entry = await self.entry(opt.decoder)
        item = DecideItem(inst, opt.prompt, entry.id, opt.decode, opt.k, opt.seed, opt.time_budget_s)
        if self.cfg.batching:
            return unwrap(await self._batched(item))
        return unwrap(self._compute([item])[0])

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)  # overridden from the config in __init__
    async def _batched(self, items: list[DecideItem]) -> list[Decision | ItemError]:
        return self._compute(items)  # on the loop thread: see the module docstring

    def _compute(self, items: list[DecideItem]) -> list[Decision | ItemError]:
        """Never raises: a failure of the batch machinery itself must not fail every caller in the batch."""
        self.batches += 1
        try:
            entries = {item.decoder: self._known[item.decoder] for item in items}
            return self.engine.decide_items(items, entries)
        except Exception:  # noqa: BLE001
            return [ItemError(500, "internal error while batching this request")] * len(items)

    async def decide_many(self, instances: list[Instance], opt: DecodeOptions) -> tuple[str, list[Decision]]:
        """/v1/decide_batch: the request is already a batch, decided in one pass of the policy (per cell shape
        and memory chunk), bypassing the cross-caller queue."""
        entry = await self.entry(opt.decoder)
        item = DecideItem(instances[0], opt.prompt, entry.id, opt.decode, opt.k, opt.seed, opt.time_budget_s)
        start = time.perf_counter()
        decisions = self.engine.decide(instances, opt.prompt, entry, item)
        wall = time.perf_counter() - start
        for dec in decisions:
            dec.stats = {**dec.stats, "serve_batch_size": len(instances), "serve_batch_wall_s": wall}
        return entry.id, decisions

    # -- registering ---------------------------------------------------------------------------------
    async def register(self, decoder_id: str, rel_dir: str | None) -> dict[str, Any]:
        """Validate the decoder checkpoint ``rel_dir`` (inside the decoders directory) on this replica, then
        publish it in the catalog; only after the catalog accepted the id is it cached here."""
        rel = rel_dir or decoder_id
        path = decoder_dir_inside(self.cfg.decoders_dir, rel)
        entry = DecoderEntry(decoder_id, str(path), "registered", {}, rel)
        known = await self.call_catalog("resolve", decoder_id)
        if known is not None and known.path != entry.path:
            raise LamboInputError(
                f"decoder id {decoder_id!r} is already registered for another checkpoint; decoder ids are "
                "immutable, register the new checkpoint under a new id",
                where="id",
                status=409,
            )
        view, meta = self.engine.load_view(entry)
        entry = DecoderEntry(decoder_id, entry.path, "registered", meta, rel)
        created = unwrap(await self.call_catalog("register", entry))
        self.engine.adopt(decoder_id, view)
        self._known[decoder_id] = entry
        self._unknown.pop(decoder_id, None)
        return {"id": decoder_id, "dir": rel, "created": bool(created), "meta": meta}

    def info(self) -> dict[str, Any]:
        return {
            "default_decoder": self.cfg.default_decoder,
            "loaded_decoders": self.engine.loaded_decoders(),
            "batching": {
                "enabled": self.cfg.batching,
                "max_batch_size": self.cfg.max_batch_size,
                "batch_wait_timeout_s": self.cfg.batch_wait_timeout_s,
                "batches": self.batches,
            },
            "time_budgets": self.engine.time_budgets,
            "checkpoint": self.engine.default_entry.meta,
        }
