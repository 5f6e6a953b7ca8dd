"""`ray job submit -- lambo pretrain` against a real two-node Ray cluster started on this machine.

Each node is a `ray start --block` process of its own (unique ports, token auth as Ray 2.60 turns it on
for local clusters: the CLI must send RAY_AUTH_TOKEN, cluster/local.sh shows the commands); teardown
sends SIGTERM to exactly those two processes, which makes each of them stop the Ray processes it
started, so other Ray sessions on the machine are untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (all held open until the last is chosen, so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def agent_ports(ports: list[int]) -> list[str]:
    """Every per-node agent port of its own: both nodes share this machine (and CI's other Ray sessions
    may hold the defaults), and a dashboard agent that cannot bind its default port never registers,
    which `ray job submit` reports as "No available agent"."""
    listen, grpc, runtime_env, metrics = ports
    return [
        f"--dashboard-agent-listen-port={listen}",
        f"--dashboard-agent-grpc-port={grpc}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--metrics-export-port={metrics}",
    ]


def ray_cli() -> list[str]:
    return [sys.executable, "-m", "ray.scripts.scripts"]


@pytest.fixture
def two_node_cluster(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_DISABLE_USAGE_STATS": "1"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash, *ports = free_ports(10)
    # One temp dir per node: both nodes live on this machine, and runtime-env agents sharing one would
    # unpack / garbage-collect the same working_dir package under each other's running processes.
    # Short paths: Ray's socket paths must stay under 107 bytes.
    head_dir, worker_dir = (tempfile.mkdtemp(prefix="lr-", dir="/tmp") for _ in range(2))
    procs: list[subprocess.Popen] = []
    logs = []

    def start(args: list[str], name: str) -> None:
        log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - closed at the end of the test
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [*ray_cli(), "start", "--block", "--num-cpus=1", "--disable-usage-stats", *args],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )

    try:
        start(
            [
                "--head",
                f"--port={gcs}",
                f"--dashboard-port={dash}",
                "--dashboard-host=127.0.0.1",
                "--include-dashboard=true",
                f"--temp-dir={head_dir}",
                *agent_ports(ports[:4]),
            ],
            "head",
        )
        wait_for(
            lambda: _http_ok(f"http://127.0.0.1:{dash}/api/version"),
            120,
            "head node dashboard",
            procs,
            tmp_path,
        )
        start([f"--address=127.0.0.1:{gcs}", f"--temp-dir={worker_dir}", *agent_ports(ports[4:8])], "worker")
        wait_for(lambda: _alive_nodes(env, gcs) == 2, 120, "second node", procs, tmp_path)
        yield {"dashboard": f"http://127.0.0.1:{dash}", "env": env, "head_dir": head_dir}
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
        for d in (head_dir, worker_dir):
            shutil.rmtree(d, ignore_errors=True)


def wait_for(check, timeout: float, what: str, procs: list[subprocess.Popen], logs: Path) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if any(p.poll() is not None for p in procs):
            tail = "".join(f.read_text()[-2000:] for f in sorted(logs.glob("*.log")))
            raise RuntimeError(f"a `ray start` process exited while waiting for {what}:\n{tail}")
        try:
            if check():
                return
        except Exception:  # not up yet
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{what} did not come up in {timeout:.0f} s")


def _agent_log_tail(temp_dir: str) -> str:
    """The head's dashboard-agent log, for the failure message when the job cannot be submitted."""
    logs = sorted(Path(temp_dir).glob("session_*/logs/dashboard_agent*.log"))
    return "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in logs)


def _http_ok(url: str) -> bool:
    import httpx

    return httpx.get(url, timeout=2.0).status_code < 500


def _alive_nodes(env: dict, gcs: int) -> int:
    code = (
        f"import ray; ray.init(address='127.0.0.1:{gcs}', log_to_driver=False);"
        "print(sum(n['Alive'] for n in ray.nodes()))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else 0


def test_job_submit_runs_pretraining_on_the_cluster(two_node_cluster, tmp_path):
    """Two env runners need 1 CPU each and each node has 1 CPU, so one runs on each node; the driver
    (learner) is the job's entrypoint process."""
    out = tmp_path / "run"
    cmd = [
        *ray_cli(),
        "job",
        "submit",
        "--address",
        two_node_cluster["dashboard"],
        "--working-dir",
        str(REPO),
        "--",
        "lambo",
        "pretrain",
        "--out",
        str(out),
        "--n-ues",
        "6",
        "--n-servers",
        "2",
        "--iterations",
        "2",
        "--num-env-runners",
        "2",
        "--num-envs-per-env-runner",
        "2",
        "--train-batch-size",
        "32",
        "--minibatch-size",
        "32",
        "--instances-per-episode",
        "8",
        "--epochs",
        "2",
        "--val-size",
        "4",
        "--val-expert",
        "none",
        "--quiet",
    ]
    deadline = time.monotonic() + 240.0  # the head's job agent comes up after the dashboard (slowly under load)
    while True:
        res = subprocess.run(cmd, env=two_node_cluster["env"], capture_output=True, text=True, timeout=540)
        if "No available agent" not in res.stderr or time.monotonic() > deadline:
            break
        time.sleep(3.0)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:] + _agent_log_tail(two_node_cluster["head_dir"])
    assert "succeeded" in (res.stdout + res.stderr)
    state = json.loads((out / "state.json").read_text())
    assert state["iteration"] == 2 and state["config"]["num_env_runners"] == 2
    assert [h["instances"] for h in state["history"] if h.get("phase") == "acrl"] == [32, 32]

    from lambo_ray.policy.checkpoint import load_policy

    policy, meta = load_policy(out / "policy", expected_scale="S")
    assert meta["iteration"] == 2 and meta["n_max"] == 6
