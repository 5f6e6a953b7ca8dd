"""The policy side of the Serve app without Ray: one shared encoder, decoders by id, batched decisions.

A :class:`PolicyEngine` holds the pretrained policy once. Every other decoder is served through a
*view*: a :class:`LamboPolicy` whose ``embedding`` and ``encoder`` are the very same module objects as
the base policy's (shared, never copied) and whose ``decoder`` is its own. Views are what
``lambo_ray.policy.decoding.decide`` takes, so serving a fine-tuned decoder runs exactly the code the CLI
and the benchmarks run, and a decoder costs only its own weights in memory.

The engine is synchronous and not thread-safe by design: the policy deployment calls it from its event
loop thread only, which serialises decoder loads with decisions.
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lambo_ray.errors import LamboInputError
from lambo_ray.mec.instance import Decision, Instance
from lambo_ray.serving.config import ServeConfig
from lambo_ray.serving.decoders import DecoderEntry, LRUCache, public_meta

# Modes whose decision depends only on the instance: safe to batch with other callers' instances.
# Sampling modes draw from one generator per policy call, so batching them would make a caller's
# decision depend on who else was in the batch; they are decided per request (same seed, same decision).
DETERMINISTIC_MODES = frozenset({"greedy"})


@dataclass(frozen=True)
class DecideItem:
    """One instance to decide and how; items with equal :meth:`group` are decided in one policy call."""

    instance: Instance
    prompt: str
    decoder: str  # resolved id (never None here)
    decode: str
    k: int
    seed: int

    def deterministic(self) -> bool:
        return self.decode in DETERMINISTIC_MODES or (self.decode == "refine" and self.k <= 1)

    def group(self, index: int) -> tuple:
        """Deterministic items batch by (decoder, mode, k); prompts may differ within a call (the policy
        takes one prompt per instance). Stochastic items get a group of their own."""
        if self.deterministic():
            return self.decoder, self.decode, self.k
        return self.decoder, self.decode, self.k, self.seed, index


def shares_encoder(view: torch.nn.Module, base: torch.nn.Module) -> bool:
    """True when ``view`` runs the base policy's embedding and encoder modules (same objects)."""
    return view.embedding is base.embedding and view.encoder is base.encoder


class PolicyEngine:
    """Load a pretrained checkpoint, serve its decoder and any decoder-only checkpoint by id."""

    def __init__(self, cfg: ServeConfig) -> None:
        from lambo_ray.policy.checkpoint import load_policy, policy_fingerprint, resolve_policy_dir

        torch.set_num_threads(cfg.torch_threads)
        self.cfg = cfg
        self.policy, self.meta = load_policy(resolve_policy_dir(cfg.checkpoint))
        self.policy.eval()
        # Hashing the encoder is O(parameters): once here, not at every decoder load.
        self.fingerprint = policy_fingerprint(self.policy)
        self._views: LRUCache[torch.nn.Module] = LRUCache(cfg.decoder_cache_size)
        self._views.pin(cfg.default_decoder, self.policy)

    @property
    def default_entry(self) -> DecoderEntry:
        return DecoderEntry(
            self.cfg.default_decoder,
            None,
            "checkpoint",
            {**public_meta(self.meta), "fingerprint": self.fingerprint},
        )

    # -- decoders -------------------------------------------------------------------------------
    def load_view(self, path: str) -> tuple[torch.nn.Module, dict[str, Any]]:
        """A view of the base policy with the decoder of ``path``, and the checkpoint's public meta.

        ``read_decoder`` refuses a decoder trained on another encoder (fingerprint); a missing or corrupt
        checkpoint or one of another model config raises LamboInputError naming the problem.
        """
        from lambo_ray.policy.checkpoint import DECODER_MANIFEST, read_decoder
        from lambo_ray.policy.config import PolicyConfig

        p = Path(path)
        if not (p / DECODER_MANIFEST).is_file():
            what = "does not exist" if not p.exists() else f"is not a decoder checkpoint (no {DECODER_MANIFEST})"
            raise LamboInputError(f"decoder checkpoint {path} {what}", where="path")
        state, doc = read_decoder(p, self.fingerprint)
        try:
            same_config = PolicyConfig.from_dict(dict(doc.get("config") or {})) == self.policy.cfg
        except (LamboInputError, TypeError):
            same_config = False
        if not same_config:
            raise LamboInputError(
                f"decoder checkpoint {path} has another model config than the served policy", where="path"
            )
        decoder = copy.deepcopy(self.policy.decoder)
        try:
            decoder.load_state_dict(state)
        except RuntimeError as err:
            raise LamboInputError(
                f"decoder weights in {path} do not fit the policy: {str(err)[:200]}", where="path"
            ) from None
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
                raise LamboInputError(f"decoder {entry.id!r} has no checkpoint path", status=404, where="decoder")
            return self.policy
        return self._views.get(entry.id, lambda: self.load_view(entry.path)[0])

    def loaded_decoders(self) -> list[str]:
        return self._views.keys()

    # -- decisions ------------------------------------------------------------------------------
    @torch.inference_mode()
    def decide(
        self,
        instances: Sequence[Instance],
        prompt: str | Sequence[str],
        entry: DecoderEntry,
        decode: str,
        k: int,
        seed: int,
    ) -> list[Decision]:
        """Decisions for instances sharing decoder and mode (one prompt, or one per instance): one policy call."""
        from lambo_ray.policy.decoding import decide

        return decide(self.view(entry), list(instances), prompt, mode=decode, k=k, seed=seed)

    def decide_items(
        self, items: Sequence[DecideItem], entries: dict[str, DecoderEntry]
    ) -> list[Decision | LamboInputError]:
        """Decide a batch gathered from several callers: grouped by :meth:`DecideItem.group`, one policy
        call per group, results back in the callers' order. A failing group (e.g. a decoder that cannot
        be loaded) fails only its own items."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for idx, item in enumerate(items):
            groups[item.group(idx)].append(idx)
        out: list[Decision | LamboInputError | None] = [None] * len(items)
        for idxs in groups.values():
            first = items[idxs[0]]
            start = time.perf_counter()
            try:
                decisions = self.decide(
                    [items[i].instance for i in idxs],
                    [items[i].prompt for i in idxs],
                    entries[first.decoder],
                    first.decode,
                    first.k,
                    first.seed,
                )
            except LamboInputError as err:
                for i in idxs:
                    out[i] = err
                continue
            wall = time.perf_counter() - start
            for i, dec in zip(idxs, decisions):
                dec.stats = {**dec.stats, "serve_batch_size": len(idxs), "serve_batch_wall_s": wall}
                out[i] = dec
        return out  # type: ignore[return-value]
