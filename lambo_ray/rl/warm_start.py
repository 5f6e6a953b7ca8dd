"""Supervised warm start before ACRL: imitate expert decisions (the shared imitation loss).

CPU time is scarce, and exact ``min_energy`` labels cost a few hundredths of a second each, so a
short phase of maximum likelihood on expert labels puts the policy near the expert before RL refines
it. The benchmark reports pure ACRL beside it.
"""

from __future__ import annotations

import numpy as np
import torch

from lambo_ray.mec.generator import generate_many
from lambo_ray.mec.instance import Instance
from lambo_ray.policy import LamboPolicy, featurize
from lambo_ray.policy.features import label_packing
from lambo_ray.policy.imitation import imitation_loss
from lambo_ray.rl.config import PretrainConfig


def expert_labels(cfg: PretrainConfig) -> tuple[list[Instance], list[str], np.ndarray, np.ndarray]:
    """Expert targets on fresh instances (``warm_start_experts`` per prompt), with the water-filled
    optimal shares for them (min_energy ignores shares, so the latency-optimal feasible ones are the
    natural share label). Targets and shares are padded to ``cfg.n_max``."""
    from lambo_ray.experts import get_expert
    from lambo_ray.mec.shares import optimal_shares

    insts = generate_many(cfg.scenario_config(), cfg.warm_start_labels, cfg.seed + 7_777_777)
    experts = {p: get_expert(cfg.warm_start_experts[p]) for p in cfg.warm_start_prompts}
    prompts, targets, shares = [], [], []
    for k, inst in enumerate(insts):
        p = cfg.warm_start_prompts[k % len(cfg.warm_start_prompts)]
        d = experts[p].solve(inst, p, cfg.val_expert_time_limit)
        s = optimal_shares(inst, d.target)
        t = np.zeros(cfg.n_max, np.int64)
        sh = np.zeros(cfg.n_max)
        t[: inst.n_ues] = d.target
        sh[: inst.n_ues] = s if s is not None else d.share
        prompts.append(p)
        targets.append(t)
        shares.append(sh)
    return insts, prompts, np.stack(targets), np.stack(shares)


def supervised_warm_start(policy: LamboPolicy, cfg: PretrainConfig) -> dict[str, float]:
    """``warm_start_epochs`` passes of Adam over the expert labels; returns the first and last epoch's
    mean loss (target cross-entropy + share NLL)."""
    insts, prompts, targets, shares = expert_labels(cfg)
    packings = [label_packing(inst, t[: inst.n_ues]) for inst, t in zip(insts, targets)]
    batch = featurize(insts, prompts, cfg.n_max, cfg.m_max, packings=packings)
    t_all, s_all = torch.from_numpy(targets), torch.from_numpy(shares)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.warm_start_lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    policy.train()
    first = last = float("nan")
    for epoch in range(cfg.warm_start_epochs):
        perm = torch.randperm(len(insts), generator=gen)
        losses = []
        for lo in range(0, len(insts), cfg.minibatch_size):
            idx = perm[lo : lo + cfg.minibatch_size]
            loss = imitation_loss(policy, batch.index(idx), t_all[idx], s_all[idx]).total()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
        if epoch == 0:
            first = float(np.mean(losses))
        last = float(np.mean(losses))
    policy.eval()
    return {
        "warm_start/labels": float(len(insts)),
        "warm_start/nll_first_epoch": first,
        "warm_start/nll_last_epoch": last,
    }
