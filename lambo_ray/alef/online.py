"""The policy side of ALEF's online step: greedy decisions of arriving instances, and what the query
strategies need from them (per-UE entropies from the same pass; sampled objectives when asked)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lambo_ray.alef.query import Query, QueryInput
from lambo_ray.mec.evaluator import evaluate
from lambo_ray.mec.instance import Instance
from lambo_ray.mec.packing import Packing


@dataclass
class Decided:
    """Greedy decisions of a batch and what the query needs from the same pass."""

    targets: list[np.ndarray]
    shares: list[np.ndarray]
    query_input: QueryInput
    decide_s: float  # wall time of the whole batch (featurize + encode + decode, + samples if any)


def decide(
    policy: torch.nn.Module,
    instances: Sequence[Instance],
    prompts: Sequence[str],
    chunk: int = 64,
    query: Query | None = None,
    seed: int = 0,
) -> Decided:
    """Greedy decisions (on the must-offload plan users' decisions use: :func:`inference_plan`) and
    per-UE entropies of both heads, one encoder pass per instance; for a ``query`` with an ``improve``
    decode also the evaluator objectives of greedy and of that decode (e.g. the best of k sampled
    decodes on augmented copies; seeded per instance: independent of the batch)."""
    from lambo_ray.policy.features import featurize

    start = time.perf_counter()
    plans = [inference_plan(inst, p) for inst, p in zip(instances, prompts)]
    targets, shares, ent_t, ent_s, masks = [], [], [], [], []
    n_max = max(inst.n_ues for inst in instances)
    with torch.no_grad():
        for lo in range(0, len(instances), chunk):
            part = instances[lo : lo + chunk]
            batch = featurize(part, list(prompts[lo : lo + chunk]), n_max=n_max, packings=plans[lo : lo + chunk])
            out = policy.decode(batch, policy.encode(batch), "greedy")
            # What users get, in each instance's own UE order (the decoder works in its decode order;
            # the entropies are only averaged over real UEs, so their order does not matter).
            share = batch.to_instance_order(out.share)
            target = batch.to_instance_order(out.target)
            for k, inst in enumerate(part):
                targets.append(target[k, : inst.n_ues].cpu().numpy().astype(np.int64))
                shares.append(share[k, : inst.n_ues].double().cpu().numpy())
            ent_t.append(out.entropy_target.double().cpu().numpy())
            ent_s.append(out.entropy_share.double().cpu().numpy())
            masks.append(batch.ue_mask.cpu().numpy())
    greedy_obj = improved_obj = None
    if query is not None and query.improve is not None:
        greedy_obj = objectives(instances, prompts, targets, shares)
        improved_obj = improved_objectives(policy, instances, prompts, query, seed)
    q = QueryInput(np.concatenate(ent_t), np.concatenate(ent_s), np.concatenate(masks), greedy_obj, improved_obj)
    return Decided(targets, shares, q, time.perf_counter() - start)


_PLANS: dict[tuple[int, str], tuple[Instance, Packing]] = {}  # (id(instance), prompt) -> decode-time plan
_PLANS_MAX = 8192


def inference_plan(inst: Instance, prompt: str) -> Packing:
    """The must-offload plan the policy decodes ``inst`` with, as users get it from ``lambo solve`` and
    Serve (:func:`lambo_ray.policy.decoding.decode_packing`). Memoised per instance object: ALEF decides
    and trains on the same instances again and again, and the plan holds a local search."""
    from lambo_ray.policy.decoding import decode_packing

    key = (id(inst), prompt)
    hit = _PLANS.get(key)
    if hit is not None and hit[0] is inst:
        return hit[1]
    if len(_PLANS) >= _PLANS_MAX:
        _PLANS.clear()
    plan = decode_packing(inst, prompt)[0]
    _PLANS[key] = (inst, plan)  # holding the instance keeps its id from being reused
    return plan


def objectives(
    instances: Sequence[Instance], prompts: Sequence[str], targets: Sequence[np.ndarray], shares: Sequence[np.ndarray]
) -> np.ndarray:
    """Evaluator objective of each decision; NaN where it is infeasible."""
    out = []
    for inst, p, t, s in zip(instances, prompts, targets, shares):
        ev = evaluate(inst, t, s)
        out.append(ev.objective(p) if ev.feasible else np.nan)
    return np.asarray(out, dtype=float)


def greedy_objectives(policy: torch.nn.Module, instances: Sequence[Instance], prompts: Sequence[str]) -> np.ndarray:
    """Evaluator objective of the policy's greedy decision on each instance (NaN where infeasible)."""
    d = decide(policy, instances, prompts)
    return objectives(instances, prompts, d.targets, d.shares)


def improved_objectives(
    policy: torch.nn.Module, instances: Sequence[Instance], prompts: Sequence[str], query: Query, seed: int
) -> np.ndarray:
    """Objective of the query's improving decode (best-of-k, refine; never worse than greedy) per instance."""
    from lambo_ray.policy.decoding import decide as policy_decide

    decisions = policy_decide(
        policy, list(instances), list(prompts), query.improve, k=query.samples, seed=seed, time_budget_s=query.budget_s
    )
    return np.asarray([d.objective if d.stats.get("feasible") else np.nan for d in decisions], dtype=float)
