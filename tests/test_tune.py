"""lambo tune: search-space files are checked, trial configs map onto PretrainConfig, and a tiny real
sweep (4 trials, ASHA, 2 CPUs, N=6 / M=2 cells, 2 iterations) runs end to end, is interrupted and
resumes without re-running finished trials (checked through Tune's own result files)."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from lambo_ray.errors import LamboInputError
from lambo_ray.tuning import (
    GAP_METRIC,
    load_tune_spec,
    pretrain_config_from_trial,
    summarize,
    trial_bundles,
    tune_metrics,
)
from lambo_ray.tuning.spec import parse_tune_spec
from lambo_ray.tuning.sweep import learners_by_scale

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "tune_configs").glob("*.yaml"))


# ------------------------------------------------------------------------------------ spec files


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_tune_config_loads_and_builds_its_tune_objects(path):
    from ray.tune.search.sample import Domain

    spec = load_tune_spec(path)
    space = spec.param_space()
    assert {p.name for p in spec.params} <= set(space)
    for p in spec.params:
        value = space[p.name]
        assert isinstance(value, Domain) or (p.kind == "grid" and "grid_search" in value)
    assert spec.metric == GAP_METRIC and spec.mode == "min"
    assert spec.scheduler.build(spec.max_t) is not None
    assert spec.search.build(spec.max_concurrent) is not None


def test_the_small_config_fits_two_cpus_and_the_scale_config_puts_l_on_a_gpu():
    small = load_tune_spec(ROOT / "tune_configs" / "small.yaml")
    assert small.num_samples == 4 and small.iterations == 2 and small.scheduler.type == "asha"
    assert trial_bundles(small, {}) == [{"CPU": 1.0}]
    scale = load_tune_spec(ROOT / "tune_configs" / "scale.yaml")
    runners = [{"CPU": 1.0}] * scale.fixed["num_env_runners"]
    # S: the learner in the trial process; M: one GPU learner actor; L: four (data-parallel).
    assert trial_bundles(scale, {"scale": "S"}) == [{"CPU": 1.0}] + runners
    assert trial_bundles(scale, {"scale": "M"}) == [{"CPU": 1.0}] + runners + [{"CPU": 4.0, "GPU": 1.0}]
    assert trial_bundles(scale, {"scale": "L"}) == [{"CPU": 1.0}] + runners + [{"CPU": 8.0, "GPU": 1.0}] * 4
    # The trial runs with the learners its bundles reserved, whatever the trial config says.
    lbs = learners_by_scale(scale)
    assert lbs["L"] == {"num_learners": 4, "num_cpus_per_learner": 8.0, "num_gpus_per_learner": 1.0}
    assert lbs["S"] == {} and lbs["*"] == {}
    # Learner actors asked for in the trial config itself (no per-scale resources) get their bundles too.
    assert trial_bundles(small, {"num_learners": 2, "num_cpus_per_learner": 0.5}) == [{"CPU": 1.0}] + [{"CPU": 0.5}] * 2


@pytest.mark.parametrize("name", ["lr_entropy.yaml", "architecture.yaml"])
def test_optuna_suggestions_stay_in_the_space_and_build_valid_trials(name):
    """Tune hands the param space to Optuna (TPE); its suggestions must respect every distribution's
    bounds and make a PretrainConfig the trial can build. Same seed, same proposals."""
    spec = load_tune_spec(ROOT / "tune_configs" / name)
    assert spec.search.type == "optuna"

    def proposals(n):
        searcher = spec.search.build(spec.max_concurrent)
        assert searcher.set_search_properties(spec.metric, spec.mode, spec.param_space())
        return [searcher.suggest(f"t{i}") for i in range(n)]

    first = proposals(8)
    assert first == proposals(8)
    for suggestion in first:
        for p in spec.params:
            v = suggestion[p.name]
            if p.kind == "choice":
                assert v in p.args
            else:
                assert p.args[0] <= v <= p.args[1]
        cfg = pretrain_config_from_trial({**spec.trial_defaults(), **suggestion})
        pol = cfg.policy_config()
        assert pol.d_model % pol.n_heads == 0


def test_loguniform_bounds_written_with_exponents_are_numbers():
    spec = load_tune_spec(ROOT / "tune_configs" / "lr_entropy.yaml")
    lr = next(p for p in spec.params if p.name == "lr")
    assert lr.kind == "loguniform" and all(isinstance(a, float) for a in lr.args)
    domain = spec.param_space()["lr"]
    assert (domain.lower, domain.upper) == lr.args


def _spec(**changes):
    raw = {
        "fixed": {"scale": "S", "iterations": 4, "num_env_runners": 0},
        "param_space": {"lr": {"loguniform": [1e-4, 1e-2]}},
        "scheduler": {"type": "asha", "max_t": 4},
    }
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    return raw


BAD_SPECS = [
    (dict(resourcez={"cpu": 1}), "unknown key(s) resourcez"),
    (dict(param_space=None), "param_space: missing"),
    (
        dict(param_space={"lr": {"logunifrom": [1e-4, 1e-2]}}),
        "param_space.lr: unknown distribution 'logunifrom'",
    ),
    (dict(param_space={"lr": {"loguniform": [1e-2, 1e-4]}}), "param_space.lr.loguniform: lower bound"),
    (dict(param_space={"lr": {"loguniform": [0.0, 1e-2]}}), "param_space.lr.loguniform: bounds must be > 0"),
    (dict(param_space={"lr": {"uniform": [0.1]}}), "param_space.lr.uniform: expected 2 numbers"),
    (dict(param_space={"lr": {"uniform": ["a", "b"]}}), "param_space.lr.uniform: expected numbers"),
    (dict(param_space={"lr": 0.001}), "param_space.lr: expected one distribution"),
    (
        dict(param_space={"enc_layers": {"choice": []}}),
        "param_space.enc_layers.choice: expected a non-empty list",
    ),
    (
        dict(param_space={"learning_rate": {"choice": [1e-3]}}),
        "param_space.learning_rate: not a PretrainConfig",
    ),
    (dict(fixed={"scale": "S", "iterations": 4, "colour": "red"}), "fixed.colour: not a PretrainConfig"),
    (
        dict(fixed={"scale": "S", "iterations": 4, "eval_every": 2}),
        "fixed.eval_every: set by the Tune trainable",
    ),
    (dict(fixed={"scale": "S", "iterations": 4, "lr": 1e-3}), "fixed and param_space both set lr"),
    # d_model 96 is not divisible by 5 heads: the loader names the offending combination.
    (
        dict(param_space={"d_model": {"choice": [64, 96]}, "n_heads": {"choice": [4, 5]}}),
        "invalid trial (d_model=64, n_heads=5)",
    ),
    (
        dict(param_space={"critic": {"choice": ["two_head", "three_head"]}}),
        "invalid trial (critic='three_head')",
    ),
    (dict(scheduler={"type": "asha", "max_t": 10}), "scheduler.max_t: 10 exceeds fixed.iterations 4"),
    (dict(scheduler={"type": "asha", "grace_period": 0}), "scheduler.grace_period: expected an integer >= 1"),
    (
        dict(scheduler={"type": "asha", "reduction_factor": 1}),
        "scheduler.reduction_factor: expected a number > 1",
    ),
    (dict(scheduler={"type": "hyperband"}), "scheduler.type: expected one of asha, fifo"),
    (dict(scheduler={"type": "asha", "max_tt": 3}), "scheduler: unknown key(s) max_tt"),
    (dict(search={"type": "bayes"}), "search.type: expected one of random, optuna"),
    (
        dict(search={"type": "optuna"}, param_space={"lr": {"grid": [1e-3, 1e-2]}}),
        "grid is not supported by the optuna",
    ),
    (dict(mode="minimum"), "mode: expected min or max"),
    (dict(fixed={"scale": "S", "iterations": 4, "val_expert": None}), "fixed.val_expert is null"),
    (dict(num_samples=0), "num_samples: expected an integer >= 1"),
    (dict(max_failures=-1), "max_failures: expected an integer >= 0"),
    (dict(max_failures="often"), "max_failures: expected an integer >= 0"),
    (dict(resources={"cpu": 1, "tpu": 1}), "resources: unknown key(s) tpu"),
    (dict(resources={"cpu": 0}), "resources.cpu: a trial needs at least some CPU"),
    (dict(resources={"cpu": 1, "learners": 1.5}), "resources.learners: expected a whole number"),
    (dict(resources={"cpu": 1, "learners": 3}), "divisible by num_learners 3"),
    (dict(resources_by_scale={"XL": {"cpu": 1}}), "resources_by_scale.XL: unknown scale"),
]


@pytest.mark.parametrize("changes,message", BAD_SPECS, ids=[m[:50] for _, m in BAD_SPECS])
def test_bad_tune_specs_fail_with_a_message_naming_the_key(changes, message):
    parse_tune_spec(_spec(), name="ok", where="ok.yaml")  # the base is valid
    with pytest.raises(LamboInputError) as err:
        parse_tune_spec(_spec(**changes), name="bad", where="bad.yaml")
    assert message in str(err.value) and str(err.value).startswith("bad.yaml: ")


def test_failed_trials_are_retried_max_failures_times(tmp_path):
    """The file's max_failures (default 2), overridden by --max-failures, is Tune's FailureConfig."""
    from lambo_ray.tuning import SweepOverrides
    from lambo_ray.tuning.spec import DEFAULT_MAX_FAILURES
    from lambo_ray.tuning.sweep import run_config

    spec = parse_tune_spec(_spec(), name="ok", where="ok.yaml")
    assert spec.max_failures == DEFAULT_MAX_FAILURES == 2
    assert run_config(spec, tmp_path / "exp").failure_config.max_failures == 2
    spec = parse_tune_spec(_spec(max_failures=0), name="ok", where="ok.yaml")
    assert run_config(spec, tmp_path / "exp").failure_config.max_failures == 0
    spec = spec.with_overrides(SweepOverrides(max_failures=5, num_samples=3))
    assert (spec.max_failures, spec.num_samples, spec.max_concurrent) == (5, 3, None)
    assert run_config(spec, tmp_path / "exp").failure_config.max_failures == 5
    with pytest.raises(LamboInputError, match="--max-failures must be >= 0"):
        SweepOverrides(max_failures=-1)


def test_a_trial_whose_worker_dies_is_retried_from_its_checkpoint(ray_session, tmp_path):
    """What FailureConfig(max_failures) buys: the trial is restarted from its last checkpoint and finishes."""
    from ray import tune

    from lambo_ray.tuning.sweep import run_config

    def _flaky_trial(config):
        """Checkpoints every iteration; the first attempt dies after its first checkpoint (a lost worker)."""
        import tempfile

        from ray import tune

        marker = Path(config["marker"])
        start = 0
        ckpt = tune.get_checkpoint()
        if ckpt is not None:
            start = int((Path(ckpt.path) / "it").read_text())
        attempts = int(marker.read_text()) + 1 if marker.exists() else 1
        marker.write_text(str(attempts))
        for it in range(start, 3):
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / "it").write_text(str(it + 1))
                tune.report(
                    {"it": it + 1, "start": start, "attempt": attempts}, checkpoint=tune.Checkpoint.from_directory(d)
                )
            if attempts == 1 and it == 0:
                os._exit(1)  # the worker process dies: what a lost node looks like to Tune

    spec = parse_tune_spec(_spec(max_failures=1), name="flaky", where="flaky.yaml")
    tuner = tune.Tuner(
        _flaky_trial,
        param_space={"marker": str(tmp_path / "attempts")},
        run_config=run_config(spec, tmp_path / "flaky", verbose=0),
    )
    result = tuner.fit()[0]
    assert result.error is None and result.metrics["it"] == 3
    assert result.metrics["attempt"] == 2 and result.metrics["start"] == 1  # resumed after iteration 1
    assert (tmp_path / "attempts").read_text() == "2"


def test_unparsable_or_missing_file_is_an_input_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("param_space: {lr: [unclosed\n")
    with pytest.raises(LamboInputError, match="not valid YAML"):
        load_tune_spec(bad)
    with pytest.raises(LamboInputError, match="tune config not found"):
        load_tune_spec(tmp_path / "missing.yaml")


# --------------------------------------------------------------------------------- trial pieces


def test_trial_config_splits_policy_fields_into_overrides():
    cfg = pretrain_config_from_trial(
        {
            "scale": "S",
            "lr": 2e-3,
            "enc_layers": 1,
            "d_model": 32,
            "n_heads": 2,
            "scenario": {"n_ues": 6, "n_servers": 2, "capacities_cps": [1.5e10, 3e10]},
            "iterations": 3,
            "eval_every": 5,
        }
    )
    assert cfg.lr == 2e-3 and cfg.iterations == 3 and cfg.eval_every == 1
    assert cfg.policy_overrides == {"enc_layers": 1, "d_model": 32, "n_heads": 2}
    pol = cfg.policy_config()
    assert (pol.enc_layers, pol.d_model, pol.n_heads) == (1, 32, 2)
    with pytest.raises(LamboInputError, match="colour: not a PretrainConfig"):
        pretrain_config_from_trial({"colour": 1})


def test_tune_metric_is_the_mean_gap_over_prompts_and_inf_without_feasible_decisions():
    m = {"iteration": 3, "val/min_latency/gap": 0.02, "val/min_energy/gap": 0.06, "note": [1, 2]}
    out = tune_metrics(m, ("min_latency", "min_energy"))
    assert out[GAP_METRIC] == pytest.approx(0.04) and "note" not in out and out["iteration"] == 3
    nan_gap = tune_metrics({**m, "val/min_energy/gap": float("nan")}, ("min_latency", "min_energy"))
    assert nan_gap[GAP_METRIC] == math.inf
    assert GAP_METRIC not in tune_metrics({"iteration": 1}, ("min_latency",))  # no validation: no metric


def test_a_redone_iteration_counts_once_with_its_redone_value():
    import pandas as pd

    from lambo_ray.tuning.sweep import _metric_values

    class Redone:  # rows 1, 2, 2, 3 of a trial resumed from its iteration-1 checkpoint
        metrics_dataframe = pd.DataFrame(
            {"training_iteration": [1, 2, 2, 3], GAP_METRIC: [0.9, 0.1, 0.5, float("nan")]}
        )

    # The first iteration-2 row (0.1) has no checkpoint any more: the best must not be taken from it.
    assert _metric_values(Redone(), GAP_METRIC) == [0.9, 0.5]
    assert _metric_values(Redone(), "val/other") == []


def test_cli_rejects_bad_input_before_starting_ray(tmp_path, capsys):
    from lambo_ray.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("param_space: {lr: {loguniform: [1.0e-2, 1.0e-4]}}\n")
    import ray

    was_up = ray.is_initialized()  # other tests may have started the session's Ray already
    assert main(["tune", "--config", str(bad), "--storage", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "lower bound" in err and "Traceback" not in err
    small = ROOT / "tune_configs" / "small.yaml"
    assert main(["tune", "--config", str(small), "--storage", str(tmp_path), "--resume"]) == 2
    assert "no Tune experiment to resume" in capsys.readouterr().err
    assert main(["tune", "--config", str(small), "--storage", str(tmp_path), "--num-samples", "0"]) == 2
    assert "--num-samples must be >= 1" in capsys.readouterr().err
    assert ray.is_initialized() == was_up  # bad input never started (or stopped) Ray


# ------------------------------------------------------------------------- a real tiny sweep


def _trial_rows(exp: Path) -> dict[str, list[dict]]:
    """Tune's result.json of every trial directory: trial_id -> list of reported rows."""
    rows = {}
    for result in exp.glob("*/result.json"):
        lines = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if lines:
            rows[lines[0]["trial_id"]] = lines
    return rows


