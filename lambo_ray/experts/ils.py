"""Iterated local search over assignments: polish starts, then perturb the best and descend again.

The engine behind the policy's ``search`` decode (:mod:`lambo_ray.policy.search`, where the starts are
the policy's proposals) and behind training labels for cells too large for the exact expert
(:mod:`lambo_ray.rl.labels`, where the start is the greedy heuristic's decision):

1. every start is made feasible if needed (:func:`~lambo_ray.experts.heuristics.repair`) and polished by
   best-improvement descent over moves and swaps, plus ejection chains for ``min_latency`` (for
   ``min_energy`` step 2 does their work faster);
2. ``min_energy``: the whole model, solved exactly from the best so far after reduced-cost fixing
   (:func:`~lambo_ray.experts.consensus.exact_polish`). At N = 50, M = 4 it proves the optimum in ~5 ms
   median, and the search stops there. Where the fixing leaves more than ``EXACT_MAX_FREE`` UEs with a
   choice (N = 200 cells) it rarely finishes in a budget, and the rounded LP optimum becomes one more
   start instead. Otherwise, in the time left: the UEs on which the polished
   results disagree re-decided exactly by a small MILP, the rest fixed; the UEs on which the LP
   relaxation disagrees with the best (relaxation-induced neighbourhoods); the UEs of two servers at a
   time, until no pair improves or the budget ends. Measured on tuning instances (seeds 61 000 /
   62 000, not the benchmarks'): at N = 50 the polish took the mean gap of a 15 ms search from ~0.01 %
   to 0.0014 % in less time (chains out of the polishing pays for it); at N = 200, M = 8 with 0.4 s its
   results averaged 0.12 % better than the neighbourhoods alone;
3. ``kicks`` rounds from the best so far: relocate a few random UEs to random feasible targets, descend
   again, keep the result if it is better.

Every step stays feasible. Randomness comes only from ``rng``, so the result is deterministic for a
seed unless ``time_budget_s`` cuts the work short (``budget_hit``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lambo_ray.experts.consensus import (
    Relaxation,
    consensus_repair,
    exact_polish,
    lp_guided_rounds,
    lp_relaxation,
    reduced_cost_keep,
    server_pair_rounds,
)
from lambo_ray.experts.heuristics import descend, repair
from lambo_ray.experts.placement import CAP_TOL, Assignment, PlacementTables

KICK_SIZE = 3  # UEs relocated per perturbation
LP_GUIDED = True  # step 2's LP-guided neighbourhoods (a switch to measure what they earn)
LP_ROUND = True  # step 2's rounded LP optimum as one more start (a switch to measure what it earns)
EXACT_SHARE = 1.0  # fraction of the time left that step 2's exact polish may take (0: skip it)
EXACT_CAP_S = 0.2  # its limit when the search has no budget
# Step 2's exact polish only while reduced-cost fixing leaves at most this many UEs with a choice; above
# it, the rounded LP optimum is the extra start instead. On tuning cells (seeds 62 000; 0.45 s, k = 8)
# with 8 to 97 such UEs (N = 100) the polish proves or gains most (N = 100, M = 4: 0.07 % against 0.18 %
# without it); with 160 to 196 (N = 200, M = 4 or 8) it rarely finishes, and the rounded LP start with
# the neighbourhoods did better in the time (N = 200, M = 8: 0.32 % against 0.41 % with the polish after
# the rounded start and 0.56 % with neither).
EXACT_MAX_FREE = 150


@dataclass
class Clock:
    """A wall-time budget (None: unlimited)."""

    deadline: float | None

    @classmethod
    def start(cls, budget_s: float | None) -> Clock:
        return cls(None if budget_s is None else time.perf_counter() + budget_s)

    def left(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.perf_counter())

    def up(self) -> bool:
        return self.deadline is not None and time.perf_counter() >= self.deadline


@dataclass
class IlsResult:
    cost: float  # unscaled total cost (PlacementTables.scale * cost = objective)
    target: np.ndarray
    winner: str  # label of the start the best came from, or "kick_<n>"
    polished: int
    kicks: int
    budget_hit: bool


def _consensus(
    tables: PlacementTables, best: tuple[float, np.ndarray, str], results: list[np.ndarray], clock: Clock
) -> tuple[float, np.ndarray, str]:
    """min_energy: the exact sub-model over the UEs the polished results disagree on (consensus.py)."""
    if tables.latency or clock.up():
        return best
    left = clock.left()
    target = consensus_repair(tables, best[1], results, 0.05 if left is None else max(min(left, 0.05), 0.005))
    if target is None:
        return best
    a = Assignment(tables, target)
    if a.feasible and a.cost < best[0] * (1 - 1e-12):
        return (a.cost, a.target.copy(), "consensus")
    return best


def _exact(
    tables: PlacementTables, best: tuple[float, np.ndarray, str], relaxed: Relaxation | None, clock: Clock
) -> tuple[tuple[float, np.ndarray, str], bool]:
    """min_energy: the whole model from the best so far after reduced-cost fixing
    (consensus.exact_polish); returns the best and whether it is proved optimal."""
    if tables.latency or relaxed is None or clock.up() or EXACT_SHARE <= 0:
        return best, False
    left = clock.left()
    limit = EXACT_CAP_S if left is None else max(left * EXACT_SHARE, 0.001)
    target, proved = exact_polish(tables, best[1], relaxed, limit)
    if target is not None:
        best = (Assignment(tables, target).cost, target, "exact_polish")
    return best, proved


def _lp_round(
    tables: PlacementTables,
    best: tuple[float, np.ndarray, str],
    results: list[np.ndarray],
    relaxed: Relaxation | None,
    clock: Clock,
) -> tuple[float, np.ndarray, str]:
    """min_energy, large cells: the LP optimum rounded (each UE to its largest fraction), repaired and
    polished, as one more start. At N = 200, M = 8 it lands 0.4-0.7 % above the LP bound in ~6 ms where
    local search's decision is 0.6-1.2 % above it after ~50 ms."""
    if relaxed is None or clock.up() or not LP_ROUND:
        return best
    a = Assignment(tables, np.argmax(relaxed.x, axis=1).astype(np.int64))
    if not a.feasible and not repair(a):
        return best
    descend(a, chains=False, time_limit=clock.left())
    results.append(a.target.copy())
    return (a.cost, a.target.copy(), "lp_round") if a.cost < best[0] * (1 - 1e-12) else best


