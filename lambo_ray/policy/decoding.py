"""Decode strategies, selected by name from a small registry (RL4CO style, not ``if`` branches in the model).

* ``greedy``    -- argmax target, Beta-mean share, one pass.
* ``sample``    -- one sampled decision (seeded).
* ``best_of_k`` -- greedy plus ``k`` samples, each on an *augmented* copy of the instance (random
  permutation of the UE order and of the server order, undone afterwards); the best candidate by the
  evaluator's :func:`objectives_batch` wins, feasible candidates first. The encoder is permutation-
  equivariant (no positional encodings), so it runs once per instance and its output is permuted.
* ``refine``    -- the ``best_of_k`` decision (``greedy`` when ``k <= 1``) improved by local-search moves
  (:func:`lambo_ray.experts.heuristics.improve`) and then given optimal shares
  (:func:`lambo_ray.mec.shares.optimal_shares`); the raw objective is kept in the stats so raw and
  refined results can be reported separately.

Every decision passes through :func:`fill_capacity` (part of the policy's output mapping) and is scored
by :func:`lambo_ray.experts.base.make_decision`: objective and feasibility come from the evaluator only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lambo_ray.errors import LamboInputError
from lambo_ray.mec.evaluator import objectives_batch
from lambo_ray.mec.instance import Decision, Instance, check_prompt
from lambo_ray.policy.features import PolicyBatch, featurize
from lambo_ray.policy.masks import fill_capacity
from lambo_ray.policy.model import Encoded, LamboPolicy
from lambo_ray.policy.sampling import instance_seed, row_noise

METHOD = "lambo"
MAX_ROWS = 256  # decoder rows per forward pass: bounds memory of best_of_k on big batches


@dataclass
class Candidate:
    """A raw decision of one instance (numpy, unpadded) before it is scored."""

    target: np.ndarray
    share: np.ndarray
    dead_ends: int
    stats: dict[str, Any] = field(default_factory=dict)


Strategy = Callable[[LamboPolicy, list[Instance], list[str], int, int], list[Candidate]]
STRATEGIES: dict[str, Strategy] = {}


def register_strategy(name: str) -> Callable[[Strategy], Strategy]:
    def deco(fn: Strategy) -> Strategy:
        STRATEGIES[name] = fn
        return fn

    return deco


def available_strategies() -> list[str]:
    return list(STRATEGIES)


# ----------------------------------------------------------------------------------------------
# Batched decoding helpers
# ----------------------------------------------------------------------------------------------
def _unpad(insts: Sequence[Instance], target: torch.Tensor, share: torch.Tensor, dead: torch.Tensor) -> list[Candidate]:
    out = []
    for k, inst in enumerate(insts):
        n = inst.n_ues
        out.append(
            Candidate(
                target=target[k, :n].cpu().numpy().astype(np.int64),
                share=share[k, :n].cpu().numpy().astype(np.float64),
                dead_ends=int(dead[k, :n].sum()),
            )
        )
    return out


def _instance_key(inst: Instance) -> list[np.ndarray]:
    return [
        inst.data_bits,
        inst.cycles,
        inst.deadline_s,
        inst.local_cps,
        inst.rate_bps,
        inst.capacity_cps,
        np.array([inst.tx_w, inst.local_w]),
    ]


def decode_instances(
    policy: LamboPolicy,
    instances: Sequence[Instance],
    prompts: Sequence[str],
    mode: str,
    seed: int = 0,
) -> list[Candidate]:
    """One decision per instance (greedy or sampled), batched, shares after :func:`fill_capacity`.

    Sampling noise comes from a per-instance seed (user seed + instance data), so a decision does not
    depend on which other instances share the batch.
    """
    out: list[Candidate] = []
    for lo in range(0, len(instances), MAX_ROWS):
        chunk = list(instances[lo : lo + MAX_ROWS])
        batch = featurize(chunk, list(prompts[lo : lo + MAX_ROWS])).to(_device(policy))
        noise = None
        if mode == "sample":
            seeds = [instance_seed(seed, _instance_key(inst), "sample") for inst in chunk]
            noise = row_noise(seeds, [inst.n_ues for inst in chunk], batch.n_max)
        res = policy.decode(batch, policy.encode(batch), mode=mode, noise=noise)
        out += _unpad(chunk, res.target, fill_capacity(res.target, res.share, batch.m_max), res.dead_ue)
    return out


def _device(policy: LamboPolicy) -> torch.device:
    return next(policy.parameters()).device


def _instance_perms(n: int, n_max: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` permutations of the first ``n`` of ``n_max`` slots (padding stays last), (count, n_max)."""
    tail = torch.arange(n, n_max)
    return torch.stack([torch.cat([torch.randperm(n, generator=generator), tail]) for _ in range(count)])


