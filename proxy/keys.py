"""Who a request's key is (DESIGN §11.3): a `Caller` with its config name, priority, model
patterns and rights, left on the request's scope by `proxy.auth`; and fresh keys for
`lmswitch keys new`. Pure: no I/O, and no key is ever kept here in the clear."""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from fnmatch import fnmatchcase

from starlette.types import Scope

ANONYMOUS = "anonymous"  # the name of unnamed keys (auth.api_keys, auth.admin_keys) and of none
NAME = re.compile(r"[a-z0-9_-]{1,32}")
NAME_RULE = "1 to 32 of a-z, 0-9, _ and -"
KEY_PREFIX = "sk-lmswitch-"
CALLER_SCOPE_KEY = "lmswitch.caller"
EVERY_MODEL = ("*",)


def digest(key: str) -> bytes:
    """A key's SHA-256, as `auth.keys[].key_sha256` holds it (in hex)."""
    return hashlib.sha256(key.encode()).digest()


def new_key() -> str:
    """A fresh random key: 256 bits from the OS's generator."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def check_name(name: str) -> str | None:
    """Why `name` cannot be a key's name, or None if it can."""
    if not NAME.fullmatch(name):
        return f"invalid name {name!r} ({NAME_RULE})"
    if name == ANONYMOUS:
        return f"{ANONYMOUS!r} is the name of unnamed keys; choose another"
    return None


@dataclass(frozen=True, slots=True)
class Caller:
    """The key a request presented, as the proxy knows it: its name (never the key), its
    priority, the models it may use (glob patterns over model keys and aliases), whether it may
    use /v1/* (`client`) and /api/v1/* and the page (`admin`)."""

    name: str = ANONYMOUS
    priority: int = 0
    models: tuple[str, ...] = EVERY_MODEL
    client: bool = True
    admin: bool = False

    def may_use(self, name: str, key: str) -> bool:
        """True if a pattern matches the name the client used or the model key it resolved to
        (so an alias is allowed by its own name or by its model's)."""
        if self.models == EVERY_MODEL:
            return True
        return any(fnmatchcase(name, p) or fnmatchcase(key, p) for p in self.models)

    def merged(self, other: Caller) -> Caller:
        """One key listed twice (in api_keys and admin_keys): the rights of both."""
        return Caller(
            self.name,
            max(self.priority, other.priority),
            self.models,
            self.client or other.client,
            self.admin or other.admin,
        )


EVERYONE = Caller()  # a request when no key is needed, or none was checked


def caller_of(scope: Scope) -> Caller:
    """The caller `proxy.auth` found for this request (`EVERYONE` if it checked no key)."""
    caller: Caller = scope.get(CALLER_SCOPE_KEY, EVERYONE)
    return caller