def _lp_guided(
    tables: PlacementTables,
    best: tuple[float, np.ndarray, str],
    relaxed: Relaxation | None,
    rng: np.random.Generator,
    clock: Clock,
) -> tuple[float, np.ndarray, str]:
    """min_energy: relaxation-induced neighbourhoods around the LP optimum (consensus.lp_guided_rounds)."""
    if tables.latency or relaxed is None or clock.up() or not LP_GUIDED:
        return best
    target, wins = lp_guided_rounds(tables, best[1], relaxed, rng, clock.left)
    return (Assignment(tables, target).cost, target, "lp_guided") if wins else best


def _free_after_fixing(tables: PlacementTables, best: np.ndarray, relaxed: Relaxation) -> int:
    """UEs that keep more than one option after reduced-cost fixing from ``best``: the exact polish's size."""
    return int((reduced_cost_keep(tables, best, relaxed).sum(axis=1) > 1).sum())


def _energy_steps(
    tables: PlacementTables,
    best: tuple[float, np.ndarray, str],
    results: list[np.ndarray],
    rng: np.random.Generator,
    clock: Clock,
) -> tuple[tuple[float, np.ndarray, str], bool]:
    """Step 2 (min_energy): the exact polish while it is small enough to pay (``EXACT_MAX_FREE``), else the
    rounded LP optimum as one more start; unless the exact polish proved optimality, the neighbourhoods
    (consensus, relaxation-induced, server pairs) in the time left. Returns the best and whether it is
    optimal."""
    relaxed = lp_relaxation(tables) if not clock.up() else None
    if relaxed is not None and _free_after_fixing(tables, best[1], relaxed) > EXACT_MAX_FREE:
        best = _lp_round(tables, best, results, relaxed, clock)
    else:
        best, proved = _exact(tables, best, relaxed, clock)
        if proved:
            return best, True
    best = _consensus(tables, best, results, clock)
    best = _lp_guided(tables, best, relaxed, rng, clock)
    if not clock.up():
        target, wins = server_pair_rounds(tables, best[1], rng, clock.left)
        if wins:
            best = (Assignment(tables, target).cost, target, "server_pairs")
    return best, False


def kick(a: Assignment, rng: np.random.Generator, size: int = KICK_SIZE) -> None:
    """Relocate ``size`` random UEs, each to a random target that keeps the assignment feasible."""
    t = a.tables
    for i in rng.choice(t.n_ues, size=min(size, t.n_ues), replace=False):
        i = int(i)
        p = int(a.target[i])
        free = 1.0 - a.load
        if p > 0:
            free[p - 1] += t.a_min[i, p - 1]
        ok = np.flatnonzero(np.isfinite(t.a_min[i]) & (t.a_min[i] <= free + CAP_TOL)) + 1
        options = [q for q in ([0] if t.local_ok[i] else []) + ok.tolist() if q != p]
        if options:
            a.move(i, int(rng.choice(options)))


def iterated_local_search(
    tables: PlacementTables,
    starts: Sequence[tuple[str, np.ndarray]],
    rng: np.random.Generator,
    kicks: int,
    time_budget_s: float | None = None,
) -> IlsResult | None:
    """Polish ``starts`` (label, target) in order and perturb the best; None when no start can be made
    feasible. The first start is always polished, even past the budget's end (descent stops at it)."""
    clock = Clock.start(time_budget_s)
    best: tuple[float, np.ndarray, str] | None = None
    results = []
    for label, target in starts:
        if results and clock.up():
            break
        a = Assignment(tables, target)
        if not a.feasible and not repair(a):
            continue
        descend(a, chains=tables.latency, time_limit=clock.left())
        results.append(a.target.copy())
        if best is None or a.cost < best[0]:
            best = (a.cost, a.target.copy(), label)
    if best is None:
        return None
    polished = len(results)
    if not tables.latency:
        best, proved = _energy_steps(tables, best, results, rng, clock)
        if proved:  # kicks cannot improve on an optimum
            return IlsResult(best[0], best[1], best[2], polished, 0, False)
    done = 0
    a = Assignment(tables, best[1])
    while done < kicks and not clock.up():
        kick(a, rng)
        descend(a, chains=True, time_limit=clock.left())
        done += 1
        if a.cost < best[0] * (1 - 1e-12):
            best = (a.cost, a.target.copy(), f"kick_{done}")
        else:
            a.reset(best[1])
    return IlsResult(best[0], best[1], best[2], polished, done, clock.up())
