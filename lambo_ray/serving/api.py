"""The HTTP contract of the Serve app (SPEC, interface contract: HTTP): request parsing and response bodies.

Bodies are parsed here from raw bytes rather than by FastAPI's automatic body models, for two reasons:
the byte limit (413) must be enforced *before* JSON parsing, and every error must be one
:class:`LamboInputError` naming the field (``instances[3]: field 'ues.cycles': [7] = -1.0 must be > 0``),
the same wording the CLI prints. The pydantic models below still document the API in OpenAPI (/docs).
Nothing here touches Ray or torch, so it is tested and reused without a running Serve.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lambo_ray.errors import LamboInputError
from lambo_ray.mec.evaluator import evaluate
from lambo_ray.mec.instance import PROMPTS, Decision, Instance, check_prompt
from lambo_ray.mec.io import decision_to_dict, instance_from_dict, jsonable
from lambo_ray.mec.schema import InstanceModel, describe
from lambo_ray.serving.config import DECODE_MODES, ServeConfig

DECODER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


# ---------------------------------------------------------------- request envelopes (validated, documented)
class _Envelope(BaseModel):
    # Unknown keys are refused: a typo such as "decodr" must not silently fall back to the default decoder.
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(description=f"objective, one of {', '.join(PROMPTS)}")
    decoder: str | None = Field(default=None, description="decoder id (GET /v1/decoders); default decoder if omitted")
    decode: str | None = Field(default=None, description=f"decode mode, one of {', '.join(DECODE_MODES)}")
    k: int | None = Field(default=None, description="samples for best_of_k / sample decoding")
    seed: int = Field(
        default=0, ge=0, lt=2**63, description="seed of stochastic decode modes (same seed, same decision)"
    )


class DecideBody(_Envelope):
    instance: dict[str, Any] = Field(description="a lambo.instance/1 document")


class DecideBatchBody(_Envelope):
    instances: list[dict[str, Any]] = Field(description="lambo.instance/1 documents, decided in order")


class RegisterDecoderBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    id: str = Field(pattern=DECODER_ID_PATTERN, description="id under which the decoder is served")
    path: str = Field(min_length=1, description="decoder-only checkpoint directory (save_decoder / lambo finetune)")


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
class DecideRequest:
    """One validated request: instances (one for /v1/decide), prompt, decoder id (None = default), mode, k."""

    instances: list[Instance]
    prompt: str
    decoder: str | None
    decode: str
    k: int
    seed: int


def parse_json(body: bytes, cfg: ServeConfig) -> Any:
    if len(body) > cfg.max_body_bytes:
        raise LamboInputError(
            f"request body of {len(body)} bytes exceeds the limit of {cfg.max_body_bytes} bytes", status=413
        )
    if not body:
        raise LamboInputError("empty request body; expected a JSON object", where="body")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        detail = (
            f"{err.msg} at line {err.lineno} column {err.colno}"
            if isinstance(err, json.JSONDecodeError)
            else "not UTF-8"
        )
        raise LamboInputError(f"invalid JSON ({detail})", where="body") from None


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


def _options(env: _Envelope, cfg: ServeConfig) -> tuple[str, str | None, str, int]:
    prompt = check_prompt(env.prompt)
    decode = env.decode if env.decode is not None else cfg.default_decode
    if decode not in DECODE_MODES:
        raise LamboInputError(
            f"unknown decode mode {decode!r}; expected one of {', '.join(DECODE_MODES)}", where="decode"
        )
    k = env.k if env.k is not None else cfg.default_k
    if not 1 <= k <= cfg.max_k:
        raise LamboInputError(f"k={k} outside 1..{cfg.max_k}", where="k")
    return prompt, env.decoder, decode, k


def _instance(doc: Any, cfg: ServeConfig, where: str) -> Instance:
    try:
        return instance_from_dict(doc, max_ues=cfg.max_ues)
    except LamboInputError as err:
        raise err.located(where) from None


def parse_decide(body: bytes, cfg: ServeConfig) -> DecideRequest:
    env = _envelope(parse_json(body, cfg), DecideBody)
    prompt, decoder, decode, k = _options(env, cfg)
    return DecideRequest([_instance(env.instance, cfg, "instance")], prompt, decoder, decode, k, env.seed)


def parse_decide_batch(body: bytes, cfg: ServeConfig) -> DecideRequest:
    env = _envelope(parse_json(body, cfg), DecideBatchBody)
    if not env.instances:
        raise LamboInputError("empty list; expected at least one instance", where="instances")
    if len(env.instances) > cfg.max_batch_instances:
        raise LamboInputError(
            f"{len(env.instances)} instances exceed the limit of {cfg.max_batch_instances} per request",
            where="instances",
            status=413,
        )
    prompt, decoder, decode, k = _options(env, cfg)
    instances = [_instance(doc, cfg, f"instances[{i}]") for i, doc in enumerate(env.instances)]
    return DecideRequest(instances, prompt, decoder, decode, k, env.seed)


def parse_register(body: bytes, cfg: ServeConfig) -> RegisterDecoderBody:
    doc = parse_json(body, cfg)
    if not isinstance(doc, dict):
        raise LamboInputError(f"expected a JSON object, got {type(doc).__name__}", where="body")
    try:
        return RegisterDecoderBody.model_validate(doc)
    except ValidationError as err:
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
