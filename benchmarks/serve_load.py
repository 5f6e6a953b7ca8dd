"""Serve load benchmark: throughput and p50/p99 latency of the HTTP API at N = 50, from another process.

The script starts the Serve app on an embedded local Ray (loopback only) in several configurations and,
for each, runs a separate client process (httpx + asyncio, a bounded number of requests) at several
concurrency levels against:

* ``/v1/echo``         the bare Serve HTTP path with the same body (the yardstick, measured in the same run),
* ``/v1/decide``       one instance per request, greedy, with cross-caller batching on or off,
* ``/v1/decide``       the same with the strongest decode mode (``search``; ``refine`` where the policy
                       has no ``search``), reported beside greedy,
* ``/v1/decide_batch`` ``--batch`` instances per request (the bulk path).

Configurations: batched x1 replica, unbatched x1, batched x2 replicas. ``ratio_to_echo`` is the requests/s
of a row over the echo requests/s at the same concurrency in the same configuration, so it factors out
what the machine (2 shared cores here) does to every request. Prints a table and writes
``benchmarks/results/serve_load.json``; ``--markdown`` prints the README table from such a file.

    python benchmarks/serve_load.py                      # the shipped LAMBO-S (what `lambo serve` serves)
    python benchmarks/serve_load.py --untrained          # an untrained S policy made on the fly
    python benchmarks/serve_load.py --checkpoint runs/pretrain_S --requests 160
    python benchmarks/serve_load.py --markdown benchmarks/results/serve_load.json
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
COLUMNS = [
    "config",
    "endpoint",
    "decode",
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


def _bodies(plan: dict[str, Any], step: dict[str, Any]) -> list[bytes]:
    docs = [json.loads(line) for line in Path(plan["instances"]).read_text().splitlines() if line.strip()]
    opts = {"prompt": plan["prompt"], "decode": step["decode"], **step.get("options", {})}
    if step["endpoint"] == "/v1/decide_batch":
        batch = plan["batch"]
        groups = [[docs[(i + j) % len(docs)] for j in range(batch)] for i in range(0, len(docs), batch)]
        return [json.dumps({"instances": g, **opts}).encode() for g in groups]
    return [json.dumps({"instance": d, **opts}).encode() for d in docs]


def client_main() -> None:
    """Run the plan given as JSON on stdin; print one JSON list of measurements."""
    plan = json.loads(sys.stdin.read())
    out = []
    for step in plan["steps"]:
        res = asyncio.run(
            _load(plan["url"], step["endpoint"], _bodies(plan, step), step["concurrency"], step["requests"])
        )
        out.append({**step, **res})
        print(
            f"  {step['endpoint']:<17} {step['decode']:<7} c={step['concurrency']:<3} {res['rps']:8.1f} req/s  "
            f"p50 {res['p50_ms'] or float('nan'):7.1f} ms  p99 {res['p99_ms'] or float('nan'):7.1f} ms  "
            f"errors {res['errors']}" + (f" ({res['first_error'][:120]})" if res["errors"] else ""),
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


def strongest_mode() -> str:
    from lambo_ray.policy.decoding import available_strategies

    return "search" if "search" in available_strategies() else "refine"


def _plan(args: argparse.Namespace, label: str, strong: str) -> list[dict[str, Any]]:
    first = label == CONFIGS[0][0]
    strong_opts = {"k": args.search_k, "time_budget_ms": args.search_budget_ms}
    steps = []
    for c in args.concurrency:
        n = max(args.requests, 4 * c)
        steps.append({"endpoint": "/v1/echo", "decode": "-", "concurrency": c, "requests": n})
        steps.append({"endpoint": "/v1/decide", "decode": "greedy", "concurrency": c, "requests": n})
        if first:  # the strongest mode beside greedy, once (it does not depend on the configuration)
            steps.append(
                {"endpoint": "/v1/decide", "decode": strong, "concurrency": c, "requests": n, "options": strong_opts}
            )
    if label != CONFIGS[1][0]:  # the bulk path does not use cross-caller batching
        for c in args.batch_concurrency:
            n = max(args.batch_requests, 2 * c)
            steps.append({"endpoint": "/v1/decide_batch", "decode": "greedy", "concurrency": c, "requests": n})
    return steps


def _rows(label: str, measured: list[dict[str, Any]], batch: int) -> list[dict[str, Any]]:
    echo = {m["concurrency"]: m["rps"] for m in measured if m["endpoint"] == "/v1/echo"}
    rows = []
    for m in measured:
        per_request = batch if m["endpoint"] == "/v1/decide_batch" else 1
        rows.append(
            {
                "config": label,
                "endpoint": m["endpoint"],
                "decode": m["decode"],
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
    return rows


def _run_config(label: str, overrides: dict[str, Any], plan: dict[str, Any], checkpoint: Path) -> list[dict]:
    from ray import serve

    from lambo_ray.serving.app import build_app
    from lambo_ray.serving.config import ServeConfig

    cfg = ServeConfig.from_dict({"checkpoint": str(checkpoint), **overrides})
    start = time.perf_counter()
    serve.run(build_app(cfg), name="serve_load", route_prefix="/", blocking=False)
    print(f"{label}: deployed in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--client"],
            input=json.dumps(plan),
            text=True,
            capture_output=True,
            timeout=1800,
        )
    finally:
        serve.delete("serve_load")
    sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"client failed ({proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_markdown(path: Path) -> None:
    """The README table (and its provenance line) from a results JSON written by this script."""
    from lambo_ray.results import markdown_table

    doc = json.loads(path.read_text())
    print(
        f"`{doc['command']}` at {doc['git_revision']} on {doc['machine']}, {doc['date'][:10]}; N = {doc['n_ues']}, "
        f"{doc['prompt']}, policy {doc.get('checkpoint', '?')}, strongest mode `{doc['strong_mode']}` "
        f"(k = {doc['search_k']}, budget "
        f"{doc['search_budget_ms']:g} ms), /v1/decide_batch carries {doc['batch']} instances per request; "
        f"load average at start {doc['load_average_at_start'][0]}.\n"
    )
    print(markdown_table(doc["rows"], COLUMNS))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, help="policy checkpoint (default: the shipped LAMBO-S)")
    p.add_argument("--untrained", action="store_true", help="serve an untrained S policy made on the fly")
    p.add_argument("--n-ues", type=int, default=50)
    p.add_argument("--prompt", default="min_latency")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--batch-concurrency", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--requests", type=int, default=96, help="requests per (endpoint, concurrency) point")
    p.add_argument("--batch", type=int, default=64, help="instances per /v1/decide_batch request")
    p.add_argument("--batch-requests", type=int, default=12, help="requests per /v1/decide_batch point")
    p.add_argument("--search-k", type=int, default=8, help="k of the strongest decode mode")
    p.add_argument("--search-budget-ms", type=float, default=100.0, help="time budget of the strongest mode")
    p.add_argument("--configs", nargs="+", default=[c[0] for c in CONFIGS], help="subset of the configurations")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_load.json"))
    p.add_argument("--markdown", type=Path, help="print the README table of this results file and exit")
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = _parser().parse_args()
    if args.client:
        return client_main()
    if args.markdown:
        return print_markdown(args.markdown)

    import torch
    from ray import serve

    from lambo_ray.mec.generator import generate_many
    from lambo_ray.mec.io import write_instances
    from lambo_ray.mec.scenario import ScenarioConfig
    from lambo_ray.results import print_table, write_results
    from lambo_ray.runtime import init_ray
    from lambo_ray.serving.proxy import PROXY_ENV, start_serve

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="serve_load-"))
    from lambo_ray.policy.checkpoint import default_checkpoint

    if args.untrained:
        checkpoint = _untrained_checkpoint(tmp / "ckpt")
    else:
        checkpoint = args.checkpoint or default_checkpoint()
    instances_file = tmp / "instances.jsonl"
    write_instances(instances_file, generate_many(ScenarioConfig(n_ues=args.n_ues), 64, seed=4242))
    strong = strongest_mode()

    load_at_start = os.getloadavg()
    os.environ.update(PROXY_ENV)
    init_ray(num_cpus=os.cpu_count(), log_to_driver=False)
    port = _free_port()
    start_serve("127.0.0.1", port, request_timeout_s=120.0)
    rows: list[dict[str, Any]] = []
    try:
        for label, overrides in CONFIGS:
            if label not in args.configs:
                continue
            plan = {
                "url": f"http://127.0.0.1:{port}",
                "instances": str(instances_file),
                "prompt": args.prompt,
                "batch": args.batch,
                "steps": _plan(args, label, strong),
            }
            rows += _rows(label, _run_config(label, overrides, plan, checkpoint), args.batch)
    finally:
        serve.shutdown()
    print_table(rows, COLUMNS, title=f"Serve load, N={args.n_ues}, {args.prompt}, checkpoint {checkpoint}")
    write_results(
        args.out,
        rows,
        n_ues=args.n_ues,
        prompt=args.prompt,
        strong_mode=strong,
        search_k=args.search_k,
        search_budget_ms=args.search_budget_ms,
        batch=args.batch,
        checkpoint="untrained S (made on the fly)"
        if args.untrained
        else (str(args.checkpoint) if args.checkpoint else "shipped lambo-s"),
        untrained=bool(args.untrained),
        load_average_at_start=[round(x, 2) for x in load_at_start],
        load_average_at_end=[round(x, 2) for x in os.getloadavg()],
        note="ratio_to_echo = req/s over /v1/echo req/s at the same concurrency in the same deployment; "
        "decide_batch ratio is per request (it carries `batch` instances)",
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
