"""AuthMiddleware: client keys on `/v1/*`, admin keys (or loopback only) on management paths.

Keys are compared in constant time, over digests so that not even their length leaks, and are
never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Callable, Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.errors import AuthenticationError, PermissionDeniedError, ProxyError, error_response

_ADMIN_PREFIXES = ("/api/", "/ui/")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _matches(digests: Iterable[bytes], presented: str | None) -> bool:
    """True if `presented` is one of the keys; every key is compared, whatever matches."""
    if presented is None:
        return False
    candidate = _digest(presented)
    found = False
    for digest in digests:
        found |= hmac.compare_digest(digest, candidate)
    return found


def _presented(scope: Scope, *, x_api_key: bool) -> str | None:
    """The key a client sent: `Authorization: Bearer <key>`, or Anthropic's `x-api-key`."""
    headers: Iterable[tuple[bytes, bytes]] = scope["headers"]
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif x_api_key and name == b"x-api-key" and value:
            return value.decode("latin-1")
    return None


def is_loopback(scope: Scope) -> bool:
    client = scope.get("client")
    if not client:
        return True  # a Unix socket, or an in-process client: only this machine can be there
    try:
        return ipaddress.ip_address(client[0]).is_loopback
    except ValueError:
        return False


class AuthMiddleware:
    """Pure ASGI middleware enforcing `auth.api_keys` and `auth.admin_keys`
    (docs/design.md §4.4)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        api_keys: Iterable[str],
        admin_keys: Iterable[str],
        on_refused: Callable[[Scope], None] | None = None,
    ) -> None:
        self.app = app
        self._api = [_digest(key) for key in api_keys]
        self._admin = [_digest(key) for key in admin_keys]
        self._on_refused = on_refused  # told of every refusal, for the access log and metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (error := self._check(scope)) is not None:
            response = error_response(error, path=scope["path"])
            response.headers["www-authenticate"] = "Bearer"
            await response(scope, receive, send)
            if self._on_refused is not None:
                self._on_refused(scope)
            return
        await self.app(scope, receive, send)

    def _check(self, scope: Scope) -> ProxyError | None:
        path: str = scope["path"]
        if path.startswith("/v1/") and path != "/v1/":  # `/v1/` itself only says where things are
            anthropic = path.startswith("/v1/messages")
            if self._api and not _matches(self._api, _presented(scope, x_api_key=anthropic)):
                how = "'Authorization: Bearer <key>'" + (" or 'x-api-key'" if anthropic else "")
                return AuthenticationError(
                    f"Missing or invalid API key: send one of the keys in auth.api_keys as {how}."
                )
        elif path.startswith(_ADMIN_PREFIXES) or path == "/ui":
            if self._admin:
                # The page's static files hold no data, and a browser cannot send a Bearer key
                # when it opens a page: they are served to all, and the page asks for the key.
                if path.startswith("/api/") and not _matches(
                    self._admin, _presented(scope, x_api_key=False)
                ):
                    return AuthenticationError(
                        "Missing or invalid admin key: management endpoints need one of the keys "
                        "in auth.admin_keys as 'Authorization: Bearer <key>'."
                    )
            elif not is_loopback(scope):
                return PermissionDeniedError(
                    "Management endpoints answer only clients on this machine unless "
                    "auth.admin_keys is set."
                )
        return None
