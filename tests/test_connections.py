"""Client connections (docs/design.md §4.6): `server.header_timeout` closes a connection whose
request headers do not arrive, `server.max_connections` answers 503 past the cap. Over real
sockets, against the proxy on the uvicorn configuration `lmswitch serve` runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
import uvicorn
from anyio.abc import SocketStream

from proxy.app import create_app
from proxy.cli import EXIT_USAGE, build_server, main
from proxy.emulator import Emulator
from proxy.server import BoundedHttpProtocol, uvicorn_config
from tests.helpers import MESSAGES, QWEN, proxy_process, serve, settings_for

HEADER_TIMEOUT_S = 0.4
SLACK_S = 2.0  # past the bound, the most a closure may take on a busy machine
HEALTHZ = b"GET /healthz HTTP/1.1\r\nhost: lmswitch\r\n\r\n"
PARTIAL = b"GET /healthz HTTP/1.1\r\nhost: lms"  # no end of headers


@asynccontextmanager
async def serving(**server: Any) -> AsyncIterator[tuple[int, uvicorn.Server]]:
    """The proxy, in front of the emulator, under the uvicorn configuration `serve` builds
    (`proxy.server.uvicorn_config`) with `server.*` settings, on a loopback port."""
    emulator = Emulator(token_delay_s=0.1, reply_tokens=8)
    async with serve(emulator.app) as upstream_url:
        settings = settings_for(upstream_url, server=server)
        server_ = uvicorn.Server(uvicorn_config(create_app(settings), settings))
        stopped = anyio.Event()

        async def run(sock: socket.socket) -> None:
            try:
                await server_.serve([sock])
            finally:
                stopped.set()

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            async with anyio.create_task_group() as tg:
                tg.start_soon(run, sock)
                with anyio.fail_after(5):
                    while not server_.started:  # noqa: ASYNC110 - uvicorn only exposes a flag
                        await anyio.sleep(0.01)
                try:
                    yield sock.getsockname()[1], server_
                finally:
                    server_.should_exit = True
                    with anyio.CancelScope(shield=True), anyio.fail_after(5):
                        await stopped.wait()


async def open_connections(server: uvicorn.Server, port: int, count: int) -> list[SocketStream]:
    """`count` more connections to `port`, once the server has taken every one of them."""
    before = len(server.server_state.connections)
    streams = [await anyio.connect_tcp("127.0.0.1", port) for _ in range(count)]
    await wait_for_connections(server, before + count)
    return streams


async def wait_for_connections(server: uvicorn.Server, count: int) -> None:
    with anyio.fail_after(2):
        while len(server.server_state.connections) != count:  # noqa: ASYNC110 - uvicorn's set
            await anyio.sleep(0.01)


async def read_until_closed(stream: SocketStream, timeout_s: float) -> bytes:
    """Everything the server sends until it closes the connection (`timeout_s` at most)."""
    data = bytearray()
    with anyio.move_on_after(timeout_s):
        while True:
            try:
                data += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return bytes(data)
    pytest.fail(f"the connection is still open after {timeout_s:g} s (it sent {bytes(data)!r})")


async def read_response(stream: SocketStream) -> tuple[int, bytes]:
    """One whole response with a content-length, leaving the connection open: status, body."""
    data = bytearray()
    with anyio.fail_after(5):
        while b"\r\n\r\n" not in data:
            data += await stream.receive()
        head, _, body = bytes(data).partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(body) < length:
            body += await stream.receive()
    return int(head.split()[1]), body


def split_response(data: bytes) -> tuple[int, dict[str, str], Any]:
    """A whole raw response: status, headers (lower-case names), JSON body."""
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {
        name.strip().lower(): value.strip()
        for name, value in (line.split(":", 1) for line in lines)
    }
    return int(status_line.split()[1]), headers, json.loads(body)


# --- header_timeout ---------------------------------------------------------------------------


async def test_a_connection_that_sends_nothing_is_closed_after_header_timeout() -> None:
    """A connection that sends nothing is closed, without an answer, once header_timeout passes."""
    async with serving(header_timeout=HEADER_TIMEOUT_S) as (port, server):
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            opened = anyio.current_time()
            assert await read_until_closed(stream, HEADER_TIMEOUT_S + SLACK_S) == b""
            assert anyio.current_time() - opened >= HEADER_TIMEOUT_S * 0.9
        await wait_for_connections(server, 0)


async def test_partial_headers_get_408_and_the_connection_is_closed() -> None:
    """Headers that stop halfway are answered 408 `request_timeout` and the connection closed."""
    async with (
        serving(header_timeout=HEADER_TIMEOUT_S) as (port, server),
        await anyio.connect_tcp("127.0.0.1", port) as stream,
    ):
        opened = anyio.current_time()
        await stream.send(PARTIAL)
        data = await read_until_closed(stream, HEADER_TIMEOUT_S + SLACK_S)
        assert anyio.current_time() - opened >= HEADER_TIMEOUT_S * 0.9
        status, headers, body = split_response(data)
        assert (status, headers["connection"]) == (408, "close")
        assert body["error"]["code"] == "request_timeout"
        await wait_for_connections(server, 0)


async def test_slow_headers_that_complete_within_header_timeout_are_served() -> None:
    """Headers that trickle in, but all within header_timeout, get their answer."""
    async with (
        serving(header_timeout=HEADER_TIMEOUT_S) as (port, _),
        await anyio.connect_tcp("127.0.0.1", port) as stream,
    ):
        for piece in (HEALTHZ[:10], HEALTHZ[10:25], HEALTHZ[25:]):
            await stream.send(piece)
            await anyio.sleep(HEADER_TIMEOUT_S / 4)
        status, _ = await read_response(stream)
        assert status == 200


def chat_request(*, stream: bool) -> tuple[bytes, bytes]:
    """A chat request's head and body, as raw HTTP/1.1 bytes."""
    body = json.dumps({"model": QWEN, "messages": MESSAGES, "stream": stream}).encode()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: lmswitch\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
    )
    return head, body


