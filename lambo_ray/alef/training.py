"""Decoder-only training of ALEF: the encoder and input embedding stay frozen.

Only the decoder learns: the encoder's representation of a cell is what pretraining paid for, the
decoder is small and cheap to swap per regime (Serve keeps one encoder and many decoders).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lambo_ray.alef.buffer import Example, LabelBuffer, epoch_minibatches
from lambo_ray.alef.config import AlefConfig
from lambo_ray.alef.online import inference_plan
from lambo_ray.mec.packing import Packing
from lambo_ray.policy.imitation import ImitationLoss, imitation_loss, pad_labels


def freeze_encoder(policy: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Freeze everything but the decoder; return the decoder's parameters (the only trainable ones)."""
    decoder = list(policy.decoder_parameters())
    for p in policy.parameters():
        p.requires_grad_(False)
    for p in decoder:
        p.requires_grad_(True)
    return decoder


def make_optimizer(policy: torch.nn.Module, cfg: AlefConfig) -> torch.optim.Optimizer:
    """Adam over the decoder's parameters only: a frozen parameter never even reaches the optimiser."""
    return torch.optim.Adam(freeze_encoder(policy), lr=cfg.lr, weight_decay=cfg.weight_decay)


def label_packings(examples: Sequence[Example], label_plan: str = "inference") -> list[Packing | None]:
    """The must-offload plan each label is teacher-forced with (:attr:`AlefConfig.label_plan`)."""
    from lambo_ray.policy.features import label_packing

    if label_plan == "label":
        return [label_packing(e.instance, e.target) for e in examples]
    return [inference_plan(e.instance, e.prompt) for e in examples]


def imitation_losses(
    policy: torch.nn.Module, examples: Sequence[Example], label_plan: str = "inference", train_encoder: bool = False
) -> ImitationLoss:
    """The imitation loss (:mod:`lambo_ray.policy.imitation`) on a minibatch of expert labels, with the
    encoder frozen: gradients reach only the decoder (``train_encoder``: the whole model, a control the
    capacity probe ``benchmarks/alef_ceiling.py`` compares with). Label steps the plan's masks exclude are
    left out of the loss and counted (``masked_labels``), and so are the steps before an example's
    ``first_step``."""
    from lambo_ray.policy.features import featurize

    packings = label_packings(examples, label_plan)
    batch = featurize([e.instance for e in examples], [e.prompt for e in examples], packings=packings)
    target, share = pad_labels([e.target for e in examples], [e.share for e in examples], batch.n_max)
    first = torch.tensor([e.first_step for e in examples]) if any(e.first_step for e in examples) else None
    return imitation_loss(policy, batch, target, share, train_encoder=train_encoder, first_step=first)


def train_decoder(
    policy: torch.nn.Module,
    opt: torch.optim.Optimizer,
    drifted: LabelBuffer,
    replay: LabelBuffer,
    cfg: AlefConfig,
    rng: np.random.Generator,
    train_encoder: bool = False,
) -> dict[str, float]:
    """``cfg.epochs`` passes over the drifted labels, each minibatch topped up with replay labels.

    Returns the mean losses over all steps, and the mean loss of the first and of the last epoch
    (whether the labels were fitted at all is the first question when an update gets rolled back).
    """
    params = [p for group in opt.param_groups for p in group["params"]]
    sums = {"loss": 0.0, "target_ce": 0.0, "share_nll": 0.0}
    steps = masked = 0
    epoch_loss: list[float] = []
    policy.train()
    for _ in range(cfg.epochs):
        total = n = 0.0
        for mb in epoch_minibatches(drifted, replay, cfg.batch_size, cfg.replay_fraction, rng):
            il = imitation_losses(policy, mb, cfg.label_plan, train_encoder)
            masked += il.masked_labels
            loss = il.total(cfg.target_weight, cfg.share_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sums["loss"] += loss.item()
            sums["target_ce"] += il.target_ce.item()
            sums["share_nll"] += il.share_nll.item()
            total, n = total + loss.item(), n + 1
            steps += 1
        epoch_loss.append(total / max(n, 1))
    policy.eval()
    first, last = (epoch_loss[0], epoch_loss[-1]) if epoch_loss else (float("nan"), float("nan"))
    return {k: v / max(steps, 1) for k, v in sums.items()} | {
        "steps": steps,
        "masked_labels": masked,
        "loss_first_epoch": first,
        "loss_last_epoch": last,
    }
