"""ASGI middleware for Ray Serve's HTTP proxy: Serve's own failures answered in the app's JSON error format.

Some failures never reach the app's handlers, so the app cannot word them: the proxy sheds load beyond
``max_queued_requests`` (503 with a plain-text body), times a request out after ``request_timeout_s``
(408, plain text), and, when the replica handling a request dies, has no response at all (the HTTP server
then sends a bare 500). This middleware wraps the proxy so that every such answer becomes
``{"detail": ..., "status": 503}`` with a ``Retry-After`` header: for a client all three mean "the
service is busy or lost a replica; retry shortly", and one status with one body shape is what a retry
loop needs. Responses the app produced (always JSON) pass through untouched.

It also drops the client-controlled headers that would lift the server's bounds: a request may lower
its own timeout (``x-request-timeout-seconds``, at most :data:`MAX_CLIENT_TIMEOUT_S`) but not disable
it, and may not ask to keep running after it disconnects.

Installed by pointing ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` at :func:`middlewares` in the proxy's
environment (``lambo serve`` does it; see :data:`PROXY_ENV`). Without it the statuses are the same
except that a lost replica gives a plain 500.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.middleware import Middleware

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PROXY_CALLBACK = "lambo_ray.serving.proxy:middlewares"
PROXY_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_CALLBACK}
RETRY_AFTER_S = 1
MAX_CLIENT_TIMEOUT_S = 60.0
_TIMEOUT_HEADER = b"x-request-timeout-seconds"
_DROPPED_HEADERS = {b"x-request-disconnect-disabled"}
_SERVE_FAILURES = {
    408: "the request did not finish within the server's time limit",
    429: "too many requests",
    503: "overloaded",
}


def _client_timeout_ok(value: bytes) -> bool:
    try:
        timeout = float(value.decode("latin-1"))
    except ValueError:
        return False
    return math.isfinite(timeout) and 0 < timeout <= MAX_CLIENT_TIMEOUT_S


def clean_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The request headers without those that would disable the server's timeout or disconnect handling."""
    out = []
    for name, value in headers:
        key = name.lower()
        if key in _DROPPED_HEADERS or (key == _TIMEOUT_HEADER and not _client_timeout_ok(value)):
            continue
        out.append((name, value))
    return out


def _retry_after(value: bytes | None, default: int) -> int:
    """Serve's own Retry-After (the deployment's backpressure setting) when it sent one."""
    try:
        return max(0, int(value.decode("latin-1"))) if value else default
    except ValueError:
        return default


def json_503(detail: str, retry_after_s: int = RETRY_AFTER_S) -> tuple[Message, Message]:
    body = json.dumps({"detail": detail, "status": 503}).encode()
    start = {
        "type": "http.response.start",
        "status": 503,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(retry_after_s).encode()),
        ],
    }
    return start, {"type": "http.response.body", "body": body, "more_body": False}


class ServeErrorsAsJson:
    """Pure ASGI middleware (no body buffering on the normal path): see the module docstring."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], retry_after_s: int = RETRY_AFTER_S):
        self.app = app
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        scope["headers"] = clean_headers(list(scope.get("headers") or []))
        state = {"started": False, "swallow": False}

        async def guarded_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
                status = int(message.get("status", 200))
                headers = dict((k.lower(), v) for k, v in message.get("headers") or [])
                is_json = headers.get(b"content-type", b"").startswith(b"application/json")
                if status in _SERVE_FAILURES and not is_json:
                    state["swallow"] = True
                    retry = _retry_after(headers.get(b"retry-after"), self.retry_after_s)
                    for msg in json_503(f"service unavailable: {_SERVE_FAILURES[status]}; retry", retry):
                        await send(msg)
                    return
            elif message["type"] == "http.response.body" and state["swallow"]:
                return
            await send(message)

        try:
            await self.app(scope, receive, guarded_send)
        except Exception:  # noqa: BLE001 - whatever broke, the client gets a JSON 503 rather than a bare 500
            if state["started"]:
                raise
        if not state["started"]:
            for msg in json_503("service unavailable: the replica handling this request was lost; retry"):
                await send(msg)


def middlewares() -> list[Middleware]:
    """The callback named by ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` (Serve calls it in each proxy)."""
    return [Middleware(ServeErrorsAsJson)]


def start_serve(host: str, port: int, request_timeout_s: float) -> None:
    """Start Serve with the JSON error middleware in its proxies (see :mod:`lambo_ray.serving.proxy`)."""
    from ray import serve

    serve.start(
        http_options={"host": host, "port": port, "request_timeout_s": request_timeout_s},
        controller_options={"runtime_env": {"env_vars": dict(PROXY_ENV)}},
    )