async def test_a_slow_body_is_not_cut_by_header_timeout() -> None:
    """Once the headers are in, the body may take longer than header_timeout."""
    head, body = chat_request(stream=False)
    async with (
        serving(header_timeout=HEADER_TIMEOUT_S) as (port, _),
        await anyio.connect_tcp("127.0.0.1", port) as stream,
    ):
        await stream.send(head)
        await anyio.sleep(HEADER_TIMEOUT_S * 2)
        await stream.send(body)
        status, answer = await read_response(stream)
        assert status == 200, answer
        assert json.loads(answer)["choices"]


async def test_a_response_longer_than_header_timeout_is_not_cut() -> None:
    """A stream that outlasts header_timeout ends with [DONE]."""
    request = {"model": QWEN, "messages": MESSAGES, "stream": True}
    async with (
        serving(header_timeout=HEADER_TIMEOUT_S) as (port, _),
        httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http,
    ):
        started = anyio.current_time()
        with anyio.fail_after(10):
            async with http.stream("POST", "/v1/chat/completions", json=request) as response:
                lines = [line async for line in response.aiter_lines() if line]
        assert anyio.current_time() - started > HEADER_TIMEOUT_S  # 8 tokens, 0.1 s apart
        assert lines[-1] == "data: [DONE]"


async def test_a_kept_alive_connection_with_half_a_second_request_is_closed() -> None:
    """The bound starts again with a kept-alive connection's next request: half of one is 408."""
    async with (
        serving(header_timeout=HEADER_TIMEOUT_S) as (port, server),
        await anyio.connect_tcp("127.0.0.1", port) as stream,
    ):
        await stream.send(HEALTHZ)
        assert (await read_response(stream))[0] == 200
        await anyio.sleep(HEADER_TIMEOUT_S)  # idle between requests is keep-alive's, not timed
        begun = anyio.current_time()
        await stream.send(PARTIAL)
        data = await read_until_closed(stream, HEADER_TIMEOUT_S + SLACK_S)
        assert anyio.current_time() - begun >= HEADER_TIMEOUT_S * 0.9
        assert split_response(data)[0] == 408
        await wait_for_connections(server, 0)


