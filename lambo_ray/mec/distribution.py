"""A distribution over scenarios, so one policy learns every cell it may be deployed in.

Each training instance draws its own scenario: cell size N (log-uniform: as many small as large cells
per octave), M servers with the paper's capacities cycled to M or heterogeneous ones, task load,
deadline tightness, a server outage, the area, and a crowd that walked to a hotspot. The paper scenario
(N = 50, M = 4) stays one point of it, drawn with probability ``paper_prob``. All ranges are inclusive;
a draw is a plain :class:`~lambo_ray.mec.scenario.ScenarioConfig`, so the generator, the drifts and every
method see nothing new.

Defaults cover what operators run and what the drifts do: N 10-200 (``density`` is N = 80), M 2-10,
load x0.5-2 (``load`` is x1.5), deadline factor lower end 0.6-1.0 (``deadline`` is 0.8), outage to 30%
(``outage``), walks of up to 600 s towards a hotspot (``mobility``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lambo_ray.errors import LamboInputError, reject_unknown_keys
from lambo_ray.mec.scenario import PAPER, ScenarioConfig, default_capacities


@dataclass(frozen=True)
class ScenarioDistribution:
    n_ues: tuple[int, int] = field(default=(10, 200), metadata={"help": "UEs per cell, log-uniform in [lo, hi]"})
    n_servers: tuple[int, int] = field(default=(2, 10), metadata={"help": "servers per cell, uniform in [lo, hi]"})
    paper_capacity_prob: float = field(
        default=0.5, metadata={"help": "probability of the paper capacities cycled to M (else heterogeneous)"}
    )
    capacity_cps: tuple[float, float] = field(
        default=(1e10, 6e10), metadata={"help": "heterogeneous capacities: each log-uniform in [lo, hi] cycles/s"}
    )
    load: tuple[float, float] = field(
        default=(0.5, 2.0), metadata={"help": "mean task cycles = paper mean x U[lo, hi]"}
    )
    tight_deadline_prob: float = field(
        default=0.5, metadata={"help": "probability that the deadline factor's lower end is below 1"}
    )
    deadline_low: tuple[float, float] = field(
        default=(0.6, 1.0), metadata={"help": "lower end of the deadline factor when tight, U[lo, hi]"}
    )
    outage_prob: float = field(default=0.15, metadata={"help": "probability that one server runs at 30%"})
    walk_prob: float = field(default=0.15, metadata={"help": "probability that UEs walked to a hotspot"})
    walk_s: tuple[float, float] = field(default=(60.0, 600.0), metadata={"help": "walk duration, U[lo, hi] s"})
    area_m: tuple[float, float] = field(default=(30.0, 100.0), metadata={"help": "cell side, log-uniform (m)"})
    paper_prob: float = field(default=0.15, metadata={"help": "probability of drawing the paper scenario itself"})
    base: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "ScenarioConfig values every draw starts from (default: paper)"}
    )

    def __post_init__(self) -> None:
        problems = []
        for name in ("n_ues", "n_servers", "capacity_cps", "load", "deadline_low", "walk_s", "area_m"):
            lo, hi = getattr(self, name)
            if not (0 < lo <= hi):
                problems.append(f"{name} must satisfy 0 < lo <= hi (got {getattr(self, name)})")
        for name in ("paper_capacity_prob", "tight_deadline_prob", "outage_prob", "walk_prob", "paper_prob"):
            if not (0.0 <= getattr(self, name) <= 1.0):
                problems.append(f"{name} must be a probability in [0, 1] (got {getattr(self, name)})")
        if problems:
            raise LamboInputError("; ".join(problems), where="scenario distribution")
        self.base_config()  # validates the base

    def base_config(self) -> ScenarioConfig:
        return ScenarioConfig.from_dict(dict(self.base)) if self.base else PAPER

    @property
    def max_size(self) -> tuple[int, int]:
        """(largest N, largest M) a draw can have: the padding a policy batch may need."""
        base = self.base_config()
        if self.paper_prob >= 1.0:  # a one-point distribution: the base scenario only
            return base.n_ues, base.n_servers
        return max(self.n_ues[1], base.n_ues), max(self.n_servers[1], base.n_servers)

    def sample(self, rng: np.random.Generator) -> ScenarioConfig:
        """One scenario (module docstring). Consumes a fixed number of draws, whatever the outcome."""
        u = rng.random(8)
        base = self.base_config()
        n = int(round(math.exp(rng.uniform(math.log(self.n_ues[0]), math.log(self.n_ues[1])))))
        m = int(rng.integers(self.n_servers[0], self.n_servers[1] + 1))
        lo, hi = self.capacity_cps
        caps = np.exp(rng.uniform(math.log(lo), math.log(hi), m))
        capacities = default_capacities(m) if u[1] < self.paper_capacity_prob else tuple(float(c) for c in caps)
        d_lo = float(rng.uniform(*self.deadline_low)) if u[2] < self.tight_deadline_prob else 1.0
        walk = float(rng.uniform(*self.walk_s))
        area = float(math.exp(rng.uniform(math.log(self.area_m[0]), math.log(self.area_m[1]))))
        if u[0] < self.paper_prob:
            return base
        return base.replace(
            n_ues=n,
            n_servers=m,
            capacities_cps=capacities,
            mean_cycles=base.mean_cycles * float(rng.uniform(*self.load)),
            deadline_factor=(min(d_lo, base.deadline_factor[1]), base.deadline_factor[1]),
            outage_factor=0.3 if u[3] < self.outage_prob else 1.0,
            hotspot=(0.15, 0.15) if u[4] < self.walk_prob else None,
            walk_s=walk if u[4] < self.walk_prob else 0.0,
            area_m=area,
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScenarioDistribution:
        reject_unknown_keys(cls, data, "scenario distribution")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    @classmethod
    def from_file(cls, path: str | Path) -> ScenarioDistribution:
        """A YAML or JSON file holding the fields above (unknown keys are an error naming them)."""
        import yaml

        p = Path(path)
        if not p.is_file():
            raise LamboInputError(f"scenario distribution file not found: {p}", where="scenario_dist")
        try:
            data = yaml.safe_load(p.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise LamboInputError(f"cannot parse {p}: {str(err).splitlines()[0]}", where="scenario_dist") from None
        if not isinstance(data, dict):
            raise LamboInputError(f"{p}: expected a mapping of distribution fields", where="scenario_dist")
        return cls.from_dict(data)
