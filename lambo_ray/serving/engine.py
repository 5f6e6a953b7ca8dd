"""The policy side of the Serve app without Ray: one shared encoder, decoders by id, batched decisions.

A :class:`PolicyEngine` holds the pretrained policy once. Every other decoder is served through a
*view*: a :class:`LamboPolicy` whose ``embedding`` and ``encoder`` are the very same module objects as
the base policy's (shared, never copied) and whose ``decoder`` is its own. Views are what
``lambo_ray.policy.decoding.decide`` takes, so serving a fine-tuned decoder runs exactly the code the CLI
and the benchmarks run, and a decoder costs only its own weights in memory.

Batching rules. Items gathered from several callers go through the policy together when their decision
cannot depend on who else is in the call: same decoder, mode, k and seed (sampling noise is drawn per
instance from the seed and the instance data) and the same cell shape (no padding, so no round-off that
depends on the batch). Modes that spend a time budget (refine, search) are decided per caller: a shared
budget would make one caller's result depend on the others'.

Failure isolation. A group whose policy call raises is retried item by item, so an instance that breaks
the policy fails only its own caller; an unexpected error becomes a :class:`ItemError` with status 500
and no traceback in the answer (the traceback goes to the replica's log).

The engine is synchronous and not thread-safe by design: a replica calls it from its event loop thread
only, which serialises decoder loads with decisions.
"""

from __future__ import annotations

import copy
import inspect
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lambo_ray.errors import LamboInputError
from lambo_ray.mec.instance import Decision, Instance
from lambo_ray.runtime import limit_compute_threads
from lambo_ray.serving.config import BUDGETED_MODES, ServeConfig
from lambo_ray.serving.decoders import DecoderEntry, LRUCache, public_meta

log = logging.getLogger(__name__)
# Encoder attention memory grows with (N + M)^2 per instance and head: one policy call holds at most this
# many (N + M)^2 cells (4M cells: 64 MB of float32 scores per head and layer at most).
MAX_CALL_CELLS = 1 << 22


@dataclass(frozen=True)
class ItemError:
    """The failure of one item: HTTP status and a one-line message (picklable, no traceback)."""

    status: int
    message: str

    @classmethod
    def of(cls, err: LamboInputError) -> ItemError:
        return cls(err.status, str(err))

    def error(self) -> LamboInputError:
        return LamboInputError(self.message, status=self.status)


INTERNAL = ItemError(500, "internal error while deciding this instance (logged on the server)")


@dataclass(frozen=True)
class DecideItem:
    """One instance to decide and how; items with equal :meth:`group` are decided in one policy call."""

    instance: Instance
    prompt: str
    decoder: str  # resolved id (never None here)
    decode: str
    k: int
    seed: int
    time_budget_s: float | None = None

    def group(self, index: int) -> tuple:
        """Same key, same policy call. Prompts may differ within a call (the policy takes one per instance)."""
        shape = (self.instance.n_ues, self.instance.n_servers)
        if self.decode in BUDGETED_MODES:
            return self.decoder, self.decode, self.k, self.seed, self.time_budget_s, shape, index
        return self.decoder, self.decode, self.k, self.seed, shape


def shares_encoder(view: torch.nn.Module, base: torch.nn.Module) -> bool:
    """True when ``view`` runs the base policy's embedding and encoder modules (same objects)."""
    return view.embedding is base.embedding and view.encoder is base.encoder


def _accepts_time_budget() -> bool:
    from lambo_ray.policy.decoding import decide

    return "time_budget_s" in inspect.signature(decide).parameters


