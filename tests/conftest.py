"""Shared fixtures. One local Ray for the whole session (num_cpus=2, no dashboard), started lazily
by the first test that asks for it and shut down at the end."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(scope="session")
def paper_instances():
    from lambo_ray.mec.generator import generate_many
    from lambo_ray.mec.scenario import ScenarioConfig

    return generate_many(ScenarioConfig(), 5, seed=2024)


@pytest.fixture(scope="session")
def small_instances():
    """Tiny instances (N=5, M=2) that brute force enumerates in milliseconds."""
    from lambo_ray.mec.generator import generate_many
    from lambo_ray.mec.scenario import ScenarioConfig

    cfg = ScenarioConfig(n_ues=5, n_servers=2, capacities_cps=(1.5e10, 3e10))
    return generate_many(cfg, 6, seed=7)
