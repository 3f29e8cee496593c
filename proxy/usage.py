"""Usage per key since start: what `GET /api/v1/usage` answers (DESIGN §11.3).

Fed once per finished request by the access log, with the same values as the `lmswitch_key_*`
metrics. Keys are config names (`anonymous` for unnamed keys and for no key), never the keys
themselves, so the table stays as small as the configuration.
"""

from __future__ import annotations

from typing import Any


class KeyUsage:
    """One key's requests by status, tokens, time holding a model and time waiting for one."""

    __slots__ = (
        "busy_s",
        "completion_tokens",
        "granted",
        "prompt_tokens",
        "queue_wait_s",
        "statuses",
    )

    def __init__(self) -> None:
        self.statuses: dict[int, int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.busy_s = 0.0
        self.queue_wait_s = 0.0
        self.granted = 0  # requests that were granted their model (their wait counts)

    def row(self) -> dict[str, Any]:
        requests = sum(self.statuses.values())
        return {
            "requests": requests,
            "by_status": {str(status): n for status, n in sorted(self.statuses.items())},
            "errors": sum(n for status, n in self.statuses.items() if status >= 400),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "busy_s": round(self.busy_s, 3),
            "queue_wait_s": round(self.queue_wait_s, 3),
            "queue_waits": self.granted,
        }


class Usage:
    """Every key's `KeyUsage`, by key name."""

    __slots__ = ("keys",)

    def __init__(self) -> None:
        self.keys: dict[str, KeyUsage] = {}

    def of(self, key: str) -> KeyUsage:
        """The key's usage, made at its first request."""
        if (usage := self.keys.get(key)) is None:
            usage = self.keys[key] = KeyUsage()
        return usage

    def rows(self) -> dict[str, dict[str, Any]]:
        return {key: self.keys[key].row() for key in sorted(self.keys)}
