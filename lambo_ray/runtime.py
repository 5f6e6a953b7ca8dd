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


def limit_compute_threads(threads: int) -> None:
    """Run this process's numeric work on ``threads`` threads: torch's intra-op pool and every loaded BLAS
    library (the decoder's Numba kernel multiplies through SciPy's). Decisions are small matrices, where
    extra threads spin more CPU than they save (9 rows: 18.2 ms of CPU for 14.75 ms of wall on two BLAS
    threads, 14.0 / 14.0 on one), and on a 2-core serving replica they compete with the HTTP proxy. For
    processes the project owns (a serving replica, a benchmark), set once at start: the limit is process
    wide, which is why the library's own functions never set it."""
    import scipy.linalg.cython_blas  # noqa: F401 - loads the BLAS Numba calls, so the limit reaches it
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(threads, user_api="blas")
