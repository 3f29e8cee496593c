"""The uvicorn servers lmswitch runs (signal handling, shutdown and start-up hooks), their
uvicorn configuration, and the log handler and format every command shares.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.server import HANDLED_SIGNALS

from proxy.access import AccessLine
from proxy.config import Settings

SignalHandler = Callable[[int, FrameType | None], None]


@contextlib.contextmanager
def handling_signals(handler: SignalHandler) -> Iterator[None]:
    """Send SIGINT and SIGTERM (and SIGBREAK on Windows) to `handler` inside the block.

    The previous handlers come back on exit, and, unlike uvicorn, a captured signal is not
    raised again afterwards. Only the main thread can handle signals; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in HANDLED_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def free_port() -> int:
    """A port nothing listens on now (for a server started, or restarted, on it later)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server(uvicorn.Server):
    """uvicorn's server, minus re-raising the signal after a graceful shutdown, plus a hook
    called as the shutdown begins.

    uvicorn re-raises a captured SIGTERM once drained, which kills the process with status 143;
    a drained proxy exits 0 instead.
    """

    def __init__(
        self, config: uvicorn.Config, *, on_shutdown: Callable[[], object] = lambda: None
    ) -> None:
        super().__init__(config)
        self._on_shutdown = on_shutdown

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with handling_signals(self.handle_exit):
            yield

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._on_shutdown()  # before the drain, which waits for every open response
        await super().shutdown(sockets=sockets)


class QuietServer(uvicorn.Server):
    """A server that leaves signals to its owner and says when it has started (the demo's two)."""

    def __init__(self, config: uvicorn.Config, *, on_started: Callable[[], object]) -> None:
        super().__init__(config)
        self._on_started = on_started

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self._on_started()  # uvicorn's startup either finishes started or raises SystemExit


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        if isinstance(record.msg, AccessLine):
            fields.update(record.msg.fields)  # an access line: its fields, not its text
        else:
            fields["message"] = record.getMessage()
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        return json.dumps(fields)


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.logging.format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("lmswitch")
    root.handlers[:] = [handler]
    root.setLevel(settings.logging.level.upper())
    root.propagate = False


def uvicorn_config(app: Any, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.server.host,
        port=settings.server.port,
        lifespan="on",  # a failed start-up exits instead of serving without state
        workers=1,  # the load lock and leases live in this process
        access_log=False,  # lmswitch writes its own access lines
        log_level=settings.logging.level,
        # Whole seconds (uvicorn's type), never shorter than configured, and at least 1 s.
        timeout_graceful_shutdown=max(1, math.ceil(settings.server.drain_timeout)),
        server_header=False,
    )
