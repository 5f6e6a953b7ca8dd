"""Decode strategies, selected by name from a small registry (RL4CO style, not ``if`` branches in the model).

* ``greedy``    -- argmax target, Beta-mean share, one pass.
* ``sample``    -- one sampled decision (seeded).
* ``best_of_k`` -- greedy plus ``k`` samples, each on an *augmented* copy of the instance (random
  permutation of the UE order and of the server order, undone afterwards); the best candidate by the
  evaluator's :func:`objectives_batch` wins, feasible candidates first. The encoder is permutation-
  equivariant (no positional encodings), so it runs once per instance and its output is permuted.
* ``refine``    -- the ``best_of_k`` decision (``greedy`` when ``k <= 1``) improved by local-search moves
  and then given optimal shares; the raw objective is kept in the stats so raw and refined results can
  be reported separately.
* ``search``    -- the strongest mode (:mod:`lambo_ray.policy.search`): every one of the ``k`` samples
  (and the greedy heuristic's decision) polished by local search with optimal shares, then perturbation
  rounds from the best; the policy proposes, search disposes.

Every mode is feasible by construction whenever the instance has a feasible decision (the decoder's
look-ahead masks, :mod:`lambo_ray.policy.masks`; the polishing moves never leave the feasible set). An
instance without one is flagged: ``status: "infeasible"`` and ``infeasible_reason`` in the stats.
Every decision's shares come from the share head through :func:`~lambo_ray.policy.masks.output_shares`
(refine and search: optimal shares for their targets), and it is scored by
:func:`lambo_ray.experts.base.make_decision`: objective and feasibility come from the evaluator only.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lambo_ray.errors import LamboInputError
from lambo_ray.experts.heuristics import local_search_assignment
from lambo_ray.experts.placement import Assignment, build_tables
from lambo_ray.mec.evaluator import objectives_batch
from lambo_ray.mec.instance import Decision, Instance, check_prompt
from lambo_ray.mec.packing import Packing, infeasible_stats, pack_must_offload
from lambo_ray.policy.features import PolicyBatch, featurize
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


@dataclass
class DecodeRequest:
    """What a strategy decodes: instances with their prompts and must-offload packings, and the knobs.

    ``k``: samples (best_of_k, refine, search); ``seed``: per-instance noise and augmentations;
    ``time_budget_s``: wall-time cap per instance of refine/search's polishing (None: no cap);
    ``heuristic_start``: search also polishes the greedy heuristic's decision. ``local_search``: the
    ``local_search`` baseline's assignment where planning the must-offload UEs already computed it
    (:func:`decode_packing`), so ``search`` reuses it as its floor; None elsewhere.
    """

    instances: list[Instance]
    prompts: list[str]
    packings: list[Packing]
    k: int = 16
    seed: int = 0
    time_budget_s: float | None = None
    heuristic_start: bool = True
    local_search: list[Assignment | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.local_search:
            self.local_search = [None] * len(self.instances)

    def part(self, lo: int, hi: int) -> DecodeRequest:
        return dataclasses.replace(
            self,
            instances=self.instances[lo:hi],
            prompts=self.prompts[lo:hi],
            packings=self.packings[lo:hi],
            local_search=self.local_search[lo:hi],
        )


Strategy = Callable[[LamboPolicy, DecodeRequest], list[Candidate]]
STRATEGIES: dict[str, Strategy] = {}


def register_strategy(name: str) -> Callable[[Strategy], Strategy]:
    def deco(fn: Strategy) -> Strategy:
        STRATEGIES[name] = fn
        return fn

    return deco


def available_strategies() -> list[str]:
    import lambo_ray.policy.search  # noqa: F401  (registers ``search``)

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


def instance_key(inst: Instance) -> list[np.ndarray]:
    """The arrays that identify an instance for its per-instance random streams."""
    return [
        inst.data_bits,
        inst.cycles,
        inst.deadline_s,
        inst.local_cps,
        inst.rate_bps,
        inst.capacity_cps,
        np.array([inst.tx_w, inst.local_w]),
    ]


def _batch(policy: LamboPolicy, req: DecodeRequest) -> PolicyBatch:
    return featurize(req.instances, req.prompts, packings=req.packings).to(_device(policy))


def decode_instances(policy: LamboPolicy, req: DecodeRequest, mode: str) -> list[Candidate]:
    """One decision per instance (greedy or sampled), batched.

    Sampling noise comes from a per-instance seed (user seed + instance data), so a decision does not
    depend on which other instances share the batch.
    """
    out: list[Candidate] = []
    for lo in range(0, len(req.instances), MAX_ROWS):
        part = req.part(lo, lo + MAX_ROWS)
        batch = _batch(policy, part)
        noise = None
        if mode == "sample":
            seeds = [instance_seed(req.seed, instance_key(inst), "sample") for inst in part.instances]
            noise = row_noise(seeds, [inst.n_ues for inst in part.instances], batch.n_max)
        res = policy.decode(batch, policy.encode(batch), mode=mode, noise=noise)
        back = batch.to_instance_order
        out += _unpad(part.instances, back(res.target), back(res.share), back(res.dead_ue))
    return out


def _device(policy: LamboPolicy) -> torch.device:
    return next(policy.parameters()).device


AUG_JITTER = 0.2  # std of an augmented copy's position shifts, as a fraction of N


def _instance_perms(n: int, n_max: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` permutations of the first ``n`` of ``n_max`` decode positions (padding stays last),
    (count, n_max): the decode order with jitter, each position shifted by N(0, AUG_JITTER * n). The
    policy was trained in its decode order, so copies stay close to it while differing enough for
    diverse samples; server permutations come on top."""
    tail = torch.arange(n, n_max)
    keys = torch.arange(n, dtype=torch.float64)[None] + AUG_JITTER * n * torch.randn(
        count, n, generator=generator, dtype=torch.float64
    )
    return torch.cat([torch.argsort(keys, dim=1), tail.expand(count, -1)], 1)


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
        lat_base=g_srv(g_ue(batch.lat_base), 2),
        sqrt_work=g_srv(g_ue(batch.sqrt_work), 2),
        local_lat=g_ue(batch.local_lat),
        local_ok=g_ue(batch.local_ok),
        ue_mask=g_ue(batch.ue_mask),
        server_mask=g_srv(batch.server_mask[rows], 1),
        prompt=batch.prompt[rows],
        order=g_ue(batch.order),
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
    pb: PolicyBatch, target: torch.Tensor, share: torch.Tensor, srv_perm: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decisions of a :func:`permute`'d batch back to the instances' own UE and server numbering."""
    srv_orig = torch.gather(srv_perm, 1, (target - 1).clamp_min(0)) + 1
    target = torch.where(target > 0, srv_orig, 0)
    return pb.to_instance_order(target), pb.to_instance_order(share)


def pick_best(inst: Instance, prompt: str, cands: list[Candidate]) -> tuple[int, np.ndarray, np.ndarray]:
    """Index of the best candidate: feasible first, then lowest objective; ties go to the earliest."""
    obj, feas = objectives_batch(inst, np.stack([c.target for c in cands]), np.stack([c.share for c in cands]), prompt)
    order = np.lexsort((np.arange(len(cands)), obj, ~feas))
    return int(order[0]), obj, feas


def _augmented_perms(req: DecodeRequest, n_max: int, m_max: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """UE and server permutations of ``k + 1`` copies per instance (copy 0, the greedy one, unpermuted)
    and their noise seeds, all drawn per instance: independent of the batch."""
    copies = req.k + 1
    ue_perm, srv_perm, seeds = [], [], []
    for inst in req.instances:
        key = instance_key(inst)
        g = torch.Generator().manual_seed(instance_seed(req.seed, key, "augment"))
        up = _instance_perms(inst.n_ues, n_max, copies, g)
        sp = _instance_perms(inst.n_servers, m_max, copies, g)
        up[0], sp[0] = torch.arange(n_max), torch.arange(m_max)  # copy 0: the decode order itself
        ue_perm.append(up)
        srv_perm.append(sp)
        seeds += [instance_seed(req.seed, key, "copy", a) for a in range(copies)]
    return torch.cat(ue_perm), torch.cat(srv_perm), seeds


def sampled_candidates(policy: LamboPolicy, req: DecodeRequest) -> list[list[Candidate]]:
    """Per instance: the greedy decision followed by ``k`` samples on augmented copies, all in one pass
    of the decoder (the greedy copy is a greedy row of the sampled batch)."""
    if req.k < 1:
        return [[c] for c in decode_instances(policy, req, "greedy")]
    out: list[list[Candidate]] = []
    copies, dev = req.k + 1, _device(policy)
    per_chunk = max(1, MAX_ROWS // copies)
    for lo in range(0, len(req.instances), per_chunk):
        part = req.part(lo, lo + per_chunk)
        batch = _batch(policy, part)
        enc = policy.encode(batch)
        rows = torch.arange(batch.batch_size, device=dev).repeat_interleave(copies)
        ue_perm, srv_perm, seeds = _augmented_perms(part, batch.n_max, batch.m_max)
        ue_perm, srv_perm = ue_perm.to(dev), srv_perm.to(dev)
        noise = row_noise(seeds, [inst.n_ues for inst in part.instances for _ in range(copies)], batch.n_max)
        noise.greedy = (torch.arange(len(seeds)) % copies == 0).to(dev)
        pb, pe = permute(batch, enc, rows, ue_perm, srv_perm)
        res = policy.decode(pb, pe, mode="sample", noise=noise)
        t, s = unpermute(pb, res.target, res.share, srv_perm)
        dead = pb.to_instance_order(res.dead_ue)
        for c, inst in enumerate(part.instances):
            rows_c = slice(c * copies, (c + 1) * copies)
            out.append(_unpad([inst] * copies, t[rows_c], s[rows_c], dead[rows_c]))
    return out


# ----------------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------------
@register_strategy("greedy")
def greedy(policy: LamboPolicy, req: DecodeRequest) -> list[Candidate]:
    return decode_instances(policy, req, "greedy")


@register_strategy("sample")
def sample(policy: LamboPolicy, req: DecodeRequest) -> list[Candidate]:
    return decode_instances(policy, req, "sample")


@register_strategy("best_of_k")
def best_of_k(policy: LamboPolicy, req: DecodeRequest) -> list[Candidate]:
    """Greedy + ``k`` samples on augmented copies; the evaluator picks the best."""
    out = []
    for inst, prompt, cands in zip(req.instances, req.prompts, sampled_candidates(policy, req)):
        best, obj, feas = pick_best(inst, prompt, cands)
        win = cands[best]
        win.stats = {
            "k": req.k,
            "winner": "greedy" if best == 0 else f"sample_{best - 1}",
            "greedy_objective": float(obj[0]),
            "greedy_feasible": bool(feas[0]),
            "feasible_candidates": int(feas.sum()),
        }
        out.append(win)
    return out


@register_strategy("refine")
def refine(policy: LamboPolicy, req: DecodeRequest) -> list[Candidate]:
    """The policy's decision (best-of-k when k > 1) polished by the ``search`` decode's engine from that
    one start, without kicks: local search with exact objective changes, and for ``min_energy`` an exact
    solve after reduced-cost fixing (:func:`lambo_ray.experts.ils.iterated_local_search`); then optimal
    shares. Never worse than the raw decision. (Plain local search left refine 27 % above the optimum
    on a tight-deadline N = 120 ``min_energy`` cell whose must-offload UEs it had packed wastefully.)"""
    from lambo_ray.experts.ils import iterated_local_search  # lazy: it pulls in the LP/MILP solvers
    from lambo_ray.mec.shares import optimal_shares

    base = best_of_k(policy, req) if req.k > 1 else greedy(policy, req)
    out = []
    for inst, prompt, raw, known in zip(req.instances, req.prompts, base, req.local_search):
        tables = build_tables(inst, prompt) if known is None else known.tables
        rng = np.random.default_rng(instance_seed(req.seed, instance_key(inst), "refine"))
        res = iterated_local_search(tables, [("policy", raw.target)], rng, kicks=0, time_budget_s=req.time_budget_s)
        shr = None if res is None else optimal_shares(inst, res.target)
        cands = [raw] if shr is None else [raw, Candidate(res.target, shr, 0)]
        best, obj, feas = pick_best(inst, prompt, cands)
        win = cands[best]
        win.stats = {
            **raw.stats,
            "raw_objective": float(obj[0]),
            "raw_feasible": bool(feas[0]),
            "raw_dead_ends": raw.dead_ends,
            "refined": best == 1,
            "budget_hit": bool(res.budget_hit) if res is not None else False,
            "base_decode": "best_of_k" if req.k > 1 else "greedy",
        }
        out.append(win)
    return out


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------
def decode_packing(inst: Instance, prompt: str) -> tuple[Packing, Assignment | None]:
    """The plan on which the decoder holds capacity for the must-offload UEs still to decide.

    The decoder follows its plan closely (teacher forcing trains it on each label's own plan), so for
    ``min_energy`` the plan is local search's placement of those UEs: on 48 ``deadline``-drift
    instances greedy decoding went from 2.97 % to 1.25 % above the optimum (1.18 % with the exact
    optimum's own plan), and on the generalization benchmark's 8 from 2.61 % to 1.22 % (``search``:
    0.22 % to 0.04 %). For ``min_latency`` the evidence went both ways (0.99 % -> 0.80 % on the 48,
    1.05 % -> 1.66 % on the 8, and ``search`` lost the diversity of its proposals: 0.26 % -> 0.77 %),
    so it keeps :func:`~lambo_ray.mec.packing.pack_must_offload`'s plan (first fit, regret fit,
    HiGHS), which also decides wherever local search finds nothing and says why no plan exists.
    Returns the plan and, where it was computed, local search's assignment.
    """
    must = ~inst.local_feasible()
    if prompt == "min_energy" and must.any():
        found = local_search_assignment(build_tables(inst, prompt))
        if found is not None:
            return Packing(np.where(must, found.target - 1, -1).astype(np.int64), must, "local_search"), found
    return pack_must_offload(inst), None


def make_request(
    instances: Sequence[Instance],
    prompt: str | Sequence[str],
    k: int = 16,
    seed: int = 0,
    time_budget_s: float | None = None,
    heuristic_start: bool = True,
) -> DecodeRequest:
    """Validate the knobs and compute every instance's must-offload packing once."""
    if k < 0:
        raise LamboInputError(f"k must be >= 0 (got {k})", where="k")
    if time_budget_s is not None and not (time_budget_s > 0 and math.isfinite(time_budget_s)):
        raise LamboInputError(
            f"time budget must be a positive number of seconds (got {time_budget_s})", where="time_budget"
        )
    instances = list(instances)
    prompts = [prompt] * len(instances) if isinstance(prompt, str) else list(prompt)
    if len(prompts) != len(instances):
        raise LamboInputError(f"{len(prompts)} prompts for {len(instances)} instances", where="prompt")
    for p in prompts:
        check_prompt(p)
    planned = [decode_packing(inst, p) for inst, p in zip(instances, prompts)]
    packings, found = [pk for pk, _ in planned], [a for _, a in planned]
    return DecodeRequest(instances, prompts, packings, k, seed, time_budget_s, heuristic_start, found)


def decide(
    policy: LamboPolicy,
    instances: Sequence[Instance],
    prompt: str | Sequence[str],
    mode: str = "greedy",
    k: int = 16,
    seed: int = 0,
    time_budget_s: float | None = None,
    heuristic_start: bool = True,
) -> list[Decision]:
    """Decisions of the policy for ``instances`` (one prompt for all, or one per instance).

    ``stats``: ``decode`` (the mode), ``wall_s`` (this call's wall time shared evenly over its
    instances: decoding is batched), ``batch_wall_s``, ``dead_ends`` (UEs for which the masks left no
    option, possible only on an instance without a feasible decision), ``packing`` (how the must-offload
    UEs were packed), plus the strategy's own keys; ``status: "infeasible"`` with ``infeasible_reason``
    when the instance has no feasible decision (or none was found).
    """
    available_strategies()  # registers every strategy module
    if mode not in STRATEGIES:
        raise LamboInputError(f"unknown decode mode {mode!r}; expected one of {', '.join(STRATEGIES)}", where="decode")
    start = time.perf_counter()
    req = make_request(instances, prompt, k, seed, time_budget_s, heuristic_start)
    if not req.instances:
        return []
    was_training = policy.training
    if was_training:  # module.train() walks every submodule: ~0.5 ms a call, so only when needed
        policy.eval()
    try:
        with torch.inference_mode():
            cands = STRATEGIES[mode](policy, req)
    finally:
        if was_training:
            policy.train()
    wall = time.perf_counter() - start
    from lambo_ray.experts.base import make_decision  # lazy: keeps `import lambo_ray.policy` light

    decisions = []
    for inst, p, pk, c in zip(req.instances, req.prompts, req.packings, cands):
        stats = {
            "status": "heuristic",
            "decode": mode,
            "wall_s": wall / len(req.instances),
            "batch_wall_s": wall,
            "dead_ends": c.dead_ends,
            "packing": pk.status,
            **c.stats,
        }
        decision = make_decision(inst, c.target, c.share, p, METHOD, stats)
        if not decision.stats["feasible"]:
            decision.stats.update(infeasible_stats(pk))
        decisions.append(decision)
    return decisions
