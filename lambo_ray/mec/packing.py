"""Packing the UEs that must offload: does any feasible decision exist, and one certificate of it.

A UE whose task misses its deadline locally (``c_i / f_i > T_i``) must go to a server j on which it
can still meet the deadline, with at least its minimum share ``a_min_ij``; every other UE can always
run locally. So an instance has a feasible decision exactly when the must-offload UEs can be packed
onto the servers with ``sum_i a_min_ij <= 1`` per server: a generalised-assignment feasibility
problem, NP-hard in general. :func:`pack_must_offload` answers it in three steps, cheapest first:

1. first-fit decreasing (hardest UE first, each onto the server where its minimum share is smallest
   among those with room): microseconds, and enough on almost every generated instance;
2. the same with the UEs ordered by regret (how much worse their second-best server is);
3. an exact HiGHS feasibility MILP over just the must-offload UEs, with a short time limit.

The result is a *plan*: one server per must-offload UE. Decoders use it as a look-ahead: a later
must-offload UE keeps its planned minimum share reserved until it is decided, so no earlier choice can
make the instance infeasible (:mod:`lambo_ray.policy.masks`). Heuristics use it as their placement
of last resort. When the MILP proves that no packing exists the instance is infeasible, and every
method reports that instead of a silently repaired decision; when even the MILP runs out of time the
status is ``unknown``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lambo_ray.mec.instance import Instance

# Capacity slack for round-off, the same as the water-filling feasibility test.
CAP_TOL = 1e-12
MILP_TIME_LIMIT_S = 2.0

FEASIBLE_STATUSES = ("none_needed", "first_fit", "regret_fit", "milp", "label", "local_search")


@dataclass(frozen=True)
class Packing:
    """``plan[i]`` = 0-based server of must-offload UE i, -1 for every other UE (and when no plan)."""

    plan: np.ndarray  # (N,) int64
    must_offload: np.ndarray  # (N,) bool
    status: str  # one of FEASIBLE_STATUSES, or "infeasible" / "unknown"
    reason: str = ""

    @property
    def feasible(self) -> bool:
        return self.status in FEASIBLE_STATUSES

    def reserve(self, a_min: np.ndarray) -> np.ndarray:
        """(N, M) capacity each must-offload UE holds on its planned server (its minimum share)."""
        out = np.zeros_like(a_min, dtype=float)
        rows = np.flatnonzero(self.plan >= 0)
        out[rows, self.plan[rows]] = a_min[rows, self.plan[rows]]
        return out


def fit_in_order(a_min: np.ndarray, order: np.ndarray, free: np.ndarray) -> np.ndarray | None:
    """Servers (0-based) for the rows of ``a_min`` (K, M) taken in ``order``, each on the server with
    the smallest minimum share among those with room; None as soon as one does not fit."""
    free = free.astype(float).copy()
    chosen = np.full(a_min.shape[0], -1)
    for i in order:
        fits = np.flatnonzero(np.isfinite(a_min[i]) & (a_min[i] <= free + CAP_TOL))
        if fits.size == 0:
            return None
        j = fits[np.argmin(a_min[i, fits])]
        free[j] -= a_min[i, j]
        chosen[i] = j
    return chosen


def first_fit_decreasing(a_min: np.ndarray, free: np.ndarray) -> np.ndarray | None:
    """:func:`fit_in_order` with the hardest UE (largest smallest minimum share) first."""
    return fit_in_order(a_min, np.argsort(a_min.min(axis=1), kind="stable")[::-1], free)


def _regret_order(a_min: np.ndarray) -> np.ndarray:
    """UEs with the fewest alternatives first: by the gap between their best and second-best share."""
    srt = np.sort(np.where(np.isfinite(a_min), a_min, 4.0), axis=1)
    second = srt[:, 1] if a_min.shape[1] > 1 else np.full(a_min.shape[0], 4.0)
    return np.lexsort((-srt[:, 0], -(second - srt[:, 0])))


def milp_packing(
    a_min: np.ndarray, time_limit: float = MILP_TIME_LIMIT_S, free: np.ndarray | None = None
) -> tuple[str, np.ndarray | None]:
    """Exact feasibility of packing rows of ``a_min`` (K, M) into capacities ``free`` (default 1) with HiGHS.

    Returns ("milp", servers) when a packing exists, ("infeasible", None) when HiGHS proves none does,
    ("unknown", None) when the time limit stops it first.
    """
    import highspy

    k, m = a_min.shape
    free = np.ones(m) if free is None else np.asarray(free, dtype=float)
    pairs = [
        (i, j) for i in range(k) for j in range(m) if np.isfinite(a_min[i, j]) and a_min[i, j] <= free[j] + CAP_TOL
    ]
    if len({i for i, _ in pairs}) < k:
        return "infeasible", None
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("time_limit", float(time_limit))
    h.setOptionValue("threads", 1)
    inf = highspy.kHighsInf
    for _ in pairs:
        h.addVar(0.0, 1.0)
    h.changeColsIntegrality(
        len(pairs), np.arange(len(pairs), dtype=np.int32), np.full(len(pairs), highspy.HighsVarType.kInteger)
    )
    for i in range(k):  # every UE on exactly one server
        idx = [c for c, (r, _) in enumerate(pairs) if r == i]
        h.addRow(1.0, 1.0, len(idx), np.array(idx, dtype=np.int32), np.ones(len(idx)))
    for j in range(m):  # minimum shares fit every server
        idx = [c for c, (_, s) in enumerate(pairs) if s == j]
        if idx:
            vals = np.array([a_min[pairs[c]] for c in idx])
            h.addRow(-inf, free[j] - 1e-9, len(idx), np.array(idx, dtype=np.int32), vals)
    h.run()
    status = h.getModelStatus()
    if status == highspy.HighsModelStatus.kInfeasible:
        return "infeasible", None
    sol = np.asarray(h.getSolution().col_value)
    if sol.size == len(pairs) and h.getInfo().primal_solution_status == 2:  # a feasible point
        chosen = np.full(k, -1)
        for c, (i, j) in enumerate(pairs):
            if sol[c] > 0.5:
                chosen[i] = j
        load = np.zeros(m)
        np.add.at(load, chosen, a_min[np.arange(k), chosen])
        if np.all(chosen >= 0) and np.all(load <= free + CAP_TOL):
            return "milp", chosen
    return "unknown", None


def pack_must_offload(inst: Instance, time_limit: float = MILP_TIME_LIMIT_S) -> Packing:
    """A packing of the instance's must-offload UEs (module docstring), or why there is none."""
    return pack_rows(inst.min_share(), ~inst.local_feasible(), time_limit)


