"""ALEF: active-learning fine-tuning of LAMBO's decoder when the environment drifts.

The loop (:func:`run_alef`) reads like the paper's procedure:

    label a small pre-drift replay set once; label the held-out sets (reference objectives)
    for each round:
        instances arrive from the drifted environment (unlabelled)
        the current policy decides each one online (greedy; the decision is recorded as served)
        the query strategy scores them (decision entropy, sampled or polished gain, or random); the top ones
            within budget are queried
        the expert pool labels them in parallel (exact with a time limit, fallbacks) -> labelled buffer
        the decoder is trained on the buffer (+ replay of pre-drift labels) except a held-back
            share of both; encoder and input embedding stay frozen; the update is kept only if
            greedy decisions on the held-back labels did not get worse (the gate)
        metrics: labels used, gap to the expert on held-out drifted and undrifted instances
        with a run store: the round's state is saved, so a crash loses nothing already bought

The parts live in their own modules: ``config`` (AlefConfig), ``environment`` (drift stream),
``online`` (greedy decisions + query inputs), ``query``, ``expert_pool`` / ``worker`` (labels),
``training``, ``gate``, ``references``, ``metrics``, ``rounds`` (one round), ``store`` (resume).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from lambo_ray.alef.buffer import LabelBuffer, held_back
from lambo_ray.alef.config import AlefConfig, run_seeds
from lambo_ray.alef.environment import cycle_prompts, drift_stream, snapshot_set
from lambo_ray.alef.metrics import AlefResult, LabelledSet, OnlineRecord, RoundMetrics, gap_report, labelled_gap
from lambo_ray.alef.online import Decided, decide
from lambo_ray.alef.query import LabelBudget, get_query
from lambo_ray.alef.references import Labeller, References, prepare_references, reference_key
from lambo_ray.alef.rounds import AlefRun, RunState, run_round, state_doc, trainer_doc
from lambo_ray.alef.store import CachedLabeller, RunStore, SavedRound, policy_digest
from lambo_ray.alef.training import freeze_encoder, imitation_losses, make_optimizer, train_decoder
from lambo_ray.mec.instance import Instance

__all__ = [
    "AlefConfig",
    "AlefResult",
    "Decided",
    "LabelledSet",
    "OnlineRecord",
    "References",
    "RoundMetrics",
    "cycle_prompts",
    "decide",
    "drift_stream",
    "freeze_encoder",
    "gap_report",
    "imitation_losses",
    "labelled_gap",
    "make_optimizer",
    "prepare_references",
    "reference_key",
    "run_alef",
    "snapshot_set",
    "train_decoder",
]


def _references(cfg: AlefConfig, labeller: Labeller, given: References | None) -> tuple[References, float]:
    """The run's reference sets and the time spent labelling them (0 when given)."""
    if given is None:
        refs = prepare_references(cfg, labeller)
        return refs, refs.label_s
    if given.key != reference_key(cfg):
        raise ValueError("references were prepared for another config (scenario, drift, prompts, sizes or seed)")
    return given, 0.0


def _start(
    policy: torch.nn.Module, cfg: AlefConfig, labeller: Labeller, refs: References, log: Callable[[str], None]
) -> AlefRun:
    seeds = run_seeds(cfg.seed)
    torch.manual_seed(seeds["train"])
    replay = refs.replay.examples()
    held = held_back(len(replay), cfg.held_back_share())
    policy.eval()
    return AlefRun(
        policy=policy,
        cfg=cfg,
        opt=make_optimizer(policy, cfg),
        query=get_query(cfg.query, **cfg.query_kwargs()),
        labeller=labeller,
        refs=refs,
        replay=LabelBuffer([e for e, val in zip(replay, held) if not val]),
        replay_val=[dataclasses.replace(e, validation=True) for e, val in zip(replay, held) if val],
        rng_train=np.random.default_rng(seeds["train"]),
        rng_query=np.random.default_rng(seeds["query"]),
        stream=drift_stream(cfg.scenario, cfg.drift, seeds["stream"], cfg.series_dt_s, cfg.mobility_cells),
        budget=LabelBudget(cfg.budget, cfg.rounds, cfg.budget_per_round),
        seeds=seeds,
        gate_undrifted=gate_undrifted(cfg, seeds["gate_undrifted"]),
        log=log,
    )