def permute(
    batch: PolicyBatch, enc: Encoded, rows: torch.Tensor, ue_perm: torch.Tensor, srv_perm: torch.Tensor
) -> tuple[PolicyBatch, Encoded]:
    """Copies of instances ``rows`` with UEs reordered by ``ue_perm`` (R, N) and servers by ``srv_perm`` (R, M).

    Row r's position p holds original UE ``ue_perm[r, p]`` and server slot s original server
    ``srv_perm[r, s]``. The encoder output is permuted rather than recomputed (it is equivariant).
    """

    def g_ue(x: torch.Tensor) -> torch.Tensor:  # rows of x, then its dim 1 reordered by ue_perm
        x = x[rows]
        return torch.gather(x, 1, ue_perm.reshape(*ue_perm.shape, *([1] * (x.dim() - 2))).expand(x.shape))

    def g_srv(x: torch.Tensor, dim: int) -> torch.Tensor:  # x already has the rows; dim reordered
        shape = [1] * x.dim()
        shape[0], shape[dim] = srv_perm.shape
        return torch.gather(x, dim, srv_perm.reshape(shape).expand(x.shape))

    pb = PolicyBatch(
        ue=g_ue(batch.ue),
        server=g_srv(batch.server[rows], 1),
        pair=g_srv(g_ue(batch.pair), 2),
        amin=g_srv(g_ue(batch.amin), 2),
        reserve=g_srv(g_ue(batch.reserve), 2),
        local_ok=g_ue(batch.local_ok),
        ue_mask=g_ue(batch.ue_mask),
        server_mask=g_srv(batch.server_mask[rows], 1),
        prompt=batch.prompt[rows],
    )
    pe = Encoded(
        ue=g_ue(enc.ue),
        server=g_srv(enc.server[rows], 1),
        pair=g_srv(g_ue(enc.pair), 2),
        prompt=enc.prompt[rows],
        ue_mask=pb.ue_mask,
        server_mask=pb.server_mask,
    )
    return pb, pe


