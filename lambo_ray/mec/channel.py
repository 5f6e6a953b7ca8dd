"""DROO's free-space path-loss channel with Rayleigh fading, and the Shannon uplink rate."""

from __future__ import annotations

import numpy as np

from lambo_ray.mec.scenario import ScenarioConfig

SPEED_OF_LIGHT = 3e8


def channel_gain(distance_m: np.ndarray, cfg: ScenarioConfig, rng: np.random.Generator) -> np.ndarray:
    d = np.maximum(distance_m, cfg.min_distance_m)
    gain = cfg.antenna_gain * (SPEED_OF_LIGHT / (4 * np.pi * cfg.carrier_hz * d)) ** cfg.path_loss_exp
    if cfg.fading:
        gain = gain * rng.exponential(1.0, size=gain.shape)  # Rayleigh amplitude -> unit-mean exp power
    return gain


def uplink_rate(gain: np.ndarray, cfg: ScenarioConfig) -> np.ndarray:
    noise_w = 10 ** ((cfg.noise_dbm_per_hz - 30) / 10) * cfg.bandwidth_hz
    return cfg.bandwidth_hz * np.log2(1.0 + cfg.tx_w * gain / noise_w)
