"""The named drift scenarios: each is a documented change of the scenario config (docs/model.md).

| name      | change                                                                          |
|-----------|---------------------------------------------------------------------------------|
| mobility  | UEs walk 600 s (random waypoint, <= 1.2 m/s) towards a hotspot near a corner:  |
|           | the crowd gathers, channels to far servers weaken, near servers get contended  |
| load      | task cycles x1.5 (deadlines scale with them, local still meets them)            |
| outage    | one server (random per instance) drops to 30% of its capacity                   |
| density   | N goes from 50 to 80 UEs                                                        |
| deadline  | deadline factor drawn in [0.8, 1.3]: about 40% of tasks miss locally and must offload |
"""

from __future__ import annotations

from collections.abc import Callable

from lambo_ray.errors import LamboInputError
from lambo_ray.mec.scenario import ScenarioConfig

DRIFTS: dict[str, Callable[[ScenarioConfig], ScenarioConfig]] = {
    "mobility": lambda c: c.replace(hotspot=(0.15, 0.15), walk_s=600.0),
    "load": lambda c: c.replace(mean_cycles=c.mean_cycles * 1.5),
    "outage": lambda c: c.replace(outage_factor=0.3),
    "density": lambda c: c.replace(n_ues=80),
    "deadline": lambda c: c.replace(deadline_factor=(0.8, 1.3)),
}


def apply_drift(cfg: ScenarioConfig, name: str | None) -> ScenarioConfig:
    if name is None or name == "none":
        return cfg
    if name not in DRIFTS:
        raise LamboInputError(f"unknown drift {name!r}; expected one of {', '.join(DRIFTS)}", where="drift")
    return DRIFTS[name](cfg)
