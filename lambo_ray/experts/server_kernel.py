"""The latency server term compiled: water-filled shares and the sum of work / share, in one call.

Why a twin of :func:`lambo_ray.mec.shares.water_fill`: local search (and the greedy construction,
``search``'s polishing, DE's repair) evaluates a server's term for every candidate move, ~180 times per
N = 50 ``min_latency`` decision. As a dozen numpy calls on arrays of a few elements each call cost
~25 us, nearly all of it per-call overhead, so the term alone was about a fifth of a ``search``
decision. The same iteration compiled is ~1 us. ``water_fill`` stays the reference (and the shares
every decision reports); a test pins the two together.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def latency_term(sqrt_c: np.ndarray, a_min: np.ndarray, work: np.ndarray, cap_tol: float) -> float:
    """sum_i work_i / share_i at water-filled shares (``water_fill``'s iteration); inf when the minimum
    shares are not finite or sum past 1 + ``cap_tol``."""
    n = a_min.size
    if n == 0:
        return 0.0
    total_min = 0.0
    for k in range(n):
        if not np.isfinite(a_min[k]):
            return np.inf
        total_min += a_min[k]
    if total_min > 1.0 + cap_tol or total_min > 1.0 + 1e-12:
        return np.inf
    clamped = np.zeros(n, dtype=np.bool_)
    level = np.inf
    free_mass = 0.0
    for _ in range(n + 1):
        budget = 1.0
        free_mass = 0.0
        for k in range(n):
            if clamped[k]:
                budget -= a_min[k]
            else:
                free_mass += sqrt_c[k]
        if free_mass <= 0:
            break
        level = free_mass / budget if budget > 0 else np.inf
        newly = False
        for k in range(n):
            if not clamped[k] and sqrt_c[k] / level < a_min[k]:
                clamped[k] = True
                newly = True
        if not newly:
            break
    total = 0.0
    for k in range(n):
        if clamped[k]:
            share = a_min[k]
        else:
            share = sqrt_c[k] / level if free_mass > 0 else 0.0
        total += work[k] / share
    return total
