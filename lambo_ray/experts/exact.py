"""The exact expert: Pyomo models solved by HiGHS, with a certified optimality gap (model: docs/model.md).

* ``min_energy`` is a MILP (a generalised assignment problem with the minimum shares a_min_ij as
  weights): UE energy is linear in the assignment, and an assignment is feasible iff the minimum
  shares fit on every server. One solve to optimality; the shares are then the latency-optimal
  water-filled ones (:func:`lambo_ray.mec.shares.optimal_shares`), which meet every deadline.
* ``min_latency`` is a convex MINLP: the server term c_i / (a_ij F_j) is convex in the share, and
  c x^2 / (a F) is jointly convex in (x, a), so its tangent planes (perspective cuts)
  ``t_ij >= (c_i / F_j) (2 x_ij / b - a_ij / b^2)`` are valid under-estimators for every b > 0.
  Outer approximation: the MILP with the cuts gives a lower bound; its assignment, completed with
  water-filled shares and scored by the evaluator, gives an upper bound; cuts at the new shares are
  added and the MILP re-solved (warm-started at the incumbent, on the same persistent HiGHS model)
  until the certified relative gap closes. Cuts at the water-filled (NLP-optimal) shares of an
  assignment make the MILP's value on that assignment at least its true value (the OA argument of
  Duran and Grossmann), so no assignment is visited twice and the loop terminates.
* Both prompts start from the ``local_search`` baseline's decision as the first incumbent (a MIP
  start), and ``min_latency`` takes its first cuts at that decision's shares too (``heuristic_start``):
  cuts at a near-optimal assignment shape the relaxation where the optimum lies. At N = 200, M = 8
  that took the certified gap after 60 s from about 0.8 % to 0-0.02 % (two instances); on the paper
  cell and for ``min_energy`` it is neutral.

Pyomo's persistent APPSI HiGHS interface is used (``pyomo.contrib.appsi.solvers.Highs``): cuts go to
the live HiGHS model without rebuilding it, and it is the Pyomo 6.10 HiGHS interface that takes a MIP
start (``config.warmstart``); ``pyomo.contrib.solver``'s ``highs`` is persistent too but has no
warm start. Every solve's termination condition is checked and reported.

Stats of a decision (besides the common ones of :mod:`lambo_ray.experts.base`): ``status``
("optimal" = certified gap <= gap_tol; "time_limit"; "max_rounds"; "stalled"; "infeasible";
"solver_error"; ``<status>_no_incumbent`` when no feasible decision was found at all), ``objective``
(the evaluator's), ``lower_bound``, ``gap``, ``proven_optimal``, ``rounds``, ``n_cuts``,
``termination`` (HiGHS's last), ``terminations`` (one per round) and ``mip_starts_rejected`` (MIP starts
HiGHS mis-scored, after which the round was solved again without one).

Public API: ``get_expert("exact", **ExactConfig fields)`` or ``ExactExpert(ExactConfig(...))``, then
``.solve(instance, prompt, time_limit)``; :mod:`lambo_ray.experts.exact_model` (``build_model``,
``read_assignment``) for anyone who wants the Pyomo model itself.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyomo.environ as pyo
from pyomo.contrib.appsi.base import TerminationCondition
from pyomo.contrib.appsi.solvers import Highs

from lambo_ray.errors import LamboInputError
from lambo_ray.experts.base import Expert, register
from lambo_ray.experts.exact_model import build_model, read_assignment, set_point
from lambo_ray.experts.heuristics import local_search_assignment
from lambo_ray.experts.placement import build_tables
from lambo_ray.mec.evaluator import evaluate
from lambo_ray.mec.instance import Instance
from lambo_ray.mec.shares import optimal_shares

# HiGHS outcomes after which the solver's bound and (if any) its solution may be used.
_USABLE = (TerminationCondition.optimal, TerminationCondition.maxTimeLimit)


@dataclass(frozen=True)
class ExactConfig:
    """Solver settings of the exact expert; every HiGHS option it sets comes from here."""

    gap_tol: float = 1e-4  # certified relative gap (UB - LB) / UB at which min_latency stops
    max_rounds: int = 100  # outer-approximation rounds (MILP solves) at most
    mip_rel_gap: float = 1e-9  # HiGHS mip_rel_gap of every MILP solve (but the first OA round's)
    # The first min_latency round only has to propose an assignment (its cuts are still coarse, its
    # bound far from the end result): solving it loosely halved total CPU time on paper instances.
    first_round_mip_gap: float = 1e-2
    threads: int = 1
    time_limit_s: float = 600.0  # total over all rounds; Expert.solve(time_limit=...) overrides it
    feasibility_tol: float = 1e-9  # HiGHS primal / MIP feasibility tolerance (shares are ~1e-2)
    initial_cut_points: int = 4  # geometric grid of tangent points per pair in [a_min, 1], ends included
    warm_start: bool = True  # hand the incumbent to HiGHS as a MIP start
    server_cuts: bool = True  # also the aggregated Cauchy-Schwarz cuts per server (see ExactSolver.add_server_cut)
    neighbour_cuts: bool = True  # per round, cuts where single-UE moves would put the shares
    heuristic_start: bool = True  # local search's decision as first incumbent (and, min_latency, cuts there)
    highs_options: dict[str, Any] = field(default_factory=dict)  # any further HiGHS option

    def __post_init__(self) -> None:
        if not (self.gap_tol >= 0 and self.mip_rel_gap >= 0 and self.first_round_mip_gap >= 0):
            raise ValueError("gap_tol, mip_rel_gap and first_round_mip_gap must be >= 0")
        if self.max_rounds < 1 or self.threads < 1 or self.initial_cut_points < 2:
            raise ValueError("max_rounds and threads must be >= 1, initial_cut_points >= 2")
        if not self.time_limit_s > 0:
            raise ValueError("time_limit_s must be > 0")


# ------------------------------------------------------------------------------------ solving


def make_solver(cfg: ExactConfig, mip_rel_gap: float) -> Highs:
    solver = Highs()
    if not solver.available():
        raise RuntimeError("HiGHS (highspy) is not available to Pyomo")
    solver.config.load_solution = False  # termination condition first, then load
    solver.config.mip_gap = mip_rel_gap
    solver.config.warmstart = cfg.warm_start
    solver.highs_options = {
        "threads": cfg.threads,
        "primal_feasibility_tolerance": cfg.feasibility_tol,
        "mip_feasibility_tolerance": cfg.feasibility_tol,
        "random_seed": 0,
        **cfg.highs_options,
    }
    # Cuts are handed over explicitly (add_constraints): no model scan before each re-solve.
    upd = solver.update_config
    upd.check_for_new_or_removed_constraints = False
    upd.check_for_new_or_removed_vars = False
    upd.check_for_new_or_removed_params = False
    upd.check_for_new_objective = False
    upd.update_constraints = False
    upd.update_vars = False
    upd.update_params = False
    upd.update_named_expressions = False
    return solver


@dataclass
class _Incumbent:
    target: np.ndarray
    share: np.ndarray
    objective: float


@dataclass
class _RoundOutcome:
    termination: TerminationCondition
    bound: float  # HiGHS's dual bound (-inf if none)
    target: np.ndarray | None  # the MILP's assignment, if it found one
    loose: bool  # solved with first_round_mip_gap rather than mip_rel_gap


def fallback_assignment(inst: Instance) -> np.ndarray | None:
    """A cheap feasible assignment used before the first MILP and when time runs out without one:
    all local, except UEs that must offload, which go first-fit (largest minimum share first) to the
    server needing the smallest share. None when this simple rule cannot place them."""
    target = np.zeros(inst.n_ues, dtype=np.int64)
    must = np.flatnonzero(~inst.local_feasible())
    a_min = inst.min_share()
    free = np.ones(inst.n_servers)
    for i in must[np.argsort(a_min[must].min(axis=1))[::-1]] if must.size else []:
        options = [j for j in np.argsort(a_min[i]) if a_min[i, j] <= free[j]]
        if not options:
            return None
        target[i] = options[0] + 1
        free[options[0]] -= a_min[i, options[0]]
    return target


def unplaceable_ues(inst: Instance) -> np.ndarray:
    """UEs that meet their deadline neither locally nor on any server: the instance is infeasible."""
    return np.flatnonzero(~inst.local_feasible() & ~np.any(inst.min_share() <= 1.0, axis=1))


class ExactSolver:
    """One instance, one prompt: holds the model, the persistent solver, the incumbent and the bounds."""

    def __init__(self, inst: Instance, prompt: str, cfg: ExactConfig, time_limit_s: float) -> None:
        self.inst, self.prompt, self.cfg = inst, prompt, cfg
        self.start = time.perf_counter()
        self.deadline = self.start + time_limit_s
        self.model = build_model(inst, prompt) if not unplaceable_ues(inst).size else None
        self.solver = make_solver(cfg, cfg.mip_rel_gap)
        if self.model is not None:
            self.solver.set_instance(self.model)
        self.incumbent: _Incumbent | None = None
        self.lower_bound = -math.inf
        self.rounds = 0
        self.n_cuts = 0
        self.terminations: list[str] = []
        self.mip_starts_rejected = 0  # MIP starts HiGHS mis-scored (solve_milp); solved again without them
        self._cut_keys: set[tuple[int, int, float]] = set()
        self._users = {
            j: [i for i, jj in self.model.P if jj == j] if self.model is not None else [] for j in range(inst.n_servers)
        }

    # -- bookkeeping -------------------------------------------------------------------------
    def remaining(self) -> float:
        return self.deadline - time.perf_counter()

    def offer(self, target: np.ndarray, share: np.ndarray | None = None) -> bool:
        """Complete an assignment with optimal shares (``share``, if the caller has computed them), score
        it with the evaluator, keep it if better."""
        share = optimal_shares(self.inst, target) if share is None else share
        if share is None:
            return False
        ev = evaluate(self.inst, target, share)
        if not ev.feasible:
            return False
        obj = ev.objective(self.prompt)
        if self.incumbent is None or obj < self.incumbent.objective:
            self.incumbent = _Incumbent(np.asarray(target, dtype=np.int64).copy(), share, obj)
            return True
        return False

    def gap(self) -> float:
        if self.incumbent is None or not math.isfinite(self.lower_bound):
            return math.inf
        ub = self.incumbent.objective
        return max(0.0, ub - self.lower_bound) / abs(ub) if ub != 0 else (0.0 if self.lower_bound >= 0 else math.inf)

    # -- one MILP solve ----------------------------------------------------------------------
    def solve_milp(self) -> _RoundOutcome:
        self.rounds += 1
        loose = self.prompt == "min_latency" and self.rounds == 1
        self.solver.config.mip_gap = (
            max(self.cfg.first_round_mip_gap, self.cfg.mip_rel_gap) if loose else self.cfg.mip_rel_gap
        )
        warm = self.incumbent is not None and self.cfg.warm_start
        res = self._solve(warm)
        if warm and self._misscored(res):
            # HiGHS 1.16 scores a MIP start in the presolved space without the objective offset of the
            # columns presolve removed, so a near-optimal start looks better than the optimum and comes
            # back "optimal" against a bound in that shifted space (seen on tight-deadline min_energy
            # cells). Neither the solution's score nor the bound is trusted: solve again without it
            # (highspy keeps a MIP start across runs until the solver data is cleared).
            self.mip_starts_rejected += 1
            self.solver._solver_model.clearSolver()
            res = self._solve(False)
        tc = res.termination_condition
        self.terminations.append(tc.name)
        if tc not in _USABLE:
            return _RoundOutcome(tc, -math.inf, None, loose)
        if res.best_objective_bound is not None and math.isfinite(res.best_objective_bound):
            self.lower_bound = max(self.lower_bound, float(res.best_objective_bound))
        target = None
        if res.best_feasible_objective is not None:
            self.solver.load_vars()
            target = read_assignment(self.model, self.inst.n_ues)
        bound = float(res.best_objective_bound) if res.best_objective_bound is not None else -math.inf
        return _RoundOutcome(tc, bound, target, loose)

    def _solve(self, warm: bool) -> Any:
        self.solver.config.time_limit = max(self.remaining(), 1e-3)
        self.solver.config.warmstart = warm
        if warm and self.incumbent is not None:
            set_point(self.model, self.inst, self.incumbent.target, self.incumbent.share)
        return self.solver.solve(self.model)

    def _misscored(self, res: Any) -> bool:
        """HiGHS's objective for the solution it returned differs from the model's value at that solution."""
        if res.termination_condition not in _USABLE or res.best_feasible_objective is None:
            return False
        self.solver.load_vars()
        actual = float(pyo.value(self.model.objective))
        return abs(actual - float(res.best_feasible_objective)) > 1e-7 * max(1.0, abs(actual))

    # -- cuts (min_latency) ------------------------------------------------------------------
    def add_cut(self, i: int, j: int, b: float) -> pyo.Constraint | None:
        """Tangent plane of c x^2 / (a F) at (x, a) = (1, b): t >= (c/F)(2x/b - a/b^2)."""
        b = float(b)
        key = (i, j, round(math.log(b), 9))
        if not (b > 0) or key in self._cut_keys:
            return None
        self._cut_keys.add(key)
        k = self.inst.cycles[i] / self.inst.capacity_cps[j]
        m = self.model
        return m.cuts.add(m.t[i, j] >= (2.0 * k / b) * m.x[i, j] - (k / b**2) * m.a[i, j])

    def push_cuts(self, cuts: list[pyo.Constraint | None]) -> None:
        new = [c for c in cuts if c is not None]
        if new:
            self.solver.add_constraints(new)
            self.n_cuts += len(new)

    def add_server_cut(self, j: int, s0: float) -> pyo.Constraint | None:
        """Aggregated cut on server j: sum_i t_ij >= (2 s0 S_j - s0^2 A_j) / F_j, S_j = sum_i sqrt(c_i) x_ij,
        A_j = sum_i a_ij.

        Valid because sum_i c_i x_ij^2 / a_ij >= S_j^2 / A_j (Cauchy-Schwarz) and S^2 / A is jointly
        convex, so its tangent plane at (s0, 1) under-estimates it. Per-pair cuts bound each UE's
        term separately and only learn how the server is shared from the points they were cut at;
        this one carries the sqrt(c)-proportional optimal sharing (docs/model.md) for every subset of UEs
        at once, which closes most of the gap in the first rounds when few deadlines bind.
        """
        s0 = float(s0)
        key = (-1, j, round(math.log(s0), 9)) if s0 > 0 else None
        if key is None or key in self._cut_keys:
            return None
        self._cut_keys.add(key)
        m = self.model
        users = self._users[j]
        if not users:
            return None
        sqrt_c = np.sqrt(self.inst.cycles)
        inv_f = 1.0 / self.inst.capacity_cps[j]  # scaled so coefficients stay O(1) (t is in seconds)
        return m.cuts.add(
            sum(m.t[i, j] for i in users)
            >= sum((2.0 * s0 * sqrt_c[i] * inv_f) * m.x[i, j] - (s0**2 * inv_f) * m.a[i, j] for i in users)
        )

    def server_cuts_at(self, target: np.ndarray) -> list[pyo.Constraint | None]:
        if not self.cfg.server_cuts:
            return []
        sqrt_c = np.sqrt(self.inst.cycles)
        return [self.add_server_cut(j, sqrt_c[target == j + 1].sum()) for j in range(self.inst.n_servers)]

    def initial_cuts(self) -> list[pyo.Constraint | None]:
        """Per pair: a geometric grid from a_min to 1 (both ends included) and the sqrt(c)-proportional
        share among the UEs that could use the server (the optimum when no deadline binds)."""
        a_min = self.inst.min_share()
        sqrt_c = np.sqrt(self.inst.cycles)
        cuts = []
        for j in range(self.inst.n_servers):
            users = [i for i, jj in self.model.P if jj == j]
            mass = sqrt_c[users].sum() if users else 1.0
            for i in users:
                lo = max(a_min[i, j], 1e-6)
                for b in np.geomspace(lo, 1.0, self.cfg.initial_cut_points) if lo < 1 else [1.0]:
                    cuts.append(self.add_cut(i, j, b))
                cuts.append(self.add_cut(i, j, max(lo, sqrt_c[i] / mass)))
            if self.cfg.server_cuts and users:
                for frac in np.geomspace(1.0 / len(users), 1.0, self.cfg.initial_cut_points):
                    cuts.append(self.add_server_cut(j, frac * mass))
        return cuts

    def cuts_at(self, target: np.ndarray, share: np.ndarray) -> list[pyo.Constraint | None]:
        return [self.add_cut(i, int(target[i]) - 1, share[i]) for i in np.flatnonzero(target > 0)]

    def neighbour_cuts(self, target: np.ndarray) -> list[pyo.Constraint | None]:
        """For every pair not in use: a cut at the share UE i would get if it alone moved to server j
        (sqrt(c)-proportional next to j's current UEs, at least a_min). Single-UE moves are where
        the next assignments come from, so their terms are under-estimated tightly in advance."""
        if not self.cfg.neighbour_cuts:
            return []
        sqrt_c = np.sqrt(self.inst.cycles)
        a_min = self.inst.min_share()
        mass = np.array([sqrt_c[target == j + 1].sum() for j in range(self.inst.n_servers)])
        return [
            self.add_cut(i, j, min(1.0, max(a_min[i, j], sqrt_c[i] / (mass[j] + sqrt_c[i]))))
            for (i, j) in self.model.P
            if target[i] != j + 1
        ]

    def cuts_at_milp_point(self) -> list[pyo.Constraint | None]:
        """Cuts at the MILP's own shares where its epigraph value under-estimates the true term:
        they remove the current MILP point, which the cuts at the water-filled shares may not."""
        cuts = []
        for i, j in self.model.P:
            x, a, t = (self.model.x[i, j].value, self.model.a[i, j].value, self.model.t[i, j].value)
            if x is None or x < 0.5 or a is None or a <= 0:
                continue
            true = self.inst.cycles[i] / (a * self.inst.capacity_cps[j])
            if t is None or t < true * (1 - 1e-9):
                cuts.append(self.add_cut(i, j, a))
        return cuts

    def heuristic_start(self) -> _Incumbent | None:
        """The local_search baseline's decision as the first incumbent (cfg.heuristic_start)."""
        if not self.cfg.heuristic_start:
            return None
        a = local_search_assignment(build_tables(self.inst, self.prompt))
        if a is None:
            return None
        share = optimal_shares(self.inst, a.target)
        if share is None:
            return None
        self.offer(a.target, share)
        return _Incumbent(a.target.copy(), share, a.objective)

    # -- drivers -----------------------------------------------------------------------------
    def run(self) -> tuple[str, str]:
        """Solve; return (status, last HiGHS termination condition).

        Status: "optimal" (certified gap <= gap_tol), "time_limit", "max_rounds", "stalled" (no new
        cut; only possible when HiGHS's own tolerances exceed gap_tol), "infeasible", "solver_error"
        (HiGHS reported an error, or an assignment that breaks capacity beyond its tolerance).
        """
        if unplaceable_ues(self.inst).size:
            return "infeasible", "not_started"
        start = fallback_assignment(self.inst)
        if start is not None:
            self.offer(start)
        heuristic = self.heuristic_start()
        if self.prompt == "min_latency":
            self.push_cuts(self.initial_cuts())
            if heuristic is not None:
                self.push_cuts(
                    self.cuts_at(heuristic.target, heuristic.share)
                    + self.server_cuts_at(heuristic.target)
                    + self.neighbour_cuts(heuristic.target)
                )
        last = "not_started"
        while True:
            if self.remaining() <= 0:
                return "time_limit", last
            out = self.solve_milp()
            last = out.termination.name
            if out.termination == TerminationCondition.infeasible:
                return "infeasible", last
            if out.termination not in _USABLE:
                return "solver_error", last
            share = None
            if out.target is not None:
                share = optimal_shares(self.inst, out.target)
                if share is None:
                    return "solver_error", last
                self.offer(out.target, share)
            if self.gap() <= self.cfg.gap_tol:
                return "optimal", last
            if out.termination == TerminationCondition.maxTimeLimit or self.remaining() <= 0:
                return "time_limit", last
            if self.prompt == "min_energy":  # one MILP: its gap is HiGHS's, larger than gap_tol only if
                return "stalled", last  # mip_rel_gap was configured larger than gap_tol
            if self.rounds >= self.cfg.max_rounds:
                return "max_rounds", last
            cuts = self.cuts_at_milp_point()
            if out.target is not None and share is not None:
                cuts += self.cuts_at(out.target, share) + self.server_cuts_at(out.target)
                cuts += self.neighbour_cuts(out.target)
            if not any(c is not None for c in cuts) and not out.loose:
                # Nothing new: the MILP point's epigraph is exact, so its value is its assignment's
                # true value and the bound cannot move; what is left is HiGHS's own tolerance.
                return "stalled", last
            self.push_cuts(cuts)


@register("exact")
class ExactExpert(Expert):
    """Pyomo + HiGHS with a certified gap: a MILP for min_energy, outer approximation for min_latency."""

    name = "exact"

    def __init__(self, config: ExactConfig | None = None, **overrides: Any) -> None:
        base = config or ExactConfig()
        self.config = dataclasses.replace(base, **overrides) if overrides else base

    def _solve(
        self, inst: Instance, prompt: str, time_limit: float | None
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        if time_limit is not None and not time_limit > 0:
            raise LamboInputError(f"time limit must be > 0 seconds (got {time_limit})", where="time_limit")
        limit = self.config.time_limit_s if time_limit is None else float(time_limit)
        s = ExactSolver(inst, prompt, self.config, limit)
        status, termination = s.run()
        inc = s.incumbent
        stats: dict[str, Any] = {
            "status": status,
            "termination": termination,
            "lower_bound": s.lower_bound if math.isfinite(s.lower_bound) else None,
            "gap": s.gap() if math.isfinite(s.gap()) else None,
            "proven_optimal": status == "optimal",
            "rounds": s.rounds,
            "n_cuts": s.n_cuts,
            "terminations": s.terminations,
            "mip_starts_rejected": s.mip_starts_rejected,
        }
        if inc is None:  # infeasible instance, or no feasible assignment found in time
            target = np.zeros(inst.n_ues, dtype=np.int64)
            return (
                target,
                np.zeros(inst.n_ues),
                {**stats, "status": status if status == "infeasible" else f"{status}_no_incumbent"},
            )
        stats["objective"] = inc.objective
        return inc.target, inc.share, stats
