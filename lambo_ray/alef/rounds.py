"""One round of ALEF, step by step: serve arrivals online, query, buy labels, train behind the gate.

:class:`AlefRun` holds what a run works with (policy, optimiser, RNGs, labeller, references) and
:class:`RunState` what it changes from round to round, which is what a crash must not lose
(:mod:`lambo_ray.alef.store` saves it after every round).
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lambo_ray.alef.buffer import Example, LabelBuffer, held_back, split_validation
from lambo_ray.alef.config import AlefConfig
from lambo_ray.alef.environment import cycle_prompts
from lambo_ray.alef.gate import GateReport, judge, labelled_fit
from lambo_ray.alef.labels import Label, Outcome
from lambo_ray.alef.metrics import OnlineRecord, RoundMetrics, gap_report, label_quality
from lambo_ray.alef.online import Decided, decide, greedy_objectives
from lambo_ray.alef.policy_gradient import policy_gradient_phase
from lambo_ray.alef.query import LabelBudget, Query, select
from lambo_ray.alef.references import Labeller, References
from lambo_ray.alef.training import train_decoder
from lambo_ray.mec.evaluator import evaluate
from lambo_ray.mec.instance import Instance


@dataclass
class RunState:
    """Everything a run changes from round to round."""

    completed: int = 0  # rounds done
    arrived: int = 0  # stream instances seen (the next arrival's id)
    buffer: LabelBuffer = field(default_factory=LabelBuffer)  # labels bought by the rounds
    rounds: list[RoundMetrics] = field(default_factory=list)
    online: list[OnlineRecord] = field(default_factory=list)


@dataclass
class AlefRun:
    policy: torch.nn.Module
    cfg: AlefConfig
    opt: torch.optim.Optimizer
    query: Query
    labeller: Labeller
    refs: References
    replay: LabelBuffer  # pre-drift labels mixed into training
    replay_val: list[Example]  # pre-drift labels only the gate judges on
    rng_train: np.random.Generator
    rng_query: np.random.Generator
    stream: Iterator[Instance]
    budget: LabelBudget
    seeds: dict[str, int]
    gate_undrifted: tuple[list[Instance], list[str]] = ([], [])  # unlabelled pre-drift instances the gate watches
    state: RunState = field(default_factory=RunState)
    log: Callable[[str], None] = lambda s: None

    def sample_seed(self, round_no: int) -> int:
        """Seed of the round's sampled decodes (gain query): fixed by the run seed and the round."""
        return int(np.random.SeedSequence([self.seeds["query"], round_no]).generate_state(1)[0])


@dataclass
class Arrivals:
    instances: list[Instance]
    ids: list[int]
    prompts: list[str]
    online: Decided
    records: list[OnlineRecord]  # the served decisions, with their query scores
    chosen: np.ndarray  # positions queried this round, best score first


def serve_and_query(run: AlefRun, round_no: int, k: int) -> Arrivals:
    """Unlabelled instances arrive; the current policy decides each online and the query strategy
    picks up to ``k`` to label. Decisions are recorded before any label exists: labels only change
    the decisions of instances that arrive later."""
    st = run.state
    instances = list(itertools.islice(run.stream, run.cfg.pool_size))
    ids = list(range(st.arrived, st.arrived + len(instances)))
    prompts = cycle_prompts(run.cfg.prompts, len(instances), offset=st.arrived)
    st.arrived += len(instances)
    online = decide(run.policy, instances, prompts, query=run.query, seed=run.sample_seed(round_no))
    scores = run.query(online.query_input, run.rng_query)
    records = []
    for i, (inst, p, t, s) in enumerate(zip(instances, prompts, online.targets, online.shares)):
        ev = evaluate(inst, t, s)
        records.append(OnlineRecord(ids[i], round_no, p, ev.objective(p), ev.feasible, float(scores[i])))
    return Arrivals(instances, ids, prompts, online, records, select(scores, k))


def buy_labels(run: AlefRun, arr: Arrivals, round_no: int) -> tuple[list[Label], int, float]:
    """Label the chosen instances in parallel; (labels, skipped, wall time). A skipped instance costs
    no budget and is marked in its online record."""
    t0 = time.perf_counter()
    outcomes: list[Outcome] = run.labeller.label(
        [arr.instances[i] for i in arr.chosen],
        [arr.prompts[i] for i in arr.chosen],
        ids=[arr.ids[i] for i in arr.chosen],
    )
    label_s = time.perf_counter() - t0
    labels = []
    for i, o in zip(arr.chosen, outcomes):
        rec = arr.records[i]
        rec.queried = True
        if isinstance(o, Label):
            labels.append((i, o))
            rec.label_objective, rec.label_source = o.objective, o.source
        else:
            rec.skipped = True
    validation = held_back(len(labels), run.cfg.held_back_share())
    run.state.buffer.add(
        [Example.from_label(arr.instances[i], o, round_no, val) for (i, o), val in zip(labels, validation)]
    )
    run.budget.spend(len(labels))
    return [o for _, o in labels], len(outcomes) - len(labels), label_s


