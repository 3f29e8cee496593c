"""Bad requests: each gets a clear 4xx in OpenAI's envelope, and others are served meanwhile."""

from __future__ import annotations

import contextlib
from typing import Any

import anyio
import pytest

from proxy import bodies
from proxy.emulator import Emulator
from tests.helpers import MESSAGES, QWEN, Proxy, running

CHAT = {"model": QWEN, "messages": MESSAGES}


async def still_serving(proxy: Proxy) -> None:
    reply = await proxy.sdk.chat.completions.create(model=QWEN, messages=MESSAGES)
    assert reply.model == QWEN


@pytest.mark.parametrize(
    ("body", "status", "param", "needle"),
    [
        ({**CHAT, "model": 42}, 400, "model", "non-empty string"),
        ({**CHAT, "model": ""}, 400, "model", "non-empty string"),
        ({**CHAT, "model": None}, 400, "model", "models.default"),
        ({**CHAT, "model": "x" * 100_000}, 404, "model", "does not exist"),
        ({**CHAT, "model": "qwen\x00\x1b[31m\n"}, 404, "model", "does not exist"),
        ({**CHAT, "stream": "yes"}, 400, "stream", "true or false"),
        ({**CHAT, "stream": 1}, 400, "stream", "true or false"),
    ],
)
async def test_bad_fields_get_clear_errors(
    body: dict[str, Any], status: int, param: str, needle: str
) -> None:
    emulator = Emulator()
    async with running(emulator) as proxy:
        response = await proxy.http.post("/v1/chat/completions", json=body)
        assert response.status_code == status
        error = response.json()["error"]
        assert error["param"] == param
        assert needle in error["message"]
        assert len(error["message"]) < 1000  # a huge name is not echoed whole
        assert emulator.load_count() == 0
        await still_serving(proxy)


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
async def test_wrong_content_type_is_415(content_type: str) -> None:
    async with running(Emulator()) as proxy:
        response = await proxy.http.post(
            "/v1/chat/completions",
            content=b'{"model": "x"}',
            headers={"content-type": content_type},
        )
        assert response.status_code == 415
        assert "application/json" in response.json()["error"]["message"]
        fine = await proxy.http.post(
            "/v1/chat/completions",
            json=CHAT,
            headers={"content-type": "application/json; charset=utf-8"},
        )
        assert fine.status_code == 200


async def test_a_trickling_body_times_out_without_holding_a_lease(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(bodies, "BODY_READ_TIMEOUT_S", 0.3)
    async with running(Emulator()) as proxy:

        async def trickle() -> Any:
            yield b'{"model": "qwen2.5-7b-instruct", '
            await anyio.sleep(2)
            yield b'"messages": []}'

        async with anyio.create_task_group() as tg:
            results: list[int] = []

            async def slow() -> None:
                response = await proxy.http.post("/v1/chat/completions", content=trickle())
                results.append(response.status_code)

            tg.start_soon(slow)
            await still_serving(proxy)  # others are served while it uploads
            assert (await proxy.status())["in_flight"] == 0
        assert results == [408]


async def test_odd_request_ids_are_replaced_not_echoed() -> None:
    async with running(Emulator()) as proxy:
        odd = await proxy.http.get("/v1/models", headers={"x-request-id": "a b\tc" + "x" * 300})
        assert odd.status_code == 200
        assert odd.headers["x-request-id"] != "a b\tc"
        assert len(odd.headers["x-request-id"]) == 32
        odd_but_legal = {
            b"authorization": b"Bearer \xff\xfe",
            b"x-forwarded-for": b",",
            b"accept": b"",
        }
        assert (await proxy.http.get("/v1/models", headers=odd_but_legal)).status_code == 200
        control = await proxy.http.get("/v1/models", headers={b"authorization": b"Basic \x7f\x01"})
        assert control.status_code == 400  # the HTTP server refuses it before the proxy sees it
        await still_serving(proxy)


async def test_unknown_paths_are_not_forwarded() -> None:
    emulator = Emulator()
    async with running(emulator) as proxy:
        for method, path in [("POST", "/v1/fine_tuning/jobs"), ("GET", "/api/v0/models")]:
            response = await proxy.http.request(method, path)
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "unknown_url"
        assert not [c for c in emulator.calls if c.path in ("/v1/fine_tuning/jobs",)]


async def test_request_smuggling_is_refused() -> None:
    """Content-Length and Transfer-Encoding together: refused by the server, nothing forwarded."""
    emulator = Emulator()
    async with running(emulator) as proxy:
        host, port = proxy.url.removeprefix("http://").split(":")
        body = b'{"model": "qwen2.5-7b-instruct", "messages": []}'
        raw = (
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 4\r\ntransfer-encoding: chunked\r\n\r\n"
            + hex(len(body))[2:].encode() + b"\r\n" + body + b"\r\n0\r\n\r\n"
            + b"GET /api/v1/status HTTP/1.1\r\nhost: x\r\n\r\n"
        )  # fmt: skip
        with anyio.fail_after(5):
            stream = await anyio.connect_tcp(host, int(port))
            async with stream:
                await stream.send(raw)
                answer = b""
                with anyio.move_on_after(1), contextlib.suppress(anyio.EndOfStream):
                    while True:
                        answer += await stream.receive()
        assert answer.startswith(b"HTTP/1.1 400")
        assert answer.count(b"HTTP/1.1") == 1  # the smuggled request was not answered
        assert not [c for c in emulator.calls if c.path == "/v1/chat/completions"]
        await still_serving(proxy)
