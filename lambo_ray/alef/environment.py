"""The environment side of ALEF: where unlabelled drifted instances and the reference sets come from."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from lambo_ray.mec.drift import apply_drift
from lambo_ray.mec.generator import generate, generate_series
from lambo_ray.mec.instance import Instance
from lambo_ray.mec.scenario import ScenarioConfig


def drift_stream(base: ScenarioConfig, drift: str, seed: int, dt_s: float = 30.0, cells: int = 1) -> Iterator[Instance]:
    """Unlabelled instances from the drifted environment, in arrival order (endless).

    ``mobility`` is ``cells`` cells over time, observed in turn (``generate_series``): arrival k is
    cell k mod ``cells`` at time k x ``dt_s``, its UEs started spread uniformly and walk (random
    waypoint) towards the hotspot, so the drift grows as the stream goes on. Every other drift draws
    independent snapshots of the drifted scenario from one seed sequence. The stream is a pure
    function of its arguments, so a resumed run gets the same arrivals by skipping the ones it has
    already seen.

    Why several cells: a decoder is fine-tuned for a drift regime and served to every cell in it. On
    one cell's series (``cells=1``, the earlier stream) the gate judged an update on that cell's next
    arrivals only: on mobility / min_latency it kept one that made 512 of them 0.29 % cheaper and
    1024 fresh cells of the regime 0.06 % dearer.
    """
    cfg = apply_drift(base, drift)
    if drift == "mobility":
        start = cfg.replace(walk_s=0.0)
        if cells == 1:  # the earlier stream, seeded as it was
            yield from generate_series(start, 10**9, dt_s, seed)
            return
        series = [
            generate_series(start, 10**9, dt_s * cells, int(c.generate_state(1)[0]), start_s=k * dt_s)
            for k, c in enumerate(np.random.SeedSequence(seed).spawn(cells))
        ]
        while True:
            for one in series:
                yield next(one)
    seq = np.random.SeedSequence(seed)
    while True:
        yield generate(cfg, np.random.default_rng(seq.spawn(1)[0]))


def snapshot_set(cfg: ScenarioConfig, count: int, seed: int) -> list[Instance]:
    seq = np.random.SeedSequence(seed)
    return [generate(cfg, np.random.default_rng(s)) for s in seq.spawn(count)]


def cycle_prompts(prompts: Sequence[str], count: int, offset: int = 0) -> list[str]:
    return [prompts[(offset + k) % len(prompts)] for k in range(count)]
