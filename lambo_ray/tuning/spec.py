"""Search-space files (tune_configs/*.yaml) -> a checked :class:`TuneSpec` -> Ray Tune objects.

Why a file format of our own rather than Python: a sweep must be reviewable and restartable from
what is on disk (the spec is copied into the experiment directory), and every mistake in it
(unknown key, misspelt distribution, empty range, a combination the model rejects such as
``d_model`` not divisible by ``n_heads``) must surface as one clear line *before* a cluster is
booked, not as trial errors an hour later.

Layout of a file (every key but ``param_space`` optional)::

    description: what the sweep is for
    metric: val/gap            # reported by every trial (see lambo_ray.tuning.trainable)
    mode: min
    num_samples: 4
    max_concurrent: 2
    search: {type: optuna, seed: 0}            # optuna | random
    scheduler: {type: asha, max_t: 8, grace_period: 2, reduction_factor: 2}   # asha | fifo
    resources: {cpu: 1, gpu: 0}                # per trial, plus 1 CPU per env runner
    resources_by_scale: {L: {cpu: 4, gpu: 1}}  # overrides per model scale (for `scale` sweeps)
    checkpoint_every: 1                        # iterations between trial checkpoints
    keep_checkpoints: 2                        # best-by-metric checkpoints kept per trial
    fixed: {scale: S, iterations: 8, num_env_runners: 0, ...}   # PretrainConfig / PolicyConfig fields
    param_space:
      lr: {loguniform: [1.0e-4, 3.0e-3]}
      enc_layers: {choice: [1, 2, 3]}

Keys of ``fixed`` and ``param_space`` are :class:`~lambo_ray.rl.pretrain.PretrainConfig` fields or
:class:`~lambo_ray.policy.PolicyConfig` fields (the latter become ``policy_overrides``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

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
MODES = ("min", "max")
TOP_LEVEL_KEYS = (
    "description",
    "metric",
    "mode",
    "num_samples",
    "max_concurrent",
    "search",
    "scheduler",
    "resources",
    "resources_by_scale",
    "checkpoint_every",
    "keep_checkpoints",
    "fixed",
    "param_space",
)
# Settings the Tune trainable owns: a trial reports every iteration (ASHA decides on each rung).
TRAINABLE_OWNED = {"eval_every": 1, "checkpoint_every": None}
MAX_CORNER_CHECKS = 512


class _Yaml12Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-4`` as a float (YAML 1.2), not as the string PyYAML's 1.1 rules give."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                |\.[0-9_]+(?:[eE][-+][0-9]+)?
                |[-+]?\.(?:inf|Inf|INF)
                |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as err:
        raise LamboInputError(f"not valid YAML: {str(err).splitlines()[0]}", where=where) from None


# ---------------------------------------------------------------------------------------- pieces


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
            if not all(_is_number(a) for a in args):
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
    cpu: float = 1.0
    gpu: float = 0.0

    @classmethod
    def parse(cls, raw: Any, field_: str, where: str) -> TrialResources:
        if not isinstance(raw, dict):
            raise LamboInputError(f"{field_}: expected a mapping like {{cpu: 1, gpu: 0}}", where=where)
        unknown = sorted(set(raw) - {"cpu", "gpu"})
        if unknown:
            raise LamboInputError(f"{field_}: unknown key(s) {', '.join(unknown)}; expected cpu, gpu", where=where)
        for k, v in raw.items():
            if not _is_number(v) or v < 0:
                raise LamboInputError(f"{field_}.{k}: expected a number >= 0, got {v!r}", where=where)
        res = cls(**{k: float(v) for k, v in raw.items()})
        if res.cpu <= 0:
            raise LamboInputError(f"{field_}.cpu: a trial needs at least some CPU (got {res.cpu})", where=where)
        return res


# ------------------------------------------------------------------------------------------ spec


@dataclass(frozen=True)
class TuneSpec:
    """A checked search-space file."""

    name: str
    params: tuple[ParamSpec, ...]
    fixed: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    metric: str = "val/gap"
    mode: str = "min"
    num_samples: int = 1
    max_concurrent: int | None = None
    search: SearchSpec = SearchSpec()
    scheduler: SchedulerSpec = SchedulerSpec()
    resources: TrialResources = TrialResources()
    resources_by_scale: dict[str, TrialResources] = field(default_factory=dict)
    checkpoint_every: int = 1
    keep_checkpoints: int = 2
    source: str = ""  # the file's text, copied into the experiment directory

    @property
    def iterations(self) -> int:
        return int(self.trial_defaults()["iterations"])

    @property
    def max_t(self) -> int:
        return self.scheduler.max_t or self.iterations

    def trial_defaults(self) -> dict[str, Any]:
        """Fixed settings as a trial sees them: PretrainConfig defaults, then the file's ``fixed``."""
        from lambo_ray.rl.config import PretrainConfig

        base = {f.name: f.default for f in dataclasses.fields(PretrainConfig) if f.default is not dataclasses.MISSING}
        base.update(self.fixed)
        base["eval_every"] = 1
        return base

    def param_space(self) -> dict[str, Any]:
        """Tune's ``param_space``: the fixed settings as constants and one domain per searched key."""
        space: dict[str, Any] = dict(self.fixed)
        space.update({p.name: p.domain() for p in self.params})
        return space

    def with_overrides(self, *, num_samples: int | None = None, max_concurrent: int | None = None) -> TuneSpec:
        changes: dict[str, Any] = {}
        if num_samples is not None:
            if num_samples < 1:
                raise LamboInputError(f"--num-samples must be >= 1 (got {num_samples})", where="tune")
            changes["num_samples"] = num_samples
        if max_concurrent is not None:
            if max_concurrent < 1:
                raise LamboInputError(f"--max-concurrent must be >= 1 (got {max_concurrent})", where="tune")
            changes["max_concurrent"] = max_concurrent
        return dataclasses.replace(self, **changes) if changes else self

    def resources_for(self, trial_config: dict[str, Any]) -> TrialResources:
        return self.resources_by_scale.get(str(trial_config.get("scale", "S")), self.resources)


