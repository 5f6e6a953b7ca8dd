"""Optimal CPU shares for a fixed assignment (derivation in docs/model.md, "Shares for a fixed assignment").

For one server with task set S, min sum_i c_i / (a_i F) s.t. sum a_i <= 1, a_i >= a_min_i is solved
by water-filling: a_i = max(a_min_i, sqrt(c_i) / lambda), lambda chosen so the shares sum to 1.
These shares minimise latency and meet every deadline whenever any shares can, so every method
that only chooses targets (greedy, local search, DE, DROO, brute force) completes its decision here.
"""

from __future__ import annotations

import numpy as np

from lambo_ray.mec.instance import Instance


def water_fill(sqrt_c: np.ndarray, a_min: np.ndarray) -> np.ndarray | None:
    """Shares on one server; None when even the minimum shares exceed the capacity."""
    if a_min.size == 0:
        return a_min.copy()
    if not np.all(np.isfinite(a_min)) or a_min.sum() > 1.0 + 1e-12:
        return None
    clamped = np.zeros(a_min.size, dtype=bool)
    for _ in range(a_min.size + 1):
        budget = 1.0 - a_min[clamped].sum()
        free_mass = sqrt_c[~clamped].sum()
        if free_mass <= 0:
            break
        level = free_mass / budget if budget > 0 else np.inf
        newly = ~clamped & (sqrt_c / level < a_min)
        if not newly.any():
            break
        clamped |= newly
    shares = np.where(clamped, a_min, sqrt_c / level if free_mass > 0 else 0.0)
    return shares


def optimal_shares(inst: Instance, target: np.ndarray, *, overflow: str = "fail") -> np.ndarray | None:
    """Latency-optimal shares for every server given the targets.

    When a server's assignment is infeasible (a deadline unreachable there, or the minimum shares
    summing past 1), ``overflow="fail"`` returns None for the whole decision, and
    ``overflow="sqrt_split"`` gives that server the split proportional to sqrt(c_i) (the deadline-free
    latency optimum), so the result is a function of the targets alone (RL reward decomposition).
    """
    if overflow not in ("fail", "sqrt_split"):
        raise ValueError(f"overflow must be 'fail' or 'sqrt_split' (got {overflow!r})")
    target = np.asarray(target)
    share = np.zeros(inst.n_ues)
    a_min_all = inst.min_share()
    sqrt_c = np.sqrt(inst.cycles)
    for j in range(inst.n_servers):
        idx = np.flatnonzero(target == j + 1)
        if idx.size == 0:
            continue
        s = water_fill(sqrt_c[idx], a_min_all[idx, j])
        if s is None:
            if overflow == "fail":
                return None
            s = sqrt_c[idx] / sqrt_c[idx].sum()
        share[idx] = s
    return share
