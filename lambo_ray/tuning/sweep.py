"""Build, run and restore a Tune experiment from a :class:`TuneSpec`, and summarise its trials.

Experiment directory (``<storage>/<name>/``), written Tune's way plus two files of ours::

    tune_spec.yaml        the search-space file as run (a resume uses this one, not the current file)
    val_labels.json       exact-expert objectives of the validation set, computed once for all trials
    experiment_state-*.json, tuner.pkl, searcher / scheduler state    (Tune: what Tuner.restore reads)
    <trial>/result.json, progress.csv, events.out.tfevents.*          (Tune's JSON/CSV/TensorBoard loggers)
    <trial>/checkpoint_000NNN/checkpoint/{policy,rllib,state.json}    (a `lambo pretrain` checkpoint)
    summary.json          the trial table and the best trial (written by `lambo tune` after the run)
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lambo_ray.errors import LamboInputError
from lambo_ray.tuning.spec import TuneSpec, load_tune_spec
from lambo_ray.tuning.trainable import pretrain_config_from_trial, pretrain_trial, remove_run_dirs

SPEC_FILE = "tune_spec.yaml"
LABELS_FILE = "val_labels.json"
SUMMARY_FILE = "summary.json"


def experiment_dir(storage: str | Path, name: str) -> Path:
    return Path(storage).expanduser().resolve() / name


def trial_bundles(spec: TuneSpec, config: dict[str, Any]) -> list[dict[str, float]]:
    """Resources of one trial as placement-group bundles: the trial process (which hosts RLlib's learner
    when it has no learner actors) with the spec's CPUs/GPUs for its scale, then 1 CPU per env runner,
    then one bundle per learner actor (its CPUs and GPUs), so that RLlib's actors are scheduled inside
    the trial's reservation."""
    res = spec.resources_for(config)
    head: dict[str, float] = {"CPU": res.cpu}
    if res.gpu:
        head["GPU"] = res.gpu
    settings = {**spec.trial_defaults(), **config, **res.learner_settings()}
    runners = int(settings["num_env_runners"])
    learner: dict[str, float] = {"CPU": float(settings["num_cpus_per_learner"])}
    if float(settings["num_gpus_per_learner"]):
        learner["GPU"] = float(settings["num_gpus_per_learner"])
    return [head] + [{"CPU": 1.0}] * runners + [learner] * int(settings["num_learners"])


def build_trainable(spec: TuneSpec, exp_dir: Path) -> Any:
    """The trial function with its fixed arguments and per-trial resources."""
    from ray import tune
    from ray.tune import PlacementGroupFactory

    labels = exp_dir / LABELS_FILE
    trainable = tune.with_parameters(
        pretrain_trial,
        metric=spec.metric,
        checkpoint_every=spec.checkpoint_every,
        val_labels=labels.read_text() if labels.exists() else None,
        learners_by_scale=learners_by_scale(spec),
    )
    return tune.with_resources(trainable, lambda config: PlacementGroupFactory(trial_bundles(spec, config)))


def learners_by_scale(spec: TuneSpec) -> dict[str, dict[str, Any]]:
    """Per scale (``"*"``: any other), the learner settings the spec's resources fix for a trial."""
    from lambo_ray.policy import SCALES

    out = {scale: spec.resources_for({"scale": scale}).learner_settings() for scale in SCALES}
    out["*"] = spec.resources.learner_settings()
    return out


def check_experiment(exp_dir: Path, *, resume: bool) -> None:
    """Refuse to resume nothing, or to start a second experiment over an existing one (Ray not needed)."""
    from ray import tune

    exists = tune.Tuner.can_restore(str(exp_dir))
    if resume and not exists:
        raise LamboInputError("no Tune experiment to resume here (run without --resume first)", where=str(exp_dir))
    if not resume and exists:
        raise LamboInputError(
            "an experiment already exists here; pass --resume to continue it or choose another --name",
            where=str(exp_dir),
        )


