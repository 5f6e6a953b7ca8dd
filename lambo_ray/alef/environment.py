"""The environment side of ALEF: where unlabelled drifted instances and the reference sets come from."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from lambo_ray.mec.drift import apply_drift
from lambo_ray.mec.generator import generate, generate_series
from lambo_ray.mec.instance import Instance
from lambo_ray.mec.scenario import ScenarioConfig


def drift_stream(base: ScenarioConfig, drift: str, seed: int, dt_s: float = 30.0) -> Iterator[Instance]:
    """Unlabelled instances from the drifted environment, in arrival order (endless).

    ``mobility`` is one cell over time (``generate_series``): UEs start spread uniformly and walk
    (random waypoint) towards the hotspot, so the drift grows as the stream goes on. Every other
    drift draws independent snapshots of the drifted scenario from one seed sequence. The stream is
    a pure function of its arguments, so a resumed run gets the same arrivals by skipping the ones
    it has already seen.
    """
    cfg = apply_drift(base, drift)
    if drift == "mobility":
        yield from generate_series(cfg.replace(walk_s=0.0), steps=10**9, dt_s=dt_s, seed=seed)
        return
    seq = np.random.SeedSequence(seed)
    while True:
        yield generate(cfg, np.random.default_rng(seq.spawn(1)[0]))


def snapshot_set(cfg: ScenarioConfig, count: int, seed: int) -> list[Instance]:
    seq = np.random.SeedSequence(seed)
    return [generate(cfg, np.random.default_rng(s)) for s in seq.spawn(count)]


def cycle_prompts(prompts: Sequence[str], count: int, offset: int = 0) -> list[str]:
    return [prompts[(offset + k) % len(prompts)] for k in range(count)]
