"""Random-waypoint mobility (max 1.2 m/s by default), optionally pulled towards a hotspot."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lambo_ray.mec.scenario import ScenarioConfig


def draw_positions(cfg: ScenarioConfig, n: int, rng: np.random.Generator, *, clustered: bool) -> np.ndarray:
    """Uniform positions in the square, or Gaussian around the hotspot (clipped to the square)."""
    if clustered and cfg.hotspot is not None:
        centre = np.asarray(cfg.hotspot) * cfg.area_m
        pts = centre + rng.normal(0.0, cfg.hotspot_std * cfg.area_m, size=(n, 2))
        return np.clip(pts, 0.0, cfg.area_m)
    return rng.uniform(0.0, cfg.area_m, size=(n, 2))


@dataclass
class RandomWaypoint:
    """Each UE walks in a straight line to a waypoint at its own speed in (0, v_max], then picks another.

    Waypoints are uniform in the cell, or drawn around ``cfg.hotspot`` when one is set (a crowd
    gathering: the `mobility` drift).
    """

    cfg: ScenarioConfig
    positions: np.ndarray
    rng: np.random.Generator

    def __post_init__(self) -> None:
        n = self.positions.shape[0]
        self.waypoints = draw_positions(self.cfg, n, self.rng, clustered=True)
        self.speeds = self._draw_speeds(n)

    def _draw_speeds(self, n: int) -> np.ndarray:
        return self.rng.uniform(0.1, 1.0, size=n) * self.cfg.max_speed_mps

    def step(self, dt_s: float) -> np.ndarray:
        """Advance every UE by ``dt_s`` seconds (in sub-steps, so waypoints are reached, not overshot)."""
        remaining = np.full(self.positions.shape[0], float(dt_s))
        for _ in range(64):  # a UE reaches at most a handful of waypoints per step
            active = remaining > 1e-12
            if not active.any():
                break
            delta = self.waypoints - self.positions
            dist = np.linalg.norm(delta, axis=1)
            reach = dist / self.speeds
            arrive = active & (reach <= remaining)
            move = active & ~arrive
            self.positions[arrive] = self.waypoints[arrive]
            remaining[arrive] -= reach[arrive]
            frac = np.where(move, self.speeds * remaining / np.maximum(dist, 1e-12), 0.0)
            self.positions[move] += delta[move] * frac[move, None]
            remaining[move] = 0.0
            k = int(arrive.sum())
            if k:
                self.waypoints[arrive] = draw_positions(self.cfg, k, self.rng, clustered=True)
                self.speeds[arrive] = self._draw_speeds(k)
        return self.positions
