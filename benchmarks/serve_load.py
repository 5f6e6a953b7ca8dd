"""Serve load benchmark: throughput and p50/p99 latency of the HTTP API at N = 50, from another process.

The script starts the Serve app on an embedded local Ray (loopback only) in several configurations and,
for each, runs a separate client process (httpx + asyncio, a bounded number of requests) at several
concurrency levels against:

* ``/v1/echo``         the bare Serve HTTP path with the same body (the yardstick, measured in the same run),
* ``/v1/decide``       one instance per request (greedy), with cross-caller batching on or off,
* ``/v1/decide_batch`` ``--batch`` instances per request (the bulk path).

Configurations: batched x1 replica, unbatched x1, batched x2 replicas. ``ratio_to_echo`` is the
requests/s of a row over the echo requests/s at the same concurrency in the same configuration, so it
factors out what the machine (2 shared cores here) does to every request. Prints a table and writes
``benchmarks/results/serve_load.json``.

    python benchmarks/serve_load.py                      # untrained S checkpoint, made on the fly
    python benchmarks/serve_load.py --checkpoint runs/pretrain_S --requests 160
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

CONFIGS = [  # (label, ServeConfig overrides)
    ("batched x1", {"batching": True, "policy_replicas": 1}),
    ("unbatched x1", {"batching": False, "policy_replicas": 1}),
    ("batched x2", {"batching": True, "policy_replicas": 2}),
]


# ---------------------------------------------------------------------------------------------- client
async def _load(url: str, path: str, bodies: list[bytes], concurrency: int, requests: int) -> dict[str, Any]:
    """``requests`` POSTs by ``concurrency`` workers; per-request latency, errors, wall time."""
    import httpx

    latencies: list[float] = []
    batch_sizes: list[int] = []  # policy call size each /v1/decide answer was part of
    errors: list[str] = []
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        headers = {"content-type": "application/json"}
        await asyncio.gather(
            *(client.post(path, content=bodies[i % len(bodies)], headers=headers) for i in range(min(concurrency, 8)))
        )  # warm connections and replicas

        async def worker() -> None:
            for i in counter:
                start = time.perf_counter()
                try:
                    r = await client.post(path, content=bodies[i % len(bodies)], headers=headers)
                    if r.status_code != 200:
                        errors.append(f"{r.status_code}: {r.text[:200]}")
                        continue
                except httpx.HTTPError as err:
                    errors.append(repr(err))
                    continue
                latencies.append(time.perf_counter() - start)
                if path == "/v1/decide":
                    batch_sizes.append(r.json()["decision"].get("stats", {}).get("serve_batch_size", 1))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    lat = np.array(latencies) * 1e3
    return {
        "ok": len(latencies),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "wall_s": wall,
        "rps": len(latencies) / wall,
        "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
        "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
        "mean_policy_batch": float(np.mean(batch_sizes)) if batch_sizes else None,
    }


def client_main(args: argparse.Namespace) -> None:
    """Run the plan given as JSON on stdin; print one JSON list of measurements."""
    plan = json.loads(sys.stdin.read())
    docs = [json.loads(line) for line in Path(plan["instances"]).read_text().splitlines() if line.strip()]
    prompt = plan["prompt"]
    single = [json.dumps({"instance": d, "prompt": prompt}).encode() for d in docs]
    batch = plan["batch"]
    batches = [
        json.dumps({"instances": [docs[(i + j) % len(docs)] for j in range(batch)], "prompt": prompt}).encode()
        for i in range(0, len(docs), batch)
    ]
    out = []
    for step in plan["steps"]:
        bodies = batches if step["endpoint"] == "/v1/decide_batch" else single
        res = asyncio.run(_load(plan["url"], step["endpoint"], bodies, step["concurrency"], step["requests"]))
        out.append({**step, **res})
        print(
            f"  {step['endpoint']:<17} c={step['concurrency']:<3} {res['rps']:8.1f} req/s  "
            f"p50 {res['p50_ms'] or float('nan'):7.1f} ms  p99 {res['p99_ms'] or float('nan'):7.1f} ms  "
            f"errors {res['errors']}",
            file=sys.stderr,
            flush=True,
        )
    print(json.dumps(out))


# ---------------------------------------------------------------------------------------------- server side
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _untrained_checkpoint(directory: Path) -> Path:
    import torch

    from lambo_ray.policy.checkpoint import save_policy
    from lambo_ray.policy.config import scale_config
    from lambo_ray.policy.model import LamboPolicy

    torch.manual_seed(0)
    save_policy(directory, LamboPolicy(scale_config("S")), {"note": "untrained S policy made by serve_load.py"})
    return directory


def _plan(args: argparse.Namespace, label: str) -> list[dict[str, Any]]:
    steps = []
    for c in args.concurrency:
        n = max(args.requests, 4 * c)
        steps.append({"endpoint": "/v1/echo", "concurrency": c, "requests": n})
        steps.append({"endpoint": "/v1/decide", "concurrency": c, "requests": n})
    if label == CONFIGS[0][0]:  # the bulk path does not depend on cross-caller batching
        for c in args.batch_concurrency:
            steps.append(
                {
                    "endpoint": "/v1/decide_batch",
                    "concurrency": c,
                    "requests": max(args.requests // args.batch, 2 * c),
                }
            )
    return steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, help="policy checkpoint (default: an untrained S policy)")
    p.add_argument("--n-ues", type=int, default=50)
    p.add_argument("--prompt", default="min_latency")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--batch-concurrency", type=int, nargs="+", default=[1, 8])
    p.add_argument("--requests", type=int, default=96, help="requests per (endpoint, concurrency) point")
    p.add_argument("--batch", type=int, default=16, help="instances per /v1/decide_batch request")
    p.add_argument("--configs", nargs="+", default=[c[0] for c in CONFIGS], help="subset of the configurations")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_load.json"))
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.client:
        return client_main(args)

    import torch
    from ray import serve

    from lambo_ray.mec.generator import generate_many
    from lambo_ray.mec.io import write_instances
    from lambo_ray.mec.scenario import ScenarioConfig
    from lambo_ray.results import print_table, write_results
    from lambo_ray.runtime import init_ray
    from lambo_ray.serving.app import build_app
    from lambo_ray.serving.config import ServeConfig

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="serve_load-"))
    checkpoint = args.checkpoint or _untrained_checkpoint(tmp / "ckpt")
    instances_file = tmp / "instances.jsonl"
    write_instances(instances_file, generate_many(ScenarioConfig(n_ues=args.n_ues), 64, seed=4242))

    load_at_start = os.getloadavg()
    init_ray(num_cpus=os.cpu_count(), log_to_driver=False)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    rows: list[dict[str, Any]] = []
    try:
        for label, overrides in CONFIGS:
            if label not in args.configs:
                continue
            cfg = ServeConfig.from_dict({"checkpoint": str(checkpoint), **overrides})
            start = time.perf_counter()
            serve.run(build_app(cfg), name="serve_load", route_prefix="/", blocking=False)
            print(f"{label}: deployed in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
            plan = {
                "url": url,
                "instances": str(instances_file),
                "prompt": args.prompt,
                "batch": args.batch,
                "steps": _plan(args, label),
            }
            proc = subprocess.run(
                [sys.executable, __file__, "--client"],
                input=json.dumps(plan),
                text=True,
                capture_output=True,
                timeout=1800,
            )
            sys.stderr.write(proc.stderr)
            if proc.returncode != 0:
                raise SystemExit(f"client failed ({proc.returncode})")
            measured = json.loads(proc.stdout.strip().splitlines()[-1])
            echo = {m["concurrency"]: m["rps"] for m in measured if m["endpoint"] == "/v1/echo"}
            for m in measured:
                per_request = args.batch if m["endpoint"] == "/v1/decide_batch" else 1
                rows.append(
                    {
                        "config": label,
                        "endpoint": m["endpoint"],
                        "concurrency": m["concurrency"],
                        "requests": m["ok"],
                        "errors": m["errors"],
                        "req_per_s": m["rps"],
                        "instances_per_s": m["rps"] * per_request,
                        "p50_ms": m["p50_ms"],
                        "p99_ms": m["p99_ms"],
                        "ratio_to_echo": (m["rps"] / echo[m["concurrency"]]) if m["concurrency"] in echo else None,
                        "mean_policy_batch": m["mean_policy_batch"],
                    }
                )
            serve.delete("serve_load")
    finally:
        serve.shutdown()
    cols = [
        "config",
        "endpoint",
        "concurrency",
        "requests",
        "errors",
        "req_per_s",
        "instances_per_s",
        "p50_ms",
        "p99_ms",
        "ratio_to_echo",
        "mean_policy_batch",
    ]
    print_table(rows, cols, title=f"Serve load, N={args.n_ues}, {args.prompt}, greedy, checkpoint {checkpoint}")
    load = os.getloadavg()
    write_results(
        args.out,
        rows,
        n_ues=args.n_ues,
        prompt=args.prompt,
        decode="greedy",
        batch=args.batch,
        checkpoint=str(checkpoint),
        untrained=args.checkpoint is None,
        load_average_at_start=[round(x, 2) for x in load_at_start],
        load_average_at_end=[round(x, 2) for x in load],
        note="ratio_to_echo = req/s over /v1/echo req/s at the same concurrency in the same deployment; "
        "decide_batch ratio is per request (it carries `batch` instances)",
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
