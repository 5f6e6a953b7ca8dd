"""Consensus repair for ``min_energy``: where good decisions agree, fix; where they differ, solve exactly.

``min_energy`` ignores shares, so once the targets of most UEs are fixed, the rest is a small
generalised assignment problem: binary x_iq for each free UE i and option q (local if it meets the
deadline, or a server where its deadline can be met), one option per UE, the minimum shares of each
server's free UEs within what the fixed UEs leave, minimum total energy. HiGHS solves that in
milliseconds when a few dozen UEs are free. The free UEs are those on which the polished proposals of
:func:`lambo_ray.experts.ils.iterated_local_search` disagree (the policy's samples are diverse exactly
where the decision is hard) and the others on the servers those disputes touch, so the exact model works
where local search's moves stall: on the capacity-bound exchanges of several UEs at once. The result is
never worse than the best proposal, which stays a feasible point of the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lambo_ray.experts.placement import CAP_TOL, PlacementTables

MAX_FREE = 60  # UEs left free at most (the most disputed first): keeps the model a few milliseconds


def disputed(targets: Sequence[np.ndarray]) -> np.ndarray:
    """Indices of the UEs whose target differs between the given assignments, most disputed first."""
    stack = np.stack(targets)
    distinct = np.array([len(set(col)) for col in stack.T])
    idx = np.flatnonzero(distinct > 1)
    return idx[np.argsort(-distinct[idx], kind="stable")]


def free_set(tables: PlacementTables, best: np.ndarray, targets: Sequence[np.ndarray]) -> np.ndarray:
    """The UEs the sub-model re-decides: the disputed ones, then (an improving exchange usually moves
    several UEs through the same servers) the others on the servers the disputes touch and the local
    UEs that could go there; at most ``MAX_FREE``."""
    first = disputed(targets)
    if first.size == 0:
        return first
    stack = np.stack(targets)[:, first]
    servers = np.unique(stack[stack > 0]) - 1
    on = np.flatnonzero(np.isin(best - 1, servers) & (best > 0))
    reach = np.flatnonzero((best == 0) & np.any(np.isfinite(tables.a_min[:, servers]), axis=1))
    rest = np.setdiff1d(np.concatenate([on, reach]), first)
    return np.concatenate([first, rest])[:MAX_FREE]


def consensus_repair(
    tables: PlacementTables, best: np.ndarray, targets: Sequence[np.ndarray], time_limit: float = 0.05
) -> np.ndarray | None:
    """A better assignment than ``best`` found by the exact sub-model over the disputed UEs, or None."""
    if tables.latency or len(targets) < 2:
        return None
    return resolve_subset(tables, best, free_set(tables, best, targets), time_limit)


def server_pair_rounds(
    tables: PlacementTables, best: np.ndarray, rng: np.random.Generator, time_left: Callable[[], float | None]
) -> tuple[np.ndarray, int]:
    """Large-neighbourhood rounds for ``min_energy``: free the UEs of two servers (and the local UEs that
    could go there, at most ``MAX_FREE``), re-decide them exactly, keep any improvement; stop after every
    pair has been tried once without one, or when ``time_left()`` reaches 0. Returns the assignment and
    the number of improving rounds."""
    m = tables.n_servers
    pairs = [(a, b) for a in range(m) for b in range(a + 1, m)] or [(0, 0)]
    best, cost, wins, quiet = best.copy(), _energy(tables, best), 0, 0
    while quiet < len(pairs):
        left = time_left()
        if left is not None and left <= 0:
            break
        a, b = pairs[int(rng.integers(len(pairs)))]
        servers = np.array(sorted({a, b}))
        on = np.flatnonzero(np.isin(best - 1, servers) & (best > 0))
        local = np.flatnonzero((best == 0) & np.any(np.isfinite(tables.a_min[:, servers]), axis=1))
        free = np.concatenate([on, local])
        if free.size > MAX_FREE:
            free = rng.choice(free, MAX_FREE, replace=False)
        best, cost, won = _improve_subset(tables, best, cost, free, left, 0.05)
        wins, quiet = (wins + 1, 0) if won else (wins, quiet + 1)
    return best, wins


@dataclass(frozen=True)
class Relaxation:
    """The LP relaxation of the whole ``min_energy`` model (:func:`lp_relaxation`)."""

    x: np.ndarray  # (N, M+1) fractional assignment, column 0 = local
    value: float  # its objective: a lower bound on the optimum
    reduced: np.ndarray  # (N, M+1) reduced costs, +inf where the option does not exist


def lp_relaxation(tables: PlacementTables) -> Relaxation | None:
    """The LP relaxation of the whole ``min_energy`` model, or None if HiGHS does not solve it. A
    generalised assignment LP has at most M fractional UEs at a vertex, so x is an almost integral map
    of where the optimum lies: a few tens of milliseconds at N = 200, M = 8, ~1 ms at N = 50."""
    import highspy

    n, m = tables.n_ues, tables.n_servers
    room = np.ones(m)
    ue, opt = _columns(tables, range(n), room)
    h = _highs(ue.size, tables.fixed[ue, opt], integral=False, time_limit=None)
    _add_assignment_rows(h, tables, ue, opt, room)
    h.run()
    if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        return None
    sol = h.getSolution()
    x = np.zeros((n, m + 1))
    x[ue, opt] = np.asarray(sol.col_value)
    reduced = np.full((n, m + 1), np.inf)
    reduced[ue, opt] = np.asarray(sol.col_dual)
    return Relaxation(x, float(h.getInfo().objective_function_value), reduced)


def reduced_cost_keep(tables: PlacementTables, best: np.ndarray, relaxed: Relaxation) -> np.ndarray:
    """(N, M+1) options that may be part of an assignment better than ``best``: an option whose reduced
    cost alone lifts the LP bound above ``best``'s energy cannot (``best``'s own options are kept)."""
    energy = _energy(tables, best)
    slack = max(energy - relaxed.value, 0.0) + 1e-9 * max(abs(energy), 1.0)
    keep = relaxed.reduced <= slack
    keep[np.arange(tables.n_ues), best] = True
    return keep


def exact_polish(
    tables: PlacementTables, best: np.ndarray, relaxed: Relaxation, time_limit: float | None
) -> tuple[np.ndarray | None, bool]:
    """The whole ``min_energy`` model solved from ``best``, after reduced-cost fixing
    (:func:`reduced_cost_keep`: about half the columns go at N = 50 once ``best`` is polished).
    Returns (a better assignment or None, whether HiGHS proved the result optimal, to its default
    relative gap of 1e-4). At N = 50, M = 4 it proves in ~5 ms median, faster than the neighbourhood
    rounds reach the same decisions; in larger cells the time limit usually ends it first and the
    incumbent HiGHS returns is still never worse than ``best``."""
    keep = reduced_cost_keep(tables, best, relaxed)
    ue, opt = np.nonzero(keep)
    found, proved = _solve_columns(tables, best, ue, opt.astype(np.int64), np.ones(tables.n_servers), time_limit)
    if found is not None and _energy(tables, found) < _energy(tables, best) * (1 - 1e-12):
        return found, proved
    return None, proved


def lp_guided_rounds(
    tables: PlacementTables,
    best: np.ndarray,
    relaxed: Relaxation,
    rng: np.random.Generator,
    time_left: Callable[[], float | None],
    rounds: int = 4,
    fill_size: int = 8,
) -> tuple[np.ndarray, int]:
    """Relaxation-induced neighbourhoods (RINS): free the UEs whose target the LP relaxation does not
    share with ``best`` and the UEs on the servers those disagreements involve (a random ``MAX_FREE``),
    re-decide them exactly, keep any improvement; ``rounds`` draws at most, stopping after two draws
    without one. Where the LP and the incumbent agree the optimum almost always agrees too, so these
    sets hold the exchanges that single moves, swaps and server pairs cannot find."""
    best, cost, wins, quiet = best.copy(), _energy(tables, best), 0, 0
    rows, x_lp = np.arange(tables.n_ues), relaxed.x
    for draw in range(rounds):
        left = time_left()
        if quiet >= 2 or (left is not None and left <= 0):
            break
        agree = x_lp[rows, best]
        first = np.flatnonzero(agree < 1.0 - 1e-6)
        if first.size == 0:
            break
        first = first[np.argsort(agree[first], kind="stable")][:MAX_FREE]
        touched = set((best[first][best[first] > 0] - 1).tolist())
        touched |= set((np.nonzero(x_lp[first, 1:] > 1e-6)[1]).tolist())
        servers = np.array(sorted(touched), dtype=np.int64)
        on = np.flatnonzero(np.isin(best - 1, servers) & (best > 0))
        rest = np.setdiff1d(on, first)
        fill = rng.permutation(rest)[: min(fill_size * draw, MAX_FREE - first.size)]
        free = np.concatenate([first, fill])
        best, cost, won = _improve_subset(tables, best, cost, free, left, 0.1)
        wins, quiet = (wins + 1, 0) if won else (wins, quiet + 1)
    return best, wins


def _improve_subset(
    tables: PlacementTables, best: np.ndarray, cost: float, free: np.ndarray, left: float | None, cap: float
) -> tuple[np.ndarray, float, bool]:
    """One neighbourhood: re-decide ``free`` exactly (at most ``cap`` seconds, and what is ``left``) and
    keep the result only if it lowers the energy; returns (assignment, energy, improved)."""
    found = resolve_subset(tables, best, free, cap if left is None else max(min(left, cap), 0.005))
    if found is not None and _energy(tables, found) < cost * (1 - 1e-12):
        return found, _energy(tables, found), True
    return best, cost, False


def _energy(tables: PlacementTables, target: np.ndarray) -> float:
    return float(tables.fixed[np.arange(tables.n_ues), target].sum())


def resolve_subset(tables: PlacementTables, best: np.ndarray, free: np.ndarray, time_limit: float) -> np.ndarray | None:
    """``best`` with the UEs ``free`` re-decided by the exact min_energy sub-model (module docstring), or
    None when HiGHS returns no feasible point in time."""
    if free.size < 2:
        return None
    fixed = np.setdiff1d(np.arange(tables.n_ues), free)
    load = np.zeros(tables.n_servers)
    on = fixed[best[fixed] > 0]
    np.add.at(load, best[on] - 1, tables.a_min[on, best[on] - 1])
    room = 1.0 - load
    ue, opt = _columns(tables, free, room)
    return _solve_columns(tables, best, ue, opt, room, time_limit)[0]


def _solve_columns(
    tables: PlacementTables,
    best: np.ndarray,
    ue: np.ndarray,
    opt: np.ndarray,
    room: np.ndarray,
    time_limit: float | None,
) -> tuple[np.ndarray | None, bool]:
    """The assignment MILP over the columns (``ue``, ``opt``) within ``room``, ``best`` as the incumbent
    (it must be a feasible point of the model); returns (``best`` with those UEs re-decided, or None
    without a feasible point, and whether HiGHS proved optimality)."""
    import highspy

    h = _highs(ue.size, tables.fixed[ue, opt], integral=True, time_limit=time_limit)
    _add_assignment_rows(h, tables, ue, opt, room)
    sol = highspy.HighsSolution()
    sol.col_value = (best[ue] == opt).astype(float).tolist()
    h.setSolution(sol)
    h.run()
    values = np.asarray(h.getSolution().col_value)
    if values.size != ue.size or h.getInfo().primal_solution_status != 2:
        return None, False
    out = best.copy()
    chosen = values > 0.5
    out[ue[chosen]] = opt[chosen]
    return out, h.getModelStatus() == highspy.HighsModelStatus.kOptimal


def _highs(n_cols: int, cost: np.ndarray, *, integral: bool, time_limit: float | None) -> Any:
    """A quiet single-threaded HiGHS model with ``n_cols`` columns in [0, 1] of the given costs."""
    import highspy

    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("threads", 1)
    if time_limit is not None:
        h.setOptionValue("time_limit", float(time_limit))
    idx = np.arange(n_cols, dtype=np.int32)
    h.addVars(n_cols, np.zeros(n_cols), np.ones(n_cols))
    h.changeColsCost(n_cols, idx, np.asarray(cost, dtype=float))
    if integral:
        h.changeColsIntegrality(n_cols, idx, np.full(n_cols, highspy.HighsVarType.kInteger))
    return h


def _add_assignment_rows(h: Any, tables: PlacementTables, ue: np.ndarray, opt: np.ndarray, room: np.ndarray) -> None:
    """One option per UE of ``ue``; on every server, the minimum shares of its UEs within ``room``. All
    rows in one ``addRows`` call (one call per row cost ~1 ms per model at N = 50)."""
    import highspy

    by_ue = np.argsort(ue, kind="stable")
    counts = np.unique(ue[by_ue], return_counts=True)[1]
    servers = [(j, np.flatnonzero(opt == j + 1)) for j in range(tables.n_servers)]
    servers = [(j, cols) for j, cols in servers if cols.size]
    lengths = np.concatenate([counts, [cols.size for _, cols in servers]]).astype(np.int64)
    index = np.concatenate([by_ue, *(cols for _, cols in servers)]).astype(np.int32)
    value = np.concatenate([np.ones(by_ue.size), *(tables.a_min[ue[cols], j] for j, cols in servers)])
    lower = np.concatenate([np.ones(counts.size), np.full(len(servers), -highspy.kHighsInf)])
    upper = np.concatenate([np.ones(counts.size), [room[j] + CAP_TOL for j, _ in servers]])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int32)
    h.addRows(lengths.size, lower, upper, index.size, starts, index, value.astype(float))


def _columns(tables: PlacementTables, rows: Iterable[int], room: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The model's columns over ``rows``: (UE, option) pairs, one per option a UE can take within ``room``,
    UE by UE in the order given, options ascending (0 = local)."""
    rows = np.fromiter(rows, dtype=np.int64)
    amin = tables.a_min[rows]
    with np.errstate(invalid="ignore"):
        fits = np.isfinite(amin) & (amin <= room + CAP_TOL)
    which, opt = np.nonzero(np.concatenate([tables.local_ok[rows][:, None], fits], axis=1))
    return rows[which], opt.astype(np.int64)
