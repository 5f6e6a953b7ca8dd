"""Pydantic models of the file/HTTP contract (`lambo.instance/1`, `lambo.decision/1`).

Validation lives here and only here; the messages name the field (``ues.rate_bps[3]``) so a user
can fix the file. Extra fields are allowed (the contract says: add fields freely).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

INSTANCE_SCHEMA = "lambo.instance/1"
DECISION_SCHEMA = "lambo.decision/1"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)


class ServersModel(_Strict):
    capacity_cps: list[float] = Field(min_length=1)

    @field_validator("capacity_cps")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        return _all_positive(v)


class UEsModel(_Strict):
    data_bits: list[float] = Field(min_length=1)
    cycles: list[float] = Field(min_length=1)
    deadline_s: list[float] = Field(min_length=1)
    local_cps: list[float] = Field(min_length=1)
    rate_bps: list[list[float]] = Field(min_length=1)

    @field_validator("data_bits", "cycles", "deadline_s", "local_cps")
    @classmethod
    def _positive(cls, v: list[float]) -> list[float]:
        return _all_positive(v)

    @field_validator("rate_bps")
    @classmethod
    def _rates_positive(cls, v: list[list[float]]) -> list[list[float]]:
        for i, row in enumerate(v):
            for j, x in enumerate(row):
                if not x > 0:
                    raise ValueError(f"[{i}][{j}] = {x} must be > 0")
        return v

    @model_validator(mode="after")
    def _same_length(self) -> UEsModel:
        n = len(self.cycles)
        for name in ("data_bits", "deadline_s", "local_cps", "rate_bps"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries but cycles has {n} (one per UE)")
        return self


class PowerModel(_Strict):
    tx_w: float = Field(gt=0)
    local_w: float = Field(gt=0)


class InstanceModel(_Strict):
    schema_: Literal["lambo.instance/1"] = Field(alias="schema")
    servers: ServersModel
    ues: UEsModel
    power: PowerModel
    geometry: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _rate_width(self) -> InstanceModel:
        m = len(self.servers.capacity_cps)
        for i, row in enumerate(self.ues.rate_bps):
            if len(row) != m:
                raise ValueError(
                    f"ues.rate_bps[{i}] has {len(row)} entries but there are {m} servers (shape must be N x M)"
                )
        return self


class DecisionModel(_Strict):
    schema_: Literal["lambo.decision/1"] = Field(alias="schema")
    prompt: Literal["min_latency", "min_energy"]
    target: list[int] = Field(min_length=1)
    share: list[float] = Field(min_length=1)
    objective: float | None = Field(default=None, allow_inf_nan=True)
    method: str

    @field_validator("target")
    @classmethod
    def _nonneg(cls, v: list[int]) -> list[int]:
        for i, t in enumerate(v):
            if t < 0:
                raise ValueError(f"[{i}] = {t} must be >= 0 (0 = local, j = server j)")
        return v

    @field_validator("share")
    @classmethod
    def _unit(cls, v: list[float]) -> list[float]:
        for i, s in enumerate(v):
            if not 0 <= s <= 1:
                raise ValueError(f"[{i}] = {s} must be in [0, 1]")
        return v

    @model_validator(mode="after")
    def _same_length(self) -> DecisionModel:
        if len(self.target) != len(self.share):
            raise ValueError(f"target has {len(self.target)} entries but share has {len(self.share)}")
        return self


def _all_positive(v: list[float]) -> list[float]:
    for i, x in enumerate(v):
        if not x > 0:
            raise ValueError(f"[{i}] = {x} must be > 0")
    return v


def describe(err: ValidationError) -> str:
    """The first pydantic error as one line: ``field 'ues.cycles': [3] = -1.0 must be > 0``."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if p != "__root__")
    loc = loc.replace("schema_", "schema")
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    if first["type"] == "missing":
        return f"missing field '{loc}'"
    if first["type"] in ("finite_number",):
        return f"field '{loc}': NaN or inf is not allowed{more}"
    return f"field '{loc or '<document>'}': {msg}{more}"
