"""Leases and waiting: a request's hold on a loaded model, its wait for one, and the error a
failed wait answers with.

`ModelManager` hands them out; the scheduler decides when (docs/design.md §4.1).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

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


@dataclass(frozen=True, slots=True)
class Progress:
    """Where a waiting request stands, for the feedback it gets (docs/design.md §4.7)."""

    model: str
    upstream: str | None  # the host it waits on, once it is placed
    waited_s: float
    loading: bool  # its model is loading now (else it waits its turn, or a confirmation)
    expected_s: float | None  # the whole wait expected, what it waited included; None: unknown
    ahead: int  # requests waiting for models to be served before its own


class Ticket:
    """A request's place in a host's queue, read by its feedback while it waits: the host sets
    `progress` while the request is queued there, and clears it when it leaves."""

    __slots__ = ("progress",)

    def __init__(self) -> None:
        self.progress: Callable[[], Progress] | None = None


class Lease:
    """A request's hold on a loaded model: while it is held the model is never unloaded."""

    __slots__ = (
        "_release",
        "_released",
        "arrived",
        "client",
        "key",
        "upstream",
        "waited_on_load",
        "waited_s",
    )

    def __init__(
        self,
        key: str,
        waited_s: float,
        on_load: bool,
        release: Callable[[str, str | None], None],
        arrived: float,
        upstream: str,
        client: str | None = None,
    ) -> None:
        self._release = release
        self._released = False
        self.arrived = arrived  # when the request first queued (on the manager's clock)
        self.client = client  # who holds it (its connection), for the fairness rule
        self.key = key
        self.upstream = upstream  # the name of the host it holds the model on
        self.waited_s = waited_s
        self.waited_on_load = on_load

    def release(self) -> None:
        """Give the model back. Synchronous and idempotent, so it is safe in any `finally`."""
        if not self._released:
            self._released = True
            self._release(self.key, self.client)


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


# A confirmation this recent lets a new run of requests to a model start without a probe; and
# while a load is wanted or running, a request goes to a model only if LM Studio confirmed it
# loaded this recently (and since the load was wanted) (docs/design.md §4.1).
FRESH_S = 0.25


class Gate:
    """The requests out to one model (sent, their answer not begun), and when LM Studio last
    confirmed the model loaded.

    With JIT loading on, LM Studio loads a model that a request names and that is not loaded,
    in some versions one copy per concurrent request. A model unloaded behind the proxy's back
    would then be loaded once per request of a burst. So when nothing is out to a model, one
    request goes (the probe); the others wait until LM Studio confirms the model loaded after
    the probe was sent (an answer from it begins, or a listing shows it), or nothing is out.

    A request sent without a confirmation newer than itself may make LM Studio load the model
    (`dark`) until one comes: no other load may start meanwhile.
    """

    __slots__ = (
        "_changed",
        "asked_at",
        "confirmed_at",
        "model",
        "out",
        "probe_sent",
        "probed",
        "recheck",
        "unchecked_at",
    )

    def __init__(self, model: str | None = None) -> None:
        self.model = model
        self.out = 0
        self.probe_sent = -math.inf
        self.unchecked_at = -math.inf  # when the last request was sent unconfirmed
        self.confirmed_at = -math.inf
        self.asked_at = -math.inf  # when the last listing asked on its behalf began
        self.recheck = False  # a listing missed the model while requests were out to it
        self.probed = False  # `dark`, as last told to the scheduler
        self._changed: anyio.Event | None = None

    @property
    def clear(self) -> bool:
        """Whether a request may go to the model now, as far as its own requests go: nothing
        is out, or the model was confirmed since the first of them was sent."""
        return self.out == 0 or self.confirmed_at >= self.probe_sent

    @property
    def dark(self) -> bool:
        """A request is out that was sent unconfirmed, and the model not confirmed since: LM
        Studio may be loading the model for it."""
        return self.out > 0 and self.confirmed_at < self.unchecked_at

    def sent(self, now: float, *, checked: bool) -> None:
        """A request goes out; `checked`: the model was confirmed after a load began (§4.1)."""
        if self.out == 0:  # a new run: its first request probes, unless just confirmed
            fresh = now - self.confirmed_at <= FRESH_S
            self.probe_sent = self.confirmed_at if fresh else now
        if not checked:
            self.unchecked_at = now
        self.out += 1

    def answered(self, sent_at: float | None) -> None:
        """A request's answer began, or it ended without one (None). An answer confirms the
        model as of when its request was sent, not later: a request sent after it may still
        have found the model gone."""
        self.out -= 1
        if sent_at is not None:
            self.confirmed_at = max(self.confirmed_at, sent_at)
        self.changed()

    def confirm(self, at: float) -> None:
        """A listing started at `at` shows the model loaded."""
        self.confirmed_at = max(self.confirmed_at, at)
        self.changed()

    def doubt(self, at: float) -> None:
        """A listing started at `at` missed the model while requests were out to it (LM Studio
        may be loading it for them): the next requests wait for a confirmation since."""
        self.probe_sent = max(self.probe_sent, at)
        self.changed()

    def forget(self) -> None:
        """LM Studio went away: what it confirmed before counts no more."""
        self.confirmed_at = -math.inf
        self.changed()

    def changed(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def wait_change(self) -> None:
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()
