"""Decode benchmark: CPU wall time of the policy's encode + autoregressive decode at N = 50, M = 4.

For each model scale (S, M), batch size B and decode mode it times, single-threaded
(``torch.set_num_threads(1)``):

* ``decide``  -- :func:`lambo_ray.policy.decide` end to end (featurize, encode, decode, fill_capacity,
  evaluator scoring), greedy only: what Serve pays per request batch;
* ``encode``  -- ``policy.encode`` on a featurized batch;
* ``decode``  -- ``policy.decode`` greedy and sample (the per-UE loop; RL rollouts call it).

This machine is shared and noisy, so a speedup is only honest when both sides are measured in the same
run: ``--baseline-rev REV`` checks ``REV`` out as a temporary ``git worktree`` and drives it through
this same script in a second worker process, alternating the two implementations task by task so that
load changes hit both alike. ``speedup`` is the ratio of the least *process CPU time* of the repeats
(single-threaded, so it does not count time the process waits for a core other engineers' jobs hold);
``speedup_wall`` is the ratio of the fastest wall times. Both workers build the
policy from the same seed and return their decisions, so the table also shows whether the optimised
decoder decides as the baseline did (``same_target``: identical targets; ``share_diff``/``logp_diff``:
the largest absolute difference, float round-off of a reordered computation).

    python benchmarks/decode.py                                # current tree only
    python benchmarks/decode.py --baseline-rev 87e5e01         # with a same-run baseline
    python benchmarks/decode.py --scales S --batches 1 16 --repeats 3

Prints a table and writes ``benchmarks/results/decode.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
N_UES, N_SERVERS = 50, 4
KINDS = ("decide_greedy", "encode", "decode_greedy", "decode_sample")


# ---------------------------------------------------------------------------------------------- worker
class Worker:
    """Times tasks of one implementation (whatever ``lambo_ray`` this process imports)."""

    def __init__(self) -> None:
        import torch

        torch.set_num_threads(1)
        self.torch = torch
        self.policies: dict[str, Any] = {}
        self.cache: dict[tuple[str, int], Any] = {}

    def policy(self, scale: str):
        from lambo_ray.policy import LamboPolicy, scale_config

        if scale not in self.policies:
            self.torch.manual_seed(0)
            self.policies[scale] = LamboPolicy(scale_config(scale)).eval()
        return self.policies[scale]

    def data(self, scale: str, b: int):
        from lambo_ray.mec.generator import generate_many
        from lambo_ray.mec.scenario import ScenarioConfig
        from lambo_ray.policy import featurize

        if (scale, b) not in self.cache:
            insts = generate_many(ScenarioConfig(n_ues=N_UES, n_servers=N_SERVERS), b, seed=0)
            batch = featurize(insts, "min_latency")
            with self.torch.no_grad():
                enc = self.policy(scale).encode(batch)
            self.cache[(scale, b)] = (insts, batch, enc)
        return self.cache[(scale, b)]

    def run(self, task: dict[str, Any]) -> dict[str, Any]:
        from lambo_ray.policy import decide

        torch = self.torch
        scale, b, kind, repeats = task["scale"], task["batch"], task["kind"], task["repeats"]
        pol = self.policy(scale)
        insts, batch, enc = self.data(scale, b)
        digest = None
        if kind == "decide_greedy":
            fn = lambda: decide(pol, insts, "min_latency", "greedy")  # noqa: E731
        elif kind == "encode":
            fn = lambda: pol.encode(batch)  # noqa: E731
        elif kind == "decode_greedy":
            fn = lambda: pol.decode(batch, enc, "greedy")  # noqa: E731
        elif kind == "decode_sample":
            fn = lambda: pol.decode(batch, enc, "sample", generator=torch.Generator().manual_seed(0))  # noqa: E731
        else:
            raise ValueError(kind)
        times, cpu = [], []
        with torch.no_grad():
            out = fn()  # warm-up (allocator, lazy imports)
            for _ in range(repeats):
                start, start_cpu = time.perf_counter(), time.process_time()
                out = fn()
                cpu.append(time.process_time() - start_cpu)
                times.append(time.perf_counter() - start)
        if kind.startswith("decode"):
            digest = {"target": out.target.tolist(), "share": out.share.tolist(), "logp": out.logp.tolist()}
        elif kind == "decide_greedy":
            digest = {"target": [d.target.tolist() for d in out], "share": [d.share.tolist() for d in out]}
        times.sort()
        return {
            "ms": 1e3 * times[len(times) // 2],
            "min_ms": 1e3 * times[0],
            "cpu_ms": 1e3 * min(cpu),
            "digest": digest,
        }


def worker_main() -> None:
    import lambo_ray

    w = Worker()
    print(json.dumps({"ready": True, "lambo_ray": str(Path(lambo_ray.__file__).resolve().parent)}), flush=True)
    for line in sys.stdin:
        print(json.dumps(w.run(json.loads(line))), flush=True)


# ---------------------------------------------------------------------------------------------- driver
def compare(cur: dict | None, base: dict | None) -> dict[str, Any]:
    """Same decisions? ``same_target``: every target identical; ``share_diff``: max |share difference|
    (float round-off of a reordered computation, not a different decision); ``logp_diff`` likewise."""
    if cur is None or base is None:
        return {}
    import numpy as np

    out: dict[str, Any] = {"same_target": cur["target"] == base["target"]}
    flat = lambda v: np.concatenate([np.ravel(np.asarray(x, dtype=float)) for x in v])  # noqa: E731
    if out["same_target"]:
        out["share_diff"] = float(np.max(np.abs(flat(cur["share"]) - flat(base["share"]))))
        if "logp" in cur:
            out["logp_diff"] = float(np.max(np.abs(np.asarray(cur["logp"]) - np.asarray(base["logp"]))))
    return out


class Remote:
    """A worker subprocess importing ``lambo_ray`` from ``root``."""

    def __init__(self, root: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker"],
            cwd=str(root),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        hello = json.loads(self.proc.stdout.readline())
        got = Path(hello["lambo_ray"])
        if got != (root / "lambo_ray").resolve():
            self.close()
            raise RuntimeError(f"worker for {root} imported lambo_ray from {got}")

    def ask(self, task: dict[str, Any]) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(task) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker died on {task}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def make_worktree(rev: str) -> tuple[Path, Path]:
    tmp = Path(tempfile.mkdtemp(prefix="lambo_decode_baseline_"))
    path = tmp / "tree"
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(path), rev],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    return tmp, path


def remove_worktree(tmp: Path, path: Path) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, capture_output=True)
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run(["git", "worktree", "prune"], cwd=ROOT, capture_output=True)


def readme_table(doc: dict[str, Any]) -> str:
    """The README's table: CPU time of the decoding tasks against the same-run baseline."""
    from lambo_ray.results import markdown_table

    rows = [
        {
            "scale": r["scale"],
            "B": r["B"],
            "task": r["task"],
            "cpu_ms": r["cpu_ms"],
            "baseline_cpu_ms": r.get("baseline_cpu_ms", "-"),
            "speedup": r.get("speedup", "-"),
            "same_targets": r.get("same_target", "-"),
        }
        for r in doc["rows"]
        if r["task"] != "encode"
    ]
    head = f"`{doc['command']}` (git {doc['git_revision']}, {doc['date'][:10]}, {doc['machine']})\n\n"
    return head + markdown_table(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--scales", nargs="+", default=["S", "M"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per task (median reported); M uses half")
    ap.add_argument("--baseline-rev", default=None, help="git revision to time in the same run (via a worktree)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode.json"))
    ap.add_argument("--markdown", type=Path, default=None, help="print the README table of a results file and exit")
    args = ap.parse_args(argv)
    if args.worker:
        worker_main()
        return 0
    if args.markdown is not None:
        print(readme_table(json.loads(args.markdown.read_text())))
        return 0

    from lambo_ray.results import print_table, write_results

    current = Remote(ROOT)
    baseline = tmp = wt = base_sha = None
    try:
        if args.baseline_rev:
            base_sha = subprocess.run(
                ["git", "rev-parse", "--short", args.baseline_rev],
                cwd=ROOT,
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
            tmp, wt = make_worktree(args.baseline_rev)
            baseline = Remote(wt)
        rows = []
        for scale in args.scales:
            for b in args.batches:
                for kind in args.kinds:
                    reps = max(1, args.repeats // 2) if scale != "S" else args.repeats
                    task = {"scale": scale, "batch": b, "kind": kind, "repeats": reps}
                    row: dict[str, Any] = {"scale": scale, "B": b, "task": kind}
                    if baseline is not None:  # baseline first, then current, for every task
                        base = baseline.ask(task)
                    cur = current.ask(task)
                    row["ms"], row["min_ms"], row["cpu_ms"] = cur["ms"], cur["min_ms"], cur["cpu_ms"]
                    row["ms_per_instance"] = cur["cpu_ms"] / b
                    if kind.startswith("decode"):
                        row["ms_per_step"] = cur["cpu_ms"] / N_UES
                    if baseline is not None:
                        row["baseline_ms"], row["baseline_cpu_ms"] = base["ms"], base["cpu_ms"]
                        row["speedup"] = base["cpu_ms"] / cur["cpu_ms"]
                        row["speedup_wall"] = base["min_ms"] / cur["min_ms"]
                        row.update(compare(cur["digest"], base["digest"]))
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        current.close()
        if baseline is not None:
            baseline.close()
        if wt is not None:
            remove_worktree(tmp, wt)
    cols = ["scale", "B", "task", "ms", "min_ms", "cpu_ms", "ms_per_instance", "ms_per_step"]
    if args.baseline_rev:
        cols += [
            "baseline_ms",
            "baseline_cpu_ms",
            "speedup",
            "speedup_wall",
            "same_target",
            "share_diff",
            "logp_diff",
        ]
    print_table(
        rows,
        cols,
        title=f"decode benchmark, N={N_UES}, M={N_SERVERS}, 1 thread" + (f", baseline {base_sha}" if base_sha else ""),
    )
    write_results(
        args.out,
        rows,
        n_ues=N_UES,
        n_servers=N_SERVERS,
        threads=1,
        baseline_rev=base_sha,
        repeats=args.repeats,
        note="ms = median, min_ms = fastest wall time of the repeats, cpu_ms = least process CPU time; "
        "speedup = baseline_cpu_ms / cpu_ms (CPU time does not count time descheduled by other "
        "load on the shared cores), speedup_wall = ratio of min_ms; same run, "
        "tasks alternated between the two worker processes; same_target = identical targets, share_diff / "
        "logp_diff = max abs difference to the baseline",
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
