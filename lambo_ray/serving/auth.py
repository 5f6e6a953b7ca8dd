"""Who may change what the server serves: a bearer token for the mutating endpoints.

Deciding is public (that is the service); registering a decoder changes what every caller gets, so it
needs the admin token (``Authorization: Bearer <token>``). The replicas hold only the token's SHA-256
(:attr:`ServeConfig.admin_token_sha256`, filled from ``$LAMBO_ADMIN_TOKEN`` when the app is built), and
compare digests in constant time. With no token configured the mutating endpoints are disabled (403),
so a server started without thinking about it cannot be reconfigured by anyone who reaches its port.
"""

from __future__ import annotations

import hmac

from lambo_ray.errors import LamboInputError
from lambo_ray.serving.config import ADMIN_TOKEN_ENV, ServeConfig, token_digest


class AuthError(LamboInputError):
    """401 (missing or wrong token) or 403 (disabled); carries the WWW-Authenticate challenge."""

    headers = {"WWW-Authenticate": 'Bearer realm="lambo"'}


def check_admin(authorization: str | None, cfg: ServeConfig) -> None:
    """Raise :class:`AuthError` unless ``authorization`` carries the configured admin bearer token."""
    if cfg.admin_token_sha256 is None:
        raise AuthError(
            f"mutating endpoints are disabled on this server: start it with ${ADMIN_TOKEN_ENV} set to enable them",
            status=403,
        )
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("missing admin token: send 'Authorization: Bearer <token>'", status=401)
    if not hmac.compare_digest(token_digest(token.strip()), cfg.admin_token_sha256):
        raise AuthError("invalid admin token", status=401)
