"""Leases and waiting: a request's hold on a loaded model, its wait for one, and the error a
failed wait answers with.

`ModelManager` hands them out; the scheduler decides when (docs/design.md §4.1).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable

import anyio

from proxy.errors import (
    CapacityError,
    ProxyError,
    QueueFullError,
    QueueTimeoutError,
    UpstreamUnavailableError,
)
from proxy.scheduling import Fail, FailReason


class ClientGone(Exception):  # noqa: N818 - not an error: the client left while waiting
    """The client disconnected while its request waited for a model."""


class Pending:
    """A waiting request's outcome: `event` is set once it is granted, or failed with `error`."""

    __slots__ = ("error", "event")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.error: ProxyError | None = None

    async def wait(self, disconnected: Callable[[], Awaitable[None]] | None) -> None:
        """Wait for the outcome; `ClientGone` if `disconnected` returns first.

        Either way the outcome may be set meanwhile: the caller reads `event` to tell.
        """
        if disconnected is None:
            await self.event.wait()
            return
        gone = False
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                nonlocal gone
                await disconnected()
                gone = True
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            await self.event.wait()
            tg.cancel_scope.cancel()
        if gone and not self.event.is_set():
            raise ClientGone


class Lease:
    """A request's hold on a loaded model: while it is held the model is never unloaded."""

    __slots__ = ("_release", "_released", "key", "waited_on_load", "waited_s")

    def __init__(
        self, key: str, waited_s: float, on_load: bool, release: Callable[[str], None]
    ) -> None:
        self._release = release
        self._released = False
        self.key = key
        self.waited_s = waited_s
        self.waited_on_load = on_load

    def release(self) -> None:
        """Give the model back. Synchronous and idempotent, so it is safe in any `finally`."""
        if not self._released:
            self._released = True
            self._release(self.key)


def failure(action: Fail) -> ProxyError:
    """The error a request gets when the scheduler fails its wait."""
    if isinstance(action.error, ProxyError):
        return action.error
    if action.reason is FailReason.EXPIRED:
        return QueueTimeoutError(action.message, retry_after_s=5)
    if action.reason is FailReason.QUEUE_FULL:
        return QueueFullError(action.message, retry_after_s=1)
    if action.reason is FailReason.UNREADABLE:
        return UpstreamUnavailableError(action.message, retry_after_s=5)
    if action.reason is FailReason.NO_FIT:
        return CapacityError(action.message, should_retry=False)
    return ProxyError(action.message)


# A request goes to a model at once while the model was confirmed loaded this recently, after
# the request that began the current run of requests out to it was sent (docs/design.md §4.1).
FRESH_S = 1.0


class Gate:
    """The requests out to one model (sent, their answer not begun), and when LM Studio last
    confirmed the model loaded.

    With JIT loading on, LM Studio loads a model that a request names and that is not loaded,
    in some versions one copy per concurrent request. A model unloaded behind the proxy's back
    would then be loaded once per request of a burst. So when nothing is out to a model, one
    request goes (the probe); the others wait until LM Studio confirms the model loaded after
    the probe was sent (an answer from it begins, or a listing shows it), or nothing is out.

    Until the model is confirmed after the probe was sent, LM Studio may be loading it for the
    probe (`dark`): no other load may start meanwhile.
    """

    __slots__ = (
        "_changed",
        "confirmed_at",
        "listing",
        "out",
        "probe_sent",
        "recheck",
    )

    def __init__(self) -> None:
        self.out = 0
        self.probe_sent = -math.inf
        self.confirmed_at = -math.inf
        self.listing: anyio.Event | None = None  # the listing asked to confirm this probe
        self.recheck = False  # a listing missed the model while requests were out to it
        self._changed: anyio.Event | None = None

    def clear(self, now: float) -> bool:
        """Whether a request may go to the model now."""
        confirmed = self.confirmed_at >= self.probe_sent and now - self.confirmed_at <= FRESH_S
        return self.out == 0 or confirmed

    @property
    def dark(self) -> bool:
        """Requests are out, and the model was not confirmed since the first of them was sent."""
        return self.out > 0 and self.confirmed_at < self.probe_sent

    def sent(self, now: float) -> None:
        if self.out == 0:
            self.probe_sent, self.listing = now, None
        self.out += 1

    def answered(self, now: float | None) -> None:
        """A request's answer began (`now`: it confirms the model), or it ended without one."""
        self.out -= 1
        if now is not None:
            self.confirmed_at = max(self.confirmed_at, now)
        if self.out == 0:
            self.listing = None  # the next probe asks afresh
        self.changed()

    def confirm(self, at: float) -> None:
        """A listing started at `at` shows the model loaded."""
        self.confirmed_at = max(self.confirmed_at, at)
        self.changed()

    def changed(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def wait_change(self) -> None:
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()
