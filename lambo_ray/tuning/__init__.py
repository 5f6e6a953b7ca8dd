"""Ray Tune sweeps of LAMBO pretraining: search-space files, the trial, running/resuming, summaries.

Public API:

* :func:`load_tune_spec` / :class:`TuneSpec` -- read and check ``tune_configs/*.yaml`` (its parts:
  :mod:`lambo_ray.tuning.space`); :class:`SweepOverrides` -- what command-line flags may change in it
* :func:`run_sweep` -- run or resume a sweep (Ray initialised by the caller), returns Tune's ResultGrid
* :func:`summarize`, :func:`format_table` -- trial table (best first) and best trial
* :func:`pretrain_trial`, :func:`pretrain_config_from_trial`, :func:`tune_metrics` -- the trial itself
"""

from lambo_ray.tuning.space import ParamSpec, SchedulerSpec, SearchSpec, TrialResources
from lambo_ray.tuning.spec import SweepOverrides, TuneSpec, load_tune_spec
from lambo_ray.tuning.sweep import (
    LABELS_FILE,
    SPEC_FILE,
    SUMMARY_FILE,
    check_experiment,
    experiment_dir,
    format_table,
    run_sweep,
    summarize,
    trial_bundles,
)
from lambo_ray.tuning.trainable import GAP_METRIC, pretrain_config_from_trial, pretrain_trial, tune_metrics

__all__ = [
    "ParamSpec",
    "SchedulerSpec",
    "SearchSpec",
    "TrialResources",
    "SweepOverrides",
    "TuneSpec",
    "load_tune_spec",
    "LABELS_FILE",
    "SPEC_FILE",
    "SUMMARY_FILE",
    "check_experiment",
    "experiment_dir",
    "trial_bundles",
    "format_table",
    "run_sweep",
    "summarize",
    "GAP_METRIC",
    "pretrain_config_from_trial",
    "pretrain_trial",
    "tune_metrics",
]