def prepare_validation_labels(spec: TuneSpec, exp_dir: Path) -> None:
    """Solve the validation set with the exact expert once, in the driver, for every trial to reuse.

    Trials whose sampled settings change the validation set (scenario, size, seed) notice the key
    mismatch in Pretrainer's cache and solve their own.
    """
    from lambo_ray.rl.pretrain import ValidationSet

    cfg = pretrain_config_from_trial(spec.trial_defaults())
    if cfg.val_expert is not None:
        ValidationSet.build(cfg, exp_dir / LABELS_FILE)


def run_sweep(
    spec: TuneSpec,
    storage: str | Path,
    *,
    name: str | None = None,
    resume: bool = False,
    callbacks: Sequence[Any] = (),
    verbose: int = 1,
) -> Any:
    """Run (or with ``resume`` continue) the sweep; returns Tune's ResultGrid. Ray must be initialised.

    A resumed experiment keeps its stored spec and searcher/scheduler state; finished trials are not
    run again, interrupted ones continue from their last checkpoint, errored ones are retried from
    theirs (``resume_errored=True``).
    """
    from ray import tune

    name = name or spec.name
    exp = experiment_dir(storage, name)
    check_experiment(exp, resume=resume)
    if resume:
        stored = load_tune_spec(exp / SPEC_FILE)
        tuner = tune.Tuner.restore(str(exp), build_trainable(stored, exp), resume_unfinished=True, resume_errored=True)
        return _fit(tuner)

    exp.mkdir(parents=True, exist_ok=True)
    (exp / SPEC_FILE).write_text(spec.source or json.dumps({"name": spec.name}))
    prepare_validation_labels(spec, exp)
    tuner = tune.Tuner(
        build_trainable(spec, exp),
        param_space=spec.param_space(),
        tune_config=tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            num_samples=spec.num_samples,
            max_concurrent_trials=spec.max_concurrent if spec.search.type == "optuna" else None,
            search_alg=spec.search.build(spec.max_concurrent),
            scheduler=spec.scheduler.build(spec.max_t),
            # A finished trial's process runs the next one: torch/RLlib imports and Ray worker
            # start-up (seconds each) are paid once per concurrent slot, not once per trial.
            reuse_actors=True,
        ),
        run_config=run_config(spec, exp, verbose=verbose, callbacks=callbacks),
    )
    return _fit(tuner)


def run_config(spec: TuneSpec, exp: Path, *, verbose: int = 1, callbacks: Sequence[Any] = ()) -> Any:
    """Tune's RunConfig of an experiment: where it lives, its checkpoints, and how often a failed trial is
    retried (``spec.max_failures``: Tune restarts it from its last checkpoint, so a transient failure
    such as a lost worker costs at most ``checkpoint_every`` iterations)."""
    from ray import tune

    return tune.RunConfig(
        name=exp.name,
        storage_path=str(exp.parent),
        verbose=verbose,
        callbacks=list(callbacks),
        checkpoint_config=tune.CheckpointConfig(
            num_to_keep=spec.keep_checkpoints,
            checkpoint_score_attribute=spec.metric,
            checkpoint_score_order=spec.mode,
        ),
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
    )


def _fit(tuner: Any) -> Any:
    """Tuner.fit, then remove the run directories that stopped trials left on this node (all trials of
    one experiment run share the id prefix before the ``_``)."""
    results = tuner.fit()
    ids = [str((r.metrics or {}).get("trial_id", "")) for r in results]
    remove_run_dirs({i.rsplit("_", 1)[0] + "_" for i in ids if "_" in i})
    return results


# ------------------------------------------------------------------------------------------ summary


@dataclass(frozen=True)
class TrialRow:
    trial_id: str
    status: str  # done | stopped (by the scheduler before the last iteration) | unfinished | error
    iterations: int
    best: float | None  # best value of the metric over the trial's reports
    last: float | None
    params: dict[str, Any]
    checkpoint: str | None  # best checkpoint (by the metric) of the trial

    def to_dict(self) -> dict[str, Any]:
        return {
            "trial_id": self.trial_id,
            "status": self.status,
            "iterations": self.iterations,
            "best": self.best,
            "last": self.last,
            "params": self.params,
            "checkpoint": self.checkpoint,
        }


