"""Configuration of the Serve application: one typed dataclass, built from `serve/config.yaml` args or CLI flags.

Everything a deployment needs travels in this object (it is pickled into the replicas), so a config
file, ``lambo serve`` and the tests all describe the same app the same way. Unknown keys and bad values
are rejected up front with a :class:`LamboInputError`, before Serve starts anything.

The limits exist because every request costs policy work that grows with its size: the encoder
attends over N + M tokens (memory (N + M)^2 per head), the decoder takes N steps over M servers, a
batch pads to its largest instance, and best-of-k multiplies all of it by k. Each limit is checked
before any policy work and answered with 413 naming it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lambo_ray.errors import LamboInputError, reject_unknown_keys

ADMIN_TOKEN_ENV = "LAMBO_ADMIN_TOKEN"
MIN_ADMIN_TOKEN_CHARS = 16
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
# Decode modes that spend a time budget (local search); the others are bounded by the size limits alone.
BUDGETED_MODES = frozenset({"refine", "search"})


def decode_modes() -> tuple[str, ...]:
    """The policy's decode strategies (``lambo_ray.policy.decoding``), the only modes a request may name."""
    from lambo_ray.policy.decoding import available_strategies

    return tuple(available_strategies())


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class ServeConfig:
    """What the app serves, its limits and its failure behaviour (every field documented in ``help``)."""

    checkpoint: str = field(metadata=_help("pretrained policy directory (`lambo pretrain`); its decoder is 'default'"))
    decoders_dir: str | None = field(
        default=None,
        metadata=_help("directory of decoder-only checkpoints, one sub-directory per decoder (id = its name)"),
    )
    default_decoder: str = field(default="default", metadata=_help("id of the pretrained checkpoint's own decoder"))
    # -- size limits (413 above them, before any policy work) --------------------------------------------
    max_ues: int = field(default=1000, metadata=_help("most UEs (N) per instance"))
    max_servers: int = field(default=64, metadata=_help("most edge servers (M) per instance"))
    max_pairs: int = field(default=50_000, metadata=_help("most UE-server pairs (N*M) per instance"))
    max_batch_instances: int = field(default=256, metadata=_help("most instances per /v1/decide_batch request"))
    max_request_ues: int = field(default=25_600, metadata=_help("most UEs summed over one request's instances"))
    max_body_bytes: int = field(default=8_000_000, metadata=_help("largest request body in bytes"))
    max_json_depth: int = field(default=32, metadata=_help("deepest JSON nesting a body may have"))
    max_int_digits: int = field(default=20, metadata=_help("longest JSON integer literal (digits)"))
    max_k: int = field(default=64, metadata=_help("largest k (samples of best_of_k / refine / search)"))
    max_time_budget_ms: float = field(default=2000.0, metadata=_help("largest time budget a request may ask for"))
    # -- decoding defaults -------------------------------------------------------------------------------
    default_decode: str = field(default="greedy", metadata=_help("decode mode of requests that name none"))
    default_k: int = field(default=8, metadata=_help("k of requests that name none"))
    default_time_budget_ms: float = field(
        default=250.0, metadata=_help("time budget of refine / search requests that name none")
    )
    # -- batching and capacity -----------------------------------------------------------------------------
    batching: bool = field(default=True, metadata=_help("group concurrent /v1/decide callers (@serve.batch)"))
    max_batch_size: int = field(default=32, metadata=_help("@serve.batch max_batch_size"))
    batch_wait_timeout_s: float = field(default=0.002, metadata=_help("@serve.batch wait for a batch to fill (s)"))
    decoder_cache_size: int = field(default=4, metadata=_help("decoders in memory per replica besides the default"))
    policy_replicas: int | None = field(
        default=None, metadata=_help("replicas holding the policy (None: the deployment options decide)")
    )
    policy_num_cpus: float = field(default=1.0, metadata=_help("CPUs Ray reserves per replica"))
    torch_threads: int = field(default=1, metadata=_help("torch intra-op and BLAS threads per replica"))
    max_ongoing_requests: int = field(default=64, metadata=_help("requests one replica works on at once"))
    max_queued_requests: int = field(
        default=64, metadata=_help("requests waiting for a replica; beyond that 503 with Retry-After at once")
    )
    retry_after_s: int = field(default=1, metadata=_help("Retry-After (s) of 503 answers"))
    request_timeout_s: float = field(default=30.0, metadata=_help("end-to-end HTTP request timeout (s)"))
    catalog_timeout_s: float = field(default=5.0, metadata=_help("timeout of every call to the decoder catalog (s)"))
    # -- administration ------------------------------------------------------------------------------------
    admin_token_sha256: str | None = field(
        default=None,
        metadata=_help(
            f"SHA-256 (hex) of the bearer token of mutating endpoints; taken from ${ADMIN_TOKEN_ENV} when the "
            "app is built if unset; without either, mutating endpoints are disabled"
        ),
    )

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise LamboInputError("serve config: 'checkpoint' is required (a `lambo pretrain` checkpoint directory)")
        self._check_ints()
        self._check_numbers()
        modes = decode_modes()
        if self.default_decode not in modes:
            raise LamboInputError(
                f"serve config: 'default_decode' must be one of {', '.join(modes)} (got {self.default_decode!r})"
            )
        if self.default_k > self.max_k:
            raise LamboInputError(f"serve config: default_k={self.default_k} exceeds max_k={self.max_k}")
        if self.default_time_budget_ms > self.max_time_budget_ms:
            raise LamboInputError(
                f"serve config: default_time_budget_ms={self.default_time_budget_ms} exceeds "
                f"max_time_budget_ms={self.max_time_budget_ms}"
            )
        if self.batching and self.max_ongoing_requests <= self.max_batch_size:
            raise LamboInputError(
                f"serve config: max_ongoing_requests={self.max_ongoing_requests} must exceed max_batch_size="
                f"{self.max_batch_size} (a replica never sees a full batch otherwise)"
            )
        if not self.default_decoder or "/" in self.default_decoder:
            raise LamboInputError(f"serve config: bad 'default_decoder' id {self.default_decoder!r}")
        if self.admin_token_sha256 is not None and not _SHA256_HEX.match(str(self.admin_token_sha256)):
            raise LamboInputError("serve config: 'admin_token_sha256' must be 64 lower-case hex digits")

    def _check_ints(self) -> None:
        positive = (
            "max_ues",
            "max_servers",
            "max_pairs",
            "max_batch_instances",
            "max_request_ues",
            "max_body_bytes",
            "max_json_depth",
            "max_int_digits",
            "max_k",
            "default_k",
            "max_batch_size",
            "decoder_cache_size",
            "policy_replicas",
            "torch_threads",
            "max_ongoing_requests",
            "max_queued_requests",
            "retry_after_s",
        )
        for name in positive:
            value = getattr(self, name)
            if value is None and name == "policy_replicas":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LamboInputError(f"serve config: '{name}' must be an integer >= 1 (got {value!r})")
        if not isinstance(self.batching, bool):
            raise LamboInputError(f"serve config: 'batching' must be true or false (got {self.batching!r})")

    def _check_numbers(self) -> None:
        ranges = {
            "batch_wait_timeout_s": (0.0, 10.0),
            "policy_num_cpus": (0.0, 1024.0),
            "max_time_budget_ms": (1.0, 600_000.0),
            "default_time_budget_ms": (1.0, 600_000.0),
            "request_timeout_s": (0.1, 3600.0),
            "catalog_timeout_s": (0.1, 600.0),
        }
        for name, (lo, hi) in ranges.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise LamboInputError(f"serve config: '{name}' must be a number in [{lo:g}, {hi:g}] (got {value!r})")

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> ServeConfig:
        """From the ``args:`` mapping of a Serve config file; unknown keys are an error, not ignored."""
        values = dict(values or {})
        reject_unknown_keys(cls, values, "serve config")
        if "checkpoint" not in values:
            raise LamboInputError("serve config: 'checkpoint' is required (a `lambo pretrain` checkpoint directory)")
        for key in ("checkpoint", "decoders_dir"):
            if values.get(key) is not None:
                values[key] = str(Path(str(values[key])).expanduser().resolve())
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_admin_token_from_env(self) -> ServeConfig:
        """The config with ``admin_token_sha256`` filled from ``$LAMBO_ADMIN_TOKEN`` (when set and not already
        configured). Only the digest travels to the replicas: the token itself is never pickled or logged."""
        token = os.environ.get(ADMIN_TOKEN_ENV)
        if self.admin_token_sha256 is not None or not token:
            return self
        if len(token) < MIN_ADMIN_TOKEN_CHARS:
            raise LamboInputError(
                f"${ADMIN_TOKEN_ENV} must be at least {MIN_ADMIN_TOKEN_CHARS} characters "
                "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
            )
        return dataclasses.replace(self, admin_token_sha256=token_digest(token))


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()
