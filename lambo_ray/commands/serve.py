"""`lambo serve`: put the policy behind Ray Serve (the app of `serve/config.yaml`) and print its URL.

The checkpoint (and decoders directory) are checked before Ray or Serve start, so a wrong path is one
line and exit code 2, not a crash-looping replica. Without ``--checkpoint`` the policy shipped with the
package is served. With an embedded local Ray the process keeps serving until Ctrl-C (the app lives as
long as this process's Ray); when connected to a cluster (RAY_ADDRESS) the app is deployed and the
command returns unless ``--blocking`` is given.

It listens on 127.0.0.1 unless ``--host`` says otherwise: exposing the API is a decision (put it behind
a reverse proxy or pass ``--host 0.0.0.0`` on a trusted network). Registering decoders needs
``$LAMBO_ADMIN_TOKEN`` set when the server starts; without it that endpoint is disabled.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from pathlib import Path

from lambo_ray.errors import LamboInputError

APP_NAME = "lambo"


def _default_checkpoint() -> Path | None:
    """The checkpoint shipped inside the package, when this build has one."""
    from lambo_ray.policy import checkpoint

    if hasattr(checkpoint, "default_checkpoint"):
        return Path(checkpoint.default_checkpoint())
    return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="pretrained policy directory (`lambo pretrain`); default: the policy shipped with the package",
    )
    p.add_argument("--decoders", type=Path, help="directory of decoder-only checkpoints (id = sub-directory name)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1; 0.0.0.0 exposes every interface)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--replicas", type=int, default=1, help="replicas holding the policy (each holds the encoder once)")
    p.add_argument("--no-batching", action="store_true", help="decide every /v1/decide request on its own")
    p.add_argument("--max-batch-size", type=int, default=32, help="@serve.batch max_batch_size")
    p.add_argument("--batch-wait-ms", type=float, default=2.0, help="@serve.batch wait for a batch to fill (ms)")
    p.add_argument("--max-ues", type=int, default=1000, help="refuse (413) instances with more UEs")
    p.add_argument("--max-servers", type=int, default=64, help="refuse (413) instances with more servers")
    p.add_argument("--max-body-bytes", type=int, default=8_000_000, help="refuse (413) larger request bodies")
    p.add_argument("--max-queued-requests", type=int, default=64, help="queued requests beyond which 503 at once")
    p.add_argument("--request-timeout-s", type=float, default=30.0, help="end-to-end request timeout (503 after)")
    p.add_argument("--cache-size", type=int, default=4, help="decoders kept in memory per replica (LRU)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded local Ray (default: all)")
    p.add_argument(
        "--blocking",
        action="store_true",
        help="stay in the foreground until Ctrl-C (always the case with an embedded local Ray)",
    )


def config_from_args(args: argparse.Namespace):
    from lambo_ray.serving.config import ServeConfig

    if not 1 <= args.port <= 65535:
        raise LamboInputError(f"--port must be in 1..65535 (got {args.port})")
    if args.replicas < 1:
        raise LamboInputError(f"--replicas must be >= 1 (got {args.replicas})")
    checkpoint = args.checkpoint or _default_checkpoint()
    if checkpoint is None:
        raise LamboInputError("--checkpoint DIR is required (this build ships no default policy)")
    return ServeConfig.from_dict(
        {
            "checkpoint": str(checkpoint),
            "decoders_dir": str(args.decoders) if args.decoders else None,
            "policy_replicas": args.replicas,
            "batching": not args.no_batching,
            "max_batch_size": args.max_batch_size,
            "batch_wait_timeout_s": args.batch_wait_ms / 1e3,
            "max_ues": args.max_ues,
            "max_servers": args.max_servers,
            "max_body_bytes": args.max_body_bytes,
            "max_queued_requests": args.max_queued_requests,
            "request_timeout_s": args.request_timeout_s,
            "decoder_cache_size": args.cache_size,
        }
    ).with_admin_token_from_env()


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            raise LamboInputError(f"cannot listen on {host}:{port} ({err.strerror}); pick another --port") from None


def start_serve(host: str, port: int, request_timeout_s: float) -> None:
    """Start Serve with the JSON error middleware in its proxies (see :mod:`lambo_ray.serving.proxy`)."""
    from ray import serve

    from lambo_ray.serving.proxy import PROXY_ENV

    serve.start(
        http_options={"host": host, "port": port, "request_timeout_s": request_timeout_s},
        controller_options={"runtime_env": {"env_vars": dict(PROXY_ENV)}},
    )


def start(cfg, host: str, port: int, *, num_cpus: int | None = None) -> str:
    """Start Serve on (embedded or cluster) Ray, deploy the app, return its base URL."""
    from ray import serve

    from lambo_ray.commands.common import init_ray
    from lambo_ray.serving.app import build_app, check_checkpoint
    from lambo_ray.serving.proxy import PROXY_ENV

    check_checkpoint(cfg, load_weights=True)  # a bad checkpoint is one line, before anything starts
    app = build_app(cfg)
    os.environ.update(PROXY_ENV)  # an embedded Ray's processes inherit it
    init_ray(num_cpus=num_cpus)
    start_serve(host, port, cfg.request_timeout_s)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"http://{shown}:{port}"


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    embedded = not os.environ.get("RAY_ADDRESS")
    if embedded:
        _check_port_free(args.host, args.port)
    url = start(cfg, args.host, args.port, num_cpus=args.num_cpus)
    admin = "enabled" if cfg.admin_token_sha256 else "disabled (set LAMBO_ADMIN_TOKEN to enable)"
    print(
        f"lambo serve: policy {cfg.checkpoint} ready at {url}  (POST {url}/v1/decide, docs {url}/docs; "
        f"decoder registration {admin})",
        flush=True,
    )
    if not (args.blocking or embedded):
        return 0
    from ray import serve

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("lambo serve: shutting down", flush=True)
    finally:
        serve.shutdown()
    return 0
