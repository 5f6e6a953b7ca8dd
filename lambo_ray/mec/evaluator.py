"""The one evaluator: every method, test, benchmark, report and the Serve API compute objectives here.

Latency and energy per UE (the formulas are in docs/model.md), both objectives, and a feasibility
report that names each broken constraint and by how much. Infeasible decisions are reported, never repaired.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lambo_ray.errors import LamboInputError
from lambo_ray.mec.instance import Instance, check_prompt

# Relative slack for floating-point round-off in solver output (shares summing to 1 + 1e-12, ...).
TOL = 1e-7


@dataclass
class Evaluation:
    latency_s: np.ndarray
    energy_j: np.ndarray
    mean_latency_s: float
    total_energy_j: float
    feasible: bool
    violations: list[dict[str, Any]] = field(default_factory=list)

    def objective(self, prompt: str) -> float:
        check_prompt(prompt)
        return self.mean_latency_s if prompt == "min_latency" else self.total_energy_j

    def to_dict(self, prompt: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "feasible": self.feasible,
            "mean_latency_s": self.mean_latency_s,
            "total_energy_j": self.total_energy_j,
            "latency_s": self.latency_s.tolist(),
            "energy_j": self.energy_j.tolist(),
            "violations": self.violations,
        }
        if prompt is not None:
            out["objective"] = self.objective(prompt)
        return out


def check_decision_shape(inst: Instance, target: np.ndarray, share: np.ndarray) -> None:
    """Shape/range errors make a decision meaningless (not merely infeasible): raise, naming the field."""
    n, m = inst.n_ues, inst.n_servers
    if target.shape != (n,):
        raise LamboInputError(f"target has shape {target.shape}, expected ({n},) for this instance", where="target")
    if share.shape != (n,):
        raise LamboInputError(f"share has shape {share.shape}, expected ({n},) for this instance", where="share")
    if not np.all(np.isfinite(share)):
        raise LamboInputError("share contains NaN or inf", where="share")
    bad = np.flatnonzero((target < 0) | (target > m))
    if bad.size:
        raise LamboInputError(f"target[{bad[0]}]={target[bad[0]]} outside 0..{m}", where="target")


def evaluate(inst: Instance, target: np.ndarray, share: np.ndarray) -> Evaluation:
    target = np.asarray(target, dtype=np.int64)
    share = np.asarray(share, dtype=np.float64)
    check_decision_shape(inst, target, share)
    off = target > 0
    j = np.where(off, target - 1, 0)
    rows = np.arange(inst.n_ues)
    rate = inst.rate_bps[rows, j]
    tx = inst.data_bits / rate
    cap = inst.capacity_cps[j]
    violations: list[dict[str, Any]] = []

    bad_share = off & (share <= 0)
    for i in np.flatnonzero(bad_share):
        violations.append({"constraint": "share_positive", "ue": int(i), "share": float(share[i])})
    with np.errstate(divide="ignore"):
        remote = tx + inst.cycles / (np.where(bad_share, 0.0, share) * cap)
    latency = np.where(off, np.where(bad_share, np.inf, remote), inst.local_latency())
    energy = np.where(off, inst.tx_w * tx, inst.local_w * inst.local_latency())

    for i in np.flatnonzero(~off & (share != 0)):
        violations.append({"constraint": "share_local_zero", "ue": int(i), "share": float(share[i])})
    for i in np.flatnonzero(off & (share > 1 + TOL)):
        violations.append({"constraint": "share_at_most_one", "ue": int(i), "share": float(share[i])})
    late = np.flatnonzero(latency > inst.deadline_s * (1 + TOL))
    for i in late:
        violations.append(
            {
                "constraint": "deadline",
                "ue": int(i),
                "latency_s": float(latency[i]),
                "deadline_s": float(inst.deadline_s[i]),
                "excess_s": float(latency[i] - inst.deadline_s[i]),
            }
        )
    load = np.bincount(target[off] - 1, weights=share[off], minlength=inst.n_servers)
    for s in np.flatnonzero(load > 1 + TOL):
        violations.append(
            {
                "constraint": "capacity",
                "server": int(s) + 1,
                "load": float(load[s]),
                "excess": float(load[s] - 1),
            }
        )
    return Evaluation(
        latency_s=latency,
        energy_j=energy,
        mean_latency_s=float(latency.mean()),
        total_energy_j=float(energy.sum()),
        feasible=not violations,
        violations=violations,
    )


def relative_gap(value: float, reference: float) -> float:
    """(value - reference) / |reference|: the optimality gap of a method against the exact expert."""
    return (value - reference) / abs(reference) if reference != 0 else float("nan")


def objectives_batch(
    inst: Instance, targets: np.ndarray, shares: np.ndarray, prompt: str
) -> tuple[np.ndarray, np.ndarray]:
    """Objective and feasibility of K candidate decisions for one instance, vectorised over K.

    Used by best-of-K selection (DROO, policy sampling): same formulas as :func:`evaluate`.
    """
    check_prompt(prompt)
    targets = np.asarray(targets, dtype=np.int64)
    shares = np.asarray(shares, dtype=np.float64)
    k, n = targets.shape
    off = targets > 0
    j = np.where(off, targets - 1, 0)
    rate = np.take_along_axis(np.broadcast_to(inst.rate_bps, (k, n, inst.n_servers)), j[..., None], -1)[..., 0]
    tx = inst.data_bits[None] / rate
    cap = inst.capacity_cps[j]
    safe = np.where(off & (shares > 0), shares, 1.0)
    latency = np.where(off, tx + inst.cycles[None] / (safe * cap), inst.local_latency()[None])
    latency = np.where(off & (shares <= 0), np.inf, latency)
    energy = np.where(off, inst.tx_w * tx, inst.local_w * inst.local_latency()[None])
    load = np.zeros((k, inst.n_servers + 1))
    np.add.at(load, (np.repeat(np.arange(k), n), targets.ravel()), np.where(off, shares, 0.0).ravel())
    feasible = (
        np.all(latency <= inst.deadline_s[None] * (1 + TOL), axis=1)
        & np.all(load[:, 1:] <= 1 + TOL, axis=1)
        & np.all(~off | (shares <= 1 + TOL), axis=1)
        & np.all(off | (shares == 0), axis=1)
    )
    obj = latency.mean(axis=1) if prompt == "min_latency" else energy.sum(axis=1)
    return obj, feasible
