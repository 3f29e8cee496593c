"""The uvicorn servers lmswitch runs (signal handling, shutdown and start-up hooks), their
uvicorn configuration, the HTTP protocol that bounds client connections, and the log handler and
format every command shares.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from http import HTTPStatus
from types import FrameType
from typing import Any, ClassVar

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import HANDLED_SIGNALS, ServerState

from proxy.access import AccessLine
from proxy.config import ServerSettings, Settings
from proxy.errors import ProxyError, RequestTimeoutError
from proxy.reporter import LOG_FIELDS

SignalHandler = Callable[[int, FrameType | None], None]

logger = logging.getLogger("lmswitch.server")


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


class CannotListenError(Exception):
    """A server's address cannot be bound: the port is taken, or the host is not this machine's.

    Its message is one line for the user: the address, why, and what to change.
    """


def listen(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to `port` on every address `host` resolves to, and listening, as asyncio's
    `create_server` (hence uvicorn) would bind them; port 0 picks a free one (the same for all).

    Bound before the server starts, so that a port in use is said in one line before the app
    starts up, rather than by uvicorn's errno message after it. Raises CannotListenError.
    """
    sockets: list[socket.socket] = []
    skipped: OSError | None = None  # an address of a family not enabled here
    try:
        infos = list(
            dict.fromkeys(
                socket.getaddrinfo(
                    host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
                )
            )
        )
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            if os.name == "posix" and sys.platform != "cygwin":  # asyncio's default
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # one socket per family, as asyncio binds them
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:  # the port the first address got, for all
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            try:
                sock.bind(address)
            except OSError as exc:
                if exc.errno != errno.EADDRNOTAVAIL:
                    raise
                sockets.pop().close()  # that family is not enabled here: asyncio skips it too
                skipped = exc
                continue
            sock.listen(2048)  # uvicorn's default backlog
        if not sockets and skipped is not None:
            raise skipped
    except OSError as exc:
        for sock in sockets:
            sock.close()
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise CannotListenError(f"cannot listen on {where}: {_why(exc)}") from exc
    return sockets


def _why(exc: OSError) -> str:
    reason = (exc.strerror or str(exc)).lower()
    if exc.errno == errno.EADDRINUSE:
        return f"{reason} (another lmswitch, or LM Studio?); choose another port with --port"
    if exc.errno == errno.EACCES:
        return f"{reason} (ports below 1024 need privileges); choose another with --port"
    return f"{reason}; check the address (--host, or server.host)"


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

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and sockets:  # uvicorn says where it listens only if it bound itself
            self._log_started_message(sockets)

    def run_on(self, sockets: list[socket.socket]) -> None:
        """Serve on `sockets` (from `listen`) until stopped, then close them."""
        try:
            self.run(sockets)
        finally:
            for sock in sockets:
                sock.close()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._on_shutdown()  # before the drain, which waits for every open response
        await super().shutdown(sockets=sockets)


class QuietServer(uvicorn.Server):
    """A server that leaves signals to its owner, says when it has started, and calls
    `on_shutdown` as its shutdown begins (the demo's servers)."""

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        on_started: Callable[[], object],
        on_shutdown: Callable[[], object] = lambda: None,
    ) -> None:
        super().__init__(config)
        self._on_started = on_started
        self._on_shutdown = on_shutdown

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self._on_started()  # uvicorn's startup either finishes started or raises SystemExit

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._on_shutdown()  # before the drain, which waits for every open response
        await super().shutdown(sockets=sockets)


# --- the HTTP protocol -------------------------------------------------------------------------


_REFUSED_LOG_S = 60.0


