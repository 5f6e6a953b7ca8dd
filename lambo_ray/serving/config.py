"""Configuration of the Serve application: one typed dataclass, built from `serve/config.yaml` args or CLI flags.

Everything a deployment needs travels in this object (it is pickled into the replicas), so a config
file, ``lambo serve`` and the tests all describe the same app the same way. Unknown keys and bad values
are rejected up front with a :class:`LamboInputError`, before Serve starts anything.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lambo_ray.errors import LamboInputError, reject_unknown_keys

# The policy's decode modes (lambo_ray.policy.decoding); validated per request.
DECODE_MODES: tuple[str, ...] = ("greedy", "best_of_k", "sample", "refine", "search")


@dataclass(frozen=True)
class ServeConfig:
    """What the app serves and its limits.

    checkpoint: pretrained policy directory (``save_policy``); its decoder is served as ``default_decoder``.
    decoders_dir: optional directory whose sub-directories are decoder-only checkpoints (``save_decoder``,
        e.g. written by ``lambo finetune``), each servable under its directory name.
    max_ues: instances with more UEs are refused with 413 (the policy is quadratic in N).
    max_body_bytes: request bodies above this size are refused with 413 before JSON parsing.
    max_batch_instances: most instances one ``/v1/decide_batch`` request may carry (413 above).
    batching: group concurrent ``/v1/decide`` callers with ``@serve.batch`` (``--no-batching`` turns it off).
    max_batch_size / batch_wait_timeout_s: the ``@serve.batch`` knobs.
    decoder_cache_size: decoders held in memory per policy replica besides the default (LRU beyond that).
    max_k: upper bound on ``k`` of best_of_k / sample decoding a request may ask for.
    policy_replicas / ingress_replicas: fixed replica counts; None leaves them to the deployment options
        (``serve/config.yaml`` may set ``num_replicas`` or ``autoscaling_config`` there instead).
    policy_num_cpus: CPUs Ray reserves per policy replica (the ingress and the catalog reserve none).
    max_ongoing_requests: concurrent requests per replica; must exceed max_batch_size or batches never fill.
    torch_threads: intra-op threads per policy replica (1 on small machines: replicas, not threads, scale).
    """

    checkpoint: str
    decoders_dir: str | None = None
    default_decoder: str = "default"
    max_ues: int = 1000
    max_body_bytes: int = 8_000_000
    max_batch_instances: int = 256
    batching: bool = True
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.005
    decoder_cache_size: int = 4
    default_decode: str = "greedy"
    default_k: int = 8
    max_k: int = 64
    policy_replicas: int | None = None
    ingress_replicas: int | None = None
    policy_num_cpus: float = 1.0
    max_ongoing_requests: int = 64
    torch_threads: int = 1

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise LamboInputError("serve config: 'checkpoint' is required (a `lambo pretrain` checkpoint directory)")
        positive = (
            "max_ues",
            "max_body_bytes",
            "max_batch_instances",
            "max_batch_size",
            "decoder_cache_size",
            "default_k",
            "max_k",
            "policy_replicas",
            "ingress_replicas",
            "max_ongoing_requests",
            "torch_threads",
        )
        for name in positive:
            value = getattr(self, name)
            if value is None and name.endswith("_replicas"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LamboInputError(f"serve config: '{name}' must be an integer >= 1 (got {value!r})")
        if not isinstance(self.batch_wait_timeout_s, (int, float)) or not 0 <= self.batch_wait_timeout_s <= 10:
            raise LamboInputError(
                f"serve config: 'batch_wait_timeout_s' must be in [0, 10] seconds (got {self.batch_wait_timeout_s!r})"
            )
        if not isinstance(self.policy_num_cpus, (int, float)) or self.policy_num_cpus < 0:
            raise LamboInputError(f"serve config: 'policy_num_cpus' must be >= 0 (got {self.policy_num_cpus!r})")
        if not isinstance(self.batching, bool):
            raise LamboInputError(f"serve config: 'batching' must be true or false (got {self.batching!r})")
        if self.default_decode not in DECODE_MODES:
            raise LamboInputError(
                f"serve config: 'default_decode' must be one of {', '.join(DECODE_MODES)} (got {self.default_decode!r})"
            )
        if self.default_k > self.max_k:
            raise LamboInputError(f"serve config: default_k={self.default_k} exceeds max_k={self.max_k}")
        if not self.default_decoder or "/" in self.default_decoder:
            raise LamboInputError(f"serve config: bad 'default_decoder' id {self.default_decoder!r}")

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