def _interrupter(marker: Path):
    """A Tune callback that interrupts the experiment like Ctrl+C would (SIGUSR1 is Tune's other stop
    signal) once one trial has finished and another, unfinished one has saved a checkpoint: the resume
    must then keep the finished trial and continue the other from its checkpoint.

    Tune pickles RunConfig callbacks with the experiment and restores them on resume, so the callback
    fires once per ``marker`` file, not once per instance.
    """
    from ray import tune

    class Interrupt(tune.Callback):
        def __init__(self) -> None:
            self.complete: set[str] = set()
            self.checkpointed: set[str] = set()

        def _maybe_interrupt(self) -> None:
            midway = self.checkpointed - self.complete
            if not marker.exists() and self.complete and midway:
                marker.write_text(json.dumps({"complete": sorted(self.complete), "midway": sorted(midway)}))
                os.kill(os.getpid(), signal.SIGUSR1)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.complete.add(trial.trial_id)
            self._maybe_interrupt()

        def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
            self.checkpointed.add(trial.trial_id)
            self._maybe_interrupt()

    return Interrupt()


def test_tiny_sweep_reports_the_best_trial_and_resumes_without_repeating_finished_trials(ray_session, tmp_path):
    from lambo_ray.policy import load_policy
    from lambo_ray.tuning import run_sweep

    spec = load_tune_spec(ROOT / "tune_configs" / "small.yaml")
    marker = tmp_path / "interrupted.json"
    first = run_sweep(spec, tmp_path / "runs", name="sweep", callbacks=[_interrupter(marker)], verbose=0)
    exp = Path(first.experiment_path)
    assert marker.exists(), "the sweep finished before the interrupt could fire"
    at_interrupt = json.loads(marker.read_text())
    finished_before, midway = set(at_interrupt["complete"]), set(at_interrupt["midway"])
    before = _trial_rows(exp)
    finished_text = {t: (next(exp.glob(f"*{t}*/result.json"))).read_text() for t in finished_before}
    assert len(before) < 4 or any(len(before[t]) < 2 for t in midway & set(before))
    interrupted = summarize(first, spec)  # statuses as saved on disk at the interrupt
    status = {t["trial_id"]: t["status"] for t in interrupted["trials"]}
    assert interrupted["unfinished"] >= 1 and all(status[t] in ("done", "stopped") for t in finished_before)

    results = run_sweep(spec, tmp_path / "runs", name="sweep", resume=True, verbose=0)
    after = _trial_rows(exp)
    assert len(after) == spec.num_samples == 4 and results.num_errors == 0
    for t in finished_before:  # not run again: its result file is byte for byte what it was
        assert next(exp.glob(f"*{t}*/result.json")).read_text() == finished_text[t]
    for t, rows in after.items():
        its = [r["training_iteration"] for r in rows]
        # A trial resumed from its checkpoint continues the Pretrainer's own count (1 then 2); one that
        # restarted from scratch would report Pretrainer iteration 1 as Tune iteration 2.
        assert [r["iteration"] for r in rows] == its, (t, rows)
        # Tune logs a report before the experiment state records its checkpoint: a trial interrupted in
        # between resumes from the previous checkpoint and redoes the iteration (rows 1, 2, 2, 3). That is
        # at most one step back, and never to the start (the next row would then be iteration 1).
        steps_back = [(a, b) for a, b in zip(its, its[1:]) if b != a + 1]
        assert all(2 <= b <= a for a, b in steps_back) and len(steps_back) <= 1, (t, its)
        assert sorted(set(its)) == list(range(1, its[-1] + 1)) and its[-1] <= spec.iterations, (t, its)
        assert all(np.isfinite(r[GAP_METRIC]) for r in rows)
    for t in midway:
        assert [r["iteration"] for r in after[t]][: len(before[t])] == [r["iteration"] for r in before[t]]

    # Tune's loggers wrote CSV and TensorBoard files for every trial.
    for trial_dir in {p.parent for p in exp.glob("*/result.json")}:
        assert (trial_dir / "progress.csv").exists() and list(trial_dir.glob("events.out.tfevents*"))

    summary = summarize(results, spec)
    assert summary["unfinished"] == 0 and {t["status"] for t in summary["trials"]} <= {"done", "stopped"}
    for t in summary["trials"]:
        assert t["iterations"] == after[t["trial_id"]][-1]["training_iteration"]
        assert (t["status"] == "done") == (t["iterations"] == spec.iterations)
    # A redone iteration's first row is superseded (its checkpoint was never recorded).
    last_of_iteration = [{r["training_iteration"]: r for r in rows} for rows in after.values()]
    all_values = [r[GAP_METRIC] for rows in last_of_iteration for r in rows.values()]
    assert summary["best"]["best"] == pytest.approx(min(all_values))
    assert [t["trial_id"] for t in summary["trials"]][0] == summary["best"]["trial_id"]
    assert sorted(t["trial_id"] for t in summary["trials"]) == sorted(after)
    # The best checkpoint is a `lambo pretrain` checkpoint: its policy loads without Ray.
    ckpt = Path(summary["best"]["checkpoint"])
    state = json.loads((ckpt / "state.json").read_text())
    assert state["config"]["lr"] == pytest.approx(summary["best"]["params"]["lr"])
    policy, _ = load_policy(ckpt / "policy")
    assert policy.cfg.enc_layers == summary["best"]["params"]["enc_layers"]


