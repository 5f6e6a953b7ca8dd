"""A short label-free policy-gradient phase on drifted instances, after a round's imitation.

Imitation trains the decoder on the expert's states; greedy decoding then meets its own, and on
drifts where most UEs must offload imitating near-optimal labels can make greedy decisions worse
(exposure bias). Sampling the current policy on drifted instances and reinforcing the samples that
beat their siblings optimises the decisions the policy actually reaches, at no expert cost. The
advantage is a group baseline (as pretraining's default ACRL baseline): each instance is decoded
``k`` times and a sample's advantage is how much cheaper it is than the mean of its group.

Measured with the capacity probe (``benchmarks/alef_ceiling.py --variants decoder rl``, 384 drifted
self-labelled instances, 3 rounds, ``min_energy``): after imitation plus the phase the held-out
greedy gap ended lower than after imitation alone on ``deadline`` (3 of 3 seeds, 0.02-0.42 points),
``outage`` (0.08) and ``density`` (0.16), and higher on ``mobility`` (0.19); ALEF's gate judges the
imitation + policy-gradient update of a round as one. On by default (``AlefConfig.pg_epochs``):
on ``lambo finetune --drift outage`` the decoder shipped with the phase was cheaper on 1024 fresh
drifted instances than the one shipped without it, on both seeds and under both gates; the phase is
also why more arrivals per round help (without it 128 and 768 arrivals shipped equally good decoders).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch

from lambo_ray.alef.online import inference_plan, objectives
from lambo_ray.mec.instance import Instance

if TYPE_CHECKING:
    from lambo_ray.policy.features import PolicyBatch
    from lambo_ray.policy.model import DecodeOut, Encoded

INFEASIBLE_PENALTY = 1.1  # an infeasible sample counts as its group's worst feasible one times this


def sampled_groups(
    policy: torch.nn.Module, instances: Sequence[Instance], prompts: Sequence[str], k: int, seed: int
) -> tuple[np.ndarray, PolicyBatch, Encoded, DecodeOut]:
    """``k`` sampled decodes of each instance (on the must-offload plan users' decisions use) and their
    evaluator objectives, ``(len(instances), k)`` with NaN where infeasible; plus the batch, encoding
    and decode, in group-major row order (instance 0's ``k`` rows first)."""
    from lambo_ray.policy.features import featurize

    rep = [inst for inst in instances for _ in range(k)]
    rep_prompts = [p for p in prompts for _ in range(k)]
    batch = featurize(rep, rep_prompts, packings=[inference_plan(i, p) for i, p in zip(rep, rep_prompts)])
    with torch.no_grad():
        enc = policy.encode(batch)
        out = policy.decode(batch, enc, "sample", generator=torch.Generator().manual_seed(seed))
    target, share = batch.to_instance_order(out.target), batch.to_instance_order(out.share)
    obj = objectives(
        rep,
        rep_prompts,
        [target[r, : inst.n_ues].cpu().numpy() for r, inst in enumerate(rep)],
        [share[r, : inst.n_ues].double().cpu().numpy() for r, inst in enumerate(rep)],
    )
    return obj.reshape(len(instances), k), batch, enc, out


def group_advantages(obj: np.ndarray) -> np.ndarray:
    """How much cheaper each sample is than the mean of its group (a row), as a fraction of that mean.

    Relative, so instances of different sizes weigh alike; infeasible samples (NaN) count as the
    group's worst feasible one times :data:`INFEASIBLE_PENALTY`, and a group with nothing feasible has
    nothing to prefer (all zero)."""
    feasible = np.isfinite(obj)
    worst = np.max(np.where(feasible, obj, -np.inf), axis=1, keepdims=True)
    filled = np.where(feasible, obj, INFEASIBLE_PENALTY * np.where(np.isfinite(worst), worst, 1.0))
    mean = filled.mean(axis=1, keepdims=True)
    return (mean - filled) / np.maximum(mean, 1e-12)


def policy_gradient_phase(
    policy: torch.nn.Module,
    opt: torch.optim.Optimizer,
    instances: Sequence[Instance],
    prompts: Sequence[str],
    rng: np.random.Generator,
    epochs: int,
    k: int = 8,
    chunk: int = 16,
    grad_clip: float = 1.0,
    lr_scale: float = 1.0,
) -> dict[str, float]:
    """``epochs`` passes over ``instances`` in chunks of ``chunk`` instances x ``k`` samples: the
    parameters ``opt`` holds ascend advantage x log-probability of the sampled decisions. The
    offloading choice always counts; the share only where the prompt is ``min_latency`` (the
    ``min_energy`` objective does not see shares, so their log-probabilities would only add noise).
    Deterministic given ``rng``. Returns the steps taken and the mean spread (standard deviation) of
    the groups' advantages: how much the samples differed, i.e. how much there was to learn from.
    ``lr_scale`` multiplies ``opt``'s learning rates for the phase's steps (restored afterwards)."""
    if epochs < 1 or not instances:
        return {"pg_steps": 0, "pg_group_spread": float("nan")}
    params = [p for group in opt.param_groups for p in group["params"]]
    spreads: list[float] = []
    was_training = policy.training
    policy.train()
    with scaled_learning_rate(opt, lr_scale):
        for _ in range(epochs):
            perm = rng.permutation(len(instances))
            for lo in range(0, len(instances), chunk):
                part = [int(i) for i in perm[lo : lo + chunk]]
                obj, batch, enc, out = sampled_groups(
                    policy, [instances[i] for i in part], [prompts[i] for i in part], k, int(rng.integers(2**31))
                )
                adv = group_advantages(obj)
                spreads.append(float(adv.std(axis=1).mean()))
                latency_rows = torch.tensor([prompts[i] == "min_latency" for i in part for _ in range(k)])
                tf = policy.teacher_forced(batch, enc, out.target, out.share, u=out.u)
                logp = tf.logp_target.sum(-1) + torch.where(latency_rows, tf.logp_share.sum(-1), 0.0)
                loss = -(torch.as_tensor(adv.reshape(-1), dtype=logp.dtype) * logp).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
                opt.step()
    policy.train(was_training)
    return {"pg_steps": len(spreads), "pg_group_spread": float(np.mean(spreads))}


@contextmanager
def scaled_learning_rate(opt: torch.optim.Optimizer, scale: float) -> Iterator[None]:
    """``opt``'s learning rates times ``scale`` inside the block, as they were after it (even on error)."""
    lrs = [group["lr"] for group in opt.param_groups]
    for group in opt.param_groups:
        group["lr"] *= scale
    try:
        yield
    finally:
        for group, lr in zip(opt.param_groups, lrs):
            group["lr"] = lr