def unpermute(
    target: torch.Tensor,
    share: torch.Tensor,
    ue_perm: torch.Tensor,
    srv_perm: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Back to the original UE and server numbering."""
    srv_orig = torch.gather(srv_perm, 1, (target - 1).clamp_min(0)) + 1
    t_orig_order = torch.where(target > 0, srv_orig, 0)
    t = torch.zeros_like(target).scatter_(1, ue_perm, t_orig_order)
    s = torch.zeros_like(share).scatter_(1, ue_perm, share)
    return t, s


def _pick_best(inst: Instance, prompt: str, cands: list[Candidate]) -> tuple[int, np.ndarray, np.ndarray]:
    """Index of the best candidate: feasible first, then lowest objective; ties go to the earliest."""
    obj, feas = objectives_batch(inst, np.stack([c.target for c in cands]), np.stack([c.share for c in cands]), prompt)
    order = np.lexsort((np.arange(len(cands)), obj, ~feas))
    return int(order[0]), obj, feas


# ----------------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------------
@register_strategy("greedy")
def greedy(policy: LamboPolicy, insts: list[Instance], prompts: list[str], k: int, seed: int) -> list[Candidate]:
    return decode_instances(policy, insts, prompts, "greedy")


@register_strategy("sample")
def sample(policy: LamboPolicy, insts: list[Instance], prompts: list[str], k: int, seed: int) -> list[Candidate]:
    return decode_instances(policy, insts, prompts, "sample", seed)


@register_strategy("best_of_k")
def best_of_k(policy: LamboPolicy, insts: list[Instance], prompts: list[str], k: int, seed: int) -> list[Candidate]:
    """Greedy + ``k`` samples on augmented copies; the evaluator picks the best."""
    greedy_c = decode_instances(policy, insts, prompts, "greedy")
    if k < 1:
        return greedy_c
    out: list[Candidate] = []
    per_chunk = max(1, MAX_ROWS // k)
    dev = _device(policy)
    for lo in range(0, len(insts), per_chunk):
        chunk = insts[lo : lo + per_chunk]
        batch = featurize(chunk, prompts[lo : lo + per_chunk]).to(dev)
        enc = policy.encode(batch)
        b = batch.batch_size
        rows = torch.arange(b, device=dev).repeat_interleave(k)
        ue_perm, srv_perm, seeds = [], [], []
        for inst in chunk:  # everything random is drawn per instance: independent of the batch
            key = _instance_key(inst)
            g = torch.Generator().manual_seed(instance_seed(seed, key, "augment"))
            up = _instance_perms(inst.n_ues, batch.n_max, k, g)
            sp = _instance_perms(inst.n_servers, batch.m_max, k, g)
            up[0], sp[0] = torch.arange(batch.n_max), torch.arange(batch.m_max)  # copy 0: original order
            ue_perm.append(up)
            srv_perm.append(sp)
            seeds += [instance_seed(seed, key, "copy", a) for a in range(k)]
        ue_perm, srv_perm = torch.cat(ue_perm).to(dev), torch.cat(srv_perm).to(dev)
        noise = row_noise(seeds, [inst.n_ues for inst in chunk for _ in range(k)], batch.n_max)
        pb, pe = permute(batch, enc, rows, ue_perm, srv_perm)
        res = policy.decode(pb, pe, mode="sample", noise=noise)
        share = fill_capacity(res.target, res.share, pb.m_max)
        t, s = unpermute(res.target, share, ue_perm, srv_perm)
        dead = torch.zeros_like(res.dead_ue).scatter_(1, ue_perm, res.dead_ue)
        for c, inst in enumerate(chunk):
            sampled = _unpad([inst] * k, t[c * k : (c + 1) * k], s[c * k : (c + 1) * k], dead[c * k : (c + 1) * k])
            cands = [greedy_c[lo + c], *sampled]
            best, obj, feas = _pick_best(inst, prompts[lo + c], cands)
            win = cands[best]
            win.stats = {
                "k": k,
                "winner": "greedy" if best == 0 else f"sample_{best - 1}",
                "greedy_objective": float(obj[0]),
                "greedy_feasible": bool(feas[0]),
                "feasible_candidates": int(feas.sum()),
            }
            out.append(win)
    return out


@register_strategy("refine")
def refine(policy: LamboPolicy, insts: list[Instance], prompts: list[str], k: int, seed: int) -> list[Candidate]:
    """Local search + optimal shares on the policy's decision; never worse than the raw decision."""
    from lambo_ray.experts.heuristics import improve  # lazy: the experts package pulls in solvers
    from lambo_ray.mec.shares import optimal_shares

    base = best_of_k(policy, insts, prompts, k, seed) if k > 1 else greedy(policy, insts, prompts, k, seed)
    out = []
    for inst, prompt, raw in zip(insts, prompts, base):
        tgt = improve(inst, prompt, raw.target)
        shr = optimal_shares(inst, tgt)
        cands = [raw] if shr is None else [raw, Candidate(tgt, shr, 0)]
        best, obj, feas = _pick_best(inst, prompt, cands)
        win = cands[best]
        win.stats = {
            **raw.stats,
            "raw_objective": float(obj[0]),
            "raw_feasible": bool(feas[0]),
            "raw_dead_ends": raw.dead_ends,
            "refined": best == 1,
            "base_decode": "best_of_k" if k > 1 else "greedy",
        }
        out.append(win)
    return out


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------
def decide(
    policy: LamboPolicy,
    instances: Sequence[Instance],
    prompt: str | Sequence[str],
    mode: str = "greedy",
    k: int = 16,
    seed: int = 0,
) -> list[Decision]:
    """Decisions of the policy for ``instances`` (one prompt for all, or one per instance).

    ``stats``: ``decode`` (the mode), ``wall_s`` (this call's wall time shared evenly over its
    instances: decoding is batched), ``batch_wall_s``, ``dead_ends`` (UEs for which the masks left no
    option; they run locally and the evaluator reports any miss), plus the strategy's own keys.
    """
    if mode not in STRATEGIES:
        raise LamboInputError(f"unknown decode mode {mode!r}; expected one of {', '.join(STRATEGIES)}", where="decode")
    if k < 0:
        raise LamboInputError(f"k must be >= 0 (got {k})", where="k")
    instances = list(instances)
    if not instances:
        return []
    prompts = [prompt] * len(instances) if isinstance(prompt, str) else list(prompt)
    if len(prompts) != len(instances):
        raise LamboInputError(f"{len(prompts)} prompts for {len(instances)} instances", where="prompt")
    for p in prompts:
        check_prompt(p)
    was_training = policy.training
    policy.eval()
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            cands = STRATEGIES[mode](policy, instances, prompts, k, seed)
    finally:
        policy.train(was_training)
    wall = time.perf_counter() - start
    from lambo_ray.experts.base import make_decision  # lazy: keeps `import lambo_ray.policy` light

    decisions = []
    for inst, p, c in zip(instances, prompts, cands):
        stats = {
            "status": "heuristic",
            "decode": mode,
            "wall_s": wall / len(instances),
            "batch_wall_s": wall,
            "dead_ends": c.dead_ends,
            **c.stats,
        }
        decisions.append(make_decision(inst, c.target, c.share, p, METHOD, stats))
    return decisions