def gate_undrifted(cfg: AlefConfig, seed: int) -> tuple[list[Instance], list[str]]:
    """Fresh instances of the undrifted (pretraining) regime on which the gate watches forgetting: the same
    set every round, unlabelled; none without a gate."""
    count = cfg.gate_instances if cfg.gate else 0
    return snapshot_set(cfg.scenario, count, seed), cycle_prompts(cfg.prompts, count)


def _restore(run: AlefRun, saved: SavedRound) -> dict[str, Any]:
    """Put a saved round's state into a freshly started run; returns the saved ``before`` report."""
    s = saved.state
    run.policy.decoder.load_state_dict(saved.trainer["decoder"])
    run.opt.load_state_dict(saved.trainer["optimizer"])
    torch.set_rng_state(saved.trainer["torch_rng"])
    run.rng_train.bit_generator.state = s["rng"]["train"]
    run.rng_query.bit_generator.state = s["rng"]["query"]
    run.budget.spent = int(s["budget_spent"])
    run.state = RunState(
        completed=int(s["completed_rounds"]),
        arrived=int(s["arrived"]),
        buffer=LabelBuffer(saved.buffer),
        rounds=[RoundMetrics.from_dict(r) for r in s["rounds"]],
        online=[OnlineRecord(**{k: v for k, v in o.items() if k != "gap"}) for o in s["online"]],
    )
    run.stream = itertools.islice(run.stream, run.state.arrived, None)  # the seeded stream, replayed
    return s["before"]


def run_alef(
    policy: torch.nn.Module,
    cfg: AlefConfig,
    pool: Any,
    references: References | None = None,
    log: Callable[[str], None] = lambda s: None,
    store: RunStore | None = None,
    on_round: Callable[[RoundMetrics], None] | None = None,
) -> AlefResult:
    """Fine-tune ``policy``'s decoder in place under ``cfg.drift``; returns per-round metrics.

    ``references`` (from :func:`prepare_references` with the same config) skips labelling them again.
    ``store``: every label goes to its journal as it arrives and the state after every round to disk;
    a store that already holds a run of this config and policy is resumed after its last round,
    without buying any label again. ``on_round`` is called after each round's state is saved.
    """
    start = time.perf_counter()
    labeller: Labeller = pool
    if store is not None:
        store.begin(cfg.to_dict(), policy_digest(policy))
        labeller = CachedLabeller(pool, store.journal)
    refs, setup_label_s = _references(cfg, labeller, references)
    run = _start(policy, cfg, labeller, refs, log)
    saved = store.load_round() if store is not None else None
    if saved is not None:
        before = _restore(run, saved)
        setup_label_s = float(saved.state.get("setup_label_s") or 0.0)
        log(f"resumed after round {run.state.completed} ({len(run.state.buffer)} labels restored)")
    else:
        before = {"drifted": gap_report(policy, refs.heldout), "undrifted": gap_report(policy, refs.undrifted)}
        log(
            f"before: drifted gap {before['drifted']['gap']:.4f}, undrifted gap {before['undrifted']['gap']:.4f}"
            f" (reference labels {setup_label_s:.1f} s{f', {refs.skipped} skipped' if refs.skipped else ''})"
        )
    while run.state.completed < cfg.rounds and run.budget.this_round() > 0:
        m = run_round(run)
        if store is not None:
            store.save_round(state_doc(run, before, setup_label_s), run.state.buffer.examples, trainer_doc(run))
        if on_round is not None:
            on_round(m)
    return AlefResult(
        config=cfg.to_dict(),
        before=before,
        rounds=run.state.rounds,
        setup_label_s=setup_label_s,
        wall_s=time.perf_counter() - start,
        pool_stats=_pool_stats(pool, labeller),
        online=run.state.online,
        buffer=list(run.state.buffer.examples),
        reference_examples=refs.examples(),
        resumed_after_round=None if saved is None else int(saved.state["completed_rounds"]),
    )


def _pool_stats(pool: Any, labeller: Labeller) -> dict[str, Any]:
    import dataclasses

    stats = dataclasses.asdict(pool.stats) if hasattr(pool, "stats") else {}
    return stats | {"from_journal": getattr(labeller, "cached", 0)}