def gate_arrivals(run: AlefRun) -> tuple[list[Instance], list[str]]:
    """The next ``cfg.gate_instances`` drifted arrivals (unlabelled), on which the gate compares the
    greedy decisions of the old and the new decoder; none without a gate."""
    st, cfg = run.state, run.cfg
    count = cfg.gate_instances if cfg.gate else 0
    instances = list(itertools.islice(run.stream, count))
    prompts = cycle_prompts(cfg.prompts, len(instances), offset=st.arrived)
    st.arrived += len(instances)
    return instances, prompts


def policy_gradient_set(run: AlefRun, arr: Arrivals) -> tuple[list[Instance], list[str]]:
    """The drifted instances the policy-gradient phase samples on: the round's arrivals and the
    instances of the labels trained on so far, but none the gate judges on (held-back labels)."""
    examples = run.state.buffer.examples
    held = {id(e.instance) for e in examples if e.validation}
    pairs = list(zip(arr.instances, arr.prompts)) + [(e.instance, e.prompt) for e in examples if not e.validation]
    seen: set[int] = set()
    instances, prompts = [], []
    for inst, prompt in pairs:
        if id(inst) not in held and id(inst) not in seen:
            seen.add(id(inst))
            instances.append(inst)
            prompts.append(prompt)
    return instances, prompts


def train_behind_gate(
    run: AlefRun,
    unlabelled: tuple[list[Instance], list[str]] = ([], []),
    pg_set: tuple[list[Instance], list[str]] = ([], []),
) -> tuple[dict[str, float], GateReport | None]:
    """Train the decoder on the buffer (+ replay) without its held-back labels, then (``pg_epochs`` > 0)
    by policy gradient on ``pg_set``; with the gate on, keep the update only if it passes
    :func:`~lambo_ray.alef.gate.judge` on the held-back labels (drifted + replay), the ``unlabelled``
    drifted arrivals and the run's undrifted gate instances (old and new decisions compared instance
    by instance), else restore decoder and optimiser exactly. Until a round has held back any label (a
    budget too small to spare one) the labelled check judges on the training labels."""
    cfg, policy = run.cfg, run.policy
    trained, held = split_validation(run.state.buffer.examples)
    if held:
        drifted, replay = held, run.replay_val
    else:
        drifted, replay = trained.examples, run.replay.examples + run.replay_val
    paired_sets = {"drifted": unlabelled, "undrifted": run.gate_undrifted} if cfg.gate else {}
    paired_sets = {k: v for k, v in paired_sets.items() if v[0]}
    before = labelled_fit(policy, drifted, replay, cfg) if cfg.gate else None
    objectives_before = {k: greedy_objectives(policy, *v) for k, v in paired_sets.items()}
    decoder_state = copy.deepcopy(policy.decoder.state_dict())
    opt_state = copy.deepcopy(run.opt.state_dict())
    train = train_decoder(policy, run.opt, trained, run.replay, cfg, run.rng_train)
    if cfg.pg_epochs > 0:
        insts_pg, prompts_pg = pg_set
        pg = policy_gradient_phase(
            policy, run.opt, insts_pg, prompts_pg, run.rng_train, cfg.pg_epochs, k=cfg.pg_samples,
            chunk=cfg.batch_size, grad_clip=cfg.grad_clip, lr_scale=cfg.pg_lr_scale,
        )  # fmt: skip
        train = {**train, **pg}
    if before is None:
        return train, None
    paired = {k: (objectives_before[k], greedy_objectives(policy, *v)) for k, v in paired_sets.items()}
    after = labelled_fit(policy, drifted, replay, cfg)
    report = judge(
        before, after, len(drifted), len(replay), cfg.gate_tolerance, paired.get("drifted"), cfg.gate_confidence,
        undrifted=paired.get("undrifted"),
    )  # fmt: skip
    if not report.accepted:
        policy.decoder.load_state_dict(decoder_state)
        run.opt.load_state_dict(opt_state)
    return train, report


