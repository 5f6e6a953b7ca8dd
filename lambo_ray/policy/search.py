"""``search``: the policy proposes, local search disposes.

The strongest decode mode, built the way neural combinatorial-optimisation systems get from ~1% to
~0.1% (POMO's multi-start with augmentation, LEHD's re-construction, SGBS + EAS):

1. *propose*: the policy's greedy decision and ``k`` samples on augmented copies of the instance
   (:func:`lambo_ray.policy.decoding.sampled_candidates`), plus, when ``heuristic_start`` is on (switch
   it off to measure what the policy alone earns), the ``local_search`` baseline's decision, polished
   second and kept as a floor: search is then never worse than local search, even when the budget ends
   early;
2. *polish*: each distinct start, best raw objective first, goes through best-improvement local search
   (single-UE moves, swaps, and for ``min_latency`` ejection chains; exact objective changes at
   water-filled shares: :func:`lambo_ray.experts.heuristics.descend`); for ``min_energy`` the best then
   seeds an exact solve of the whole model after reduced-cost fixing, which usually proves the optimum
   at the paper cell's size, and exact neighbourhoods where it does not
   (:mod:`lambo_ray.experts.ils` step 2);
3. *perturb*: ``kicks`` rounds of iterated local search from the best so far (relocate a few random
   UEs to random feasible targets, descend again, keep it if it is better), skipped once optimal;
4. the best assignment gets optimal shares (:func:`lambo_ray.mec.shares.optimal_shares`).

Every step stays inside the feasible set, so the result is feasible whenever a start is (and the starts
are feasible by construction whenever the instance has a feasible decision). All randomness comes from
per-instance seeds, so a decision is deterministic for a seed unless the time budget cuts the work
short (``stats["budget_hit"]`` says so). Raw (best proposal) and polished objectives are both in the
stats, so the policy's and the search's contributions can be reported separately.
"""

from __future__ import annotations

import numpy as np

from lambo_ray.experts.heuristics import local_search_assignment
from lambo_ray.experts.ils import IlsResult, iterated_local_search
from lambo_ray.experts.placement import Assignment, build_tables
from lambo_ray.mec.instance import Instance
from lambo_ray.mec.shares import optimal_shares
from lambo_ray.policy.decoding import (
    Candidate,
    DecodeRequest,
    instance_key,
    pick_best,
    register_strategy,
    sampled_candidates,
)
from lambo_ray.policy.model import LamboPolicy
from lambo_ray.policy.sampling import instance_seed

KICKS = 2  # perturbation rounds after polishing
POLISH_TOP = 6  # distinct policy proposals polished, best raw objective first


def _starts(inst: Instance, prompt: str, cands: list[Candidate]) -> tuple[list[tuple[str, np.ndarray]], float]:
    """Distinct policy proposals, feasible and best raw objective first, and the best raw objective."""
    _, obj, feas = pick_best(inst, prompt, cands)
    order = np.lexsort((np.arange(len(cands)), obj, ~feas))
    seen: set[bytes] = set()
    starts = []
    for idx in order:
        key = cands[idx].target.tobytes()
        if key not in seen:
            seen.add(key)
            starts.append(("greedy" if idx == 0 else f"sample_{idx - 1}", cands[idx].target))
    best_raw = float(obj[order[0]]) if feas[order[0]] else float("inf")
    return starts, best_raw


def search_instance(
    inst: Instance, prompt: str, cands: list[Candidate], req: DecodeRequest, known: Assignment | None = None
) -> Candidate:
    """Polish the proposals of one instance and perturb the best (module docstring). ``known``: local
    search's assignment if the request already computed it (its tables are then reused too)."""
    tables = build_tables(inst, prompt) if known is None else known.tables
    starts, best_raw = _starts(inst, prompt, cands)
    starts = starts[:POLISH_TOP]
    baseline = None
    if req.heuristic_start:
        baseline = local_search_assignment(tables) if known is None else known
    if baseline is not None:  # polished second: right after the policy's best proposal
        starts.insert(min(1, len(starts)), ("heuristic", baseline.target))
    rng = np.random.default_rng(instance_seed(req.seed, instance_key(inst), "search"))
    res = iterated_local_search(tables, starts, rng, KICKS, req.time_budget_s)
    if baseline is not None and res is not None and baseline.cost < res.cost:  # the budget cut it off
        res = IlsResult(baseline.cost, baseline.target.copy(), "heuristic", res.polished, res.kicks, res.budget_hit)
    stats = {"k": req.k, "raw_objective": best_raw, "starts": len(starts), "heuristic_start": req.heuristic_start}
    share = optimal_shares(inst, res.target) if res is not None else None
    if res is None or share is None:  # nothing feasible: the best raw proposal, flagged by the evaluator
        fallback = cands[pick_best(inst, prompt, cands)[0]]
        return Candidate(fallback.target, fallback.share, fallback.dead_ends, {**stats, "winner": "raw"})
    stats.update(polished=res.polished, kicks=res.kicks, budget_hit=res.budget_hit, winner=res.winner)
    return Candidate(res.target, share, 0, stats)


@register_strategy("search")
def search(policy: LamboPolicy, req: DecodeRequest) -> list[Candidate]:
    return [
        search_instance(inst, prompt, cands, req, known)
        for inst, prompt, cands, known in zip(
            req.instances, req.prompts, sampled_candidates(policy, req), req.local_search
        )
    ]
