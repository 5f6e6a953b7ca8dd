"""What the decoder may do at each step, and how its raw output becomes the decision users get.

Feasible by construction. Before UE i is decided, server j has ``remaining_j`` capacity left (1 minus
the shares already claimed on it). Part of that is *reserved*: every must-offload UE still to come
(its task misses the deadline locally) holds its minimum share on the server of a packing plan
(:mod:`lambo_ray.mec.packing`) until it is decided. UE i sees the **free** capacity

    free_ij = remaining_j - reserved_ij,     reserved_ij = sum over must-offload k after i planned on j of a_min_kj

and may take server j only if ``a_min_ij <= free_ij`` (its deadline is met there and the UEs that must
offload later still fit), with a share in ``[a_min_ij, free_ij]``. Local is allowed whenever it meets
the deadline. The plan's own server always passes for a must-offload UE (its reservation is released
as it is decided), and every other UE can run locally, so whenever the plan exists the decoder can
never reach a dead end, whatever it chose before: every decode mode and every training rollout is
feasible. Without a plan (an infeasible instance, flagged as such) nothing is reserved and a UE with no
allowed option is a *dead end*: it runs locally and the evaluator reports the missed deadline.

Output mapping: :func:`fill_capacity` spreads each used server's leftover capacity over its UEs in
proportion to their shares (shares only grow, so deadlines and capacity still hold, and latency can
only drop); its inverse on labels, :func:`claims_from_shares`, turns an expert's full-server shares
into the small decode-time claims the decoder should imitate.
"""

from __future__ import annotations

import torch

NEG = -1e9  # additive mask value (finite: a fully masked row never turns into NaN)
FIT_RTOL = 1e-9  # relative round-off allowed when testing a_min_ij <= free_ij


def reserved_after(reserve: torch.Tensor) -> torch.Tensor:
    """(B, N, M) capacity reserved for the must-offload UEs decided *after* each position.

    ``reserve`` (B, N, M) holds each must-offload UE's minimum share on its planned server (0 elsewhere);
    the result at position i is the sum over positions k > i (an exclusive suffix sum).
    """
    return reserve.flip(1).cumsum(1).flip(1) - reserve


def allowed_options(
    free: torch.Tensor, amin: torch.Tensor, local_ok: torch.Tensor, server_mask: torch.Tensor, ue_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feasible options (B,Q,M+1) given the free capacity before each query UE; and dead ends (B,Q).

    ``FIT_RTOL`` lets an expert's label whose share equals the free capacity up to round-off stay
    allowed under teacher forcing; a share built on such a server exceeds capacity or misses the
    deadline by at most that relative 1e-9, far inside the evaluator's tolerance.
    A dead end (nothing fits) and a padded UE both get "local" as their only option, so their
    distribution is deterministic (log-prob 0, entropy 0) and never NaN.
    """
    srv_ok = server_mask[:, None, :] & torch.isfinite(amin) & (amin <= free * (1.0 + FIT_RTOL))
    opts = torch.cat([local_ok[..., None], srv_ok], dim=-1) & ue_mask[..., None]
    dead = ~opts.any(-1)
    opts = opts.clone()
    opts[..., 0] |= dead
    return opts, dead & ue_mask


def categorical_entropy(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits, -1)
    return -(torch.where(allowed, logp.exp() * logp, torch.zeros_like(logp))).sum(-1)


def fill_capacity(target: torch.Tensor, share: torch.Tensor, n_servers: int) -> torch.Tensor:
    """Output mapping: scale every used server's shares so they sum to exactly 1.

    Shares only grow (each is divided by its server's load <= 1), so a share that met its
    deadline still does, and capacity holds with equality. Local/padded entries stay 0.
    """
    off = target > 0
    load = torch.zeros(*target.shape[:-1], n_servers + 1, dtype=share.dtype, device=share.device)
    load.scatter_add_(-1, target, torch.where(off, share, torch.zeros_like(share)))
    per_ue = torch.gather(load, -1, target)
    return torch.where(off & (per_ue > 0), share / per_ue.clamp_min(1e-300), share)


def claims_from_shares(target: torch.Tensor, share: torch.Tensor, amin: torch.Tensor) -> torch.Tensor:
    """The smallest decode-time shares ("claims") that :func:`fill_capacity` maps back onto ``share``.

    Use it on expert labels before teacher forcing (ALEF, supervised warm start). The decoder claims
    shares UE after UE out of what is left, and the output mapping scales every used server up to a
    full load; an expert's water-filled shares already fill each server, so imitating them literally
    teaches early UEs to claim the capacity later UEs on the same server need (greedy decoding then
    finds servers full and sends UEs local). Claims are ``kappa_j * share_i`` with
    ``kappa_j = max_i a_min_ij / share_i`` over the UEs on server j: still >= a_min (deadlines hold),
    proportional to the shares, so ``fill_capacity(claims) == share`` whenever the labels use each
    server fully. ``target`` (B, N), ``share`` (B, N), ``amin`` (B, N, M) as in :class:`PolicyBatch`.
    """
    share = share.double()
    target = target.long()
    off = target > 0
    a = torch.gather(amin.double(), -1, (target - 1).clamp_min(0)[..., None])[..., 0]
    ratio = torch.where(off & (share > 0), a / share.clamp_min(1e-300), torch.ones_like(share))
    ratio = torch.where(off, ratio.clamp(max=1.0), torch.zeros_like(share))  # > 1 only for infeasible labels
    kappa = torch.zeros(*target.shape[:-1], amin.shape[-1] + 1, dtype=share.dtype, device=share.device)
    kappa = kappa.scatter_reduce(-1, target, ratio, reduce="amax")
    return torch.where(off, share * torch.gather(kappa, -1, target), torch.zeros_like(share))