def _raw_response(
    status: int, error: ProxyError, default_headers: list[tuple[bytes, bytes]]
) -> bytes:
    """A whole `connection: close` response carrying `error`'s OpenAI body, written by the
    protocol itself: no request reached the app, so no app can answer."""
    body = json.dumps(error.body()).encode()
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode()]
    lines += [name + b": " + value for name, value in default_headers]
    lines += [f"{name}: {value}".encode() for name, value in error.headers().items()]
    lines += [b"content-type: application/json", b"content-length: %d" % len(body)]
    lines += [b"connection: close", b"", body]
    return b"\r\n".join(lines)


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol (httptools: what `http="auto"` picks with it installed), with
    two bounds on client connections (docs/design.md §4.6):

    - a request's headers must all arrive within `header_timeout_s` of the connection opening, or
      of the next request on it beginning; otherwise the connection is closed, with a 408 if part
      of a request came. Bodies and responses are not timed here (the app times body reads).
    - at most `max_connections` are open (uvicorn's own registry of them, per server); one more
      is answered 503 at once, before its request is read, then closed, and never counted.

    `bounded_protocol(server)` makes the subclass that carries a configuration's values.
    """

    header_timeout_s: ClassVar[float] = 30.0
    max_connections: ClassVar[int] = 1000
    refused: ClassVar[int] = 0  # connections refused since the last warning
    refused_logged: ClassVar[float] = -math.inf  # when the last warning was logged

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._header_timer: asyncio.TimerHandle | None = None
        self._awaiting_headers = False  # part of a request has come, not yet all its headers
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.max_connections:
            self._refuse(transport)
            return
        super().connection_made(transport)
        self._start_header_timer()

    def _refuse(self, transport: asyncio.Transport) -> None:
        self._refused = True
        self.transport = transport
        cls = type(self)
        cls.refused += 1
        now = self.loop.time()
        if now >= cls.refused_logged + _REFUSED_LOG_S:  # a flood logs one line a minute
            cls.refused_logged = now
            logger.warning(
                "refused %d new connection(s): %d are open, the most server.max_connections "
                "allows (said at most once a minute)",
                cls.refused,
                len(self.connections),
            )
            cls.refused = 0
        error = ProxyError(
            f"The proxy has {self.max_connections} connections open, the most it allows; "
            "retry shortly.",
            code="too_many_connections",
            retry_after_s=1,
        )
        transport.write(_raw_response(503, error, self.server_state.default_headers))
        transport.close()  # after the write is flushed; the request, if any, is never read

    def data_received(self, data: bytes) -> None:
        # A refused connection's bytes are never parsed. asyncio and uvloop do not start reading
        # a transport closed in connection_made, so this only guards against a loop that does.
        if not self._refused:  # pragma: no branch - see above
            super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        if not self._refused:  # a refused connection was never registered nor set up
            super().connection_lost(exc)

    # The header timer runs while a request's headers are awaited and no response is in
    # progress; it is stopped when they are complete and when the connection is lost.

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._awaiting_headers = True
        # uvicorn stops its keep-alive timer on any byte, so the next request's first byte
        # starts ours; one behind a response still in progress waits for it to end (below).
        cycle: RequestResponseCycle | None = self.cycle  # None before the first request
        if cycle is None or cycle.response_complete:
            self._start_header_timer()

    def on_headers_complete(self) -> None:
        self._awaiting_headers = False
        self._stop_header_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._awaiting_headers and not self.transport.is_closing():
            self._start_header_timer()  # a pipelined request's headers are still coming

    def _start_header_timer(self) -> None:
        if self._header_timer is None:  # a running timer keeps its start
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():  # pragma: no cover - closed earlier in this loop pass
            return
        if self._awaiting_headers:  # part of a request came: say why it gets no answer
            error = RequestTimeoutError(
                f"The request's headers did not arrive within {self.header_timeout_s:g} s."
            )
            self.transport.write(_raw_response(408, error, self.server_state.default_headers))
        logger.debug("closed a connection whose request headers did not arrive in time")
        self.transport.close()


def bounded_protocol(server: ServerSettings) -> type[BoundedHttpProtocol]:
    """`BoundedHttpProtocol` with `server`'s header_timeout and max_connections."""

    class Bounded(BoundedHttpProtocol):
        header_timeout_s = server.header_timeout
        max_connections = server.max_connections

    return Bounded


# --- logging ----------------------------------------------------------------------------------


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
            fields.update(getattr(record, LOG_FIELDS, {}))  # a model's load or unload
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


def uvicorn_config(app: Any, settings: Settings, *, log_level: str | None = None) -> uvicorn.Config:
    """uvicorn's configuration for the proxy; `log_level` for uvicorn's own lines, if not
    `logging.level` (lmswitch's lines follow `logging.level` regardless)."""
    return uvicorn.Config(
        app,
        host=settings.server.host,
        port=settings.server.port,
        lifespan="on",  # a failed start-up exits instead of serving without state
        workers=1,  # the load lock and leases live in this process
        access_log=False,  # lmswitch writes its own access lines
        log_level=log_level or settings.logging.level,
        # Whole seconds (uvicorn's type), never shorter than configured, and at least 1 s.
        timeout_graceful_shutdown=max(1, math.ceil(settings.server.drain_timeout)),
        server_header=False,
        http=bounded_protocol(settings.server),  # header timeout and connection cap
    )
