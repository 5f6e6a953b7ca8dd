"""Heuristic baselines: all-local, all-offload, greedy, and local search.

* ``all_local``  every task on its UE (always feasible on generated instances: deadlines >= local time,
  except under the ``deadline`` drift, where it is reported infeasible like any other decision).
* ``all_offload`` every UE offloaded, server drawn at random (seeded) or the best-rate one, the
  server split *equally* among its UEs. A deliberately naive stand-in: it may break deadlines or be
  worse than local, and the evaluator says so; it is never repaired.
* ``greedy``  one constructive pass: UEs that must offload are placed first (hardest first, best
  server whose choice still lets the rest fit first-fit-decreasing), then every other UE, in order of
  its stand-alone benefit, goes where the exact objective change (at water-filled shares) is best.
* ``local_search``  greedy, then best-improvement single-UE moves and pairwise swaps until none
  improves. :func:`improve` runs that descent from any assignment (the policy's ``refine`` decode).

Every method except ``all_offload`` returns a feasible decision whenever the instance has one: when the
first-fit look-ahead cannot place the UEs that must offload, they are placed as an exact packing says
(:mod:`lambo_ray.mec.packing`; a HiGHS feasibility model is the last resort). An instance without any
feasible decision gets ``status: "infeasible"`` and the reason in the decision's stats.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from lambo_ray.errors import LamboInputError
from lambo_ray.experts.base import Expert, register
from lambo_ray.experts.placement import CAP_TOL, Assignment, PlacementTables, build_tables
from lambo_ray.mec.instance import Instance, check_prompt
from lambo_ray.mec.packing import first_fit_decreasing, infeasible_stats, pack_must_offload, pack_rows
from lambo_ray.mec.shares import optimal_shares

# An improvement must exceed this fraction of the current cost: float noise never cycles the search.
REL_TOL = 1e-10


# --------------------------------------------------------------------------- helpers
def _tol(a: Assignment) -> float:
    return REL_TOL * max(abs(a.cost), 1e-30)


def _place_must_offload(a: Assignment) -> bool:
    """Place every local UE that cannot meet its deadline locally, hardest first, on the server with
    the best exact cost change among those that leave the remaining ones placeable first-fit
    decreasing. When that greedy look-ahead gets stuck (first-fit is a heuristic), the UEs are placed
    as an exact packing says (:func:`lambo_ray.mec.packing.pack_rows`, HiGHS as the last resort), so
    this succeeds whenever the must-offload UEs fit at all next to what ``a`` already offloads.
    Returns whether the result is feasible."""
    t = a.tables
    start = a.target.copy()
    if _place_by_look_ahead(a):
        return True
    a.reset(start)
    pending = (a.target == 0) & ~t.local_ok
    packing = pack_rows(t.a_min, pending, free=1.0 - a.load)
    if not packing.feasible:
        return False
    for i in np.flatnonzero(pending):
        a.move(int(i), int(packing.plan[i]) + 1)
    return a.feasible


def _place_by_look_ahead(a: Assignment) -> bool:
    """The greedy part of :func:`_place_must_offload`; returns whether every UE was placed feasibly."""
    t = a.tables
    pending = np.flatnonzero((a.target == 0) & ~t.local_ok)
    pending = pending[np.argsort(t.a_min[pending].min(axis=1), kind="stable")[::-1]]
    for pos, i in enumerate(pending):
        rest = t.a_min[pending[pos + 1 :]]
        free = 1.0 - a.load
        fits = np.flatnonzero(np.isfinite(t.a_min[i]) & (t.a_min[i] <= free + CAP_TOL))
        if fits.size == 0:
            return False
        deltas = np.array([a.move_delta(i, j + 1) for j in fits])
        choice = None
        for j in fits[np.argsort(deltas, kind="stable")]:
            after = free.copy()
            after[j] -= t.a_min[i, j]
            if first_fit_decreasing(rest, after) is not None:
                choice = int(j)
                break
        if choice is None:
            return False
        a.move(i, choice + 1)
    return a.feasible


def repair(a: Assignment) -> bool:
    """Make an infeasible starting assignment feasible: UEs on a server that cannot meet their deadline
    go local, overloaded servers shed UEs that may run locally (largest minimum share first) before any
    that must offload, then UEs that must offload are placed as in greedy. If the offloaders that were
    kept leave them no room, the must-offload UEs are placed from scratch (greedy's first phase), so
    repair succeeds whenever they fit at all. Returns whether the result is feasible."""
    t = a.tables
    target = a.target.copy()
    off = np.flatnonzero(target > 0)
    target[off[~np.isfinite(t.a_min[off, target[off] - 1])]] = 0
    for j in range(t.n_servers):
        idx = np.flatnonzero(target == j + 1)
        idx = idx[np.lexsort((t.a_min[idx, j], t.local_ok[idx]))]  # kept first: must-offload, then small shares
        while idx.size and t.a_min[idx, j].sum() > 1.0 + CAP_TOL:
            target[idx[-1]] = 0
            idx = idx[:-1]
    a.reset(target)
    if _place_must_offload(a):
        return True
    a.reset(np.zeros(t.n_ues, dtype=np.int64))
    return _place_must_offload(a)


# --------------------------------------------------------------------------- greedy
def greedy_assignment(tables: PlacementTables) -> tuple[Assignment, bool]:
    """One constructive pass (see module docstring). Returns the assignment and whether the
    must-offload placement succeeded."""
    n = tables.n_ues
    a = Assignment(tables, np.zeros(n, dtype=np.int64))
    placed = _place_must_offload(a)
    # Stand-alone benefit of offloading UE i: best (local - offloaded) cost with the server to itself.
    alone = tables.fixed[:, :1] - tables.fixed[:, 1:] - tables.work
    alone = np.where(np.isfinite(tables.a_min) & (tables.a_min <= 1.0), alone, -np.inf)
    benefit = alone.max(axis=1)
    todo = np.flatnonzero((a.target == 0) & (benefit > 0))
    for i in todo[np.argsort(-benefit[todo], kind="stable")]:
        best = a.best_move_of(int(i), _tol(a))
        if best is not None:
            a.move(int(i), best[1])
    return a, placed


# --------------------------------------------------------------------------- local search
@dataclass
class SearchStats:
    moves: int = 0
    swaps: int = 0
    chains: int = 0
    stopped: str = "local_optimum"  # or "max_moves", "time_limit"


def descend(
    a: Assignment,
    *,
    swaps: bool = True,
    chains: bool = False,
    max_moves: int | None = None,
    time_limit: float | None = None,
) -> SearchStats:
    """Best-improvement descent in place: apply the best single move while one improves, else the best
    swap, else (``chains``) the best ejection chain (:mod:`lambo_ray.experts.chains`); stop at a local
    optimum of these neighbourhoods, after ``max_moves`` steps, or at ``time_limit`` seconds. ``a`` must
    be feasible (every step keeps it so). The ``local_search`` baseline is moves and swaps only."""
    from lambo_ray.experts.chains import apply_chain, best_chain

    start = time.perf_counter()
    stats = SearchStats()
    while True:
        if max_moves is not None and stats.moves + stats.swaps + stats.chains >= max_moves:
            stats.stopped = "max_moves"
            break
        if time_limit is not None and time.perf_counter() - start > time_limit:
            stats.stopped = "time_limit"
            break
        tol = _tol(a)
        best = a.best_move(tol)
        if best is not None:
            a.move(*best[1])
            stats.moves += 1
            continue
        best = a.best_swap(tol) if swaps else None
        if best is not None:
            a.swap(*best[1])
            stats.swaps += 1
            continue
        chain = best_chain(a, tol) if chains else None
        if chain is None:
            break
        apply_chain(a, *chain[1])
        stats.chains += 1
    return stats


def local_search_assignment(tables: PlacementTables) -> Assignment | None:
    """The default ``local_search`` baseline's assignment: the greedy heuristic, then moves and swaps to a
    local optimum; None when the heuristic finds nothing feasible. Also the floor of the policy's
    ``search`` and the exact expert's first incumbent, so all three mean the same decision."""
    a, _ = greedy_assignment(tables)
    if not a.feasible:
        return None
    descend(a)
    return a


def improve(
    inst: Instance,
    prompt: str,
    target: np.ndarray,
    max_moves: int | None = None,
    time_limit: float | None = None,
    *,
    swaps: bool = True,
) -> np.ndarray:
    """Local search from any assignment; returns the improved targets (shares: ``optimal_shares``).

    An infeasible start is first repaired (see :func:`repair`), falling back to greedy if that fails;
    the result is never worse than a feasible start.
    """
    check_prompt(prompt)
    target = np.asarray(target, dtype=np.int64)
    if target.shape != (inst.n_ues,) or np.any((target < 0) | (target > inst.n_servers)):
        raise LamboInputError(f"target must hold {inst.n_ues} values in 0..{inst.n_servers}", where="target")
    tables = build_tables(inst, prompt)
    a = Assignment(tables, target)
    if not a.feasible and not repair(a):
        a, _ = greedy_assignment(tables)
    if a.feasible:
        descend(a, swaps=swaps, max_moves=max_moves, time_limit=time_limit)
    return a.target.copy()


# --------------------------------------------------------------------------- experts
def _shares_or_zero(inst: Instance, target: np.ndarray) -> np.ndarray:
    """Water-filled shares; for an infeasible assignment (only when no placement was found) equal
    shares, so the evaluator reports the violation instead of us hiding it."""
    share = optimal_shares(inst, target)
    return share if share is not None else equal_shares(target, inst.n_servers)


def equal_shares(target: np.ndarray, n_servers: int) -> np.ndarray:
    counts = np.bincount(target, minlength=n_servers + 1)
    return np.where(target > 0, 1.0 / np.maximum(counts[target], 1), 0.0)


@register("all_local")
class AllLocal(Expert):
    name = "all_local"

    def _solve(self, inst: Instance, prompt: str, time_limit: float | None):
        n = inst.n_ues
        return np.zeros(n, dtype=np.int64), np.zeros(n), {}


@register("all_offload")
class AllOffload(Expert):
    """Every UE offloaded, equal shares per server. ``server``: "random" (seeded; the same draw for
    every instance of a given N and M) or "best_rate" (each UE's strongest uplink)."""

    name = "all_offload"

    def __init__(self, server: str = "random", seed: int = 0) -> None:
        if server not in ("random", "best_rate"):
            raise LamboInputError(
                f"unknown server choice {server!r}; expected random or best_rate", where="all_offload.server"
            )
        self.server = server
        self.seed = seed

    def _solve(self, inst: Instance, prompt: str, time_limit: float | None):
        if self.server == "random":
            target = np.random.default_rng(self.seed).integers(1, inst.n_servers + 1, size=inst.n_ues)
        else:
            target = np.argmax(inst.rate_bps, axis=1) + 1
        target = target.astype(np.int64)
        return target, equal_shares(target, inst.n_servers), {"server": self.server}


@register("greedy")
class Greedy(Expert):
    """One constructive pass; ``time_limit`` is not needed (O(N M) water-fills)."""

    name = "greedy"

    def _solve(self, inst: Instance, prompt: str, time_limit: float | None):
        tables = build_tables(inst, prompt)
        a, placed = greedy_assignment(tables)
        stats: dict[str, Any] = {"model_objective": a.objective}
        if not a.feasible:
            stats.update(infeasible_stats(pack_must_offload(inst)))
        return a.target, _shares_or_zero(inst, a.target), stats


@dataclass
class LocalSearchConfig:
    start: str = "greedy"  # or "all_local" (the classic calibration start)
    swaps: bool = True
    max_moves: int | None = None


@register("local_search")
class LocalSearch(Expert):
    name = "local_search"

    def __init__(self, config: LocalSearchConfig | None = None, **overrides: Any) -> None:
        cfg = config or LocalSearchConfig()
        for key, value in overrides.items():
            if not hasattr(cfg, key):
                raise LamboInputError(f"unknown local_search option {key!r}", where="local_search")
            setattr(cfg, key, value)
        if cfg.start not in ("greedy", "all_local"):
            raise LamboInputError(
                f"unknown start {cfg.start!r}; expected greedy or all_local", where="local_search.start"
            )
        self.config = cfg

    def _solve(self, inst: Instance, prompt: str, time_limit: float | None):
        tables = build_tables(inst, prompt)
        if self.config.start == "greedy":
            a, _ = greedy_assignment(tables)
        else:
            a = Assignment(tables, np.zeros(inst.n_ues, dtype=np.int64))
            if not a.feasible:
                _place_must_offload(a)
        start_objective = a.objective
        stats: dict[str, Any] = {"start_objective": start_objective}
        if a.feasible:
            s = descend(a, swaps=self.config.swaps, max_moves=self.config.max_moves, time_limit=time_limit)
            stats.update(moves=s.moves, swaps=s.swaps, stopped=s.stopped)
            if s.stopped == "time_limit":
                stats["status"] = "time_limit"
        else:
            stats.update(infeasible_stats(pack_must_offload(inst)))
        stats["model_objective"] = a.objective
        return a.target, _shares_or_zero(inst, a.target), stats
