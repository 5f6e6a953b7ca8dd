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
import dataclasses
import os
import socket
import time
from pathlib import Path

from lambo_ray.errors import LamboInputError
from lambo_ray.flags import DataclassFlags, Flag, LazyChoices

APP_NAME = "lambo"
AUTO = "auto"
MAX_AUTO_REPLICAS = 8


def replicas_arg(text: str) -> int | str:
    if text == AUTO:
        return AUTO
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 or {AUTO} (got {text!r})")
    return count


def auto_replicas(cpus_per_replica: float) -> int:
    """Policy replicas for the CPUs the connected Ray has free: each replica decides on one core at a
    time (measured on 2 cores: two replicas 1.1x / 1.3x the decisions/s of one at 8 / 32 concurrent
    callers, 1.5-2x on the bulk path)."""
    import ray

    free = float(ray.available_resources().get("CPU", 0.0))
    fits = int(free // cpus_per_replica) if cpus_per_replica > 0 else int(free)
    return max(1, min(MAX_AUTO_REPLICAS, fits))


def _decode_strategies() -> list[str]:
    from lambo_ray.policy.decoding import available_strategies

    return list(available_strategies())


def serve_flags() -> DataclassFlags:
    """One flag per ServeConfig field; the historical short names are kept next to the field names."""
    from lambo_ray.serving.config import ServeConfig

    return DataclassFlags(
        ServeConfig,
        flags={
            "checkpoint": Flag(
                type=Path,
                convert=str,
                help="pretrained policy directory (`lambo pretrain`); default: the shipped LAMBO-S",
            ),
            "decoders_dir": Flag(names=("--decoders", "--decoders-dir"), type=Path, convert=str),
            "policy_replicas": Flag(
                names=("--replicas", "--policy-replicas"),
                type=replicas_arg,
                convert=lambda n: None if n == AUTO else n,
                default_text=AUTO,
                help=f"policy replicas: a count, or {AUTO} (one per CPU the Ray it starts on has free, at most "
                f"{MAX_AUTO_REPLICAS}; one replica is a serial bottleneck under concurrent callers)",
            ),
            "decoder_cache_size": Flag(names=("--cache-size", "--decoder-cache-size")),
            "batch_wait_timeout_s": Flag(
                names=("--batch-wait-ms",),
                help="@serve.batch wait for a batch to fill (ms)",
                convert=lambda ms: ms / 1e3,
                default_text="2",
                metavar="MS",
            ),
            "default_decode": Flag(choices=LazyChoices(_decode_strategies), metavar="STRATEGY"),
        },
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0 to listen on every interface)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the embedded local Ray (default: all)")
    p.add_argument(
        "--blocking",
        action="store_true",
        help="stay in the foreground until Ctrl-C (always the case with an embedded local Ray)",
    )
    serve_flags().add_to(p.add_argument_group("application (ServeConfig)"))


def config_from_args(args: argparse.Namespace):
    from lambo_ray.serving.config import ServeConfig

    if not 1 <= args.port <= 65535:
        raise LamboInputError(f"--port must be in 1..65535 (got {args.port})")
    values = serve_flags().values(args)
    if values.get("checkpoint") is None:
        from lambo_ray.policy.checkpoint import default_checkpoint

        values["checkpoint"] = str(default_checkpoint())
    return ServeConfig.from_dict(values).with_admin_token_from_env()


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            raise LamboInputError(f"cannot listen on {host}:{port} ({err.strerror}); pick another --port") from None


def start(cfg, host: str, port: int, *, num_cpus: int | None = None) -> tuple[str, int]:
    """Start Serve on (embedded or cluster) Ray, deploy the app; its base URL and policy replicas."""
    from ray import serve

    from lambo_ray.runtime import init_ray
    from lambo_ray.serving.app import build_app, check_checkpoint
    from lambo_ray.serving.proxy import PROXY_ENV, start_serve

    check_checkpoint(cfg, load_weights=True)  # a bad checkpoint is one line, before anything starts
    os.environ.update(PROXY_ENV)  # an embedded Ray's processes inherit it
    init_ray(num_cpus=num_cpus)
    if cfg.policy_replicas is None:
        cfg = dataclasses.replace(cfg, policy_replicas=auto_replicas(cfg.policy_num_cpus))
    app = build_app(cfg)
    start_serve(host, port, cfg.request_timeout_s)
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"http://{shown}:{port}", cfg.policy_replicas


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    embedded = not os.environ.get("RAY_ADDRESS")
    if embedded:
        _check_port_free(args.host, args.port)
    url, replicas = start(cfg, args.host, args.port, num_cpus=args.num_cpus)
    admin = "enabled" if cfg.admin_token_sha256 else "disabled (set LAMBO_ADMIN_TOKEN to enable)"
    print(
        f"lambo serve: policy {cfg.checkpoint} ready at {url} on {replicas} replica(s)  (POST {url}/v1/decide, "
        f"docs {url}/docs; decoder registration {admin})",
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
