"""Incremental objective bookkeeping for methods that choose only targets (greedy, local search, DE).

Once the targets are fixed, the shares are the water-filled optimum (:func:`lambo_ray.mec.shares`),
so the objective of an assignment splits into

* a per-UE part that does not depend on shares (``fixed[i, q]``: the local latency or the upload
  time for ``min_latency``; the UE energy for ``min_energy``), and
* one *server term* per server (``min_latency`` only): ``sum_i work_ij / a_ij`` at the water-filled
  shares, where ``work_ij`` is UE i's compute time on a whole server j.

Both tables are read off the evaluator (:func:`build_tables` evaluates all-local and
"everyone on server j at share 1"), so no latency or energy formula is restated here; the only
structure used is that an offloaded latency is affine in ``1 / share``. A move then touches at most
two server terms, which is what makes local search cheap: ``(sum_i sqrt(work_ij))^2`` is the
server term's unconstrained optimum (no deadline binds) and a lower bound otherwise, so candidate
moves are screened vectorised with it and only the promising ones are water-filled exactly.

An assignment is feasible iff no UE that misses its deadline locally is local and, on every server,
the minimum shares ``a_min`` fit (``sum a_min <= 1``): exactly when :func:`optimal_shares` succeeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lambo_ray.experts.server_kernel import latency_term
from lambo_ray.mec.evaluator import evaluate
from lambo_ray.mec.instance import Instance, check_prompt

# Same slack as water_fill's feasibility test, so "feasible here" == "optimal_shares is not None".
CAP_TOL = 1e-12


@dataclass(frozen=True)
class PlacementTables:
    """Everything the incremental model needs for one (instance, prompt)."""

    prompt: str
    fixed: np.ndarray  # (N, M+1) share-independent cost of UE i at target q (0 = local)
    work: np.ndarray  # (N, M) compute time on a whole server (min_latency), zeros for min_energy
    sqrt_work: np.ndarray  # (N, M)
    sqrt_c: np.ndarray  # (N,) water-filling weights (shares are proportional to sqrt c when free)
    a_min: np.ndarray  # (N, M) minimum share meeting the deadline, inf where unreachable
    local_ok: np.ndarray  # (N,) local execution meets the deadline
    scale: float  # objective = scale * total cost (1/N: mean latency; 1: total energy)

    @property
    def n_ues(self) -> int:
        return int(self.fixed.shape[0])

    @property
    def n_servers(self) -> int:
        return int(self.work.shape[1])

    @property
    def latency(self) -> bool:
        return self.prompt == "min_latency"

    def server_cost(self, j: int, idx: np.ndarray) -> float:
        """Exact server term of server j (0-based) hosting UEs ``idx``; inf when they do not fit."""
        if idx.size == 0:
            return 0.0
        a_min = self.a_min[idx, j]
        if not np.all(np.isfinite(a_min)) or a_min.sum() > 1.0 + CAP_TOL:
            return float("inf")
        if not self.latency:
            return 0.0
        return float(latency_term(self.sqrt_c[idx], a_min, self.work[idx, j], CAP_TOL))

    def assignment_cost(self, target: np.ndarray) -> float:
        """Total (unscaled) cost of an assignment; inf when infeasible."""
        target = np.asarray(target)
        if np.any((target == 0) & ~self.local_ok):
            return float("inf")
        total = float(self.fixed[np.arange(self.n_ues), target].sum())
        for j in range(self.n_servers):
            total += self.server_cost(j, np.flatnonzero(target == j + 1))
        return total

    def objective(self, target: np.ndarray) -> float:
        return self.scale * self.assignment_cost(target)


def build_tables(inst: Instance, prompt: str) -> PlacementTables:
    """Per-placement costs read off the evaluator (one all-local call, one call per server)."""
    check_prompt(prompt)
    n, m = inst.n_ues, inst.n_servers
    local = evaluate(inst, np.zeros(n, dtype=np.int64), np.zeros(n))
    tx = inst.tx_latency()
    fixed = np.empty((n, m + 1))
    work = np.zeros((n, m))
    latency = prompt == "min_latency"
    fixed[:, 0] = local.latency_s if latency else local.energy_j
    for j in range(m):
        # Everyone on server j with the whole server: infeasible as a decision, but it is the
        # evaluator's per-UE latency/energy at share 1 that we need (latency = tx + work / share).
        full = evaluate(inst, np.full(n, j + 1, dtype=np.int64), np.ones(n))
        if latency:
            fixed[:, j + 1] = tx[:, j]
            work[:, j] = full.latency_s - tx[:, j]
        else:
            fixed[:, j + 1] = full.energy_j
    return PlacementTables(
        prompt=prompt,
        fixed=fixed,
        work=work,
        sqrt_work=np.sqrt(np.maximum(work, 0.0)),
        sqrt_c=np.sqrt(inst.cycles),
        a_min=inst.min_share(),
        local_ok=inst.local_feasible(),
        scale=1.0 / n if latency else 1.0,
    )


class Assignment:
    """A mutable assignment with its per-server load, server terms and best-move / best-swap search.

    Loads and lower-bound sums are recomputed from scratch after every applied move (O(N M), no
    drift); exact server terms only for the (at most two) servers a move touches.
    """

    def __init__(self, tables: PlacementTables, target: np.ndarray) -> None:
        self.tables = tables
        self.reset(target)

    def reset(self, target: np.ndarray) -> None:
        """Start over from ``target``, every server term recomputed."""
        tables = self.tables
        self.target = np.asarray(target, dtype=np.int64).copy()
        if self.target.shape != (tables.n_ues,):
            raise ValueError(f"target has shape {self.target.shape}, expected ({tables.n_ues},)")
        self.server = np.array([tables.server_cost(j, self.members(j)) for j in range(tables.n_servers)])
        self._refresh()

    # ----------------------------------------------------------------- state
    def members(self, j: int) -> np.ndarray:
        return np.flatnonzero(self.target == j + 1)

    def _refresh(self) -> None:
        t = self.tables
        m = t.n_servers
        off = self.target > 0
        srv = self.target[off] - 1
        rows = np.flatnonzero(off)
        self.load = np.bincount(srv, weights=t.a_min[rows, srv], minlength=m).astype(float)  # int64 when empty
        self.sw_sum = np.bincount(srv, weights=t.sqrt_work[rows, srv], minlength=m).astype(float)

    @property
    def cost(self) -> float:
        t = self.tables
        if np.any((self.target == 0) & ~t.local_ok):
            return float("inf")
        return float(t.fixed[np.arange(t.n_ues), self.target].sum() + self.server.sum())

    @property
    def objective(self) -> float:
        return self.tables.scale * self.cost

    @property
    def feasible(self) -> bool:
        return bool(np.isfinite(self.cost))

    def _with(self, j: int, add: int | None = None, drop: int | None = None) -> float:
        idx = self.members(j)
        if drop is not None:
            idx = idx[idx != drop]
        if add is not None:
            idx = np.append(idx, add)
        return self.tables.server_cost(j, idx)

    # ----------------------------------------------------------------- moves
    def move_delta(self, i: int, q: int) -> float:
        """Exact change of the total cost when UE i goes to target q."""
        t = self.tables
        p = int(self.target[i])
        if p == q:
            return 0.0
        if q == 0 and not t.local_ok[i]:
            return float("inf")
        delta = t.fixed[i, q] - t.fixed[i, p]
        if p > 0:
            delta += self._with(p - 1, drop=i) - self.server[p - 1]
        if q > 0:
            delta += self._with(q - 1, add=i) - self.server[q - 1]
        return float(delta)

    def move(self, i: int, q: int) -> None:
        p = int(self.target[i])
        if p == q:
            return
        self.target[i] = q
        for s in {p, q} - {0}:
            self.server[s - 1] = self.tables.server_cost(s - 1, self.members(s - 1))
        self._refresh()

    def swap_delta(self, i: int, k: int) -> float:
        t = self.tables
        p, q = int(self.target[i]), int(self.target[k])
        if p == q:
            return 0.0
        if (q == 0 and not t.local_ok[i]) or (p == 0 and not t.local_ok[k]):
            return float("inf")
        delta = t.fixed[i, q] + t.fixed[k, p] - t.fixed[i, p] - t.fixed[k, q]
        if p > 0:
            delta += self._with(p - 1, add=k, drop=i) - self.server[p - 1]
        if q > 0:
            delta += self._with(q - 1, add=i, drop=k) - self.server[q - 1]
        return float(delta)

    def swap(self, i: int, k: int) -> None:
        p, q = int(self.target[i]), int(self.target[k])
        if p == q:
            return
        self.target[i], self.target[k] = q, p
        for s in {p, q} - {0}:
            self.server[s - 1] = self.tables.server_cost(s - 1, self.members(s - 1))
        self._refresh()

    # ----------------------------------------------------------------- search
    def move_bounds(self, rows: np.ndarray | None = None) -> np.ndarray:
        """(len(rows), M+1) lower bounds on the single moves of UEs ``rows`` (default: all) on their cost
        change (exact for min_energy); inf where the move is a no-op or cannot be feasible."""
        t = self.tables
        m = t.n_servers
        rows = np.arange(t.n_ues) if rows is None else rows
        tgt = self.target[rows]
        a_min = t.a_min[rows]
        on = tgt[:, None] == np.arange(1, m + 1)[None, :]
        fits = np.isfinite(a_min) & (self.load[None, :] + a_min <= 1.0 + CAP_TOL) & ~on
        feasible = np.column_stack([t.local_ok[rows] & (tgt != 0), fits])
        fixed = t.fixed[rows]
        bound = fixed - fixed[np.arange(rows.size), tgt][:, None]
        if t.latency:
            p = np.maximum(tgt - 1, 0)
            sqrt_work = t.sqrt_work[rows]
            rest = np.maximum(self.sw_sum[p] - sqrt_work[np.arange(rows.size), p], 0.0)
            leave = np.where(tgt > 0, rest**2 - self.server[p], 0.0)
            join = (self.sw_sum[None, :] + sqrt_work) ** 2 - self.server[None, :]
            bound = bound + leave[:, None]
            bound[:, 1:] += join
        return np.where(feasible, bound, np.inf)

    def swap_bounds(self) -> np.ndarray:
        """(N, N) lower bounds on every swap's cost change, inf on the diagonal/lower triangle, for
        pairs on the same target, and where a swap cannot be feasible."""
        t = self.tables
        n = t.n_ues
        rows = np.arange(n)
        tgt = self.target
        cur = t.fixed[rows, tgt]
        to_other = t.fixed[:, tgt]  # [i, k] = cost of UE i at UE k's target
        bound = to_other + to_other.T - cur[:, None] - cur[None, :]
        srv = np.maximum(tgt - 1, 0)
        off = tgt > 0
        a_in = t.a_min[:, srv]  # [i, k] = a_min of UE i on k's server
        a_own = np.where(off, t.a_min[rows, srv], 0.0)  # [k]
        fits = np.where(
            off[None, :],
            np.isfinite(a_in) & (self.load[srv][None, :] - a_own[None, :] + a_in <= 1.0 + CAP_TOL),
            t.local_ok[:, None],
        )
        feasible = fits & fits.T & (tgt[:, None] != tgt[None, :]) & np.triu(np.ones((n, n), dtype=bool), 1)
        if t.latency:
            sw_in = t.sqrt_work[:, srv]
            sw_own = np.where(off, t.sqrt_work[rows, srv], 0.0)
            rest = np.maximum(self.sw_sum[srv] - sw_own, 0.0)
            change = np.where(off[None, :], (rest[None, :] + sw_in) ** 2 - self.server[srv][None, :], 0.0)
            bound = bound + change + change.T
        return np.where(feasible, bound, np.inf)

    def _best(self, bounds: np.ndarray, exact, tol: float) -> tuple[float, tuple[int, int]] | None:
        """Best improving candidate: exact deltas evaluated in order of their lower bounds, stopping
        as soon as no remaining bound can beat the best exact delta found."""
        flat = bounds.ravel()
        cand = np.flatnonzero(flat < -tol)
        if cand.size == 0:
            return None
        cand = cand[np.argsort(flat[cand], kind="stable")]
        best: tuple[float, tuple[int, int]] | None = None
        width = bounds.shape[1]
        for c in cand:
            if best is not None and flat[c] >= best[0]:
                break
            pair = (int(c // width), int(c % width))
            d = flat[c] if not self.tables.latency else exact(*pair)
            if d < -tol and (best is None or d < best[0]):
                best = (float(d), pair)
        return best

    def best_move(self, tol: float) -> tuple[float, tuple[int, int]] | None:
        """Most improving single move (i, q) with its exact delta, or None when none improves by > tol."""
        return self._best(self.move_bounds(), self.move_delta, tol)

    def best_move_of(self, i: int, tol: float) -> tuple[float, int] | None:
        """Most improving new target q for UE i alone (exact delta), or None."""
        best = self._best(self.move_bounds(np.array([i])), lambda _, q: self.move_delta(i, q), tol)
        return None if best is None else (best[0], best[1][1])

    def best_swap(self, tol: float) -> tuple[float, tuple[int, int]] | None:
        return self._best(self.swap_bounds(), self.swap_delta, tol)
