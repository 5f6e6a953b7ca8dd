"""Fault tolerance of pretraining: a killed env runner is restarted and training goes on; a driver killed
with SIGKILL resumes from its last checkpoint with nothing lost or done twice. And the acceptance run of
remote learners from the command line: `lambo pretrain --num-learners 2`, then `lambo solve` on its
checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SMALL = {"n_ues": 8, "n_servers": 2, "capacities_cps": [1.5e10, 3e10]}
SMALL_FLAGS = ["--n-ues", "8", "--n-servers", "2", "--capacities", "1.5e10", "3e10"]
TINY_FLAGS = [
    "--num-envs-per-env-runner",
    "8",
    "--instances-per-episode",
    "16",
    "--train-batch-size",
    "64",
    "--minibatch-size",
    "32",
    "--epochs",
    "2",
    "--val-size",
    "4",
    "--val-expert",
    "none",
    "--quiet",
]


@pytest.mark.slow
def test_killed_env_runner_is_restarted_and_training_goes_on(ray_session, tmp_path):
    """ray.kill on the only env-runner actor while its next batch is in flight (sampling overlaps
    learning): the next iteration waits for Ray's restart, trains on a full batch, and the metrics count
    the restart."""
    from lambo_ray.rl.config import PretrainConfig
    from lambo_ray.rl.pretrain import Pretrainer

    cfg = PretrainConfig(
        scenario=dict(SMALL),
        iterations=4,
        num_env_runners=1,
        num_envs_per_env_runner=8,
        instances_per_episode=16,
        train_batch_size=64,
        minibatch_size=32,
        num_epochs=2,
        val_size=4,
        val_expert=None,
        seed=1,
    )
    trainer = Pretrainer(cfg, tmp_path / "run", progress=False)
    try:
        first = trainer.train_iteration()
        assert first["ft/env_runner_restarts"] == 0 and first["ft/healthy_env_runners"] == 1
        actors = trainer.algo.env_runner_group._worker_manager.actors()
        assert len(actors) == 1
        before = {k: v.clone() for k, v in trainer.learner_state().items()}
        ray_session.kill(next(iter(actors.values())), no_restart=False)  # a crash: Ray may restart it
        history = [trainer.train_iteration() for _ in range(3)]
        after = trainer.learner_state()
    finally:
        trainer.close()
    assert history[-1]["ft/env_runner_restarts"] >= 1  # RLlib counted the restart
    assert all(h["ft/healthy_env_runners"] == 1 for h in history)
    assert [h["instances"] for h in history] == [64, 64, 64]  # every iteration trained on a full batch
    assert [h["iteration"] for h in history] == [2, 3, 4]
    assert all(h["timers/lambo_learn_s"] > 0 for h in history)
    # And the learner kept learning: its weights moved in the iterations after the kill.
    assert max(float((after[k] - before[k]).abs().max()) for k in before) > 1e-5


def tensorboard_steps(logdir: Path, tag: str) -> list[int]:
    """Steps of ``tag`` as TensorBoard shows them: event files in order, and a SessionLog START at step s
    in a later file drops the earlier files' events at steps >= s (TensorBoard's purge rule)."""
    import struct

    from tensorboardX.proto import event_pb2

    steps: list[int] = []
    for path in sorted(logdir.glob("events.out.tfevents.*"), key=lambda f: f.stat().st_mtime):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                steps = [s for s in steps if s < event.step]
            for value in event.summary.value:
                if value.tag == tag:
                    steps.append(int(event.step))
    return steps


def run_cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "RAY_DISABLE_USAGE_STATS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "lambo_ray.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the Ray processes it starts can be cleaned up
        **kw,
    )


def saved_iteration(out: Path) -> int:
    try:
        return int(json.loads((out / "rllib" / "lambo_state.json").read_text())["iteration"])
    except (OSError, ValueError, KeyError):
        return -1


def end_group(proc: subprocess.Popen) -> None:
    """Kill what is left of the process group this test started (the killed driver's Ray processes)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_driver_killed_with_sigkill_resumes_at_the_same_iteration(tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", "--out", str(out), "--iterations", "8", "--num-env-runners", "0", "--seed", "4"]
    args += SMALL_FLAGS + TINY_FLAGS
    proc = run_cli(args)
    try:
        deadline = time.monotonic() + 420
        while saved_iteration(out) < 2:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "no checkpoint at iteration 2 within 7 minutes"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)  # the driver only, mid-run
        proc.wait(timeout=60)
    finally:
        end_group(proc)
    killed_at = saved_iteration(out)
    saved = json.loads((out / "rllib" / "lambo_state.json").read_text())
    assert 2 <= killed_at < 8 and saved["iteration"] == killed_at

    resumed = run_cli([*args, "--resume"])
    try:
        log, _ = resumed.communicate(timeout=600)
    finally:
        end_group(resumed)
    assert resumed.returncode == 0, log
    state = json.loads((out / "state.json").read_text())
    iterations = [h["iteration"] for h in state["history"] if h["phase"] == "acrl"]
    assert iterations == list(range(1, 9))  # each iteration exactly once: none lost, none repeated
    assert state["history"][: len(saved["history"])] == saved["history"]  # the checkpointed past is kept
    assert state["iteration"] == 8 and json.loads(log.strip().splitlines()[-1])["iterations"] == 8
    # TensorBoard: the resumed run's log starts with a purge marker at the first redone iteration, so the
    # steps the killed run logged after its checkpoint are dropped by TensorBoard, not shown twice.
    assert tensorboard_steps(out / "tb", "train/batch_reward_mean") == list(range(1, 9))


@pytest.mark.slow
def test_cli_two_remote_learners_train_and_solve_loads_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = ["pretrain", "--out", str(out), "--iterations", "2", "--num-env-runners", "1", "--num-learners", "2"]
    proc = run_cli(args + SMALL_FLAGS + TINY_FLAGS)
    try:
        log, _ = proc.communicate(timeout=600)
    finally:
        end_group(proc)
    assert proc.returncode == 0, log
    state = json.loads((out / "state.json").read_text())
    assert state["iteration"] == 2 and state["config"]["num_learners"] == 2
    assert [h["instances"] for h in state["history"] if h["phase"] == "acrl"] == [64, 64]

    from lambo_ray.cli import main
    from lambo_ray.mec.generator import generate_many
    from lambo_ray.mec.io import write_instances
    from lambo_ray.mec.scenario import ScenarioConfig

    inst = tmp_path / "inst.jsonl"
    write_instances(inst, generate_many(ScenarioConfig.from_dict(SMALL), 3, seed=9))
    dec = tmp_path / "dec.jsonl"
    argv = ["solve", "--method", "lambo", "--checkpoint", str(out), "--prompt", "min_energy"]
    assert main([*argv, "--in", str(inst), "--out", str(dec), "--quiet"]) == 0
    from lambo_ray.mec.evaluator import evaluate
    from lambo_ray.mec.io import read_decisions

    decisions = read_decisions(dec)
    assert len(decisions) == 3
    for d, i in zip(decisions, generate_many(ScenarioConfig.from_dict(SMALL), 3, seed=9)):
        assert evaluate(i, d.target, d.share).feasible


def test_pretrain_help_lists_the_learner_flags(capsys):
    from lambo_ray.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--num-learners", "--num-gpus-per-learner", "--num-cpus-per-learner", "--precision", "--baseline"):
        assert flag in text
