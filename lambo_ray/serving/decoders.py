"""Which decoders exist (the catalog) and which are in memory (a bounded LRU cache per policy replica).

Why our own cache rather than Serve model multiplexing (``@serve.multiplexed``): multiplexing ties one
model id to one request context (``serve.get_multiplexed_model_id()``), but ``@serve.batch`` groups
requests of *different* callers into one call, and those may name different decoders; a batch must be
split by decoder inside the handler, which a per-request model id cannot express. Decoders are also
small next to the shared encoder that every one of them reuses, so multiplexing's routing to the replica
that already holds a model buys little, while pinning the default decoder (never evicted) and evicting the
rest by recency is exactly what this module does in a few lines.

Decoder ids are immutable: an id always names the same checkpoint directory, so replicas may cache the
id -> path mapping forever and registering a new decoder can never change the meaning of a request in
flight (a "swap" is registering a new id and sending requests to it). Re-registering an id with the same
path is idempotent; with another path it is refused (409).
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Generic, TypeVar

from lambo_ray.errors import LamboInputError

T = TypeVar("T")


@dataclass(frozen=True)
class DecoderEntry:
    """A servable decoder: its id, the checkpoint directory it comes from and where it was declared.

    ``path`` is the absolute directory, for the replicas only; responses show ``dir`` (relative to the
    decoders directory) so that no absolute server path ever leaves the server.
    """

    id: str
    path: str | None  # None for the pretrained checkpoint's own decoder (held with the encoder)
    source: str  # "checkpoint" | "decoders_dir" | "registered"
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    dir: str | None = None  # relative to the decoders directory

    def to_public(self) -> dict[str, Any]:
        return {"id": self.id, "dir": self.dir, "source": self.source, "meta": self.meta}


class DecoderCatalog:
    """id -> :class:`DecoderEntry` for the whole app (one instance, in the catalog deployment).

    ``is_decoder_dir`` tells a decoder checkpoint directory from any other directory; it is injected so
    that this class knows nothing about the checkpoint format.
    """

    def __init__(self, default: DecoderEntry, decoders_dir: str | None, is_decoder_dir: Callable[[Path], bool]) -> None:
        self._entries: dict[str, DecoderEntry] = {default.id: default}
        self._dir = Path(decoders_dir) if decoders_dir else None
        self._is_decoder_dir = is_decoder_dir
        self._lock = threading.Lock()
        self.rescan()

    def rescan(self) -> None:
        """Pick up checkpoints dropped into ``decoders_dir`` (sub-directory name = id) since the last scan."""
        if self._dir is None or not self._dir.is_dir():
            return
        with self._lock:
            for sub in sorted(self._dir.iterdir()):
                if sub.name not in self._entries and sub.is_dir() and self._is_decoder_dir(sub):
                    self._entries[sub.name] = DecoderEntry(
                        sub.name, str(sub.resolve()), "decoders_dir", decoder_manifest_summary(sub), sub.name
                    )

    def resolve(self, decoder_id: str) -> DecoderEntry | None:
        entry = self._entries.get(decoder_id)
        if entry is None:
            self.rescan()
            entry = self._entries.get(decoder_id)
        return entry

    def register(self, entry: DecoderEntry) -> bool:
        """Add an entry (already validated by a policy replica). True if new, False if already identical."""
        with self._lock:
            old = self._entries.get(entry.id)
            if old is not None:
                if old.path == entry.path:
                    return False
                raise LamboInputError(
                    f"decoder id {entry.id!r} is already registered for another checkpoint; decoder ids "
                    "are immutable, register the new checkpoint under a new id",
                    where="id",
                    status=409,
                )
            self._entries[entry.id] = entry
            return True

    def entries(self) -> list[DecoderEntry]:
        self.rescan()
        return list(self._entries.values())


class LRUCache(Generic[T]):
    """At most ``capacity`` loaded values besides the pinned ones; least recently used evicted first.

    Thread-safe: Serve runs a replica's sync methods (``info``) on a thread pool, beside the loop that loads.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._pinned: dict[str, T] = {}
        self._items: OrderedDict[str, T] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0
        self.evictions = 0

    def pin(self, key: str, value: T) -> None:
        with self._lock:
            self._pinned[key] = value

    def get(self, key: str, load: Callable[[], T]) -> T:
        with self._lock:
            if key in self._pinned:
                return self._pinned[key]
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = load()  # outside the lock: loading reads a checkpoint from disk
        with self._lock:
            self.loads += 1
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
                self.evictions += 1
            return value

    def keys(self) -> list[str]:
        with self._lock:
            return [*self._pinned, *self._items]


# == lambo_ray.policy.checkpoint.DECODER_MANIFEST (a test asserts it): spelled out here so that the
# catalog and ingress processes never import torch (lambo_ray.policy does) to recognise a directory.
DECODER_MANIFEST = "decoder.json"


def is_decoder_checkpoint(path: Path) -> bool:
    return (Path(path) / DECODER_MANIFEST).is_file()


def decoder_manifest_summary(path: Path) -> dict[str, Any]:
    """What a decoder's manifest says about it (id, base encoder, caller's meta), read without torch.

    For listing only: the decoder is validated (fingerprint, shapes) when a replica loads it.
    """
    import json

    try:
        doc = json.loads((Path(path) / DECODER_MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict):
        return {}
    return {
        **public_meta(doc.get("meta") if isinstance(doc.get("meta"), dict) else {}),
        "decoder_id": doc.get("decoder_id"),
        "base_fingerprint": doc.get("base_fingerprint"),
    }


def _scrub(value: Any) -> Any:
    """A string that is an absolute path keeps only its last component (responses show no server paths)."""
    if isinstance(value, str) and (value.startswith(("/", "~", "\\")) or (len(value) > 2 and value[1:3] == ":\\")):
        return PurePath(value).name
    return value


def public_meta(meta: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON-safe scalar part of a checkpoint's meta (what GET /v1/decoders shows), absolute paths
    reduced to their last component."""
    out: dict[str, Any] = {}
    for key, value in (meta or {}).items():
        if isinstance(value, (str, int, float, bool)) or value is None:
            out[key] = _scrub(value)
        elif isinstance(value, dict) and all(isinstance(v, (str, int, float, bool)) for v in value.values()):
            out[key] = {k: _scrub(v) for k, v in value.items()}
    return out


NOT_A_DECODER_DIR = (
    "not a decoder checkpoint in the server's decoders directory (name one of its sub-directories, relative)"
)
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_DIR_SEGMENTS = 4


def decoder_dir_inside(decoders_dir: str | None, rel: str) -> Path:
    """The decoder checkpoint directory ``rel`` names inside ``decoders_dir``, or one uniform 422.

    ``rel`` must be a relative path of plain name segments (no ``..``, no absolute path, no backslash),
    resolve (symlinks followed) to a directory inside ``decoders_dir`` and hold a decoder manifest.
    Every failure gives the same message, so the answer never tells whether some path exists.
    """
    refused = LamboInputError(NOT_A_DECODER_DIR, where="dir")
    if decoders_dir is None:
        raise refused
    parts = rel.split("/")
    if not 1 <= len(parts) <= MAX_DIR_SEGMENTS or not all(_SEGMENT.match(p) and p not in (".", "..") for p in parts):
        raise refused
    root = Path(decoders_dir).resolve()
    try:
        target = (root / Path(*parts)).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        raise refused from None
    if root not in target.parents or not is_decoder_checkpoint(target):
        raise refused
    return target
