"""`lambo solve` streams and survives crashes: decisions are appended durably as they are made, ``--resume``
continues an interrupted run (also one killed with SIGKILL) to the same file an uninterrupted run writes,
a torn last line is cut, and a resume with other parameters is refused. Bad bytes in input files are
exit code 2 with file and line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lambo_ray.cli import main
from lambo_ray.errors import LamboInputError
from lambo_ray.mec.generator import generate_many
from lambo_ray.mec.instance import Decision
from lambo_ray.mec.io import instance_to_dict, read_decisions, write_instances
from lambo_ray.mec.journal import DecisionJournal, part_path, run_path
from lambo_ray.mec.scenario import ScenarioConfig

SAME = ("target", "share", "objective", "method", "prompt")  # "identical": everything but stats (wall times)


def _docs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _same_decisions(a: Path, b: Path) -> None:
    da, db = _docs(a), _docs(b)
    assert len(da) == len(db)
    for x, y in zip(da, db):
        assert {k: x[k] for k in SAME} == {k: y[k] for k in SAME}


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inst") / "small.jsonl"
    write_instances(path, generate_many(ScenarioConfig(n_ues=8, n_servers=2, capacities_cps=(1e10, 2e10)), 12, seed=3))
    return path


def _solve(inp: Path, out: Path, method: str = "greedy", *extra: str) -> int:
    return main(["solve", "--method", method, "--prompt", "min_latency", "--in", str(inp), "--out", str(out)]
                + ["--quiet", *extra])  # fmt: skip


# ------------------------------------------------------------------------------------- the journal


def _decision(k: int) -> Decision:
    return Decision(np.array([0, 1]), np.array([0.0, 0.5]), "min_energy", f"m{k}", float(k), {"wall_s": 0.1})


def test_journal_keeps_complete_lines_cuts_a_torn_one_and_aligns(tmp_path):
    out = tmp_path / "d.jsonl"
    record = {"method": "x", "input_sha256": "abc"}
    j = DecisionJournal.open(out, record, resume=False)
    for k in range(5):
        j.append(_decision(k))
    j.close()
    assert not out.exists()  # nothing is published before the run is complete
    with part_path(out).open("ab") as fh:
        fh.write(b'{"schema":"lambo.decision/1","pro')  # a write the crash cut short
    j = DecisionJournal.open(out, record, resume=True)
    assert j.done == 5 and [d.method for d in j.saved()] == [f"m{k}" for k in range(5)]
    j.close()
    j = DecisionJournal.open(out, record, resume=True, align=2)  # batches of 2: restart at 4
    assert j.done == 4
    j.append(_decision(4))
    j.commit()
    assert [d.method for d in read_decisions(out)] == [f"m{k}" for k in range(5)]
    assert not part_path(out).exists() and not run_path(out).exists()


def test_journal_refuses_a_resume_with_other_parameters_and_a_silent_restart(tmp_path):
    out = tmp_path / "d.jsonl"
    j = DecisionJournal.open(out, {"method": "exact", "seed": 0}, resume=False)
    j.append(_decision(0))
    j.close()
    with pytest.raises(LamboInputError, match=r"seed: was 0, now 1"):
        DecisionJournal.open(out, {"method": "exact", "seed": 1}, resume=True)
    with pytest.raises(LamboInputError, match="pass --resume to continue it"):
        DecisionJournal.open(out, {"method": "exact", "seed": 0}, resume=False)
    assert part_path(out).read_bytes().count(b"\n") == 1  # nothing saved was lost


# ----------------------------------------------------------------------------------- through the CLI


def test_resume_after_an_interruption_gives_the_uninterrupted_file(small_file, tmp_path):
    full, cut = tmp_path / "full.jsonl", tmp_path / "cut.jsonl"
    assert _solve(small_file, full, "de", "--seed", "4") == 0
    # An interrupted run: 5 decisions on disk and a torn sixth line.
    lines = full.read_text().splitlines(keepends=True)
    assert _solve(small_file, cut, "de", "--seed", "4") == 0
    os.replace(cut, part_path(cut))
    run_path(cut).write_text(json.dumps(json.loads(_record_of(small_file, "de", 4))))
    part_path(cut).write_text("".join(lines[:5]) + lines[5][:40])
    assert _solve(small_file, cut, "de", "--seed", "4", "--resume") == 0
    _same_decisions(full, cut)
    assert not part_path(cut).exists() and not run_path(cut).exists()


def _record_of(inp: Path, method: str, seed: int, **options) -> str:
    """The run record `lambo solve` writes for these parameters (captured from a run that is stopped)."""
    from lambo_ray.mec.io import file_digest
    from lambo_ray.solving import SolveOptions

    opts = SolveOptions(method=method, prompt="min_latency", seed=seed, **options)
    record = {**opts.record(), "input_path": str(inp.resolve()), "input_sha256": file_digest(inp)}
    record["instances"] = sum(1 for line in inp.read_text().splitlines() if line.strip())
    from lambo_ray.mec.journal import RUN_FORMAT

    return json.dumps({"format": RUN_FORMAT, **record})


def test_resume_is_refused_when_the_parameters_or_the_input_changed(small_file, tmp_path, capsys):
    out = tmp_path / "d.jsonl"
    part_path(out).write_text("")
    run_path(out).write_text(_record_of(small_file, "de", 4))
    assert _solve(small_file, out, "de", "--seed", "5", "--resume") == 2
    assert "seed: was 4, now 5" in capsys.readouterr().err
    assert _solve(small_file, out, "greedy", "--resume") == 2
    assert "method: was 'de', now 'greedy'" in capsys.readouterr().err
    other = tmp_path / "other.jsonl"
    other.write_text(small_file.read_text().replace("\n", "\n\n", 1))  # same instances, other bytes
    assert main(["solve", "--method", "de", "--seed", "4", "--prompt", "min_latency", "--in", str(other)]
                + ["--out", str(out), "--resume", "--quiet"]) == 2  # fmt: skip
    assert "input_sha256" in capsys.readouterr().err
    assert _solve(small_file, out, "de", "--seed", "4") == 2  # an interrupted run is not silently restarted
    assert "pass --resume" in capsys.readouterr().err
    assert not out.exists() and part_path(out).exists()


def test_online_learners_resume_to_the_same_decisions(small_file, tmp_path):
    """DROO learns from every instance it decides: a resume replays the decided ones first."""
    full, cut = tmp_path / "full.jsonl", tmp_path / "cut.jsonl"
    assert _solve(small_file, full, "droo") == 0
    part_path(cut).write_text("".join(full.read_text().splitlines(keepends=True)[:7]))
    run_path(cut).write_text(_record_of(small_file, "droo", 0))
    assert _solve(small_file, cut, "droo", "--resume") == 0
    _same_decisions(full, cut)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    import torch

    from lambo_ray.policy import LamboPolicy, scale_config
    from lambo_ray.policy.checkpoint import save_policy

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("policy") / "policy"
    save_policy(path, LamboPolicy(scale_config("S", d_model=32, enc_layers=1)).eval())
    return path


def test_the_policy_resumes_at_a_batch_boundary_to_the_same_decisions(small_file, policy_dir, tmp_path, monkeypatch):
    """The policy decides in batches: a resume restarts at the last complete batch so batches match."""
    import lambo_ray.solving as solving
    from lambo_ray.mec.io import read_instances
    from lambo_ray.policy.checkpoint import load_policy
    from lambo_ray.policy.decoding import decide

    monkeypatch.setattr(solving, "LAMBO_BATCH", 4)
    full, cut = tmp_path / "full.jsonl", tmp_path / "cut.jsonl"
    args = ("--checkpoint", str(policy_dir), "--decode", "sample", "--k", "3", "--seed", "2")
    assert _solve(small_file, full, "lambo", *args) == 0
    policy, _ = load_policy(policy_dir)
    insts = read_instances(small_file)
    expected = [d for k in range(0, 12, 4) for d in decide(policy, insts[k : k + 4], "min_latency", "sample", 3, 2)]
    assert [d["target"] for d in _docs(full)] == [d.target.tolist() for d in expected]
    # 6 decisions on disk: the second batch is incomplete, so it is decided again from instance 4
    part_path(cut).write_text("".join(full.read_text().splitlines(keepends=True)[:6]))
    run_path(cut).write_text(_record_of(small_file, "lambo", 2, checkpoint=str(policy_dir), decode="sample", k=3))
    assert _solve(small_file, cut, "lambo", *args, "--resume") == 0
    _same_decisions(full, cut)


def test_time_budget_goes_to_the_policy_only_if_its_decoding_takes_one(small_file, policy_dir, tmp_path, capsys):
    import inspect

    from lambo_ray.policy.decoding import decide

    out = tmp_path / "d.jsonl"
    assert _solve(small_file, out, "greedy", "--time-budget-ms", "50") == 2
    assert "--time-budget-ms applies to --method lambo" in capsys.readouterr().err
    code = _solve(small_file, out, "lambo", "--checkpoint", str(policy_dir), "--time-budget-ms", "50")
    if "time_budget_s" in inspect.signature(decide).parameters:
        assert code == 0 and len(_docs(out)) == 12
    else:
        assert code == 2 and "takes no time budget" in capsys.readouterr().err
        assert not part_path(out).exists() and not run_path(out).exists()  # refused before any work


@pytest.mark.slow
def test_sigkill_midway_then_resume_equals_an_uninterrupted_exact_run(tmp_path):
    """The acceptance test: a real `lambo solve --method exact` process killed with SIGKILL midway."""
    inp = tmp_path / "inst.jsonl"
    write_instances(inp, generate_many(ScenarioConfig(n_ues=25), 6, seed=11))  # ~1 s each
    argv = [sys.executable, "-m", "lambo_ray.cli", "solve", "--method", "exact", "--prompt", "min_latency"]
    argv += ["--in", str(inp), "--quiet"]
    full, cut = tmp_path / "full.jsonl", tmp_path / "cut.jsonl"
    proc = subprocess.Popen([*argv, "--out", str(cut)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        part = part_path(cut)
        if part.exists() and part.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read().decode()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = part_path(cut).read_bytes().count(b"\n")
    assert 2 <= done < 6 and not cut.exists()

    resumed = subprocess.run([*argv, "--out", str(cut), "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after {done} of 6" in resumed.stderr
    assert subprocess.run([*argv, "--out", str(full)], capture_output=True).returncode == 0
    _same_decisions(full, cut)
    assert all(d["stats"]["proven_optimal"] for d in _docs(cut))  # no time limit hit: deterministic


# --------------------------------------------------------------------------------------- bad bytes


@pytest.fixture(scope="module")
def good_line(small_file):
    return small_file.read_text().splitlines()[0].encode()


BAD_LINES = {
    "invalid UTF-8": (b'{"schema": "lambo.instance/1", "x": "\xff\xfe"}', "not valid UTF-8 (byte 0xff"),
    "deep nesting": (b"[" * 100_000, "nested too deeply"),
    "5000-digit integer": (b'{"n": ' + b"9" * 5000 + b"}", "an integer has too many digits"),
    "NaN literal": (b'{"x": NaN}', "NaN is not valid JSON"),
    "Infinity literal": (b'{"x": -Infinity}', "-Infinity is not valid JSON"),
    "overflowing float": (b'{"x": 1e999}', "overflows a float"),
}


@pytest.mark.parametrize("name", list(BAD_LINES))
@pytest.mark.parametrize("command", ["solve", "evaluate"])
def test_bad_bytes_exit_2_with_file_and_line(tmp_path, good_line, capsys, name, command):
    bad, expected = BAD_LINES[name]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(good_line + b"\n\n" + bad + b"\n")
    out = tmp_path / "out.jsonl"
    if command == "solve":
        argv = ["solve", "--method", "greedy", "--prompt", "min_energy", "--in", str(path), "--out", str(out)]
    else:
        argv = ["evaluate", "--instances", str(path), "--decisions", str(path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{path}:3" in err and expected in err, err
    assert not out.exists() and not part_path(out).exists()  # checked before any work


def test_bad_bytes_in_a_subprocess_are_one_line_on_stderr(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_bytes(b"[" * 100_000 + b"\n")
    proc = subprocess.run(
        [sys.executable, "-m", "lambo_ray.cli", "solve", "--method", "greedy", "--prompt", "min_energy"]
        + ["--in", str(path), "--out", str(tmp_path / "o.jsonl")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "deep.jsonl:1" in proc.stderr


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_bad_bytes_in_config_files_exit_2(tmp_path, capsys, suffix):
    path = tmp_path / f"scenario{suffix}"
    path.write_bytes(b"n_ues: 5\n\xff\n" if suffix == ".yaml" else b'{"n_ues": NaN}')
    assert main(["generate", "--count", "1", "--scenario", str(path), "--out", str(tmp_path / "g.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err


def test_instance_documents_still_round_trip_through_the_strict_reader(small_file):
    from lambo_ray.mec.io import iter_instances, read_instances

    insts = read_instances(small_file)
    assert [instance_to_dict(i) for i in iter_instances(small_file, start=10)] == [
        instance_to_dict(i) for i in insts[10:]
    ]
