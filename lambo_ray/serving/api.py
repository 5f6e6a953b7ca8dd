"""The HTTP contract of the Serve app: request parsing and response bodies.

Bodies are parsed here from raw bytes rather than by FastAPI's automatic body models, for two reasons:
the limits (body size, nesting, integer size, N, M, N*M, batch, k, time budget: 413) must be enforced
*before* JSON is turned into arrays and before any policy work, and every error must be one
:class:`LamboInputError` naming the field (``instances[3]: field 'ues.cycles': [7] = -1.0 must be > 0``),
the same wording the CLI prints. The pydantic models below still document the API in OpenAPI (/docs).
Nothing here touches Ray or torch, so it is tested and reused without a running Serve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lambo_ray.errors import LamboInputError
from lambo_ray.mec.evaluator import evaluate
from lambo_ray.mec.instance import PROMPTS, Decision, Instance, check_prompt
from lambo_ray.mec.io import decision_to_dict, instance_from_dict, jsonable
from lambo_ray.mec.schema import InstanceModel, describe
from lambo_ray.serving import limits
from lambo_ray.serving.config import BUDGETED_MODES, ServeConfig, decode_modes

DECODER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


# ---------------------------------------------------------------- request envelopes (validated, documented)
class _Envelope(BaseModel):
    # Unknown keys are refused: a typo such as "decodr" must not silently fall back to the default decoder.
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(description=f"objective, one of {', '.join(PROMPTS)}")
    decoder: str | None = Field(default=None, description="decoder id (GET /v1/decoders); default decoder if omitted")
    decode: str | None = Field(default=None, description="decode mode (greedy, best_of_k, sample, refine, search...)")
    k: int | None = Field(default=None, description="samples for best_of_k / sample / refine / search decoding")
    seed: int = Field(
        default=0, ge=0, lt=2**63, description="seed of stochastic decode modes (same seed, same decision)"
    )
    time_budget_ms: float | int | None = Field(
        default=None,
        description="local-search time per instance of refine / search decoding in ms; a request's instances "
        "together are bounded by the server's max_time_budget_ms",
    )


class DecideBody(_Envelope):
    instance: dict[str, Any] = Field(description="a lambo.instance/1 document")


class DecideBatchBody(_Envelope):
    instances: list[Any] = Field(description="lambo.instance/1 documents, decided in order")


class RegisterDecoderBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    id: str = Field(pattern=DECODER_ID_PATTERN, description="id under which the decoder is served")
    dir: str | None = Field(
        default=None,
        description="sub-directory of the server's decoders directory holding the decoder checkpoint "
        "(relative; default: the id)",
    )


# Documentation-only twins with the instance schema spelled out (what /docs shows).
class _DecideDoc(_Envelope):
    instance: InstanceModel


class _DecideBatchDoc(_Envelope):
    instances: list[InstanceModel]


class EvaluationOut(BaseModel):
    objective: float | None
    feasible: bool
    latency_s: list[float | None]
    energy_j: list[float | None]
    mean_latency_s: float | None = None
    total_energy_j: float | None = None
    violations: list[dict[str, Any]] = []


class DecideOut(BaseModel):
    decision: dict[str, Any] = Field(description="a lambo.decision/1 document")
    evaluation: EvaluationOut
    decoder: str
    timing_ms: float = Field(
        description="server-side wall time of the request in ms; for /v1/decide_batch "
        "items, the request's time divided by its number of instances"
    )


class DecideBatchOut(BaseModel):
    results: list[DecideOut]


class ErrorOut(BaseModel):
    detail: str = Field(description="one line naming the problem (field, limit, decoder id)")
    status: int


def openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` documenting a raw-parsed request body with a pydantic model."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": model.model_json_schema(ref_template="#/components/schemas/{model}")}
            },
        }
    }


DECIDE_DOC = _DecideDoc
DECIDE_BATCH_DOC = _DecideBatchDoc


# ---------------------------------------------------------------- parsed requests
@dataclass(frozen=True)
class DecodeOptions:
    """How to decide: prompt, decoder id (None = default), mode, k, seed, time budget (s; None = none)."""

    prompt: str
    decoder: str | None
    decode: str
    k: int
    seed: int
    time_budget_s: float | None


@dataclass(frozen=True)
class DecideRequest:
    """One validated request: its instances (one for /v1/decide) and how to decide them."""

    instances: list[Instance]
    options: DecodeOptions


def _envelope(doc: Any, model: type[_Envelope]) -> _Envelope:
    if not isinstance(doc, dict):
        raise LamboInputError(f"expected a JSON object, got {type(doc).__name__}", where="body")
    try:
        return model.model_validate(doc)
    except ValidationError as err:
        first = err.errors()[0]
        if first["type"] == "extra_forbidden":
            raise LamboInputError(f"unknown field '{first['loc'][0]}'", where="body") from None
        raise LamboInputError(describe(err), where="body") from None


def _time_budget(env: _Envelope, decode: str, cfg: ServeConfig, count: int) -> float | None:
    """Seconds of local search per instance. The request's instances together may spend at most
    ``max_time_budget_ms``: an explicit budget beyond that is refused (413), the default one shrinks."""
    budget = env.time_budget_ms
    if budget is None:
        if decode not in BUDGETED_MODES:
            return None
        return min(cfg.default_time_budget_ms, cfg.max_time_budget_ms / count) / 1e3
    if not math.isfinite(budget) or budget <= 0:
        raise LamboInputError(f"time_budget_ms={budget} must be a positive number of ms", where="time_budget_ms")
    if budget * count > cfg.max_time_budget_ms:
        spent = f"{count} instances x {budget:g} ms" if count > 1 else f"time_budget_ms={budget:g}"
        raise limits.too_large(
            f"{spent} exceed the limit max_time_budget_ms={cfg.max_time_budget_ms:g}", "time_budget_ms"
        )
    return float(budget) / 1e3


def _options(env: _Envelope, cfg: ServeConfig, count: int = 1) -> DecodeOptions:
    prompt = check_prompt(env.prompt)
    decode = env.decode if env.decode is not None else cfg.default_decode
    modes = decode_modes()
    if decode not in modes:
        raise LamboInputError(f"unknown decode mode {decode!r}; expected one of {', '.join(modes)}", where="decode")
    k = env.k if env.k is not None else cfg.default_k
    if k < 1:
        raise LamboInputError(f"k={k} must be >= 1", where="k")
    if k > cfg.max_k:
        raise limits.too_large(f"k={k} exceeds the limit max_k={cfg.max_k}", "k")
    if env.decoder is not None and not env.decoder:
        raise LamboInputError("empty decoder id", where="decoder")
    return DecodeOptions(prompt, env.decoder, decode, k, env.seed, _time_budget(env, decode, cfg, count))


def _instance(doc: Any, where: str) -> Instance:
    try:
        return instance_from_dict(doc)
    except LamboInputError as err:
        raise err.located(where) from None


def parse_decide(body: bytes, cfg: ServeConfig) -> DecideRequest:
    env = _envelope(limits.parse_json(body, cfg), DecideBody)
    options = _options(env, cfg)
    limits.check_request_sizes([env.instance], cfg, ["instance"])
    return DecideRequest([_instance(env.instance, "instance")], options)


def parse_decide_batch(body: bytes, cfg: ServeConfig) -> DecideRequest:
    env = _envelope(limits.parse_json(body, cfg), DecideBatchBody)
    if not env.instances:
        raise LamboInputError("empty list; expected at least one instance", where="instances")
    if len(env.instances) > cfg.max_batch_instances:
        raise limits.too_large(
            f"{len(env.instances)} instances exceed the limit max_batch_instances={cfg.max_batch_instances}",
            "instances",
        )
    options = _options(env, cfg, len(env.instances))
    where = [f"instances[{i}]" for i in range(len(env.instances))]
    limits.check_request_sizes(env.instances, cfg, where)
    return DecideRequest([_instance(doc, w) for doc, w in zip(env.instances, where)], options)


def parse_register(body: bytes, cfg: ServeConfig) -> RegisterDecoderBody:
    doc = limits.parse_json(body, cfg)
    if not isinstance(doc, dict):
        raise LamboInputError(f"expected a JSON object, got {type(doc).__name__}", where="body")
    try:
        return RegisterDecoderBody.model_validate(doc)
    except ValidationError as err:
        first = err.errors()[0]
        if first["type"] == "extra_forbidden":
            raise LamboInputError(f"unknown field '{first['loc'][0]}'", where="body") from None
        raise LamboInputError(describe(err), where="body") from None


# ---------------------------------------------------------------- responses
def decide_result(inst: Instance, decision: Decision, decoder: str, timing_ms: float) -> dict[str, Any]:
    """The response of one decided instance; the evaluation is the one evaluator's, made JSON-safe
    (an infinite latency, offloaded with share 0 and reported infeasible, becomes null)."""
    ev = evaluate(inst, decision.target, decision.share)
    return {
        "decision": decision_to_dict(decision),
        "evaluation": jsonable(ev.to_dict(decision.prompt)),
        "decoder": decoder,
        "timing_ms": timing_ms,
    }


def error_body(err: LamboInputError) -> dict[str, Any]:
    return {"detail": str(err), "status": err.status}
