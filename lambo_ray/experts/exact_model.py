"""The Pyomo formulation of one instance for one prompt (the exact expert's model, docs/model.md).

Kept apart from the solving loop in :mod:`lambo_ray.experts.exact` so that anyone who wants the model
itself (to inspect it, write it to a file or hand it to another solver) gets it without the loop.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyomo.environ as pyo

from lambo_ray.mec.instance import Instance


def allowed_pairs(inst: Instance) -> list[tuple[int, int]]:
    """(i, j) pairs that can meet UE i's deadline on server j with at most the whole server.

    Pairs with a_min = inf (the upload alone misses the deadline) or a_min > 1 get no variables at all,
    which is the same as fixing x_ij = 0 but keeps the MILP small.
    """
    a_min = inst.min_share()
    return [(int(i), int(j)) for i, j in zip(*np.nonzero(a_min <= 1.0))]


def build_model(inst: Instance, prompt: str) -> pyo.ConcreteModel:
    """The assignment model of one instance for one prompt.

    Sets I (UEs), J (servers), P (allowed pairs); binary x[i,j] (UE i offloads to j), share a[i,j]
    with a_min_ij x_ij <= a_ij <= x_ij, sum_i a_ij <= 1 per server, sum_j x_ij <= 1 per UE (== 1
    when local execution misses the deadline). For ``min_latency`` also t[i,j] >= 0, the epigraph of
    the server term c_i / (a_ij F_j), bounded below by cuts added to ``model.cuts`` (empty here).
    """
    n, m = inst.n_ues, inst.n_servers
    a_min = inst.min_share()
    tx = inst.tx_latency()
    local_lat = inst.local_latency()
    local_ok = inst.local_feasible()
    pairs = allowed_pairs(inst)

    model = pyo.ConcreteModel(name=f"lambo_{prompt}")
    model.I = pyo.Set(initialize=range(n))
    model.J = pyo.Set(initialize=range(m))
    model.P = pyo.Set(within=model.I * model.J, initialize=pairs)
    model.x = pyo.Var(model.P, domain=pyo.Binary)
    model.a = pyo.Var(model.P, bounds=(0.0, 1.0))

    model.share_min = pyo.Constraint(model.P, rule=lambda mdl, i, j: mdl.a[i, j] >= a_min[i, j] * mdl.x[i, j])
    model.share_max = pyo.Constraint(model.P, rule=lambda mdl, i, j: mdl.a[i, j] <= mdl.x[i, j])

    by_server = {j: [i for i, jj in pairs if jj == j] for j in range(m)}
    by_ue = {i: [j for ii, j in pairs if ii == i] for i in range(n)}

    def capacity(mdl: pyo.ConcreteModel, j: int) -> Any:
        if not by_server[j]:
            return pyo.Constraint.Skip
        return sum(mdl.a[i, j] for i in by_server[j]) <= 1.0

    def one_place(mdl: pyo.ConcreteModel, i: int) -> Any:
        used = sum(mdl.x[i, j] for j in by_ue[i]) if by_ue[i] else 0.0
        if local_ok[i]:
            return pyo.Constraint.Skip if not by_ue[i] else used <= 1.0
        if not by_ue[i]:
            raise ValueError(f"UE {i} meets its deadline nowhere; check unplaceable_ues() first")
        return used == 1.0

    model.capacity = pyo.Constraint(model.J, rule=capacity)
    model.one_place = pyo.Constraint(model.I, rule=one_place)

    offloaded = {i: sum(model.x[i, j] for j in by_ue[i]) for i in range(n)}
    if prompt == "min_energy":
        local_e = inst.local_w * local_lat
        tx_e = inst.tx_w * tx
        model.objective = pyo.Objective(
            expr=sum(local_e[i] * (1 - offloaded[i]) for i in range(n))
            + sum(tx_e[i, j] * model.x[i, j] for i, j in pairs),
            sense=pyo.minimize,
        )
    else:
        model.t = pyo.Var(model.P, bounds=(0.0, None))
        model.cuts = pyo.ConstraintList()
        model.objective = pyo.Objective(
            expr=(
                sum(local_lat[i] * (1 - offloaded[i]) for i in range(n))
                + sum(tx[i, j] * model.x[i, j] + model.t[i, j] for i, j in pairs)
            )
            / n,
            sense=pyo.minimize,
        )
    return model


def read_assignment(model: pyo.ConcreteModel, n_ues: int) -> np.ndarray:
    """Targets (0 = local, j + 1 = server j) from the loaded x values, rounding the binaries."""
    target = np.zeros(n_ues, dtype=np.int64)
    for (i, j), var in model.x.items():
        if var.value is not None and var.value > 0.5:
            target[i] = j + 1
    return target


def set_point(model: pyo.ConcreteModel, inst: Instance, target: np.ndarray, share: np.ndarray) -> None:
    """Load a decision into the variables (the MIP start): t at its true value c / (a F), which every
    tangent cut under-estimates, so the point is feasible for the MILP whatever cuts it holds."""
    for i, j in model.P:
        on = target[i] == j + 1
        model.x[i, j].set_value(1.0 if on else 0.0)
        model.a[i, j].set_value(float(share[i]) if on else 0.0)
        if hasattr(model, "t"):
            model.t[i, j].set_value(float(inst.cycles[i] / (share[i] * inst.capacity_cps[j])) if on else 0.0)
