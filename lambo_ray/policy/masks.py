"""What the decoder may do at each step, and how its outputs become the decision users get.

Feasible by construction. While decoding, a UE sent to server j holds only its *minimum* share
``a_min_ij`` there (what its deadline needs); ``remaining_j`` is 1 minus the minimum shares held so far.
Part of that is *reserved*: every must-offload UE still to come (its task misses the deadline locally)
holds its minimum share on the server of a packing plan (:mod:`lambo_ray.mec.packing`) until it is
decided. UE i sees the **free** capacity

    free_ij = remaining_j - reserved_ij,   reserved_ij = sum of a_min_kj over must-offload k after i planned on j

and may take server j only if ``a_min_ij <= free_ij`` (its deadline is met there and the UEs that must
offload later still fit). Local is allowed whenever it meets the deadline. The plan's own server always
passes for a must-offload UE (its reservation is released as it is decided), and every other UE can run
locally, so whenever the plan exists the decoder can never reach a dead end, whatever it chose before:
every decode mode and every training rollout is feasible. Without a plan (an infeasible instance,
flagged as such) nothing is reserved and a UE with no allowed option is a *dead end*: it runs locally
and the evaluator reports the missed deadline.

Shares. Holding only minimum shares while deciding leaves the most room for later UEs (holding the final
shares instead left many servers full early: 7.1% vs 2.7% greedy gap on min_energy in our check). The
share head outputs each UE's fraction ``u`` of its server's spare capacity, and :func:`output_shares`
turns the fractions into the decision: minimum share plus the normalised fraction of what is left, so
capacity and deadlines hold for any ``u``. :func:`spare_fractions` is its inverse on expert labels.
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


def future_demand(amin: torch.Tensor) -> torch.Tensor:
    """(B, N, M) how much of each server the UEs after each position could use: the exclusive suffix sum
    of their minimum shares where reachable. Divided by the free capacity, it tells the decoder how
    contested a server still is (attention averages, so the decoder could not count this itself)."""
    reachable = torch.isfinite(amin) & (amin <= 1.0)
    return reserved_after(torch.where(reachable, amin, torch.zeros_like(amin)))


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


def _per_server(target: torch.Tensor, x: torch.Tensor, n_servers: int) -> torch.Tensor:
    """(B, N) -> (B, N): the sum of ``x`` over the UEs on each UE's server (local UEs: their own sum)."""
    total = torch.zeros(*target.shape[:-1], n_servers + 1, dtype=x.dtype, device=x.device)
    total.scatter_add_(-1, target, x)
    return torch.gather(total, -1, target)


def output_shares(target: torch.Tensor, u: torch.Tensor, amin: torch.Tensor) -> torch.Tensor:
    """The decision's shares from the share head's outputs: every offloaded UE gets its minimum share plus
    its fraction ``u`` of its server's spare capacity, normalised over the server's UEs:

        share_i = a_min_ij + (1 - A_j) u_i / U_j,    A_j = sum a_min on j,  U_j = sum u on j

    so deadlines hold (share >= a_min) and every used server is used fully, whatever ``u`` is. ``target``
    (B, N), ``u`` (B, N), ``amin`` (B, N, M); local and padded UEs get 0.
    """
    target = target.long()
    off = target > 0
    a = torch.where(off, torch.gather(amin.double(), -1, (target - 1).clamp_min(0)[..., None])[..., 0], 0.0)
    a = torch.where(torch.isfinite(a), a, 0.0)
    u = torch.where(off, u.double(), 0.0)
    m = amin.shape[-1]
    spare = (1.0 - _per_server(target, a, m)).clamp_min(0.0)
    frac = u / _per_server(target, u, m).clamp_min(1e-300)
    return torch.where(off, a + spare * frac, torch.zeros_like(a))


def spare_fractions(target: torch.Tensor, share: torch.Tensor, amin: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`output_shares` on labels: each offloaded UE's fraction of its server's spare
    capacity, ``(share_i - a_min_ij) / (1 - A_j)`` (they sum to 1 on a server the labels fill). What the
    share head imitates; 0.5 where a server has no spare capacity (any fraction maps to a_min there)."""
    target = target.long()
    off = target > 0
    a = torch.where(off, torch.gather(amin.double(), -1, (target - 1).clamp_min(0)[..., None])[..., 0], 0.0)
    a = torch.where(torch.isfinite(a), a, 0.0)
    spare = 1.0 - _per_server(target, a, amin.shape[-1])
    extra = (share.double() - a).clamp_min(0.0)
    u = torch.where(spare > 1e-12, extra / spare.clamp_min(1e-12), 0.5)
    return torch.where(off, u, 0.5)
