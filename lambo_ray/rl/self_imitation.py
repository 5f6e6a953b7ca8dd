"""Self-imitation: the policy's own search-improved decisions become its next labels.

Exact labels get expensive for large cells (the MILP needs seconds to minutes at N >= 100), and labels
the policy cannot reproduce step by step teach it less than labels close to what it already does. So
after the supervised warm start, each round draws fresh instances of the training distribution, lets
the current policy propose (greedy + ``k`` augmented samples) and ``search`` polish them (local search
with ejection chains and perturbations, the greedy heuristic's decision as one more start), adds the
best decisions to the label pool, and trains a few more epochs on the whole pool (the expert labels
stay, so nothing learned from them is forgotten).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from lambo_ray.policy import LamboPolicy, decide
from lambo_ray.policy.features import instance_features, label_packing
from lambo_ray.rl.config import PretrainConfig
from lambo_ray.rl.labels import training_instance
from lambo_ray.rl.warm_start import Example, train_on_examples

SELF_SEED_OFFSET = 5_555_555  # fresh instances per round, far from the expert labels' seeds


def search_examples(
    policy: LamboPolicy, cfg: PretrainConfig, round_index: int, log: Callable[[str], None]
) -> list[Example]:
    """One round's new labels: ``self_imitation_instances`` fresh instances x the warm-start prompts."""
    seed = cfg.seed + SELF_SEED_OFFSET + 1_000 * round_index
    dist = cfg.training_distribution()
    insts = [training_instance(dist, seed, i) for i in range(cfg.self_imitation_instances)]
    out = []
    for prompt in cfg.warm_start_prompts:
        decisions = decide(policy, insts, prompt, "search", k=cfg.self_imitation_k, seed=seed)
        for inst, d in zip(insts, decisions):
            if d.stats["feasible"]:
                target = np.asarray(d.target, dtype=np.int64)
                feats = instance_features(inst, label_packing(inst, target))
                out.append(Example(inst, prompt, target, np.asarray(d.share), feats))
        log(f"self-imitation round {round_index + 1}: {prompt} labelled by search")
    return out


def self_imitation(
    policy: LamboPolicy, cfg: PretrainConfig, examples: list[Example], log: Callable[[str], None] = print
) -> dict[str, float]:
    """``self_imitation_rounds`` rounds (module docstring); ``examples`` (the expert labels) grows."""
    metrics: dict[str, float] = {}
    for r in range(cfg.self_imitation_rounds):
        examples.extend(search_examples(policy, cfg, r, log))
        losses = train_on_examples(
            policy,
            examples,
            cfg.self_imitation_epochs,
            cfg.warm_start_lr * cfg.self_imitation_lr_scale,
            cfg.warm_start_batch_ues,
            cfg.seed + 1 + r,
            log,
        )
        metrics[f"self_imitation/round_{r + 1}_loss"] = losses[-1] if losses else float("nan")
    metrics["self_imitation/labels"] = float(len(examples))
    return metrics