def load_tune_spec(path: str | Path) -> TuneSpec:
    """Read and check a tune_configs/*.yaml file; every problem is a LamboInputError naming the key."""
    path = Path(path)
    if not path.is_file():
        raise LamboInputError("tune config not found", where=str(path))
    text = path.read_text()
    return parse_tune_spec(load_yaml(text, str(path)), name=path.stem, where=str(path), source=text)


def parse_tune_spec(raw: Any, *, name: str, where: str, source: str = "") -> TuneSpec:
    if not isinstance(raw, dict):
        raise LamboInputError("expected a mapping at the top level", where=where)
    unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise LamboInputError(
            f"unknown key(s) {', '.join(unknown)}; expected some of {', '.join(TOP_LEVEL_KEYS)}", where=where
        )
    space = raw.get("param_space")
    if not isinstance(space, dict) or not space:
        raise LamboInputError("param_space: missing or empty (nothing to search)", where=where)
    params = tuple(ParamSpec.parse(str(k), v, where) for k, v in space.items())
    fixed = raw.get("fixed", {}) or {}
    if not isinstance(fixed, dict):
        raise LamboInputError("fixed: expected a mapping of PretrainConfig / PolicyConfig fields", where=where)
    both = sorted(set(fixed) & set(space))
    if both:
        raise LamboInputError(f"fixed and param_space both set {', '.join(both)}", where=where)
    for key in list(fixed) + list(space):
        _check_setting_key(key, "fixed" if key in fixed else "param_space", where)
    for key, forced in TRAINABLE_OWNED.items():
        if key in fixed and fixed[key] != forced:
            raise LamboInputError(
                f"fixed.{key}: set by the Tune trainable (validation every iteration for ASHA, checkpoints "
                f"every `checkpoint_every` iterations); remove it",
                where=where,
            )

    mode = raw.get("mode", "min")
    if mode not in MODES:
        raise LamboInputError(f"mode: expected min or max, got {mode!r}", where=where)
    metric = raw.get("metric", "val/gap")
    if not isinstance(metric, str) or not metric:
        raise LamboInputError("metric: expected the name of a reported metric such as val/gap", where=where)
    search = _sub_spec(raw, "search", SearchSpec, where)
    if search.type not in SEARCH_TYPES:
        raise LamboInputError(
            f"search.type: expected one of {', '.join(SEARCH_TYPES)}, got {search.type!r}", where=where
        )
    if search.type == "optuna" and any(p.kind == "grid" for p in params):
        raise LamboInputError("param_space: grid is not supported by the optuna search; use choice", where=where)
    scheduler = _sub_spec(raw, "scheduler", SchedulerSpec, where)
    if scheduler.type not in SCHEDULER_TYPES:
        raise LamboInputError(
            f"scheduler.type: expected one of {', '.join(SCHEDULER_TYPES)}, got {scheduler.type!r}",
            where=where,
        )
    resources = TrialResources.parse(raw.get("resources", {}), "resources", where)
    by_scale_raw = raw.get("resources_by_scale", {}) or {}
    if not isinstance(by_scale_raw, dict):
        raise LamboInputError("resources_by_scale: expected a mapping scale -> {cpu, gpu}", where=where)
    from lambo_ray.policy import SCALES

    for scale in by_scale_raw:
        if scale not in SCALES:
            raise LamboInputError(
                f"resources_by_scale.{scale}: unknown scale; expected one of {', '.join(SCALES)}", where=where
            )
    by_scale = {str(k): TrialResources.parse(v, f"resources_by_scale.{k}", where) for k, v in by_scale_raw.items()}

    spec = TuneSpec(
        name=name,
        params=params,
        fixed=dict(fixed),
        description=str(raw.get("description", "")).strip(),
        metric=metric,
        mode=mode,
        num_samples=_positive_int(raw, "num_samples", 1, where),
        max_concurrent=_positive_int(raw, "max_concurrent", None, where),
        search=search,
        scheduler=scheduler,
        resources=resources,
        resources_by_scale=by_scale,
        checkpoint_every=_positive_int(raw, "checkpoint_every", 1, where),
        keep_checkpoints=_positive_int(raw, "keep_checkpoints", 2, where),
        source=source,
    )
    if scheduler.type == "asha":
        for key in ("max_t", "grace_period"):
            v = getattr(scheduler, key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise LamboInputError(f"scheduler.{key}: expected an integer >= 1, got {v!r}", where=where)
        if not (_is_number(scheduler.reduction_factor) and scheduler.reduction_factor > 1):
            raise LamboInputError(
                f"scheduler.reduction_factor: expected a number > 1, got {scheduler.reduction_factor!r}",
                where=where,
            )
    check_space(spec, where)
    if spec.metric.endswith("gap") and spec.trial_defaults().get("val_expert") is None:
        raise LamboInputError(
            f"metric: {spec.metric} is a gap to the expert, but fixed.val_expert is null "
            "(no expert labels: use a val/<prompt>/objective metric instead)",
            where=where,
        )
    if spec.scheduler.type == "asha":
        if spec.max_t > spec.iterations:
            raise LamboInputError(
                f"scheduler.max_t: {spec.max_t} exceeds fixed.iterations {spec.iterations}: "
                "trials end before ASHA's last rung",
                where=where,
            )
        if spec.scheduler.grace_period > spec.max_t:
            raise LamboInputError(
                f"scheduler.grace_period: {spec.scheduler.grace_period} > max_t {spec.max_t}", where=where
            )
    return spec


def check_space(spec: TuneSpec, where: str) -> None:
    """Build the PretrainConfig (and policy config) of the extreme points of the space, so that a
    combination the model rejects is reported now, naming the values, instead of failing trials."""
    from lambo_ray.tuning.trainable import pretrain_config_from_trial

    corners = [p.extremes() for p in spec.params]
    n = math.prod(len(c) for c in corners)
    if n <= MAX_CORNER_CHECKS:
        points = itertools.product(*corners)
    else:  # a large grid of choices: its first MAX_CORNER_CHECKS points in lexicographic order
        points = itertools.islice(itertools.product(*corners), MAX_CORNER_CHECKS)
    base = spec.trial_defaults()
    for values in points:
        trial = dict(base, **dict(zip((p.name for p in spec.params), values)))
        try:
            cfg = pretrain_config_from_trial(trial)
            cfg.policy_config()
        except (LamboInputError, TypeError, ValueError) as err:
            shown = ", ".join(f"{p.name}={v!r}" for p, v in zip(spec.params, values))
            raise LamboInputError(f"the space contains an invalid trial ({shown}): {err}", where=where) from None


# --------------------------------------------------------------------------------------- helpers


def setting_keys() -> tuple[set[str], set[str]]:
    """(PretrainConfig fields, PolicyConfig fields) a sweep may set."""
    from lambo_ray.policy import PolicyConfig
    from lambo_ray.rl.config import PretrainConfig

    return (
        {f.name for f in dataclasses.fields(PretrainConfig)},
        {f.name for f in dataclasses.fields(PolicyConfig)},
    )


def _check_setting_key(key: str, section: str, where: str) -> None:
    pretrain, policy = setting_keys()
    if key not in pretrain and key not in policy:
        raise LamboInputError(f"{section}.{key}: not a PretrainConfig or PolicyConfig field", where=where)


def _sub_spec(raw: dict[str, Any], key: str, cls: type, where: str) -> Any:
    value = raw.get(key, {}) or {}
    if not isinstance(value, dict):
        raise LamboInputError(f"{key}: expected a mapping", where=where)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise LamboInputError(
            f"{key}: unknown key(s) {', '.join(unknown)}; expected some of {', '.join(sorted(known))}",
            where=where,
        )
    return cls(**value)


def _positive_int(raw: dict[str, Any], key: str, default: int | None, where: str) -> int | None:
    v = raw.get(key, default)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise LamboInputError(f"{key}: expected an integer >= 1, got {v!r}", where=where)
    return v


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