def summarize(results: Any, spec: TuneSpec) -> dict[str, Any]:
    """One row per trial (sorted best first) and the best trial, from a ResultGrid.

    ``unfinished`` trials are those an interrupted run left pending or running: ``--resume`` runs them.
    """
    from ray.tune import ExperimentAnalysis

    searched = [p.name for p in spec.params]
    # Trial ids and statuses, which Result lacks, as saved in the experiment state on disk: after an
    # interrupt that is the truth (Tune marks its in-memory trials terminated when it shuts them down).
    trials = {t.path: t for t in ExperimentAnalysis(str(results.experiment_path)).trials}
    rows: list[TrialRow] = []
    for result in results:
        metrics = result.metrics or {}
        config = result.config or {}
        trial = trials.get(result.path)
        iterations = int(metrics.get("training_iteration", 0))
        total = int(pretrain_config_from_trial({**spec.trial_defaults(), **config}).iterations)
        tune_status = getattr(trial, "status", "TERMINATED")
        if result.error is not None or tune_status == "ERROR":
            status = "error"
        elif tune_status != "TERMINATED":
            status = "unfinished"
        else:
            status = "done" if iterations >= total else "stopped"
        values = _metric_values(result, spec.metric)
        best = (min(values) if spec.mode == "min" else max(values)) if values else None
        ckpt = None
        if values:
            try:
                best_ckpt = result.get_best_checkpoint(spec.metric, spec.mode)
                ckpt = best_ckpt.path if best_ckpt is not None else None
            except (RuntimeError, ValueError, KeyError):
                ckpt = result.checkpoint.path if result.checkpoint is not None else None
        trial_id = getattr(trial, "trial_id", None) or str(metrics.get("trial_id", Path(result.path).name))
        rows.append(
            TrialRow(
                trial_id=trial_id,
                status=status,
                iterations=iterations,
                best=best,
                last=_finite(metrics.get(spec.metric)),
                params={k: config.get(k) for k in searched},
                checkpoint=ckpt,
            )
        )
    sign = 1 if spec.mode == "min" else -1
    rows.sort(key=lambda r: (r.best is None, sign * r.best if r.best is not None else 0.0))
    best_row = rows[0] if rows and rows[0].best is not None else None
    return {
        "experiment": str(results.experiment_path),
        "metric": spec.metric,
        "mode": spec.mode,
        "trials": [r.to_dict() for r in rows],
        "best": best_row.to_dict() if best_row else None,
        "unfinished": sum(r.status == "unfinished" for r in rows),
        "num_errors": results.num_errors,
        "num_terminated": results.num_terminated,
    }


def _metric_values(result: Any, metric: str) -> list[float]:
    """The metric over a trial's reports, one per iteration.

    A trial interrupted after reporting an iteration whose checkpoint the experiment state had not yet
    recorded resumes from the older checkpoint and redoes that iteration; Tune then appends a second row
    with the same ``training_iteration``. Only the redone row counts: the first one's checkpoint is
    gone, so a best value taken from it would name a model nobody can load.
    """
    df = result.metrics_dataframe
    if df is None or metric not in df:
        return []
    if "training_iteration" in df:
        df = df.drop_duplicates("training_iteration", keep="last")
    return [float(v) for v in df[metric].tolist() if v is not None and math.isfinite(float(v))]


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def format_table(summary: dict[str, Any], params: Sequence[str]) -> str:
    """A plain-text table of the trials (best first) for terminals and docs."""
    head = ["trial", "status", "iter", f"best {summary['metric']}", "last", *params]
    body = []
    for r in summary["trials"]:
        body.append(
            [
                r["trial_id"],
                r["status"],
                str(r["iterations"]),
                _fmt(r["best"]),
                _fmt(r["last"]),
                *(_fmt(r["params"].get(p)) for p in params),
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in body]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
