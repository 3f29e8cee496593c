"""Leases and waiting: a request's hold on a loaded model, its wait for one, and the error a
failed wait answers with.

`ModelManager` hands them out; the scheduler decides when (docs/design.md §4.1).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

from proxy.errors import CapacityError, ProxyError, QueueFullError, QueueTimeoutError
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
    if action.reason is FailReason.NO_FIT:
        return CapacityError(action.message, should_retry=False)
    return ProxyError(action.message)