def pack_rows(
    a_min: np.ndarray, must: np.ndarray, time_limit: float = MILP_TIME_LIMIT_S, free: np.ndarray | None = None
) -> Packing:
    """:func:`pack_must_offload` on raw arrays: ``a_min`` (N, M), ``must`` (N,) bool, the capacity ``free``
    (M,) left on each server (default: all of it)."""
    n, m = a_min.shape
    free = np.ones(m) if free is None else np.asarray(free, dtype=float)
    plan = np.full(n, -1, dtype=np.int64)
    rows = np.flatnonzero(must)
    if rows.size == 0:
        return Packing(plan, must.copy(), "none_needed")
    sub = a_min[rows]
    unreachable = rows[np.min(np.where(np.isfinite(sub), sub, np.inf), axis=1) > 1 + CAP_TOL]
    if unreachable.size:
        return Packing(
            plan, must.copy(), "infeasible", f"UE {int(unreachable[0])} misses its deadline locally and on every server"
        )
    for status, order in (
        ("first_fit", np.argsort(sub.min(axis=1), kind="stable")[::-1]),
        ("regret_fit", _regret_order(sub)),
    ):
        chosen = fit_in_order(sub, order, free)
        if chosen is not None:
            plan[rows] = chosen
            return Packing(plan, must.copy(), status)
    status, chosen = milp_packing(sub, time_limit, free)
    if chosen is not None:
        plan[rows] = chosen
        return Packing(plan, must.copy(), status)
    if status == "infeasible":
        return Packing(
            plan,
            must.copy(),
            "infeasible",
            f"the {rows.size} UEs that miss their deadline locally cannot all fit on the servers "
            "(the minimum shares they need exceed the capacity; proven by a MILP)",
        )
    return Packing(
        plan,
        must.copy(),
        "unknown",
        f"no packing of the {rows.size} UEs that must offload was found within {time_limit:g} s",
    )


def infeasible_stats(packing: Packing) -> dict[str, str]:
    """Decision stats of a method that found no feasible decision: ``status`` and the reason, which says
    whether none exists (proven) or none was found in time."""
    reason = packing.reason or "no feasible decision was found"
    return {"status": "infeasible", "infeasible_reason": reason, "packing": packing.status}
