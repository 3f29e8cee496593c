"""EventBus: live events fanned out to `/api/v1/events` subscribers.

Publishing never waits: each subscriber has a bounded buffer, and one that falls behind (a slow
or dead client) is dropped rather than allowed to slow the proxy or grow memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

Event = tuple[str, dict[str, Any]]  # (kind, data)


class EventBus:
    """A fan-out of (kind, data) events to any number of bounded subscriber streams."""

    def __init__(self, buffer: int = 256) -> None:
        self._buffer = buffer
        self._subscribers: set[MemoryObjectSendStream[Event]] = set()
        self._closed = False
        self.dropped = 0

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        """Hand the event to every subscriber at once; drop those whose buffer is full."""
        for send in list(self._subscribers):
            try:
                send.send_nowait((kind, data))
            except anyio.WouldBlock:
                self._drop(send)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._drop(send)

    def _drop(self, send: MemoryObjectSendStream[Event]) -> None:
        self._subscribers.discard(send)
        send.close()  # the subscriber's stream ends after what it has buffered
        self.dropped += 1

    def close(self) -> None:
        """End every subscriber's stream (after what it has buffered), and new ones at once.

        Called when the server starts shutting down: live event streams never end by
        themselves, so left open they would hold up the drain for all of `drain_timeout`.
        """
        self._closed = True
        for send in list(self._subscribers):
            self._subscribers.discard(send)
            send.close()

    @contextmanager
    def subscribe(self) -> Iterator[MemoryObjectReceiveStream[Event]]:
        """A stream of the events published from now on, until it is dropped or closed."""
        send, receive = anyio.create_memory_object_stream[Event](self._buffer)
        if self._closed:
            send.close()
        else:
            self._subscribers.add(send)
        try:
            with receive:
                yield receive
        finally:
            self._subscribers.discard(send)
            send.close()