async def test_a_pipelined_partial_request_is_timed_from_the_end_of_the_response_before_it() -> (
    None
):
    """Half a request sent behind one still being answered: the answer is not cut, and the bound
    starts when it ends."""
    head, body = chat_request(stream=True)
    async with (
        serving(header_timeout=HEADER_TIMEOUT_S) as (port, _),
        await anyio.connect_tcp("127.0.0.1", port) as stream,
    ):
        await stream.send(head + body + PARTIAL)
        data, answered = bytearray(), None
        with anyio.fail_after(10):
            while answered is None:  # the stream: 8 tokens 0.1 s apart, longer than the bound
                data += await stream.receive()
                if b"data: [DONE]" in data:
                    answered = anyio.current_time()
        data += await read_until_closed(stream, HEADER_TIMEOUT_S + SLACK_S)
        assert anyio.current_time() - answered >= HEADER_TIMEOUT_S * 0.9
        answer, _, after = bytes(data).partition(b"\r\n0\r\n\r\n")  # the last chunk
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert after.startswith(b"HTTP/1.1 408 ")


# --- max_connections --------------------------------------------------------------------------


async def test_past_max_connections_a_new_connection_gets_503_and_is_closed() -> None:
    """At the cap, a new connection is answered 503 at once, unasked, and closed; it does not
    count, and once a connection closes a new one is served."""
    async with serving(max_connections=3) as (port, server):
        idle = await open_connections(server, port, 3)
        for _ in range(2):  # refusals do not count towards the cap
            async with await anyio.connect_tcp("127.0.0.1", port) as refused:
                status, headers, body = split_response(await read_until_closed(refused, 2))
            assert status == 503
            assert (headers["retry-after"], headers["connection"]) == ("1", "close")
            assert headers["content-type"] == "application/json"
            assert body["error"]["code"] == "too_many_connections"
            assert body["error"]["type"] == "server_error"
            assert body["error"]["param"] is None
            assert len(server.server_state.connections) == 3

        await idle.pop().aclose()
        await wait_for_connections(server, 2)
        async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as http:
            assert (await http.get("/healthz")).status_code == 200
        for stream in idle:
            await stream.aclose()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts /proc/<pid>/fd")
async def test_a_flood_of_partial_headers_is_closed_and_its_descriptors_freed(
    tmp_path: Path,
) -> None:
    """`lmswitch serve` with 600 connections that never finish their headers closes every one
    within header_timeout, and its open file descriptors come back to where they were."""
    flood = 600
    async with (
        serve(Emulator().app) as upstream_url,
        proxy_process(tmp_path, upstream_url, header_timeout=HEADER_TIMEOUT_S) as proxy,
    ):
        fds = Path(f"/proc/{proxy.pid}/fd")
        before = len(os.listdir(fds))
        streams: list[SocketStream] = []
        try:
            for _ in range(flood):
                stream = await anyio.connect_tcp("127.0.0.1", proxy.port)
                streams.append(stream)
                await stream.send(PARTIAL)
            answers: list[bytes] = []

            async def drain(stream: SocketStream) -> None:
                data = bytearray()
                with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                    while True:
                        data += await stream.receive()
                answers.append(bytes(data))

            with anyio.move_on_after(HEADER_TIMEOUT_S + 10):
                async with anyio.create_task_group() as tg:
                    for stream in streams:
                        tg.start_soon(drain, stream)
        finally:
            for stream in streams:
                await stream.aclose()
        assert len(answers) == flood, f"{flood - len(answers)} of {flood} connections still open"
        assert all(answer.startswith(b"HTTP/1.1 408 ") for answer in answers)
        with anyio.fail_after(5):
            while len(os.listdir(fds)) > before + 5:  # noqa: ASYNC110 - the kernel's count
                await anyio.sleep(0.05)


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("server:\n  header_timeout: 0\n", "server.header_timeout"),
        ("server:\n  header_timeout: soon\n", "server.header_timeout"),
        ("server:\n  max_connections: 0\n", "server.max_connections"),
        ("server:\n  max_connections: many\n", "server.max_connections"),
    ],
)
def test_invalid_connection_limits_make_serve_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], yaml_text: str, key: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml_text, encoding="utf-8")
    assert main(["serve", "--config", str(path)]) == EXIT_USAGE
    assert key in capsys.readouterr().err


def test_serve_runs_the_bounded_protocol(tmp_path: Path) -> None:
    """`lmswitch serve`'s uvicorn server speaks HTTP through the protocol with the bounds."""
    path = tmp_path / "config.yaml"
    path.write_text("server:\n  header_timeout: 7s\n  max_connections: 9\n", encoding="utf-8")
    protocol = build_server(["--config", str(path)]).config.http
    assert isinstance(protocol, type)
    assert issubclass(protocol, BoundedHttpProtocol)
    assert (protocol.header_timeout_s, protocol.max_connections) == (7, 9)
