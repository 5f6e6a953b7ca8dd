"""Starting Ray the one way every entry point does (commands, benchmarks)."""

from __future__ import annotations

import os
from typing import Any


def init_ray(num_cpus: int | None = None, **kwargs: Any) -> Any:
    """Connect to the cluster when RAY_ADDRESS is set (e.g. under `ray job submit`), else start an
    embedded local Ray. Passing num_cpus to a cluster connection is an error in Ray, so it is dropped.
    Returns the ``ray`` module."""
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
    return ray
