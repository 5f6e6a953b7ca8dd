"""The parts of a search-space file: one searched hyperparameter (a distribution), the search
algorithm, the trial scheduler and the resources of a trial; each checked when parsed and turned into
the Ray Tune object it describes only when a sweep runs (Ray is not imported before that)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lambo_ray.errors import LamboInputError

# name -> number of list arguments (None: a non-empty list of values)
DISTRIBUTIONS: dict[str, int | None] = {
    "uniform": 2,
    "loguniform": 2,
    "quniform": 3,
    "qloguniform": 3,
    "randint": 2,
    "lograndint": 2,
    "choice": None,
    "grid": None,
}
SEARCH_TYPES = ("random", "optuna")
SCHEDULER_TYPES = ("asha", "fifo")


@dataclass(frozen=True)
class ParamSpec:
    """One searched hyperparameter: ``{kind: args}`` in the file."""

    name: str
    kind: str
    args: tuple[Any, ...]

    @classmethod
    def parse(cls, name: str, raw: Any, where: str) -> ParamSpec:
        field_ = f"param_space.{name}"
        if not isinstance(raw, dict) or len(raw) != 1:
            raise LamboInputError(
                f"{field_}: expected one distribution such as {{loguniform: [1.0e-4, 1.0e-2]}} or "
                f"{{choice: [1, 2]}}; got {raw!r}",
                where=where,
            )
        kind, args = next(iter(raw.items()))
        if kind not in DISTRIBUTIONS:
            raise LamboInputError(
                f"{field_}: unknown distribution {kind!r}; expected one of {', '.join(DISTRIBUTIONS)}",
                where=where,
            )
        if not isinstance(args, list) or not args:
            raise LamboInputError(f"{field_}.{kind}: expected a non-empty list", where=where)
        n = DISTRIBUTIONS[kind]
        if n is not None:
            if len(args) != n:
                raise LamboInputError(f"{field_}.{kind}: expected {n} numbers, got {len(args)}", where=where)
            if not all(is_number(a) for a in args):
                raise LamboInputError(f"{field_}.{kind}: expected numbers, got {args!r}", where=where)
            lo, hi = args[0], args[1]
            if not lo < hi:
                raise LamboInputError(f"{field_}.{kind}: lower bound {lo} must be < upper bound {hi}", where=where)
            if (kind.startswith("log") or kind == "qloguniform") and lo <= 0:
                raise LamboInputError(f"{field_}.{kind}: bounds must be > 0 on a log scale (got {lo})", where=where)
            if kind in ("randint", "lograndint") and not all(isinstance(a, int) for a in args):
                raise LamboInputError(f"{field_}.{kind}: bounds must be integers", where=where)
            if kind.startswith("q") and not args[2] > 0:
                raise LamboInputError(f"{field_}.{kind}: quantum must be > 0", where=where)
        elif kind == "choice" and len({repr(a) for a in args}) != len(args):
            raise LamboInputError(f"{field_}.choice: repeated values {args!r}", where=where)
        return cls(name, kind, tuple(args))

    def domain(self) -> Any:
        from ray import tune

        a = self.args
        return {
            "uniform": lambda: tune.uniform(a[0], a[1]),
            "loguniform": lambda: tune.loguniform(a[0], a[1]),
            "quniform": lambda: tune.quniform(a[0], a[1], a[2]),
            "qloguniform": lambda: tune.qloguniform(a[0], a[1], a[2]),
            "randint": lambda: tune.randint(a[0], a[1]),  # upper bound exclusive (Tune's convention)
            "lograndint": lambda: tune.lograndint(a[0], a[1]),
            "choice": lambda: tune.choice(list(a)),
            "grid": lambda: tune.grid_search(list(a)),
        }[self.kind]()

    def extremes(self) -> list[Any]:
        """Values that bound the distribution: every choice, or both ends of a range."""
        if self.kind in ("choice", "grid"):
            return list(self.args)
        if self.kind in ("randint", "lograndint"):
            return [self.args[0], self.args[1] - 1]
        return [self.args[0], self.args[1]]


@dataclass(frozen=True)
class SchedulerSpec:
    type: str = "asha"
    max_t: int | None = None  # default: fixed.iterations
    grace_period: int = 1
    reduction_factor: float = 2.0

    def build(self, max_t: int) -> Any:
        """The scheduler; metric and mode come from TuneConfig (Tune refuses them in both places)."""
        if self.type == "fifo":
            from ray.tune.schedulers import FIFOScheduler

            return FIFOScheduler()
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(
            time_attr="training_iteration",
            max_t=max_t,
            grace_period=self.grace_period,
            reduction_factor=self.reduction_factor,
        )


@dataclass(frozen=True)
class SearchSpec:
    type: str = "random"
    seed: int | None = None

    def build(self, max_concurrent: int | None) -> Any:
        """The search algorithm; metric and mode come from TuneConfig. Optuna's concurrency is capped by
        TuneConfig.max_concurrent_trials (a ConcurrencyLimiter), the basic generator's by itself."""
        if self.type == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            return OptunaSearch(seed=self.seed)
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=self.seed, max_concurrent=max_concurrent or 0)


@dataclass(frozen=True)
class TrialResources:
    """What one trial reserves: ``cpu``/``gpu`` for the trial process (the driver, which hosts the learner
    when there are no learner actors) and, optionally, ``learners`` learner actors with
    ``cpus_per_learner`` / ``gpus_per_learner`` each (the trial's num_learners, num_cpus_per_learner,
    num_gpus_per_learner). Env runners add 1 CPU each."""

    cpu: float = 1.0
    gpu: float = 0.0
    learners: int | None = None  # None: the trial config's num_learners (default 0)
    cpus_per_learner: float | None = None
    gpus_per_learner: float | None = None

    KEYS = ("cpu", "gpu", "learners", "cpus_per_learner", "gpus_per_learner")

    @classmethod
    def parse(cls, raw: Any, field_: str, where: str) -> TrialResources:
        if not isinstance(raw, dict):
            raise LamboInputError(f"{field_}: expected a mapping like {{cpu: 1, gpu: 0}}", where=where)
        unknown = sorted(set(raw) - set(cls.KEYS))
        if unknown:
            raise LamboInputError(
                f"{field_}: unknown key(s) {', '.join(unknown)}; expected {', '.join(cls.KEYS)}", where=where
            )
        for k, v in raw.items():
            if not is_number(v) or v < 0:
                raise LamboInputError(f"{field_}.{k}: expected a number >= 0, got {v!r}", where=where)
        if "learners" in raw and int(raw["learners"]) != raw["learners"]:
            raise LamboInputError(f"{field_}.learners: expected a whole number, got {raw['learners']!r}", where=where)
        res = cls(**{k: (int(v) if k == "learners" else float(v)) for k, v in raw.items()})
        if res.cpu <= 0:
            raise LamboInputError(f"{field_}.cpu: a trial needs at least some CPU (got {res.cpu})", where=where)
        return res

    def learner_settings(self) -> dict[str, Any]:
        """The PretrainConfig fields these resources fix (those the file gave)."""
        pairs = (
            ("num_learners", self.learners),
            ("num_cpus_per_learner", self.cpus_per_learner),
            ("num_gpus_per_learner", self.gpus_per_learner),
        )
        return {k: v for k, v in pairs if v is not None}


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
