"""Query strategies of ALEF: which of the online-decided instances are worth an expert label.

A strategy turns the policy's per-UE uncertainty on a pool of instances into one score per
instance; :func:`select` takes the ``budget`` highest. Strategies are registered by name
(``entropy``, ``power``, ``random``, ``gain``, ``polish``) and chosen by config, not by ``if`` branches in the loop.

``entropy`` (the paper's choice): the mean, over the *real* UEs of an instance (padding masked
out), of the entropy of the offloading head's distribution at each decoding step. A policy that
is unsure where many UEs go is the one whose decisions an expert label changes most. The share
head's uncertainty can be added with ``share_weight`` > 0 (default 0): it is a differential
entropy (of a continuous distribution over (0, 1]), so it has a different scale and can be
negative, and mixing it in is a choice to make knowingly, not by default.

``power``: entropy with the top-k replaced by sampling. Top-k on a per-instance score picks a
batch of near-duplicates from the pool's most atypical corner (the same few hard cells, the same
overloaded server) and leaves the bulk of the drifted distribution unlabelled; measured here,
entropy's top 96 of 512 arrivals were no better labels than 96 random ones. Power acquisition
(stochastic batch acquisition, Kirsch et al., TMLR 2023) draws the batch without replacement with
probability proportional to ``entropy ** beta`` (Gumbel-top-k: ``beta * log(entropy)`` plus
standard Gumbel noise, then the top k), so uncertain instances are favoured but the batch still
covers the pool; ``beta`` = 0 is ``random``, ``beta`` -> infinity is ``entropy``. The default
``beta`` = 1 is the paper's. Costs nothing over ``entropy``. Measured on all five ``min_energy``
drifts with the default round structure it is no better than random either (ahead on 1 of 5;
docs/alef.md): it is kept for comparison, not made the default.

``random``: uniform scores from a seeded generator; the baseline that shows what the entropy
query buys at the same label budget.

``gain``: how much better the policy itself can do than its greedy decision on the instance, as a
fraction of the greedy objective: greedy minus the best of ``samples`` sampled decodes on augmented
copies (``best_of_k``; it contains the greedy decision, so the gain is >= 0), both scored by the
evaluator; an infeasible greedy decision scores 1. This is a certified *lower bound* on the greedy
decision's own gap on that instance: the thing fine-tuning has to remove, measured rather than
proxied. Entropy is a proxy that fails both ways under drift: a policy shaped by RL with an entropy
bonus is unsure among near-equivalent options (high entropy, nothing to learn), and after a drift it
is often confidently wrong (low entropy, e.g. still sending UEs to a server that lost 70 % of its
capacity); one better sample exposes the latter. Instances with equal gain (typically 0 when the
samples never beat greedy) are ordered by entropy, so ``gain`` reduces to ``entropy`` where sampling
finds nothing. It costs ``samples`` extra decodes per arrival, no expert call.

``polish``: the same score with the ``refine`` decode in place of the samples: greedy polished by the
``search`` engine's local search from that one start (for ``min_energy`` an exact solve after
reduced-cost fixing), capped at ``POLISH_BUDGET_S`` per arrival. Sampling from the policy finds only
what the policy already half-believes, so on most arrivals best-of-k ties greedy and ``gain`` falls
back to entropy; the polish moves away from the policy, so its improvement is close to the greedy
decision's true gap on every arrival: the strategy spends the labels where the decoder is furthest
from the optimum. It costs one polish per arrival, no expert call: in the ALEF benchmark's runs
with 768 arrivals per round about 0.09 s per arrival on ``outage`` cells and 0.17 s on 80-UE
``density`` cells (the run's extra wall time over random's).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lambo_ray.errors import LamboInputError


@dataclass(frozen=True)
class QueryInput:
    """What the online decode of a pool of B instances leaves behind for the query."""

    entropy_target: np.ndarray  # (B, N) entropy of the offloading head at each UE's step
    entropy_share: np.ndarray  # (B, N) entropy of the share head (0 where the UE ran locally)
    ue_mask: np.ndarray  # (B, N) True for real UEs, False for padding
    # Only for strategies with an ``improve`` decode: evaluator objectives of the greedy decision and of
    # that decode's (NaN where infeasible), (B,) each.
    greedy_objective: np.ndarray | None = None
    improved_objective: np.ndarray | None = None

    def __post_init__(self) -> None:
        shapes = {self.entropy_target.shape, self.entropy_share.shape, self.ue_mask.shape}
        if len(shapes) != 1 or self.entropy_target.ndim != 2:
            raise ValueError(f"entropy_target, entropy_share and ue_mask must share one (B, N) shape, got {shapes}")
        for name in ("greedy_objective", "improved_objective"):
            v = getattr(self, name)
            if v is not None and v.shape != (self.size,):
                raise ValueError(f"{name} must have shape ({self.size},), got {v.shape}")

    @property
    def size(self) -> int:
        return int(self.entropy_target.shape[0])


def mean_over_real_ues(values: np.ndarray, ue_mask: np.ndarray) -> np.ndarray:
    """Per-instance mean over real UEs; padding must neither add to nor dilute the score."""
    mask = ue_mask.astype(float)
    return (np.where(ue_mask, values, 0.0).sum(axis=1)) / np.maximum(mask.sum(axis=1), 1.0)


Scorer = Callable[[QueryInput, np.random.Generator], np.ndarray]


@dataclass(frozen=True)
class Query:
    """A configured strategy: ``score(query_input, rng)`` gives one score per instance. ``improve`` is
    the decode mode (:mod:`lambo_ray.policy.decoding`) whose objective it compares greedy's with, run
    with ``samples`` samples and at most ``budget_s`` of polishing per instance; None: no such decode."""

    name: str
    score: Scorer
    improve: str | None = None
    samples: int = 0
    budget_s: float | None = None

    def __call__(self, q: QueryInput, rng: np.random.Generator) -> np.ndarray:
        return self.score(q, rng)


_STRATEGIES: dict[str, Callable[..., Query]] = {}


def register_query(name: str) -> Callable[[Callable[..., Query]], Callable[..., Query]]:
    def deco(factory: Callable[..., Query]) -> Callable[..., Query]:
        _STRATEGIES[name] = factory
        return factory

    return deco


@register_query("entropy")
def entropy_query(share_weight: float = 0.0) -> Query:
    def score(q: QueryInput, rng: np.random.Generator) -> np.ndarray:
        s = mean_over_real_ues(q.entropy_target, q.ue_mask)
        if share_weight:
            s = s + share_weight * mean_over_real_ues(q.entropy_share, q.ue_mask)
        return s

    return Query("entropy", score)


# Exponent of the power query; 1 as in Kirsch et al., who found it robust across tasks.
POWER_BETA = 1.0


@register_query("power")
def power_query(beta: float = POWER_BETA) -> Query:
    if not (beta >= 0 and math.isfinite(beta)):
        raise LamboInputError(f"power query needs a finite beta >= 0 (got {beta})", where="query")

    def score(q: QueryInput, rng: np.random.Generator) -> np.ndarray:
        entropy = mean_over_real_ues(q.entropy_target, q.ue_mask)
        # For beta > 0 an instance the policy is certain about (entropy 0) is drawn last, never dropped.
        log_entropy = np.log(np.maximum(entropy, np.finfo(float).tiny))
        return beta * log_entropy + rng.gumbel(size=q.size)

    return Query("power", score)


@register_query("random")
def random_query() -> Query:
    def score(q: QueryInput, rng: np.random.Generator) -> np.ndarray:
        return rng.random(q.size)

    return Query("random", score)


def relative_improvement(greedy: np.ndarray, improved: np.ndarray) -> np.ndarray:
    """(greedy - improved) / |greedy| per instance, >= 0; 1 where greedy is infeasible (NaN)."""
    greedy, improved = np.asarray(greedy, float), np.asarray(improved, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        gain = (greedy - improved) / np.abs(greedy)
    gain = np.where(np.isfinite(gain), np.clip(gain, 0.0, 1.0), 0.0)
    return np.where(np.isnan(greedy), 1.0, gain)


# Weight of the entropy tie-break of ``gain`` and ``polish``: the mean entropy is at most log(M + 1)
# (~2.3 at M = 9), so it reorders only instances whose gains differ by less than ~2e-6 (float noise).
GAIN_TIE_WEIGHT = 1e-6
# Cap on the polishing time per arrival of the ``polish`` query, so that large cells cannot stall a
# round (the benchmark runs of the module docstring averaged 0.09-0.17 s per arrival).
POLISH_BUDGET_S = 0.2


def improvement_score(q: QueryInput, rng: np.random.Generator) -> np.ndarray:
    """Greedy's relative excess over the strategy's improving decode, ties broken by entropy."""
    if q.greedy_objective is None or q.improved_objective is None:
        raise ValueError("this query needs greedy and improved objectives in its QueryInput")
    gain = relative_improvement(q.greedy_objective, q.improved_objective)
    return gain + GAIN_TIE_WEIGHT * mean_over_real_ues(q.entropy_target, q.ue_mask)


@register_query("gain")
def gain_query(samples: int = 8) -> Query:
    if samples < 1:
        raise LamboInputError(f"gain query needs samples >= 1 (got {samples})", where="query")
    return Query("gain", improvement_score, improve="best_of_k", samples=samples)


@register_query("polish")
def polish_query(budget_s: float = POLISH_BUDGET_S) -> Query:
    if not (budget_s > 0 and math.isfinite(budget_s)):
        raise LamboInputError(f"polish query needs a positive time budget (got {budget_s})", where="query")
    return Query("polish", improvement_score, improve="refine", samples=1, budget_s=budget_s)


def query_strategies() -> list[str]:
    return sorted(_STRATEGIES)


def get_query(name: str, **kwargs: float) -> Query:
    if name not in _STRATEGIES:
        raise LamboInputError(
            f"unknown query strategy {name!r}; expected one of {', '.join(query_strategies())}", where="query"
        )
    return _STRATEGIES[name](**kwargs)


def select(scores: np.ndarray, budget: int) -> np.ndarray:
    """Indices of the ``budget`` highest scores, highest first; ties go to the earlier instance."""
    scores = np.asarray(scores, dtype=float)
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError("query scores contain NaN (the policy's entropies are broken)")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    order = np.argsort(-scores, kind="stable")
    return order[: min(budget, scores.size)]


@dataclass
class LabelBudget:
    """A total label budget spent over rounds: at most ``per_round`` each, never more than is left."""

    total: int
    rounds: int
    per_round: int | None = None  # default: the total spread evenly (ceil) over the rounds
    spent: int = 0

    def __post_init__(self) -> None:
        if self.total < 1:
            raise LamboInputError(f"label budget must be >= 1 (got {self.total})", where="budget")
        if self.rounds < 1:
            raise LamboInputError(f"rounds must be >= 1 (got {self.rounds})", where="rounds")
        if self.per_round is None:
            self.per_round = math.ceil(self.total / self.rounds)
        if self.per_round < 1:
            raise LamboInputError(f"budget per round must be >= 1 (got {self.per_round})", where="budget")

    @property
    def remaining(self) -> int:
        return self.total - self.spent

    def this_round(self) -> int:
        return min(int(self.per_round), self.remaining)

    def spend(self, n: int) -> None:
        if n > self.remaining:
            raise ValueError(f"spending {n} labels with only {self.remaining} left")
        self.spent += n
