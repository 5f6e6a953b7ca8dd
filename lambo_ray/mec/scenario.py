"""Scenario configuration: the paper's cell by default (docs/model.md), every value overridable.

One dataclass holds everything the generator needs, so an instance set is reproducible from
(config, seed) alone and every CLI flag / YAML key maps to exactly one field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lambo_ray.errors import LamboInputError, reject_unknown_keys


def _f(default: Any, help_text: str) -> Any:
    """A field with its help text (shown by every command that takes scenario flags)."""
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True)
class ScenarioConfig:
    """Everything the generator draws an instance from (SI units; the defaults are the paper's cell)."""

    # Geometry: a square cell, servers and UEs uniform at random.
    area_m: float = _f(50.0, "side of the square cell (m)")
    n_ues: int = _f(50, "UEs (N), one task each")
    n_servers: int = _f(4, "edge servers (M); without --capacities the paper's capacities are cycled")
    capacities_cps: tuple[float, ...] = _f((1.5e10, 1.5e10, 3e10, 5e10), "CPU capacity F_j of each server (cycles/s)")
    max_speed_mps: float = _f(1.2, "top walking speed of a UE (m/s)")
    # Tasks: c_i, d_i uniform in [lo, hi] x mean.
    mean_cycles: float = _f(1e10, "mean CPU cycles c_i of a task")
    mean_data_bits: float = _f(2e8, "mean input size d_i of a task (bits)")
    task_spread: tuple[float, float] = _f((0.5, 1.5), "c_i and d_i are uniform in [LO, HI] x their mean")
    local_cps: float = _f(1e9, "local CPU speed f_i of every UE (cycles/s)")
    # Deadline T_i uniform in [lo, hi] x c_i / f_i (lo >= 1: local always meets it).
    deadline_factor: tuple[float, float] = _f(
        (1.0, 1.3), "deadline T_i is uniform in [LO, HI] x the local time c_i/f_i (LO >= 1: local meets it)"
    )
    tx_w: float = _f(1.0, "transmit power p_tx of a UE (W)")
    local_w: float = _f(1.0, "local computing power p_loc of a UE (W)")
    # Channel (DROO): g = A_d (3e8 / (4 pi f_c D))^d_e x Exp(1) fading.
    antenna_gain: float = _f(4.11, "antenna gain A_d of the path-loss model")
    carrier_hz: float = _f(915e6, "carrier frequency f_c (Hz)")
    path_loss_exp: float = _f(2.8, "path-loss exponent d_e")
    min_distance_m: float = _f(1.0, "distances are clamped to at least this (m)")
    bandwidth_hz: float = _f(2e6, "uplink bandwidth B per UE (Hz)")
    noise_dbm_per_hz: float = _f(-174.0, "noise power spectral density N0 (dBm/Hz)")
    fading: bool = _f(True, "Rayleigh fading (unit-mean exponential power) on every link")
    # Drift knobs (identity by default; see lambo_ray.mec.drift for the named scenarios).
    outage_factor: float = _f(1.0, "capacity multiplier of one server, in (0, 1] (the outage drift uses 0.3)")
    outage_server: int = _f(-1, "the server hit by --outage-factor, 0-based (-1: a random one per instance)")
    hotspot: tuple[float, float] | None = _f(
        None, "UEs walk towards this point X Y, as fractions of the cell side (the mobility drift)"
    )
    hotspot_std: float = _f(0.15, "spread of the hotspot crowd, as a fraction of the cell side")
    walk_s: float = _f(0.0, "UEs walk this long (random waypoint) before the snapshot (s)")

    def __post_init__(self) -> None:
        problems = []
        if self.n_ues < 1:
            problems.append(f"n_ues must be >= 1 (got {self.n_ues})")
        if self.n_servers < 1:
            problems.append(f"n_servers must be >= 1 (got {self.n_servers})")
        if len(self.capacities_cps) != self.n_servers:
            problems.append(f"capacities_cps has {len(self.capacities_cps)} values but n_servers is {self.n_servers}")
        if any(not (c > 0) for c in self.capacities_cps):
            problems.append("capacities_cps must all be > 0")
        for name in (
            "area_m",
            "mean_cycles",
            "mean_data_bits",
            "local_cps",
            "bandwidth_hz",
            "tx_w",
            "local_w",
        ):
            if not (getattr(self, name) > 0):
                problems.append(f"{name} must be > 0 (got {getattr(self, name)})")
        lo, hi = self.task_spread
        if not (0 < lo <= hi):
            problems.append(f"task_spread must satisfy 0 < lo <= hi (got {self.task_spread})")
        lo, hi = self.deadline_factor
        if not (0 < lo <= hi):
            problems.append(f"deadline_factor must satisfy 0 < lo <= hi (got {self.deadline_factor})")
        if not (0 < self.outage_factor <= 1):
            problems.append(f"outage_factor must be in (0, 1] (got {self.outage_factor})")
        if problems:
            raise LamboInputError("; ".join(problems), where="scenario")

    def replace(self, **changes: Any) -> ScenarioConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScenarioConfig:
        """Build from a (YAML/JSON) mapping; unknown keys are an error, not silently ignored. Capacities
        alone set the server count; a server count alone cycles the paper's capacities to it."""
        reject_unknown_keys(cls, data, "scenario")
        kwargs = {}
        for key, value in data.items():
            if isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        if "capacities_cps" in kwargs and "n_servers" not in kwargs:
            kwargs["n_servers"] = len(kwargs["capacities_cps"])
        if "n_servers" in kwargs and "capacities_cps" not in kwargs and isinstance(kwargs["n_servers"], int):
            kwargs["capacities_cps"] = default_capacities(kwargs["n_servers"])
        return cls(**kwargs)


PAPER = ScenarioConfig()


def default_capacities(n_servers: int) -> tuple[float, ...]:
    """Paper capacities cycled to any M, so `--n-servers 8` works without listing capacities."""
    base = PAPER.capacities_cps
    return tuple(base[j % len(base)] for j in range(n_servers))