def run_round(run: AlefRun) -> RoundMetrics:
    """One round; appends its metrics and online records to the run's state and returns the metrics."""
    st, cfg = run.state, run.cfg
    round_no = st.completed + 1
    arr = serve_and_query(run, round_no, run.budget.this_round())
    cached_before = getattr(run.labeller, "cached", 0)
    labels, skipped, label_s = buy_labels(run, arr, round_no)
    t0 = time.perf_counter()
    train, gate = train_behind_gate(run, gate_arrivals(run), policy_gradient_set(run, arr))
    train_s = time.perf_counter() - t0
    m = round_metrics(run, arr, labels, train, gate)
    m.skipped, m.label_s, m.train_s = skipped, label_s, train_s
    m.labels_cached = getattr(run.labeller, "cached", 0) - cached_before
    st.online.extend(arr.records)
    st.rounds.append(m)
    st.completed = round_no
    run.log(round_line(m, cfg))
    return m


def round_metrics(
    run: AlefRun, arr: Arrivals, labels: list[Label], train: dict[str, float], gate: GateReport | None
) -> RoundMetrics:
    sources: dict[str, int] = {}
    for lab in labels:
        sources[lab.source] = sources.get(lab.source, 0) + 1
    evals = arr.records
    queried_gaps = [g for g in (evals[i].gap for i in arr.chosen) if g is not None]
    scores = np.array([r.score for r in evals])
    nan = float("nan")
    return RoundMetrics(
        round=run.state.completed + 1,
        labels_used=run.budget.spent,
        labels_this_round=len(labels),
        label_sources=sources,
        online_objective={
            p: float(np.mean([r.objective for r in evals if r.prompt == p])) for p in sorted(set(arr.prompts))
        },
        online_feasible=float(np.mean([r.feasible for r in evals])),
        queried_online_gap=float(np.mean(queried_gaps)) if queried_gaps else nan,
        query_score_mean=float(np.mean(scores[arr.chosen])) if len(arr.chosen) else nan,
        pool_score_mean=float(np.mean(scores)),
        train=train,
        drifted=gap_report(run.policy, run.refs.heldout),
        undrifted=gap_report(run.policy, run.refs.undrifted),
        label_s=nan,
        train_s=nan,
        decide_s=arr.online.decide_s,
        gate_gap_before=gate.before.gap if gate else nan,
        gate_gap_after=gate.after.gap if gate else nan,
        accepted=gate.accepted if gate else True,
        label_quality=label_quality(labels),
        gate=gate.to_dict() if gate else {},
    )


def round_line(m: RoundMetrics, cfg: AlefConfig) -> str:
    line = (
        f"round {m.round}: labels {m.labels_used}/{cfg.budget} {m.label_sources}"
        + (f", {m.skipped} skipped" if m.skipped else "")
        + (f", {m.labels_cached} from the journal" if m.labels_cached else "")
        + f", loss {m.train['loss']:.4f}, drifted gap {m.drifted['gap']:.4f}, undrifted gap {m.undrifted['gap']:.4f}"
        + f", label {m.label_s:.1f} s, train {m.train_s:.1f} s"
    )
    if m.gate and not m.accepted:
        b, a = m.gate["before"], m.gate["after"]
        change = m.gate.get("unlabelled_change")
        line += (
            f" (update rolled back, {m.gate['diagnosis']}: labelled gap {b['gap']:.4f} -> {a['gap']:.4f}, "
            f"loss {b['loss']:.4f} -> {a['loss']:.4f}"
            + (
                f", unlabelled objective {100 * change:+.3f} % (se {100 * m.gate['unlabelled_se']:.3f})"
                if change is not None
                else ""
            )
            + ")"
        )
    return line


def state_doc(run: AlefRun, before: dict[str, Any], setup_label_s: float) -> dict[str, Any]:
    """What :class:`~lambo_ray.alef.store.RunStore` saves besides the buffer and trainer state."""
    import dataclasses

    st = run.state
    return {
        "completed_rounds": st.completed,
        "arrived": st.arrived,
        "budget_spent": run.budget.spent,
        "rng": {"train": run.rng_train.bit_generator.state, "query": run.rng_query.bit_generator.state},
        "before": before,
        "setup_label_s": setup_label_s,
        "rounds": [dataclasses.asdict(r) for r in st.rounds],
        "online": [dataclasses.asdict(o) for o in st.online],
    }


def trainer_doc(run: AlefRun) -> dict[str, Any]:
    return {
        "decoder": run.policy.decoder.state_dict(),
        "optimizer": run.opt.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
