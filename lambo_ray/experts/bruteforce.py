"""Brute force: every one of the (M+1)^N assignments, the independent reference for tests.

Nothing here is clever on purpose: each assignment is completed with the latency-optimal shares of
:func:`lambo_ray.mec.shares.optimal_shares` (which also meet every deadline whenever any shares can,
so they are the right shares for both prompts) and scored by the evaluator
(:func:`lambo_ray.mec.evaluator.objectives_batch`). The only shortcut is a vectorised pre-filter that
drops assignments for which no shares exist (a UE local past its deadline, or offloaded where its
deadline is unreachable, or minimum shares overflowing a server); it is a necessary condition only,
and the evaluator still decides feasibility of everything that passes it.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from lambo_ray.errors import LamboInputError
from lambo_ray.experts.base import Expert, register
from lambo_ray.mec.evaluator import objectives_batch
from lambo_ray.mec.instance import Instance
from lambo_ray.mec.shares import optimal_shares

MAX_ASSIGNMENTS = 2_000_000
CHUNK = 4096


def n_assignments(inst: Instance) -> int:
    return (inst.n_servers + 1) ** inst.n_ues


def assignment_chunks(n_ues: int, n_servers: int, chunk: int = CHUNK):
    """All targets in {0..M}^N, in lexicographic order, as (K, N) int arrays of at most ``chunk`` rows."""
    it = itertools.product(range(n_servers + 1), repeat=n_ues)
    while True:
        block = list(itertools.islice(it, chunk))
        if not block:
            return
        yield np.asarray(block, dtype=np.int64).reshape(len(block), n_ues)


def admissible(inst: Instance, targets: np.ndarray) -> np.ndarray:
    """Necessary condition for shares to exist, vectorised over the K rows of ``targets``."""
    a_min = np.concatenate([np.zeros((inst.n_ues, 1)), inst.min_share()], axis=1)  # column 0: local
    rows = np.arange(inst.n_ues)[None, :]
    need = a_min[rows, targets]  # (K, N): minimum share of each UE where it is placed (0 if local)
    ok = np.all(np.isfinite(need), axis=1)
    ok &= np.all((targets > 0) | inst.local_feasible()[None, :], axis=1)
    load = np.zeros((targets.shape[0], inst.n_servers + 1))
    np.add.at(
        load,
        (np.repeat(np.arange(targets.shape[0]), inst.n_ues), targets.ravel()),
        np.where(np.isfinite(need), need, 0.0).ravel(),
    )
    ok &= np.all(load[:, 1:] <= 1.0 + 1e-12, axis=1)
    return ok


def brute_force(inst: Instance, prompt: str) -> tuple[np.ndarray, np.ndarray, float, int]:
    """(target, share, objective, number of feasible assignments) of the best assignment.

    Raises LamboInputError when there are more than MAX_ASSIGNMENTS assignments; returns an all-local
    decision with objective inf when none is feasible.
    """
    total = n_assignments(inst)
    if total > MAX_ASSIGNMENTS:
        raise LamboInputError(
            f"brute force would enumerate (M+1)^N = {inst.n_servers + 1}^{inst.n_ues} = {total:.3g} "
            f"assignments (limit {MAX_ASSIGNMENTS:.0e}); use a smaller instance",
            where="instance",
        )
    best_t, best_s, best_obj, n_feasible = np.zeros(inst.n_ues, np.int64), np.zeros(inst.n_ues), np.inf, 0
    for targets in assignment_chunks(inst.n_ues, inst.n_servers):
        targets = targets[admissible(inst, targets)]
        shares = [optimal_shares(inst, t) for t in targets]
        keep = np.array([s is not None for s in shares], dtype=bool)
        if not keep.any():
            continue
        targets = targets[keep]
        share_arr = np.stack([s for s in shares if s is not None])
        obj, feasible = objectives_batch(inst, targets, share_arr, prompt)
        n_feasible += int(feasible.sum())
        obj = np.where(feasible, obj, np.inf)
        k = int(np.argmin(obj))
        if obj[k] < best_obj:
            best_t, best_s, best_obj = targets[k].copy(), share_arr[k].copy(), float(obj[k])
    return best_t, best_s, best_obj, n_feasible


@register("brute_force")
class BruteForceExpert(Expert):
    """Exhaustive enumeration; refuses instances with more than 2e6 assignments."""

    name = "brute_force"

    def _solve(
        self, inst: Instance, prompt: str, time_limit: float | None
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        target, share, obj, n_feasible = brute_force(inst, prompt)
        status = "optimal" if np.isfinite(obj) else "infeasible"
        return (
            target,
            share,
            {
                "status": status,
                "proven_optimal": status == "optimal",
                "gap": 0.0 if status == "optimal" else None,
                "lower_bound": obj if status == "optimal" else None,
                "n_assignments": n_assignments(inst),
                "n_feasible": n_feasible,
            },
        )
