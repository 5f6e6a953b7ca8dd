"""ALEF: active-learning fine-tuning of LAMBO's decoder when the environment drifts (SPEC section 3).

The loop (``run_alef``) reads like the paper's procedure:

    label a small pre-drift replay set once; label the held-out sets (reference objectives)
    for each round:
        instances arrive from the drifted environment (unlabelled)
        the current policy decides each one online (greedy; the decision is recorded as served)
        the query strategy scores them by decision entropy; the top ones within budget are queried
        the expert pool labels them in parallel (exact, DE fallback) -> labelled buffer
        the decoder is trained on the buffer (+ replay of pre-drift labels); encoder and input
            embedding stay frozen
        metrics: labels used, gap to the expert on held-out drifted and undrifted instances

Only the decoder learns: the encoder's representation of a cell is what pretraining paid for,
the decoder is small and cheap to swap per regime (Serve keeps one encoder and many decoders).
The online decision of an instance never waits for labelling: it is made and recorded before the
round queries anything; labels only change the decisions of instances that arrive later.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lambo_ray.alef.buffer import Example, LabelBuffer, epoch_minibatches
from lambo_ray.alef.expert_pool import ExpertPool, Label
from lambo_ray.alef.query import LabelBudget, QueryInput, get_query, select
from lambo_ray.errors import LamboInputError
from lambo_ray.mec.drift import DRIFTS, apply_drift
from lambo_ray.mec.evaluator import evaluate, relative_gap
from lambo_ray.mec.generator import generate, generate_series
from lambo_ray.mec.instance import Instance, check_prompt
from lambo_ray.mec.scenario import ScenarioConfig
from lambo_ray.policy.imitation import ImitationLoss, imitation_loss, pad_labels


@dataclass
class AlefConfig:
    """Every hyperparameter of one ALEF run (logged with its metrics, so a run is reproducible)."""

    drift: str = field(default="outage", metadata={"help": "the named drift to adapt to", "choices": tuple(DRIFTS)})
    prompts: tuple[str, ...] = field(
        default=("min_latency", "min_energy"),
        metadata={"help": "prompts of the arriving instances (they cycle)", "choices": ("min_latency", "min_energy")},
    )
    rounds: int = field(default=4, metadata={"help": "query-label-train rounds"})
    pool_size: int = field(default=64, metadata={"help": "unlabelled drifted instances decided online per round"})
    budget: int = field(default=200, metadata={"help": "expert labels in total over all rounds"})
    budget_per_round: int | None = field(
        default=None, metadata={"help": "labels per round (default: the budget spread evenly over the rounds)"}
    )
    query: str = field(default="entropy", metadata={"help": "query strategy: which arrivals get an expert label"})
    query_share_weight: float = field(
        default=0.0, metadata={"help": "entropy query: weight of the share head's entropy"}
    )
    experts: int = field(default=2, metadata={"help": "expert actors (one CPU each)"})
    label_time_limit: float = field(
        default=10.0, metadata={"help": "seconds per label for exact (and again for the DE fallback)"}
    )
    # Passes over the labelled drifted buffer after each round. A few gentle Adam steps on a policy
    # shaped by RL made things worse (outage, 96 labels: gap 7.6% -> 9.0% at lr 3e-4 x 8 epochs);
    # training to convergence on the labels cut it to 3.4% and also lowered the undrifted gap
    # (1.5% -> 1.1%) with lr 1e-3 x 20 epochs.
    epochs: int = field(default=20, metadata={"help": "passes over the labelled data after each round"})
    batch_size: int = field(default=16, metadata={"help": "labelled instances per gradient step"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate of the decoder"})
    weight_decay: float = field(default=0.0, metadata={"help": "Adam weight decay of the decoder"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip"})
    replay_fraction: float = field(
        default=0.25, metadata={"help": "share of each minibatch drawn from the pre-drift replay set"}
    )
    # Keep a round's decoder update only if greedy decoding on the labelled data (drifted buffer +
    # replay) does not get worse: imitation loss can fall while greedy decisions get worse (exposure
    # bias), and a fine-tuning run must never ship a decoder worse than the one it started from on
    # the data it has. The held-out sets stay untouched by this choice.
    gate: bool = field(
        default=True,
        metadata={"help": "keep a round's update only if greedy decisions on the labelled data did not get worse"},
    )
    gate_tolerance: float = field(
        default=0.0, metadata={"help": "the gate accepts gap_after <= gap_before + this (absolute)"}
    )
    n_replay: int = field(default=32, metadata={"help": "undrifted instances labelled once at the start (replay)"})
    n_heldout: int = field(
        default=32, metadata={"help": "held-out drifted instances (gap), and as many undrifted ones (forgetting)"}
    )
    target_weight: float = field(default=1.0, metadata={"help": "weight of the cross-entropy of the expert's targets"})
    share_weight: float = field(
        default=1.0, metadata={"help": "weight of the negative log-likelihood of the expert's share claims"}
    )
    series_dt_s: float = field(
        default=30.0, metadata={"help": "mobility drift: seconds between arrivals of the cell's time series"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the arrivals, the reference sets and training"})
    scenario: ScenarioConfig = field(
        default_factory=ScenarioConfig, metadata={"help": "the undrifted (pretraining) regime"}
    )

    def __post_init__(self) -> None:
        problems = []
        if self.drift not in DRIFTS:
            problems.append(f"unknown drift {self.drift!r}; expected one of {', '.join(DRIFTS)}")
        self.prompts = tuple(check_prompt(p) for p in self.prompts)
        if not self.prompts:
            problems.append("at least one prompt is needed")
        for name in ("rounds", "pool_size", "budget", "experts", "epochs", "batch_size", "n_heldout"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.n_replay < 0:
            problems.append(f"n_replay must be >= 0 (got {self.n_replay})")
        if not (0.0 <= self.replay_fraction < 1.0):
            problems.append(f"replay_fraction must be in [0, 1) (got {self.replay_fraction})")
        if not (self.lr > 0 and self.label_time_limit > 0 and self.series_dt_s > 0):
            problems.append("lr, label_time_limit and series_dt_s must be > 0")
        if self.target_weight < 0 or self.share_weight < 0 or self.target_weight + self.share_weight == 0:
            problems.append("loss weights must be >= 0 and not both 0")
        if problems:
            raise LamboInputError("; ".join(problems), where="alef config")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["scenario"] = self.scenario.to_dict()
        return d


# ----------------------------------------------------------------------------- environment side


def drift_stream(base: ScenarioConfig, drift: str, seed: int, dt_s: float = 30.0) -> Iterator[Instance]:
    """Unlabelled instances from the drifted environment, in arrival order (endless).

    ``mobility`` is one cell over time (``generate_series``): UEs start spread uniformly and walk
    (random waypoint) towards the hotspot, so the drift grows as the stream goes on. Every other
    drift draws independent snapshots of the drifted scenario from one seed sequence.
    """
    cfg = apply_drift(base, drift)
    if drift == "mobility":
        yield from generate_series(cfg.replace(walk_s=0.0), steps=10**9, dt_s=dt_s, seed=seed)
        return
    seq = np.random.SeedSequence(seed)
    while True:
        yield generate(cfg, np.random.default_rng(seq.spawn(1)[0]))


def snapshot_set(cfg: ScenarioConfig, count: int, seed: int) -> list[Instance]:
    seq = np.random.SeedSequence(seed)
    return [generate(cfg, np.random.default_rng(s)) for s in seq.spawn(count)]


def cycle_prompts(prompts: Sequence[str], count: int, offset: int = 0) -> list[str]:
    return [prompts[(offset + k) % len(prompts)] for k in range(count)]


# ----------------------------------------------------------------------------------- policy side


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


@dataclass
class Decided:
    """Greedy decisions of a batch and what the query needs from the same pass."""

    targets: list[np.ndarray]
    shares: list[np.ndarray]
    query_input: QueryInput
    decide_s: float  # wall time of the whole batch (featurize + encode + decode)


def decide(policy: torch.nn.Module, instances: Sequence[Instance], prompts: Sequence[str], chunk: int = 64) -> Decided:
    """Greedy decisions and per-UE entropies of both heads, one encoder pass per instance."""
    from lambo_ray.policy.features import featurize

    start = time.perf_counter()
    targets, shares, ent_t, ent_s, masks = [], [], [], [], []
    n_max = max(inst.n_ues for inst in instances)
    with torch.no_grad():
        for lo in range(0, len(instances), chunk):
            part = instances[lo : lo + chunk]
            batch = featurize(part, list(prompts[lo : lo + chunk]), n_max=n_max)
            out = policy.decode(batch, policy.encode(batch), "greedy")
            # What users get: the policy's output mapping spreads each server's leftover capacity.
            share = batch.to_instance_order(out.share)
            target = batch.to_instance_order(out.target)
            for k, inst in enumerate(part):
                targets.append(target[k, : inst.n_ues].cpu().numpy().astype(np.int64))
                shares.append(share[k, : inst.n_ues].double().cpu().numpy())
            ent_t.append(out.entropy_target.double().cpu().numpy())
            ent_s.append(out.entropy_share.double().cpu().numpy())
            masks.append(batch.ue_mask.cpu().numpy())
    q = QueryInput(np.concatenate(ent_t), np.concatenate(ent_s), np.concatenate(masks))
    return Decided(targets, shares, q, time.perf_counter() - start)


def imitation_losses(policy: torch.nn.Module, examples: Sequence[Example]) -> ImitationLoss:
    """The imitation loss (:mod:`lambo_ray.policy.imitation`) on a minibatch of expert labels, with the
    encoder frozen: gradients reach only the decoder."""
    from lambo_ray.policy.features import featurize, label_packing

    packings = [label_packing(e.instance, e.target) for e in examples]
    batch = featurize([e.instance for e in examples], [e.prompt for e in examples], packings=packings)
    target, share = pad_labels([e.target for e in examples], [e.share for e in examples], batch.n_max)
    return imitation_loss(policy, batch, target, share, train_encoder=False)


def train_decoder(
    policy: torch.nn.Module,
    opt: torch.optim.Optimizer,
    drifted: LabelBuffer,
    replay: LabelBuffer,
    cfg: AlefConfig,
    rng: np.random.Generator,
) -> dict[str, float]:
    """``cfg.epochs`` passes over the drifted labels, each minibatch topped up with replay labels."""
    params = [p for group in opt.param_groups for p in group["params"]]
    sums = {"loss": 0.0, "target_ce": 0.0, "share_nll": 0.0}
    steps = masked = 0
    policy.train()
    for _ in range(cfg.epochs):
        for mb in epoch_minibatches(drifted, replay, cfg.batch_size, cfg.replay_fraction, rng):
            il = imitation_losses(policy, mb)
            target_ce, share_nll = il.target_ce, il.share_nll
            masked += il.masked_labels
            loss = cfg.target_weight * target_ce + cfg.share_weight * share_nll
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sums["loss"] += loss.item()
            sums["target_ce"] += target_ce.item()
            sums["share_nll"] += share_nll.item()
            steps += 1
    policy.eval()
    return {k: v / max(steps, 1) for k, v in sums.items()} | {"steps": steps, "masked_labels": masked}


# ---------------------------------------------------------------------------------------- metrics


@dataclass
class LabelledSet:
    """Instances with expert reference labels: the held-out sets and the replay set."""

    instances: list[Instance]
    prompts: list[str]
    labels: list[Label]

    def examples(self) -> list[Example]:
        return [
            Example(i, p, lab.target, lab.share, lab.source, lab.objective)
            for i, p, lab in zip(self.instances, self.prompts, self.labels)
        ]


def gap_report(policy: torch.nn.Module, ref: LabelledSet) -> dict[str, float]:
    """Greedy decode against the expert: mean relative gap over feasible decisions, feasibility rate,
    and the imitation losses on the reference labels (all objectives from the evaluator)."""
    dec = decide(policy, ref.instances, ref.prompts)
    gaps, feasible = [], []
    for inst, p, lab, t, s in zip(ref.instances, ref.prompts, ref.labels, dec.targets, dec.shares):
        ev = evaluate(inst, t, s)
        feasible.append(ev.feasible)
        if ev.feasible:
            gaps.append(relative_gap(ev.objective(p), lab.objective))
    with torch.no_grad():
        il = imitation_losses(policy, ref.examples())
    return {
        "gap": float(np.mean(gaps)) if gaps else float("nan"),
        "feasible": float(np.mean(feasible)),
        "target_ce": float(il.target_ce),
        "share_nll": float(il.share_nll),
    }


@dataclass
class OnlineRecord:
    """One served decision of the stream: what was decided online and, if queried, what the expert said."""

    instance_id: int
    round: int
    prompt: str
    objective: float
    feasible: bool
    score: float  # query score
    queried: bool = False
    label_objective: float | None = None
    label_source: str | None = None

    @property
    def gap(self) -> float | None:
        """Gap of the *online* decision to its label (only queried instances have one)."""
        if self.label_objective is None or not self.feasible:
            return None
        return relative_gap(self.objective, self.label_objective)


@dataclass
class RoundMetrics:
    round: int
    labels_used: int  # cumulative
    labels_this_round: int
    label_sources: dict[str, int]
    online_objective: dict[str, float]  # per prompt: mean objective of the round's served decisions
    online_feasible: float  # feasibility rate of those decisions (no labels exist for most of them)
    queried_online_gap: float  # gap of the online decisions of the queried instances to their labels
    query_score_mean: float  # mean query score of the queried instances
    pool_score_mean: float  # ... and of the whole arrival pool (entropy query: queried > pool)
    train: dict[str, float]
    drifted: dict[str, float]  # gap_report on the held-out drifted set after this round
    undrifted: dict[str, float]  # gap_report on the held-out undrifted set (forgetting)
    label_s: float
    train_s: float
    decide_s: float
    gate_gap_before: float = float("nan")  # greedy gap on buffer + replay labels before this round's update
    gate_gap_after: float = float("nan")  # ... and after it
    accepted: bool = True  # False: the update was rolled back (see AlefConfig.gate)


def labelled_gap(policy: torch.nn.Module, examples: Sequence[Example]) -> float:
    """Mean greedy gap to the labels over ``examples``; an infeasible decision counts as a 100% gap."""
    if not examples:
        return float("nan")
    dec = decide(policy, [e.instance for e in examples], [e.prompt for e in examples])
    gaps = []
    for e, t, s in zip(examples, dec.targets, dec.shares):
        ev = evaluate(e.instance, t, s)
        gaps.append(relative_gap(ev.objective(e.prompt), e.objective) if ev.feasible else 1.0)
    return float(np.mean(gaps))


@dataclass
class AlefResult:
    config: dict[str, Any]
    before: dict[str, dict[str, float]]  # {"drifted": gap_report, "undrifted": gap_report}
    rounds: list[RoundMetrics]
    setup_label_s: float
    wall_s: float
    pool_stats: dict[str, Any]
    online: list[OnlineRecord] = field(default_factory=list)  # every served decision, in arrival order

    @property
    def after(self) -> dict[str, dict[str, float]]:
        last = self.rounds[-1] if self.rounds else None
        return self.before if last is None else {"drifted": last.drifted, "undrifted": last.undrifted}

    @property
    def labels_used(self) -> int:
        return self.rounds[-1].labels_used if self.rounds else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "before": self.before,
            "after": self.after,
            "labels_used": self.labels_used,
            "rounds": [dataclasses.asdict(r) for r in self.rounds],
            "setup_label_s": self.setup_label_s,
            "wall_s": self.wall_s,
            "pool_stats": self.pool_stats,
            "online": [dataclasses.asdict(o) | {"gap": o.gap} for o in self.online],
        }


# ------------------------------------------------------------------------------------- the loop


def _seeds(seed: int) -> dict[str, int]:
    names = ("stream", "heldout_drifted", "heldout_undrifted", "replay", "query", "train")
    children = np.random.SeedSequence(seed).spawn(len(names))
    return {n: int(c.generate_state(1)[0]) for n, c in zip(names, children)}


@dataclass
class References:
    """The labelled sets a run is measured on and replays: held-out drifted instances (gap), held-out
    undrifted ones (forgetting) and the pre-drift replay set. They depend on the config's scenario,
    drift, prompts, sizes and seed only, so runs that differ in query or experts can share them."""

    heldout: LabelledSet
    undrifted: LabelledSet
    replay: LabelledSet
    label_s: float
    key: tuple = ()  # reference_key(cfg) of the config they were drawn for

    def sources(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in (self.heldout, self.undrifted, self.replay):
            for lab in s.labels:
                out[lab.source] = out.get(lab.source, 0) + 1
        return out


def reference_key(cfg: AlefConfig) -> tuple:
    return (cfg.scenario, cfg.drift, cfg.prompts, cfg.n_heldout, cfg.n_replay, cfg.seed)


def prepare_references(cfg: AlefConfig, pool: ExpertPool) -> References:
    """Draw and label the reference sets in one parallel pool call (negative ids: the stream's are >= 0)."""
    seeds = _seeds(cfg.seed)
    sets = [
        (
            snapshot_set(apply_drift(cfg.scenario, cfg.drift), cfg.n_heldout, seeds["heldout_drifted"]),
            cycle_prompts(cfg.prompts, cfg.n_heldout),
        ),
        (
            snapshot_set(cfg.scenario, cfg.n_heldout, seeds["heldout_undrifted"]),
            cycle_prompts(cfg.prompts, cfg.n_heldout),
        ),
        (
            snapshot_set(cfg.scenario, cfg.n_replay, seeds["replay"]) if cfg.n_replay else [],
            cycle_prompts(cfg.prompts, cfg.n_replay),
        ),
    ]
    instances = [i for insts, _ in sets for i in insts]
    prompts = [p for _, ps in sets for p in ps]
    t0 = time.perf_counter()
    labels = pool.label(instances, prompts, ids=[-1 - k for k in range(len(instances))])
    label_s = time.perf_counter() - t0
    out, lo = [], 0
    for insts, ps in sets:
        out.append(LabelledSet(list(insts), list(ps), labels[lo : lo + len(insts)]))
        lo += len(insts)
    return References(out[0], out[1], out[2], label_s, reference_key(cfg))


def run_alef(
    policy: torch.nn.Module,
    cfg: AlefConfig,
    pool: ExpertPool,
    references: References | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> AlefResult:
    """Fine-tune ``policy``'s decoder in place under ``cfg.drift``; returns per-round metrics.

    ``references`` (from :func:`prepare_references` with the same config) skips labelling them again.
    """
    start = time.perf_counter()
    seeds = _seeds(cfg.seed)
    torch.manual_seed(seeds["train"])
    rng_train = np.random.default_rng(seeds["train"])
    rng_query = np.random.default_rng(seeds["query"])
    query = get_query(cfg.query, **({"share_weight": cfg.query_share_weight} if cfg.query == "entropy" else {}))
    opt = make_optimizer(policy, cfg)
    policy.eval()

    if references is not None and references.key != reference_key(cfg):
        raise ValueError("references were prepared for another config (scenario, drift, prompts, sizes or seed)")
    refs = references if references is not None else prepare_references(cfg, pool)
    setup_label_s = refs.label_s if references is None else 0.0
    heldout, undrifted, replay_set = refs.heldout, refs.undrifted, refs.replay
    replay = LabelBuffer(replay_set.examples())
    before = {"drifted": gap_report(policy, heldout), "undrifted": gap_report(policy, undrifted)}
    log(
        f"before: drifted gap {before['drifted']['gap']:.4f}, undrifted gap {before['undrifted']['gap']:.4f}"
        f" (reference labels {setup_label_s:.1f} s)"
    )

    stream = drift_stream(cfg.scenario, cfg.drift, seeds["stream"], cfg.series_dt_s)
    budget = LabelBudget(cfg.budget, cfg.rounds, cfg.budget_per_round)
    buffer = LabelBuffer()
    rounds: list[RoundMetrics] = []
    records: list[OnlineRecord] = []
    arrived = 0
    for r in range(cfg.rounds):
        k = budget.this_round()
        if k == 0:
            break
        # 1. Unlabelled instances arrive; the current policy decides each one online.
        arrivals = list(itertools.islice(stream, cfg.pool_size))
        ids = list(range(arrived, arrived + len(arrivals)))
        prompts = cycle_prompts(cfg.prompts, len(arrivals), offset=arrived)
        arrived += len(arrivals)
        online = decide(policy, arrivals, prompts)
        evals = [evaluate(i, t, s) for i, t, s in zip(arrivals, online.targets, online.shares)]

        # 2. Query the most uncertain decisions within this round's budget.
        scores = query(online.query_input, rng_query)
        chosen = select(scores, k)
        served = [
            OnlineRecord(ids[i], r + 1, prompts[i], evals[i].objective(prompts[i]), evals[i].feasible, float(scores[i]))
            for i in range(len(arrivals))
        ]
        records.extend(served)  # recorded before any label exists: labels only change later decisions

        # 3. The expert pool labels them in parallel.
        t0 = time.perf_counter()
        labels = pool.label([arrivals[i] for i in chosen], [prompts[i] for i in chosen], ids=[ids[i] for i in chosen])
        label_s = time.perf_counter() - t0
        budget.spend(len(labels))
        buffer.add(
            [
                Example(arrivals[i], prompts[i], lab.target, lab.share, lab.source, lab.objective)
                for i, lab in zip(chosen, labels)
            ]
        )
        for i, lab in zip(chosen, labels):
            served[i].queried, served[i].label_objective, served[i].label_source = (
                True,
                lab.objective,
                lab.source,
            )
        queried_gaps = [g for g in (served[i].gap for i in chosen) if g is not None]

        # 4. Train the decoder on the labelled buffer (+ pre-drift replay), encoder frozen; keep the
        #    update only if greedy decoding on the labelled data did not get worse (cfg.gate).
        t0 = time.perf_counter()
        gate_set = buffer.examples + replay.examples
        gate_before = labelled_gap(policy, gate_set) if cfg.gate else float("nan")
        snapshot = [p.detach().clone() for p in policy.decoder_parameters()]
        train = train_decoder(policy, opt, buffer, replay, cfg, rng_train)
        gate_after = labelled_gap(policy, gate_set) if cfg.gate else float("nan")
        accepted = not cfg.gate or gate_after <= gate_before + cfg.gate_tolerance
        if not accepted:
            with torch.no_grad():
                for p, old in zip(policy.decoder_parameters(), snapshot):
                    p.copy_(old)
        train_s = time.perf_counter() - t0

        # 5. Metrics.
        sources: dict[str, int] = {}
        for lab in labels:
            sources[lab.source] = sources.get(lab.source, 0) + 1
        m = RoundMetrics(
            round=r + 1,
            labels_used=budget.spent,
            labels_this_round=len(labels),
            label_sources=sources,
            online_objective={
                p: float(np.mean([e.objective(p) for e, q in zip(evals, prompts) if q == p]))
                for p in sorted(set(prompts))
            },
            online_feasible=float(np.mean([e.feasible for e in evals])),
            queried_online_gap=float(np.mean(queried_gaps)) if queried_gaps else float("nan"),
            query_score_mean=float(np.mean(scores[chosen])) if len(chosen) else float("nan"),
            pool_score_mean=float(np.mean(scores)),
            train=train,
            drifted=gap_report(policy, heldout),
            undrifted=gap_report(policy, undrifted),
            label_s=label_s,
            train_s=train_s,
            decide_s=online.decide_s,
            gate_gap_before=gate_before,
            gate_gap_after=gate_after,
            accepted=accepted,
        )
        rounds.append(m)
        log(
            f"round {m.round}: labels {m.labels_used}/{cfg.budget} {sources}, loss {train['loss']:.4f}, "
            f"drifted gap {m.drifted['gap']:.4f}, undrifted gap {m.undrifted['gap']:.4f}, "
            f"label {label_s:.1f} s, train {train_s:.1f} s"
            + ("" if accepted else f" (update rolled back: labelled gap {gate_before:.4f} -> {gate_after:.4f})")
        )
    return AlefResult(
        config=cfg.to_dict(),
        before=before,
        rounds=rounds,
        setup_label_s=setup_label_s,
        wall_s=time.perf_counter() - start,
        pool_stats=dataclasses.asdict(pool.stats),
        online=records,
    )
