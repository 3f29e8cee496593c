"""Error paths end to end: every failure gets a clear answer in the client's envelope."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anyio

from proxy.emulator import Emulator
from tests.helpers import LLAMA, MESSAGES, QWEN, running

CHAT = {"model": QWEN, "messages": MESSAGES}


async def test_oversize_body_gets_413_without_a_load() -> None:
    emulator = Emulator()
    async with running(emulator, server={"max_body_bytes": 1024}) as proxy:
        big = {"model": QWEN, "messages": [{"role": "user", "content": "x" * 2048}]}
        response = await proxy.http.post("/v1/chat/completions", json=big)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"

        async def chunks() -> AsyncIterator[bytes]:  # no content-length: read until too big
            yield b'{"model": "qwen2.5-7b-instruct", "pad": "'
            for _ in range(20):
                yield b"y" * 100
            yield b'"}'

        response = await proxy.http.post("/v1/chat/completions", content=chunks())
        assert response.status_code == 413
        assert emulator.load_count() == 0


async def test_unknown_route_and_wrong_method_use_the_envelope() -> None:
    async with running(Emulator()) as proxy:
        response = await proxy.http.post("/v1/nothing-here", json={})
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "unknown_url"
        response = await proxy.http.get("/v1/chat/completions")
        assert response.status_code == 405
        assert "POST" in response.headers["allow"]
        assert response.json()["error"]["type"] == "invalid_request_error"


async def test_anthropic_routes_answer_errors_in_anthropic_shape() -> None:
    async with running(Emulator()) as proxy:
        body = {"model": "claude-sonnet-9", "max_tokens": 10, "messages": MESSAGES}
        response = await proxy.http.post("/v1/messages", json=body)
        assert response.status_code == 404
        assert response.json() == {
            "type": "error",
            "error": {"type": "not_found_error", "message": response.json()["error"]["message"]},
        }
        assert "claude-sonnet-9" in response.json()["error"]["message"]


async def test_a_load_timeout_on_the_messages_api_is_anthropics_timeout_error() -> None:
    emulator = Emulator(load_delay_s=0.35)
    async with running(emulator, upstream={"load_timeout": 0.2}) as proxy:
        body = {"model": QWEN, "max_tokens": 10, "messages": MESSAGES}
        response = await proxy.http.post("/v1/messages", json=body)
        assert response.status_code == 504
        assert response.json()["error"]["type"] == "timeout_error"


async def test_upstream_errors_pass_through_with_their_status() -> None:
    """LM Studio's own refusal (a chat without messages) reaches the client unchanged."""
    emulator = Emulator()
    async with running(emulator) as proxy:
        response = await proxy.http.post("/v1/chat/completions", json={"model": QWEN})
        assert response.status_code == 400
        [call] = [c for c in emulator.calls if c.path == "/v1/chat/completions"]
        assert call.body == {"model": QWEN}
        assert response.json()["error"] == {
            "message": "'messages' is required",
            "type": "invalid_request_error",
            "param": "messages",
            "code": None,
        }


async def test_load_timeout_answers_504_and_the_next_request_may_retry() -> None:
    emulator = Emulator(load_delay_s=0.35)  # past load_timeout, within twice it
    async with running(emulator, upstream={"load_timeout": 0.2}) as proxy:
        response = await proxy.http.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 504
        assert "load_timeout" in response.json()["error"]["message"]
        # LM Studio goes on with that load: the next request waits for it, no second load
        response = await proxy.http.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 200
        assert emulator.load_count(QWEN) == 1
        assert list(emulator.instances) == [QWEN]


async def test_queue_timeout_answers_503_with_retry_after() -> None:
    emulator = Emulator(load_delay_s=2.0)
    async with running(emulator, scheduler={"queue_timeout": 0.3}) as proxy:
        response = await proxy.http.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "queue_timeout"
        assert int(response.headers["retry-after"]) >= 1


async def test_queue_limit_answers_429() -> None:
    emulator = Emulator(load_delay_s=0.5)
    async with running(emulator, scheduler={"max_queue": 2}) as proxy:
        statuses: list[int] = []

        async def ask() -> None:
            response = await proxy.http.post("/v1/chat/completions", json=CHAT)
            statuses.append(response.status_code)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(ask)
        assert sorted(statuses) == [200, 200, 429, 429]


async def test_model_too_big_for_the_budget_is_refused_at_once() -> None:
    emulator = Emulator()
    async with running(emulator, models={"memory_budget": "2GiB"}) as proxy:
        response = await proxy.http.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 503
        error = response.json()["error"]
        assert "memory_budget" in error["message"]
        assert response.headers["x-should-retry"] == "false"
        assert emulator.load_count() == 0
        ok = await proxy.http.post("/v1/chat/completions", json={**CHAT, "model": LLAMA})
        assert ok.status_code == 200


async def test_proxy_sends_its_own_token_never_the_clients() -> None:
    emulator = Emulator(api_token="sk-lm-abcdefgh:abcdefghijklmnopqrst")
    token = {"api_token": "sk-lm-abcdefgh:abcdefghijklmnopqrst"}
    async with running(emulator, upstream=token) as proxy:
        response = await proxy.http.post(
            "/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer client-secret"}
        )
        assert response.status_code == 200
        sent = [c for c in emulator.calls if c.path == "/v1/chat/completions"]
        assert sent


async def test_health_and_readiness() -> None:
    async with running(Emulator()) as proxy:
        assert (await proxy.http.get("/healthz")).json() == {"status": "ok"}
        await proxy.wait_for(lambda status: status["upstream"]["reachable"])
        assert (await proxy.http.get("/readyz")).status_code == 200
        rows = (await proxy.http.get("/api/v1/models")).json()
        assert {row["id"] for row in rows} >= {QWEN, LLAMA}
        assert all(row["loaded"] is False for row in rows)
        assert (await proxy.http.get("/api/v1/models/loaded")).json() == []


async def test_an_upstream_slower_than_read_timeout_ends_the_stream_with_an_error() -> None:
    """LM Studio going silent mid-stream for longer than `upstream.read_timeout`."""
    emulator = Emulator(reply_tokens=5, token_delay_s=1.0)
    body = {"model": QWEN, "messages": MESSAGES, "stream": True}
    async with running(emulator, upstream={"read_timeout": 0.3}) as proxy:
        with anyio.fail_after(5):
            response = await proxy.http.post("/v1/chat/completions", json=body)
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert json.loads(events[-1])["error"]["code"] == "upstream_timeout"
        assert (await proxy.status())["in_flight"] == 0
