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
    max_failures: 2            # retries of a failed trial from its last checkpoint (transient failures)
    search: {type: optuna, seed: 0}            # optuna | random
    scheduler: {type: asha, max_t: 8, grace_period: 2, reduction_factor: 2}   # asha | fifo
    resources: {cpu: 1, gpu: 0}                # per trial process, plus 1 CPU per env runner
    resources_by_scale: {L: {cpu: 2, learners: 1, gpus_per_learner: 1, cpus_per_learner: 8}}  # per scale
    checkpoint_every: 1                        # iterations between trial checkpoints
    keep_checkpoints: 2                        # best-by-metric checkpoints kept per trial
    fixed: {scale: S, iterations: 8, num_env_runners: 0, ...}   # PretrainConfig / PolicyConfig fields
    param_space:
      lr: {loguniform: [1.0e-4, 3.0e-3]}
      enc_layers: {choice: [1, 2, 3]}

Keys of ``fixed`` and ``param_space`` are :class:`~lambo_ray.rl.config.PretrainConfig` fields or
:class:`~lambo_ray.policy.PolicyConfig` fields (the latter become ``policy_overrides``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lambo_ray.config_files import load_yaml, read_text
from lambo_ray.errors import LamboInputError
from lambo_ray.tuning.space import (
    SCHEDULER_TYPES,
    SEARCH_TYPES,
    ParamSpec,
    SchedulerSpec,
    SearchSpec,
    TrialResources,
    is_number,
)

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
    "max_failures",
    "checkpoint_every",
    "keep_checkpoints",
    "fixed",
    "param_space",
)
# Settings the Tune trainable owns: a trial reports every iteration (ASHA decides on each rung).
TRAINABLE_OWNED = {"eval_every": 1, "checkpoint_every": None}
MAX_CORNER_CHECKS = 512
# Retries of a failed trial from its last checkpoint: a lost node, an env runner killed for memory or a
# worker that died while starting are transient on a shared cluster; a bug fails every retry the same way.
DEFAULT_MAX_FAILURES = 2


@dataclass(frozen=True)
class SweepOverrides:
    """What `lambo tune` flags may change in a search-space file; None keeps the file's value."""

    num_samples: int | None = field(
        default=None, metadata={"help": "trials to sample (default: the file's num_samples, else 1)"}
    )
    max_concurrent: int | None = field(
        default=None,
        metadata={"help": "trials running at once (default: the file's, else as many as the resources allow)"},
    )
    max_failures: int | None = field(
        default=None,
        metadata={
            "help": "retries of a failed trial from its last checkpoint, for transient failures such as a lost "
            f"worker (default: the file's max_failures, else {DEFAULT_MAX_FAILURES})"
        },
    )

    def __post_init__(self) -> None:
        for name, low in (("num_samples", 1), ("max_concurrent", 1), ("max_failures", 0)):
            value = getattr(self, name)
            if value is not None and value < low:
                flag = "--" + name.replace("_", "-")
                raise LamboInputError(f"{flag} must be >= {low} (got {value})", where="tune")


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
    max_failures: int = DEFAULT_MAX_FAILURES
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

    def with_overrides(self, overrides: SweepOverrides) -> TuneSpec:
        """The spec with the values a command line gave instead of the file's."""
        changes = {k: v for k, v in dataclasses.asdict(overrides).items() if v is not None}
        return dataclasses.replace(self, **changes) if changes else self

    def resources_for(self, trial_config: dict[str, Any]) -> TrialResources:
        return self.resources_by_scale.get(str(trial_config.get("scale", "S")), self.resources)


def load_tune_spec(path: str | Path) -> TuneSpec:
    """Read and check a tune_configs/*.yaml file; every problem is a LamboInputError naming the key."""
    path = Path(path)
    if not path.is_file():
        raise LamboInputError("tune config not found", where=str(path))
    text = read_text(path)
    return parse_tune_spec(load_yaml(text, str(path)), name=path.stem, where=str(path), source=text)


def parse_tune_spec(raw: Any, *, name: str, where: str, source: str = "") -> TuneSpec:
    if not isinstance(raw, dict):
        raise LamboInputError("expected a mapping at the top level", where=where)
    unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise LamboInputError(
            f"unknown key(s) {', '.join(unknown)}; expected some of {', '.join(TOP_LEVEL_KEYS)}", where=where
        )
    params, fixed = _parse_settings(raw, where)
    mode = raw.get("mode", "min")
    if mode not in MODES:
        raise LamboInputError(f"mode: expected min or max, got {mode!r}", where=where)
    metric = raw.get("metric", "val/gap")
    if not isinstance(metric, str) or not metric:
        raise LamboInputError("metric: expected the name of a reported metric such as val/gap", where=where)
    search, scheduler = _parse_algorithms(raw, params, where)
    resources, by_scale = _parse_resources(raw, where)
    spec = TuneSpec(
        name=name,
        params=params,
        fixed=fixed,
        description=str(raw.get("description", "")).strip(),
        metric=metric,
        mode=mode,
        num_samples=_positive_int(raw, "num_samples", 1, where),
        max_concurrent=_positive_int(raw, "max_concurrent", None, where),
        max_failures=_count(raw, "max_failures", DEFAULT_MAX_FAILURES, where),
        search=search,
        scheduler=scheduler,
        resources=resources,
        resources_by_scale=by_scale,
        checkpoint_every=_positive_int(raw, "checkpoint_every", 1, where),
        keep_checkpoints=_positive_int(raw, "keep_checkpoints", 2, where),
        source=source,
    )
    check_space(spec, where)
    _check_consistency(spec, where)
    return spec


def _parse_settings(raw: dict[str, Any], where: str) -> tuple[tuple[ParamSpec, ...], dict[str, Any]]:
    """The searched parameters and the fixed settings, each key a PretrainConfig / PolicyConfig field."""
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
    return params, dict(fixed)


def _parse_algorithms(
    raw: dict[str, Any], params: tuple[ParamSpec, ...], where: str
) -> tuple[SearchSpec, SchedulerSpec]:
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
    if scheduler.type == "asha":
        for key in ("max_t", "grace_period"):
            v = getattr(scheduler, key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise LamboInputError(f"scheduler.{key}: expected an integer >= 1, got {v!r}", where=where)
        if not (is_number(scheduler.reduction_factor) and scheduler.reduction_factor > 1):
            raise LamboInputError(
                f"scheduler.reduction_factor: expected a number > 1, got {scheduler.reduction_factor!r}",
                where=where,
            )
    return search, scheduler


def _parse_resources(raw: dict[str, Any], where: str) -> tuple[TrialResources, dict[str, TrialResources]]:
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
    return resources, by_scale


def _check_consistency(spec: TuneSpec, where: str) -> None:
    """Rules that tie the metric, the scheduler and the fixed settings together."""
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
        trial.update(spec.resources_for(trial).learner_settings())  # what the trial will run with
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


def _count(raw: dict[str, Any], key: str, default: int, where: str) -> int:
    v = raw.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise LamboInputError(f"{key}: expected an integer >= 0, got {v!r}", where=where)
    return v
