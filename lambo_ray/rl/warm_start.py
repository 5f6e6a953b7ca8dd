"""Supervised warm start before ACRL: imitate expert labels over the training distribution.

CPU time is scarce, and an expert label costs milliseconds to seconds, so a phase of maximum likelihood
(the shared imitation loss, :mod:`lambo_ray.policy.imitation`) on expert decisions puts the policy near
the expert before RL refines it; the benchmark reports pure ACRL beside it. Labels come from
:mod:`lambo_ray.rl.labels` (cached in the run directory, made in parallel on Ray). Cells of very
different sizes are trained together: each minibatch holds cells of similar size up to a budget of UE
tokens (little padding, and small cells get large batches), and the learning rate decays on a cosine.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lambo_ray.mec.instance import Instance
from lambo_ray.mec.shares import optimal_shares
from lambo_ray.policy import LamboPolicy
from lambo_ray.policy.features import PROMPT_IDS, InstanceFeatures, collate, instance_features, label_packing
from lambo_ray.policy.imitation import imitation_loss, pad_labels
from lambo_ray.rl.config import PretrainConfig
from lambo_ray.rl.labels import Label, LabelConfig, build_labels, training_instance

LABELS_CACHE = "labels.jsonl"
LABEL_SEED_OFFSET = 7_777_777  # training instances are far from the validation seeds


@dataclass
class Example:
    """One labelled instance, with its features computed once (the label's own must-offload packing)."""

    instance: Instance
    prompt: str
    target: np.ndarray
    share: np.ndarray
    features: InstanceFeatures

    @property
    def size(self) -> int:
        return self.instance.n_ues


def label_config(cfg: PretrainConfig) -> LabelConfig:
    return LabelConfig(energy_exact_time_limit=cfg.label_energy_time_limit, kicks=cfg.label_kicks)


def examples_from_labels(cfg: PretrainConfig, labels: Sequence[Label], seed: int) -> list[Example]:
    dist = cfg.training_distribution()
    out, cache = [], {}
    for lab in labels:
        inst = cache.get(lab.index) or cache.setdefault(lab.index, training_instance(dist, seed, lab.index))
        target = np.asarray(lab.target, dtype=np.int64)
        share = optimal_shares(inst, target)
        if share is None:  # cannot happen for a feasible label; never imitate an infeasible one
            continue
        feats = instance_features(inst, label_packing(inst, target))
        out.append(Example(inst, lab.prompt, target, share, feats))
    return out


def size_batches(examples: Sequence[Example], ue_budget: int, rng: np.random.Generator) -> list[list[int]]:
    """Minibatches of cells of similar size (sorted by N with random tie-breaks), each holding at most
    ``ue_budget`` padded UE tokens, in random order."""
    sizes = np.array([e.size for e in examples])
    order = np.lexsort((rng.random(len(examples)), sizes))
    batches, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * max(sizes[cur[-1]], sizes[i]) > ue_budget:
            batches.append(cur)
            cur = []
        cur.append(int(i))
    if cur:
        batches.append(cur)
    return [batches[k] for k in rng.permutation(len(batches))]


def imitation_step(policy: LamboPolicy, opt: torch.optim.Optimizer, examples: Sequence[Example]) -> float:
    batch = collate([e.features for e in examples], np.array([PROMPT_IDS[e.prompt] for e in examples]))
    target, share = pad_labels([e.target for e in examples], [e.share for e in examples], batch.n_max)
    loss = imitation_loss(policy, batch, target, share).total()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    opt.step()
    return float(loss.item())


def train_on_examples(
    policy: LamboPolicy,
    examples: Sequence[Example],
    epochs: int,
    lr: float,
    ue_budget: int,
    seed: int,
    log: Callable[[str], None] = print,
) -> list[float]:
    """``epochs`` passes of Adam with a cosine learning rate (to lr / 10); returns each epoch's mean loss."""
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    rng = np.random.default_rng(seed)
    plan = [size_batches(examples, ue_budget, rng) for _ in range(epochs)]
    total, step, losses = sum(len(p) for p in plan), 0, []
    policy.train()
    for epoch, batches in enumerate(plan):
        epoch_loss = []
        for idx in batches:
            for group in opt.param_groups:
                group["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(total, 1))))
            epoch_loss.append(imitation_step(policy, opt, [examples[i] for i in idx]))
            step += 1
        losses.append(float(np.mean(epoch_loss)))
        log(f"warm start: epoch {epoch + 1}/{epochs} loss {losses[-1]:.4f}")
    policy.eval()
    return losses


def warm_start_labels(cfg: PretrainConfig, run_dir: str | Path, log: Callable[[str], None] = print) -> list[Label]:
    """The run's expert labels: ``warm_start_labels`` training instances x ``warm_start_prompts``, from the
    cache in ``run_dir`` where present (a run can be labelled ahead of training, or resumed)."""
    return build_labels(
        cfg.training_distribution(),
        cfg.seed + LABEL_SEED_OFFSET,
        cfg.warm_start_labels,
        Path(run_dir) / LABELS_CACHE,
        label_config(cfg),
        prompts=cfg.warm_start_prompts,
        log=log,
    )


def supervised_warm_start(
    policy: LamboPolicy, cfg: PretrainConfig, run_dir: str | Path, log: Callable[[str], None] = print
) -> dict[str, float]:
    """Label ``warm_start_labels`` instances of the training distribution for every warm-start prompt
    (cached in ``run_dir``), imitate them, then run the self-imitation rounds; returns the first and last
    epoch's mean loss."""
    from lambo_ray.rl.self_imitation import self_imitation

    labels = warm_start_labels(cfg, run_dir, log)
    examples = examples_from_labels(cfg, labels, cfg.seed + LABEL_SEED_OFFSET)
    losses = train_on_examples(
        policy, examples, cfg.warm_start_epochs, cfg.warm_start_lr, cfg.warm_start_batch_ues, cfg.seed, log
    )
    metrics = {
        "warm_start/labels": float(len(examples)),
        "warm_start/nll_first_epoch": losses[0] if losses else float("nan"),
        "warm_start/nll_last_epoch": losses[-1] if losses else float("nan"),
    }
    return metrics | self_imitation(policy, cfg, examples, log)
