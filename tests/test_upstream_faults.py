"""An upstream that misbehaves at the HTTP level: each fault ends in a clear error, in time."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx2
import pytest
from anyio.abc import SocketStream

from proxy.emulator import Emulator
from tests.helpers import MESSAGES, QWEN, Proxy, proxy_for

CHAT = {"model": QWEN, "messages": MESSAGES}


class FaultyUpstream:
    """A raw HTTP/1.1 server: LM Studio's management answers come from the emulator, but
    completions get `fault`."""

    def __init__(self, fault: str) -> None:
        self.fault = fault
        self.emulator = Emulator()
        self._app = httpx2.AsyncClient(
            transport=httpx2.ASGITransport(app=self.emulator.app), base_url="http://lmstudio"
        )

    async def handle(self, stream: SocketStream) -> None:
        async with stream:
            buffer = b""
            with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
                while True:
                    while b"\r\n\r\n" not in buffer:
                        buffer += await stream.receive()
                    head, buffer = buffer.split(b"\r\n\r\n", 1)
                    lines = head.decode().split("\r\n")
                    method, path, _ = lines[0].split(" ")
                    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
                    length = int(headers.get("content-length", "0"))
                    while len(buffer) < length:
                        buffer += await stream.receive()
                    body, buffer = buffer[:length], buffer[length:]
                    if path.startswith("/v1/"):
                        await self._misbehave(stream)
                        return
                    answer = await self._app.request(method, path, content=body)
                    await stream.send(
                        b"HTTP/1.1 %d OK\r\ncontent-type: application/json\r\n"
                        b"content-length: %d\r\n\r\n"
                        % (answer.status_code, len(answer.content))
                        + answer.content
                    )

    async def _misbehave(self, stream: SocketStream) -> None:
        if self.fault == "garbage":
            await stream.send(b"SPAM SPAM SPAM\r\n\r\n")
        elif self.fault == "no-done":
            chunk = b'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\n'
            await stream.send(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n"
                + b"%x\r\n%s\r\n" % (len(chunk), chunk) * 2
                + b"0\r\n\r\n"
            )
        elif self.fault == "crash-page":  # what uvicorn sends when its app dies mid-request
            await stream.send(
                b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain; charset=utf-8"
                b"\r\ncontent-length: 21\r\n\r\nInternal Server Error"
            )
        elif self.fault == "silent":
            await anyio.sleep_forever()
        # "close": say nothing, hang up

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[str]:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610 - anyio, not Django
        async with self._app, listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, self.handle)
            try:
                yield f"http://127.0.0.1:{port}"
            finally:
                tg.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def faulty(fault: str, **sections: Any) -> AsyncIterator[Proxy]:
    async with FaultyUpstream(fault).serve() as url, proxy_for(url, **sections) as proxy:
        yield proxy


async def test_no_valid_http_answer_is_a_502() -> None:
    async with faulty("garbage") as proxy:
        with anyio.fail_after(5):
            response = await proxy.http.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 502
        assert response.json()["error"]["code"] == "upstream_protocol_error"
        assert (await proxy.status())["in_flight"] == 0


async def test_a_connection_closed_without_an_answer_is_lm_studio_unavailable() -> None:
    """LM Studio hanging up before its answer is LM Studio gone: 503 with Retry-After, and
    the proxy reads its state again."""
    upstream = FaultyUpstream("close")
    async with upstream.serve() as url, proxy_for(url) as proxy:
        await proxy.wait_ready()
        with anyio.fail_after(5):
            response = await proxy.http.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["code"] == "upstream_unavailable"
        assert "closed the connection without answering" in error["message"]
        assert response.headers["retry-after"] == "5"
        assert (await proxy.status())["in_flight"] == 0
        calls = upstream.emulator.calls

        def read_after_the_load() -> bool:
            paths = [call.path for call in calls]
            loaded_at = max(i for i, path in enumerate(paths) if path == "/api/v1/models/load")
            return "/api/v1/models" in paths[loaded_at:]

        await upstream.emulator.wait_until(read_after_the_load, timeout=2)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", CHAT),
        ("/v1/messages", {**CHAT, "max_tokens": 16, "stream": True}),
    ],
)
async def test_an_error_page_that_is_not_json_is_a_502_in_the_envelope(
    path: str, body: dict[str, Any]
) -> None:
    """LM Studio's error without a JSON body reaches the client as the proxy's own error."""
    async with faulty("crash-page") as proxy:
        with anyio.fail_after(5):
            response = await proxy.http.post(path, json=body)
        assert response.status_code == 502
        doc = response.json()
        error = doc["error"]
        assert error["type"] == ("api_error" if path == "/v1/messages" else "server_error")
        assert "500" in error["message"]
        assert "Internal Server Error" in error["message"]
        assert (await proxy.status())["in_flight"] == 0


async def test_a_stream_without_done_ends_with_an_error_event() -> None:
    async with faulty("no-done") as proxy:
        with anyio.fail_after(5):
            response = await proxy.http.post("/v1/chat/completions", json={**CHAT, "stream": True})
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert len(events) == 3
        assert json.loads(events[-1])["error"]["code"] == "upstream_incomplete"


async def test_an_upstream_that_never_answers_times_out() -> None:
    async with faulty("silent", upstream={"read_timeout": 0.3}) as proxy:
        with anyio.fail_after(5):
            response = await proxy.http.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "upstream_timeout"
        assert (await proxy.status())["in_flight"] == 0
