"""The connection pool to LM Studio: httpx2's transport, with a cheaper idle-connection check.

Before every request httpcore asks each idle pooled connection whether its socket became
readable (the server closed it). Through anyio's stream that question builds a dictionary of
every socket attribute each time; with a few dozen idle connections it cost a quarter of the
proxy's CPU per request (measured with py-spy under `lmswitch bench`, 32 clients). The streams
here remember their socket and answer with one `poll`.
"""

from __future__ import annotations

import select
import socket
import ssl
import sys
from collections.abc import Iterable
from typing import Any

import httpcore2
import httpx2

SocketOption = (
    tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]
)


def socket_readable(sock: socket.socket | None) -> bool:
    """True if a read would not block: data, or the peer hung up (or no socket at all)."""
    fd = -1 if sock is None else sock.fileno()
    if fd < 0:
        return True
    if sys.platform == "win32":  # pragma: no cover - no poll() on Windows
        readable, _, _ = select.select([fd], [], [], 0)
        return bool(readable)
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


class _Stream(httpcore2.AsyncNetworkStream):
    """A network stream that knows its socket; everything else goes to the wrapped one.

    (The `timeout` parameters are httpcore's interface, which ruff's ASYNC109 dislikes.)
    """

    def __init__(self, inner: httpcore2.AsyncNetworkStream) -> None:
        self._inner = inner
        self._socket: socket.socket | None = inner.get_extra_info("socket")

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
    ) -> httpcore2.AsyncNetworkStream:
        return _Stream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            return socket_readable(self._socket)
        return self._inner.get_extra_info(info)


class _Backend(httpcore2.AsyncNetworkBackend):
    """anyio's network backend, handing out `_Stream`s."""

    def __init__(self) -> None:
        self._inner = httpcore2.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        stream = await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _Stream(stream)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore2.AsyncNetworkStream:  # pragma: no cover - LM Studio listens on TCP
        return _Stream(await self._inner.connect_unix_socket(path, timeout, socket_options))

    async def sleep(self, seconds: float) -> None:  # pragma: no cover - httpcore's retries only
        await self._inner.sleep(seconds)


class PoolTransport(httpx2.AsyncHTTPTransport):
    """httpx2's transport on a pool whose connections answer the idle check cheaply."""

    def __init__(self, limits: httpx2.Limits) -> None:
        # `verify=False` only spares loading the CA bundle (~0.5 MB) for the pool built here and
        # dropped below; the pool that serves has no context of its own, so an https LM Studio
        # gets httpcore's default, verifying one when it first connects.
        super().__init__(limits=limits, trust_env=False, verify=False)
        # httpx2 builds its pool in __init__ and takes no network backend: give it one. The
        # attribute is httpx's own (`AsyncHTTPTransport._pool`), stable across its releases.
        self._pool = httpcore2.AsyncConnectionPool(
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_Backend(),
        )
