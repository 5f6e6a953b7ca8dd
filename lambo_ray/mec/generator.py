"""Seeded instance generator for the paper scenario and its drifts.

Instance ``k`` of a set depends only on (config, seed, k): seeds are spawned per instance, so a
set of 100 starts with the same 10 instances as a set of 10.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from lambo_ray.errors import LamboInputError
from lambo_ray.mec.channel import channel_gain, uplink_rate
from lambo_ray.mec.instance import Instance
from lambo_ray.mec.mobility import RandomWaypoint, draw_positions
from lambo_ray.mec.packing import pack_must_offload
from lambo_ray.mec.scenario import ScenarioConfig

MAX_REJECTIONS = 200


def instance_rngs(seed: int, count: int) -> list[np.random.Generator]:
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(count)]


def _capacities(cfg: ScenarioConfig, rng: np.random.Generator) -> np.ndarray:
    cap = np.asarray(cfg.capacities_cps, dtype=float).copy()
    if cfg.outage_factor < 1.0:
        j = cfg.outage_server if cfg.outage_server >= 0 else int(rng.integers(cfg.n_servers))
        if j >= cfg.n_servers:
            raise LamboInputError(f"outage_server {j} out of range for {cfg.n_servers} servers", where="scenario")
        cap[j] *= cfg.outage_factor
    return cap


def build_instance(
    cfg: ScenarioConfig,
    rng: np.random.Generator,
    ue_xy: np.ndarray,
    server_xy: np.ndarray,
    capacity: np.ndarray,
) -> Instance:
    """Draw tasks, deadlines and fading for UEs at the given positions."""
    n = ue_xy.shape[0]
    lo, hi = cfg.task_spread
    cycles = rng.uniform(lo, hi, n) * cfg.mean_cycles
    data = rng.uniform(lo, hi, n) * cfg.mean_data_bits
    local = np.full(n, cfg.local_cps)
    dist = np.linalg.norm(ue_xy[:, None, :] - server_xy[None, :, :], axis=-1)
    rate = uplink_rate(channel_gain(dist, cfg, rng), cfg)
    dlo, dhi = cfg.deadline_factor
    factor = rng.uniform(dlo, dhi, n)
    if dlo < 1.0:
        # A deadline below the local time must be reachable by offloading alone (given a whole server);
        # UEs for which no server can do it get a deadline drawn from the local-feasible part instead.
        deadline = factor * cycles / local
        best_alone = (data[:, None] / rate + cycles[:, None] / capacity[None, :]).min(axis=1)
        unreachable = (factor < 1.0) & (best_alone >= deadline)
        factor[unreachable] = rng.uniform(1.0, max(dhi, 1.0), int(unreachable.sum()))
        # More must-offload UEs than the servers can host: those that do not fit (first fit, hardest
        # first) get a deadline local execution meets, so tight cells stay as tight as capacity allows.
        stranded = _stranded(factor * cycles / local, data, cycles, rate, capacity, factor < 1.0)
        factor[stranded] = rng.uniform(1.0, max(dhi, 1.0), int(stranded.sum()))
    geometry = {
        "area_m": cfg.area_m,
        "ue_xy": np.round(ue_xy, 4).tolist(),
        "server_xy": np.round(server_xy, 4).tolist(),
    }
    return Instance(
        data_bits=data,
        cycles=cycles,
        deadline_s=factor * cycles / local,
        local_cps=local,
        rate_bps=rate,
        capacity_cps=capacity,
        tx_w=cfg.tx_w,
        local_w=cfg.local_w,
        geometry=geometry,
    )


def _stranded(
    deadline: np.ndarray, data: np.ndarray, cycles: np.ndarray, rate: np.ndarray, capacity: np.ndarray, must: np.ndarray
) -> np.ndarray:
    """Must-offload UEs that first-fit decreasing cannot place (bool mask)."""
    slack = deadline[:, None] - data[:, None] / rate
    with np.errstate(divide="ignore", invalid="ignore"):
        a_min = np.where(slack > 0, cycles[:, None] / (capacity[None, :] * slack), np.inf)
    free = np.ones(capacity.size)
    out = np.zeros(deadline.size, dtype=bool)
    rows = np.flatnonzero(must)
    for i in rows[np.argsort(a_min[rows].min(axis=1), kind="stable")[::-1]]:
        fits = np.flatnonzero(a_min[i] <= free)
        if fits.size == 0:
            out[i] = True
            continue
        j = fits[np.argmin(a_min[i, fits])]
        free[j] -= a_min[i, j]
    return out


def is_feasible(inst: Instance) -> bool:
    """Whether the instance has a feasible decision: the UEs that cannot run locally can be packed onto
    the servers (:func:`lambo_ray.mec.packing.pack_must_offload`; exact, HiGHS as the last resort)."""
    return pack_must_offload(inst).feasible


def generate(cfg: ScenarioConfig, rng: np.random.Generator) -> Instance:
    """One snapshot of a cell; instances without any feasible decision are redrawn (only possible with
    deadline factors below 1)."""
    for _ in range(MAX_REJECTIONS):
        server_xy = rng.uniform(0.0, cfg.area_m, size=(cfg.n_servers, 2))
        ue_xy = draw_positions(cfg, cfg.n_ues, rng, clustered=False)
        if cfg.walk_s > 0:
            ue_xy = RandomWaypoint(cfg, ue_xy, rng).step(cfg.walk_s)
        inst = build_instance(cfg, rng, ue_xy, server_xy, _capacities(cfg, rng))
        if is_feasible(inst):
            return inst
    raise LamboInputError(
        f"could not draw a feasible instance in {MAX_REJECTIONS} tries; loosen deadline_factor",
        where="scenario",
    )


def generate_many(cfg: ScenarioConfig, count: int, seed: int) -> list[Instance]:
    if count < 1:
        raise LamboInputError(f"count must be >= 1 (got {count})", where="count")
    return [generate(cfg, rng) for rng in instance_rngs(seed, count)]


def generate_series(
    cfg: ScenarioConfig, steps: int, dt_s: float, seed: int, start_s: float = 0.0
) -> Iterator[Instance]:
    """A time series of one cell: fixed servers, UEs walking (random waypoint), new tasks and fading per slot;
    the first slot after the UEs have walked ``start_s`` seconds from their uniform start."""
    rng = np.random.default_rng(seed)
    server_xy = rng.uniform(0.0, cfg.area_m, size=(cfg.n_servers, 2))
    walker = RandomWaypoint(cfg, draw_positions(cfg, cfg.n_ues, rng, clustered=False), rng)
    capacity = _capacities(cfg, rng)
    if start_s > 0:
        walker.step(start_s)
    for _ in range(steps):
        yield build_instance(cfg, rng, walker.positions.copy(), server_xy, capacity)
        walker.step(dt_s)