def _cli_tune(tmp_path: Path, name: str) -> tuple[list[str], dict[str, str]]:
    """`lambo tune` on the small sweep as a user runs it (its own embedded Ray), and its environment."""
    import sys

    env = dict(os.environ, RAY_DISABLE_USAGE_STATS="1")
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "lambo_ray.cli", "tune", "--config", str(ROOT / "tune_configs" / "small.yaml")]
    return cmd + ["--storage", str(tmp_path), "--name", name, "--quiet", "--num-cpus", "2"], env


@pytest.mark.slow
def test_cli_sweep_prints_the_table_and_a_resume_of_a_finished_sweep_runs_nothing(tmp_path):
    """`lambo tune` as users run it (its own embedded Ray in a subprocess)."""
    import subprocess

    base, env = _cli_tune(tmp_path, "cli")

    def run(*extra):
        return subprocess.run(base + list(extra), capture_output=True, text=True, env=env, timeout=600)

    first = run("--num-samples", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "best trial" in first.stdout and "best val/gap" in first.stdout
    exp = tmp_path / "cli"
    summary = json.loads((exp / "summary.json").read_text())
    assert len(summary["trials"]) == 2 and summary["best"]["trial_id"] in first.stdout
    files = {p: p.read_text() for p in exp.glob("*/result.json")}
    assert len(files) == 2

    again = run("--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.read_text() for p in exp.glob("*/result.json")} == files  # nothing re-ran
    clobber = run()
    assert clobber.returncode == 2 and "already exists" in clobber.stderr


CTRL_C_TRIALS = 8


@pytest.mark.slow
def test_cli_ctrl_c_mid_sweep_then_resume_finishes_the_remaining_trials(tmp_path):
    """Ctrl+C (SIGINT) on `lambo tune` once trials have reported: exit 130 with a --resume hint, the
    state is on disk, and `--resume` runs the rest without re-running what finished."""
    import subprocess
    import time

    cmd, env = _cli_tune(tmp_path, "ctrlc")
    # 8 trials one at a time: when the first has finished, most are still pending however fast the
    # machine is (with 4 trials two at a time, a fast machine finished them all before the interrupt).
    first = cmd + ["--num-samples", str(CTRL_C_TRIALS), "--max-concurrent", "1"]
    proc = subprocess.Popen(first, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    exp = tmp_path / "ctrlc"
    deadline = time.monotonic() + 400
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            rows = _trial_rows(exp) if exp.exists() else {}
            if any(len(r) == 2 for r in rows.values()):  # one trial finished: let Tune record it, interrupt
                time.sleep(2.0)
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the sweep ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "--resume" in err and "Traceback" not in err
    # Finished means finished in the experiment state Tune saved at the interrupt (summary.json reads it): a
    # trial whose last row landed in result.json just before Ctrl+C may not be recorded as done yet, and
    # Tune then rightly runs it again from its last registered checkpoint.
    interrupted = json.loads((exp / "summary.json").read_text())
    assert interrupted["unfinished"] >= 1
    done = [t["trial_id"] for t in interrupted["trials"] if t["status"] in ("done", "stopped")]
    done_text = {t: next(exp.glob(f"*{t}*/result.json")).read_text() for t in done}

    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = _trial_rows(exp)
    assert len(after) == CTRL_C_TRIALS
    for t, text in done_text.items():
        assert next(exp.glob(f"*{t}*/result.json")).read_text() == text
    for t, rows in after.items():
        its = [r["training_iteration"] for r in rows]
        # The Pretrainer's count continues Tune's (a restart from scratch would not); an iteration after
        # the last registered checkpoint may be reported twice, never skipped.
        assert [r["iteration"] for r in rows] == its and its[0] == 1 and its[-1] <= 2, (t, its)
        assert all(b - a in (0, 1) for a, b in zip(its, its[1:])), (t, its)
    summary = json.loads((exp / "summary.json").read_text())
    assert summary["unfinished"] == 0 and len(summary["trials"]) == CTRL_C_TRIALS
