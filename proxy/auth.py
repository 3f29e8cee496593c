"""AuthMiddleware: client keys on `/v1/*` and Ollama's `/api/*`, admin keys (or loopback only)
on management paths; named keys (DESIGN §11.3) leave their `Caller` on the request and their
name on its record.

Keys are compared in constant time, over digests so that not even their length leaks, and are
never logged: only their config names are.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Callable, Iterable, Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.access import record_of
from proxy.config import AuthSettings
from proxy.errors import (
    OLLAMA_PATHS,
    AuthenticationError,
    PermissionDeniedError,
    ProxyError,
    error_response,
)
from proxy.keys import ANONYMOUS, CALLER_SCOPE_KEY, Caller, digest

_ADMIN_PREFIXES = ("/api/", "/ui/")

Credential = tuple[bytes, Caller]  # a key's SHA-256, and who it is


def credentials(auth: AuthSettings) -> list[Credential]:
    """Every key of `auth` as a digest and its caller, one entry per distinct key: unnamed keys
    are `anonymous`, every model, priority 0 (one in both api_keys and admin_keys is both)."""
    found: dict[bytes, Caller] = {}

    def add(sha256: bytes, caller: Caller) -> None:
        found[sha256] = found[sha256].merged(caller) if sha256 in found else caller

    for key in auth.api_keys:
        add(digest(key.get_secret_value()), Caller(client=True, admin=False))
    for key in auth.admin_keys:
        add(digest(key.get_secret_value()), Caller(client=False, admin=True))
    for named in auth.keys:
        add(named.sha256(), Caller(named.name, named.priority, named.models, True, named.admin))
    return list(found.items())


def _identify(keys: Sequence[Credential], presented: str | None) -> Caller | None:
    """The caller whose key `presented` is, or None; every key is compared, whatever matches,
    so the time taken says nothing of which key (or how much of one) matched."""
    if presented is None:
        return None
    candidate = digest(presented)
    found = None
    for sha256, caller in keys:
        if hmac.compare_digest(sha256, candidate):
            found = caller
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
    """Pure ASGI middleware enforcing `auth.api_keys`, `auth.admin_keys` and `auth.keys`
    (docs/design.md §4.4); the caller a valid key names is left on the scope (`caller_of`), and
    its name and priority on the request's record."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: Iterable[Credential],
        on_refused: Callable[[Scope], None] | None = None,
    ) -> None:
        self.app = app
        self._keys = list(keys)
        self._clients_need_key = any(caller.client for _, caller in self._keys)
        self._admins_need_key = any(caller.admin for _, caller in self._keys)
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

    def _caller(self, scope: Scope, *, x_api_key: bool) -> Caller | None:
        """The caller of the key presented, also left on the scope and the record; None if no
        key or an unknown one was presented."""
        caller = _identify(self._keys, _presented(scope, x_api_key=x_api_key))
        if caller is not None:
            scope[CALLER_SCOPE_KEY] = caller
            record = record_of(scope)
            record.key, record.priority = caller.name, caller.priority
        return caller

    def _check(self, scope: Scope) -> ProxyError | None:
        path: str = scope["path"]
        # `/v1/` itself only says where things are; Ollama's API is a client's, like `/v1/*`.
        if (path.startswith("/v1/") and path != "/v1/") or path in OLLAMA_PATHS:
            anthropic = path.startswith("/v1/messages")
            if self._clients_need_key:
                caller = self._caller(scope, x_api_key=anthropic)
                if caller is None or not caller.client:
                    how = "'Authorization: Bearer <key>'" + (" or 'x-api-key'" if anthropic else "")
                    return AuthenticationError(
                        "Missing or invalid API key: send one of the keys in auth.api_keys or "
                        f"auth.keys as {how}."
                    )
        elif path.startswith(_ADMIN_PREFIXES) or path == "/ui":
            if self._admins_need_key:
                # The page's static files hold no data, and a browser cannot send a Bearer key
                # when it opens a page: they are served to all, and the page asks for the key.
                if not path.startswith("/api/"):
                    return None
                caller = self._caller(scope, x_api_key=False)
                if caller is None or (not caller.admin and caller.name == ANONYMOUS):
                    return AuthenticationError(
                        "Missing or invalid admin key: management endpoints need one of the keys "
                        "in auth.admin_keys, or of auth.keys with admin: true, as "
                        "'Authorization: Bearer <key>'."
                    )
                if not caller.admin:
                    return PermissionDeniedError(
                        f"The key {caller.name!r} is not an admin key: management endpoints need "
                        "one of auth.admin_keys, or of auth.keys with admin: true."
                    )
            elif not is_loopback(scope):
                return PermissionDeniedError(
                    "Management endpoints answer only clients on this machine unless "
                    "auth.admin_keys (or an admin key in auth.keys) is set."
                )
        return None
