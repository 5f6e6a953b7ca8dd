"""Ejection chains: the neighbourhood that gets local search out of capacity-bound local optima.

With single moves and swaps, a UE that wants a full server can only get there by trading places
with one of its UEs. ``min_energy`` is a generalised assignment problem, and its local optima are
mostly of that kind: UE i would save energy on server j, j is full, and the UE k that should make room
belongs neither where i comes from nor locally... but somewhere else. A chain moves i to j and *ejects*
one UE k of j to any other target l (local, i's old server, or a third server):

    i: p -> j,   k: j -> l        (l != j; l == p is an ordinary swap)

All N x (N/M) x (M+1) chains are screened vectorised with lower bounds on their cost change (exact for
``min_energy``, whose objective ignores shares; for ``min_latency`` the server terms are bounded by
their deadline-free optimum ``(sum sqrt work)^2`` as in :mod:`lambo_ray.experts.placement`), and only
the promising ones are evaluated exactly.
"""

from __future__ import annotations

import numpy as np

from lambo_ray.experts.placement import CAP_TOL, Assignment


def chain_delta(a: Assignment, i: int, j: int, k: int, dest: int) -> float:
    """Exact change of the total cost of ``i: p -> j, k: j -> dest`` (targets 1-based, 0 = local)."""
    t = a.tables
    p = int(a.target[i])
    if j == 0 or dest == j or p == j or i == k or int(a.target[k]) != j:
        return float("inf")
    if dest == 0 and not t.local_ok[k]:
        return float("inf")
    delta = t.fixed[i, j] - t.fixed[i, p] + t.fixed[k, dest] - t.fixed[k, j]
    changes: dict[int, tuple[list[int], list[int]]] = {j: ([i], [k])}
    if p > 0:
        changes[p] = ([k] if dest == p else [], [i])
    if dest > 0 and dest != p:
        changes[dest] = ([k], [])
    for s, (add, drop) in changes.items():
        idx = a.members(s - 1)
        idx = np.append(idx[~np.isin(idx, drop)], add).astype(np.int64)
        delta += t.server_cost(s - 1, idx) - a.server[s - 1]
    return float(delta)


def apply_chain(a: Assignment, i: int, j: int, k: int, dest: int) -> None:
    target = a.target.copy()
    target[i], target[k] = j, dest
    a.reset(target)


def _server_bounds(a: Assignment, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower bounds (|I|, |K|, M+1) of every chain into server ``j`` (1-based), with the UEs I moving in
    and K (on j) ejected; inf where infeasible."""
    t = a.tables
    m = t.n_servers
    s = j - 1
    ks = a.members(s)
    ins = np.flatnonzero(a.target != j)
    p = a.target[ins]
    ps = np.maximum(p - 1, 0)
    a_in = t.a_min[ins, s]  # (I,)
    a_k = t.a_min[ks]  # (K, M)
    fits_j = np.isfinite(a_in)[:, None] & (a.load[s] - a_k[None, :, s] + a_in[:, None] <= 1.0 + CAP_TOL)
    # Where k can go: local, or server l with room (i's own server p gets i's share back).
    load = np.array(np.broadcast_to(a.load, (ins.size, m)), dtype=float)
    rows = np.flatnonzero(p > 0)
    load[rows, ps[rows]] -= t.a_min[ins[rows], ps[rows]]
    fits_l = np.isfinite(a_k)[None] & (load[:, None, :] + a_k[None] <= 1.0 + CAP_TOL)  # (I, K, M)
    fits_l[:, :, s] = False
    feas = np.concatenate([np.broadcast_to(t.local_ok[ks][None, :, None], (ins.size, ks.size, 1)), fits_l], 2)
    feas &= fits_j[:, :, None]
    bound = (t.fixed[ins, j] - t.fixed[ins, p])[:, None, None] + (t.fixed[ks] - t.fixed[ks, j][:, None])[None]
    if t.latency:
        bound = bound + _latency_bounds(a, j, ins, ks, p)
    return np.where(feas, bound, np.inf), ins, ks


def _latency_bounds(a: Assignment, j: int, ins: np.ndarray, ks: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Lower bounds on the server-term changes of the chains of :func:`_server_bounds`."""
    t = a.tables
    m = t.n_servers
    s = j - 1
    sw = t.sqrt_work
    into_j = (a.sw_sum[s] - sw[ks, s][None, :] + sw[ins, s][:, None]) ** 2 - a.server[s]  # (I, K)
    ps = np.maximum(p - 1, 0)
    off = p > 0
    rest_p = np.where(off, np.maximum(a.sw_sum[ps] - sw[ins, ps], 0.0), 0.0)  # (I,)
    leave_p = np.where(off, rest_p**2 - a.server[ps], 0.0)  # (I,) when k does not go to p
    join_l = (a.sw_sum[None, :] + sw[ks]) ** 2 - a.server[None, :]  # (K, M) k joins server l
    out = np.zeros((ins.size, ks.size, m + 1))
    out += (into_j + leave_p[:, None])[:, :, None]
    out[:, :, 1:] += join_l[None]
    # l == p: k joins the server i leaves, one term for both.
    rows = np.flatnonzero(off)
    both = (rest_p[rows][:, None] + sw[ks][:, ps[rows]].T) ** 2 - a.server[ps[rows]][:, None]  # (I', K)
    out[rows, :, p[rows]] += both - leave_p[rows][:, None] - join_l[:, ps[rows]].T
    return out


MAX_EXACT = 128  # min_latency: chains evaluated exactly per call, best bounds first


def best_chain(a: Assignment, tol: float) -> tuple[float, tuple[int, int, int, int]] | None:
    """The most improving chain ``(i, j, k, dest)`` with its exact delta, or None when none improves by
    > tol. For ``min_latency`` the bounds are loose (thousands of chains pass them at N = 100), so only
    the ``MAX_EXACT`` best-bounded ones are evaluated: a heuristic cut, never a wrong move."""
    best: tuple[float, tuple[int, int, int, int]] | None = None
    pool = []
    for j in range(1, a.tables.n_servers + 1):
        bounds, ins, ks = _server_bounds(a, j)
        if bounds.size == 0:
            continue
        flat = bounds.ravel()
        cand = np.flatnonzero(flat < -tol)
        for c in cand:
            ii, kk, ll = np.unravel_index(c, bounds.shape)
            pool.append((float(flat[c]), int(ins[ii]), j, int(ks[kk]), int(ll)))
    pool.sort()
    if a.tables.latency:
        pool = pool[:MAX_EXACT]
    for bound, i, j, k, dest in pool:
        if best is not None and bound >= best[0]:
            break
        d = bound if not a.tables.latency else chain_delta(a, i, j, k, dest)
        if d < -tol and (best is None or d < best[0]):
            best = (d, (i, j, k, dest))
    return best
