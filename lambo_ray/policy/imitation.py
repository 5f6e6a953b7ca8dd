"""The one imitation loss: maximum likelihood of expert decisions under teacher forcing.

Used by the supervised warm start before ACRL (:mod:`lambo_ray.rl.warm_start`) and by ALEF's
decoder-only fine-tuning (:mod:`lambo_ray.alef.finetune`), so both train towards the same thing:

* ``target_ce``: cross-entropy of the expert's targets, mean over real UEs;
* ``share_nll``: negative log-likelihood of the expert's shares under the share head (the Beta
  density of the ``u`` that maps to the label given the remaining capacity), mean over offloaded UEs.

The share head imitates each UE's fraction of its server's spare capacity
(:func:`~lambo_ray.policy.masks.spare_fractions`, computed by teacher forcing from the label's shares).
A feasible label always passes the policy's masks up to floating-point round-off when a claim sits
exactly on a full server; such UEs (log-prob ~ -1e9) are left out and counted rather than letting one
of them dominate the loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lambo_ray.policy.features import PolicyBatch

# Teacher-forced log-probs below this belong to masked options (the mask adds -1e9).
MASKED_LOGP = -1e6


@dataclass
class ImitationLoss:
    target_ce: torch.Tensor  # scalar
    share_nll: torch.Tensor  # scalar
    masked_labels: int  # label targets the policy's feasibility masks exclude (round-off)

    def total(self, target_weight: float = 1.0, share_weight: float = 1.0) -> torch.Tensor:
        return target_weight * self.target_ce + share_weight * self.share_nll


def pad_labels(
    targets: Sequence[np.ndarray], shares: Sequence[np.ndarray], n_max: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack unpadded label arrays into (B, n_max) tensors (0 = local / padding)."""
    target = torch.zeros(len(targets), n_max, dtype=torch.long)
    share = torch.zeros(len(targets), n_max, dtype=torch.float64)
    for k, (t, s) in enumerate(zip(targets, shares)):
        target[k, : len(t)] = torch.as_tensor(np.array(t, dtype=np.int64))
        share[k, : len(s)] = torch.as_tensor(np.array(s, dtype=np.float64))
    return target, share


def imitation_loss(
    policy: torch.nn.Module,
    batch: PolicyBatch,
    target: torch.Tensor,
    share: torch.Tensor,
    *,
    train_encoder: bool = True,
    first_step: torch.Tensor | None = None,
) -> ImitationLoss:
    """Both loss terms on a padded batch of labels (``target``, ``share``: (B, N) in the instances' own UE
    order, shares as the expert gave them; the batch is in decode order). ``train_encoder=False`` runs the
    encoder without gradient (ALEF). ``first_step`` (B,): decode positions before it are teacher-forced
    but left out of both terms (a label that completes the policy's own first decisions)."""
    target, share = batch.to_decode_order(target), batch.to_decode_order(share)
    with contextlib.nullcontext() if train_encoder else torch.no_grad():
        enc = policy.encode(batch)
    tf = policy.teacher_forced(batch, enc, target, share)
    real = batch.ue_mask
    if first_step is not None:
        position = torch.arange(batch.n_max, device=real.device)[None, :]
        real = real & (position >= first_step.to(device=real.device, dtype=torch.long)[:, None])
    masked = real & (tf.logp_target < MASKED_LOGP)
    keep = real & ~masked
    off = keep & (target > 0)
    target_ce = -(tf.logp_target.masked_fill(~keep, 0.0)).sum() / keep.sum().clamp(min=1)
    share_nll = -(tf.logp_share.masked_fill(~off, 0.0)).sum() / off.sum().clamp(min=1)
    return ImitationLoss(target_ce, share_nll, int(masked.sum()))
