"""Configuration of the Serve application: one typed dataclass, built from `serve/config.yaml` args or CLI flags.

Everything a deployment needs travels in this object (it is pickled into the replicas), so a config
file, ``lambo serve`` and the tests all describe the same app the same way. Unknown keys and bad values
are rejected up front with a :class:`LamboInputError`, before Serve starts anything.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lambo_ray.errors import LamboInputError, reject_unknown_keys

# The policy's decode modes (lambo_ray.policy.decoding); validated per request.
DECODE_MODES: tuple[str, ...] = ("greedy", "best_of_k", "sample", "refine", "search")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


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

    checkpoint: str = field(metadata=_help("pretrained policy directory (`lambo pretrain`); its decoder is 'default'"))
    decoders_dir: str | None = field(
        default=None,
        metadata=_help("directory of decoder-only checkpoints, one sub-directory per decoder (id = its name)"),
    )
    default_decoder: str = field(default="default", metadata=_help("id of the pretrained checkpoint's own decoder"))
    max_ues: int = field(default=1000, metadata=_help("most UEs (N) per instance"))
    max_body_bytes: int = field(default=8_000_000, metadata=_help("largest request body in bytes"))
    max_batch_instances: int = field(default=256, metadata=_help("most instances per /v1/decide_batch request"))
    batching: bool = field(default=True, metadata=_help("group concurrent /v1/decide callers (@serve.batch)"))
    max_batch_size: int = field(default=16, metadata=_help("@serve.batch max_batch_size"))
    batch_wait_timeout_s: float = field(default=0.005, metadata=_help("@serve.batch wait for a batch to fill (s)"))
    decoder_cache_size: int = field(default=4, metadata=_help("decoders in memory per replica besides the default"))
    default_decode: str = field(default="greedy", metadata=_help("decode mode of requests that name none"))
    default_k: int = field(default=8, metadata=_help("k of requests that name none"))
    max_k: int = field(default=64, metadata=_help("largest k (samples of best_of_k / sample) a request may ask for"))
    policy_replicas: int | None = field(
        default=None, metadata=_help("replicas holding the policy (None: the deployment options decide)")
    )
    ingress_replicas: int | None = field(
        default=None, metadata=_help("replicas of the HTTP ingress (None: the deployment options decide)")
    )
    policy_num_cpus: float = field(default=1.0, metadata=_help("CPUs Ray reserves per replica"))
    max_ongoing_requests: int = field(default=64, metadata=_help("requests one replica works on at once"))
    torch_threads: int = field(default=1, metadata=_help("intra-op torch threads per replica"))

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