def call_chunks(instances: Sequence[Instance]) -> list[list[int]]:
    """Indices of ``instances`` split into policy calls: one cell shape (N, M) per call, so padding never
    spreads the largest instance over the others, and at most MAX_CALL_CELLS (N + M)^2 cells per call."""
    by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, inst in enumerate(instances):
        by_shape[(inst.n_ues, inst.n_servers)].append(i)
    out = []
    for (n, m), idxs in by_shape.items():
        per_call = max(1, MAX_CALL_CELLS // (n + m) ** 2)
        out += [idxs[lo : lo + per_call] for lo in range(0, len(idxs), per_call)]
    return out


class PolicyEngine:
    """Load a pretrained checkpoint, serve its decoder and any decoder-only checkpoint by id."""

    def __init__(self, cfg: ServeConfig) -> None:
        from lambo_ray.policy.checkpoint import load_policy, policy_fingerprint, resolve_policy_dir

        limit_compute_threads(cfg.torch_threads)
        self.cfg = cfg
        self.policy, self.meta = load_policy(resolve_policy_dir(cfg.checkpoint))
        self.policy.eval()
        # Hashing the encoder is O(parameters): once here, not at every decoder load.
        self.fingerprint = policy_fingerprint(self.policy)
        self._views: LRUCache[torch.nn.Module] = LRUCache(cfg.decoder_cache_size)
        self._views.pin(cfg.default_decoder, self.policy)
        self.time_budgets = _accepts_time_budget()

    @property
    def default_entry(self) -> DecoderEntry:
        return DecoderEntry(
            self.cfg.default_decoder,
            None,
            "checkpoint",
            {**public_meta(self.meta), "fingerprint": self.fingerprint},
        )

    # -- decoders -------------------------------------------------------------------------------
    def load_view(self, entry: DecoderEntry) -> tuple[torch.nn.Module, dict[str, Any]]:
        """A view of the base policy with the decoder of ``entry``, and the checkpoint's public meta.

        A decoder trained on another encoder (fingerprint), a missing or corrupt checkpoint or one of
        another model config raises LamboInputError naming the decoder by id and directory, never by
        its absolute path.
        """
        try:
            return self._load_view(Path(entry.path or ""))
        except LamboInputError as err:
            shown = entry.dir or entry.id
            message = str(err).replace(str(Path(entry.path or "")), shown)
            raise LamboInputError(message, where=f"decoder {entry.id!r}", status=err.status) from None

    def _load_view(self, path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
        from lambo_ray.policy.checkpoint import DECODER_MANIFEST, read_decoder
        from lambo_ray.policy.config import PolicyConfig

        if not (path / DECODER_MANIFEST).is_file():
            raise LamboInputError(f"not a decoder checkpoint (no {DECODER_MANIFEST})", where=str(path))
        state, doc = read_decoder(path, self.fingerprint)
        try:
            same_config = PolicyConfig.from_dict(dict(doc.get("config") or {})) == self.policy.cfg
        except (LamboInputError, TypeError):
            same_config = False
        if not same_config:
            raise LamboInputError("has another model config than the served policy", where=str(path))
        decoder = copy.deepcopy(self.policy.decoder)
        try:
            decoder.load_state_dict(state)
        except RuntimeError as err:
            raise LamboInputError(f"decoder weights do not fit the policy: {str(err)[:200]}", where=str(path)) from None
        view = copy.copy(self.policy)  # a new Module object sharing __dict__ entries ...
        view._modules = dict(self.policy._modules)  # ... with its own child table: the same IE + encoder
        view._modules["decoder"] = decoder.eval()  # objects, its own decoder
        assert shares_encoder(view, self.policy)
        return view, {
            **public_meta(doc.get("meta")),
            "decoder_id": doc.get("decoder_id"),
            "base_fingerprint": doc.get("base_fingerprint"),
        }

    def adopt(self, decoder_id: str, view: torch.nn.Module) -> None:
        """Cache an already loaded view under ``decoder_id`` (after the catalog accepted the id)."""
        self._views.get(decoder_id, lambda: view)

    def view(self, entry: DecoderEntry) -> torch.nn.Module:
        if entry.path is None:
            if entry.id != self.cfg.default_decoder:
                raise LamboInputError(f"decoder {entry.id!r} has no checkpoint", status=404, where="decoder")
            return self.policy
        return self._views.get(entry.id, lambda: self.load_view(entry)[0])

    def loaded_decoders(self) -> list[str]:
        return self._views.keys()

    # -- decisions ------------------------------------------------------------------------------
    @torch.inference_mode()
    def decide(
        self,
        instances: Sequence[Instance],
        prompt: str | Sequence[str],
        entry: DecoderEntry,
        how: DecideItem,
    ) -> list[Decision]:
        """Decisions for instances sharing decoder and mode (one prompt, or one per instance).

        ``how`` gives mode, k, seed and time budget. One policy call per cell shape and chunk of at most
        MAX_CALL_CELLS cells (:func:`call_chunks`): for a request of one cell size, the whole request in one
        batched pass.
        """
        return self._run(self.view(entry), list(instances), prompt, how)

    def _run(
        self, view: torch.nn.Module, instances: list[Instance], prompt: str | Sequence[str], how: DecideItem
    ) -> list[Decision]:
        from lambo_ray.policy.decoding import decide

        kwargs: dict[str, Any] = {"mode": how.decode, "k": how.k, "seed": how.seed}
        if self.time_budgets and how.time_budget_s is not None:
            kwargs["time_budget_s"] = how.time_budget_s
        prompts = [prompt] * len(instances) if isinstance(prompt, str) else list(prompt)
        out: list[Decision | None] = [None] * len(instances)
        with torch.inference_mode():
            for idxs in call_chunks(instances):
                decided = decide(view, [instances[i] for i in idxs], [prompts[i] for i in idxs], **kwargs)
                for i, dec in zip(idxs, decided):
                    out[i] = dec
        return out  # type: ignore[return-value]

    def decide_items(self, items: Sequence[DecideItem], entries: dict[str, DecoderEntry]) -> list[Decision | ItemError]:
        """Decide a batch gathered from several callers: grouped by :meth:`DecideItem.group`, one policy
        call per group, results back in the callers' order. A group whose policy call fails is retried
        item by item, so only the items that fail get an :class:`ItemError`; a decoder that cannot be
        loaded fails exactly the items that asked for it."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for idx, item in enumerate(items):
            groups[item.group(idx)].append(idx)
        out: list[Decision | ItemError | None] = [None] * len(items)
        for idxs in groups.values():
            group = [items[i] for i in idxs]
            try:
                view = self.view(entries[group[0].decoder])
            except LamboInputError as err:
                results: list[Decision | ItemError] = [ItemError.of(err)] * len(group)
            else:
                results = self._decide_group(view, group)
                if len(group) > 1 and any(isinstance(r, ItemError) for r in results):
                    results = [self._decide_group(view, [it])[0] for it in group]
            for i, res in zip(idxs, results):
                out[i] = res
        return out  # type: ignore[return-value]

    def _decide_group(self, view: torch.nn.Module, group: Sequence[DecideItem]) -> list[Decision | ItemError]:
        first = group[0]
        start = time.perf_counter()
        try:
            decisions = self._run(view, [it.instance for it in group], [it.prompt for it in group], first)
        except LamboInputError as err:
            return [ItemError.of(err)] * len(group)
        except Exception:  # noqa: BLE001 - a bug must fail this group's callers only, never the whole batch
            log.exception(
                "policy call failed (%d item(s), decoder %r, mode %r)", len(group), first.decoder, first.decode
            )
            return [INTERNAL] * len(group)
        wall = time.perf_counter() - start
        for dec in decisions:
            dec.stats = {**dec.stats, "serve_batch_size": len(group), "serve_batch_wall_s": wall}
        return list(decisions)
