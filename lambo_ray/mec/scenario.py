"""Scenario configuration: the paper's defaults (SPEC section 1), every value overridable.

One dataclass holds everything the generator needs, so an instance set is reproducible from
(config, seed) alone and every CLI flag / YAML key maps to exactly one field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from lambo_ray.errors import LamboInputError, reject_unknown_keys


@dataclass(frozen=True)
class ScenarioConfig:
    # Geometry: a square cell, servers and UEs uniform at random.
    area_m: float = 50.0
    n_ues: int = 50
    n_servers: int = 4
    capacities_cps: tuple[float, ...] = (1.5e10, 1.5e10, 3e10, 5e10)
    max_speed_mps: float = 1.2
    # Tasks: c_i, d_i uniform in [lo, hi] x mean.
    mean_cycles: float = 1e10
    mean_data_bits: float = 2e8
    task_spread: tuple[float, float] = (0.5, 1.5)
    local_cps: float = 1e9
    # Deadline T_i uniform in [lo, hi] x c_i / f_i (lo >= 1: local always meets it).
    deadline_factor: tuple[float, float] = (1.0, 1.3)
    tx_w: float = 1.0
    local_w: float = 1.0
    # Channel (DROO): g = A_d (3e8 / (4 pi f_c D))^d_e x Exp(1) fading.
    antenna_gain: float = 4.11
    carrier_hz: float = 915e6
    path_loss_exp: float = 2.8
    min_distance_m: float = 1.0
    bandwidth_hz: float = 2e6
    noise_dbm_per_hz: float = -174.0
    fading: bool = True
    # Drift knobs (identity by default; see lambo_ray.mec.drift for the named scenarios).
    outage_factor: float = 1.0  # capacity multiplier of one server
    outage_server: int = -1  # which server (-1: a random one per instance)
    hotspot: tuple[float, float] | None = None  # UEs clustered around this point (fraction of area)
    hotspot_std: float = 0.15  # std of the cluster, as a fraction of the area side
    walk_s: float = 0.0  # UEs walk this long (random waypoint towards the hotspot) before the snapshot

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
        """Build from a (YAML/JSON) mapping; unknown keys are an error, not silently ignored."""
        reject_unknown_keys(cls, data, "scenario")
        kwargs = {}
        for key, value in data.items():
            if isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        if "capacities_cps" in kwargs and "n_servers" not in kwargs:
            kwargs["n_servers"] = len(kwargs["capacities_cps"])
        return cls(**kwargs)


PAPER = ScenarioConfig()


def default_capacities(n_servers: int) -> tuple[float, ...]:
    """Paper capacities cycled to any M, so `--n-servers 8` works without listing capacities."""
    base = PAPER.capacities_cps
    return tuple(base[j % len(base)] for j in range(n_servers))


def scenario_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(ScenarioConfig))
