"""Management endpoints and live events, over real sockets against the emulator."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest

from proxy.emulator import Emulator
from proxy.events import EventBus
from tests.helpers import LLAMA, MESSAGES, QWEN, Proxy, running


async def post(proxy: Proxy, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    response = await proxy.http.post(f"/api/v1/models/{path}", json=body)
    result: dict[str, Any] = response.json()
    return response.status_code, result


async def model_state(proxy: Proxy, key: str) -> str:
    rows = (await proxy.http.get("/api/v1/models")).json()
    return str(next(row["state"] for row in rows if row["id"] == key))


async def test_load_then_unload_with_the_seed_envelope() -> None:
    emulator = Emulator()
    async with running(emulator) as proxy:
        status, body = await post(proxy, "load", {"model_id": QWEN})
        assert (status, body) == (
            200,
            {"success": True, "message": f"Model {QWEN} loaded successfully", "model_id": QWEN},
        )
        assert list(emulator.instances) == [QWEN]
        status, body = await post(proxy, "load", {"model_id": QWEN})
        assert body["message"] == f"Model {QWEN} is already loaded"
        assert emulator.load_count(QWEN) == 1
        loaded = (await proxy.http.get("/api/v1/models/loaded")).json()
        assert [row["id"] for row in loaded] == [QWEN]
        assert loaded[0]["loaded"] is True
        status, body = await post(proxy, "unload", {"model_id": QWEN})
        assert (status, body["message"]) == (200, f"Model {QWEN} unloaded successfully")
        assert emulator.instances == {}
        status, body = await post(proxy, "unload", {"model_id": QWEN})
        assert (status, body["message"]) == (200, f"Model {QWEN} is not loaded")


async def test_load_evicts_by_policy_and_passes_context_length() -> None:
    emulator = Emulator()
    async with running(emulator, models={"max_loaded": 1}) as proxy:
        await post(proxy, "load", {"model_id": QWEN})
        status, _ = await post(proxy, "load", {"model_id": LLAMA, "context_length": 8192})
        assert status == 200
        assert list(emulator.instances) == [LLAMA]
        assert emulator.instances[LLAMA].context_length == 8192
        # asking for another context length reloads the model with it
        status, body = await post(proxy, "load", {"model_id": LLAMA, "context_length": 2048})
        assert body["message"] == f"Model {LLAMA} loaded successfully"
        assert emulator.instances[LLAMA].context_length == 2048


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({}, 400, "model_id"),
        ({"model": QWEN}, 400, "model"),
        ({"model_id": QWEN, "context_length": -5}, 400, "context_length"),
        ({"model_id": "no/such-model"}, 404, "model"),
    ],
)
async def test_load_rejects_bad_requests(body: dict[str, Any], status: int, param: str) -> None:
    emulator = Emulator()
    async with running(emulator) as proxy:
        got, answer = await post(proxy, "load", body)
        assert got == status
        assert answer["error"]["param"] == param
        assert emulator.load_count() == 0


async def test_load_failures_use_the_error_envelope() -> None:
    emulator = Emulator(memory_bytes=2**30)
    async with running(emulator) as proxy:
        status, body = await post(proxy, "load", {"model_id": QWEN})
        assert status == 503
        assert body["error"]["code"] == "model_load_failed"
    emulator = Emulator(load_delay_s=2)
    async with running(emulator, upstream={"load_timeout": 0.2}) as proxy:
        status, body = await post(proxy, "load", {"model_id": QWEN})
        assert status == 504


async def test_unload_waits_for_the_running_stream() -> None:
    """An unload answers only once the requests running on the model have ended."""
    emulator = Emulator(reply_tokens=10, token_delay_s=0.05)
    body = {"model": QWEN, "messages": MESSAGES, "stream": True}
    async with running(emulator) as proxy:
        order: list[str] = []

        async def unload() -> None:
            status, _ = await post(proxy, "unload", {"model_id": QWEN})
            order.append(f"unloaded {status}")

        with anyio.fail_after(10):
            async with (
                anyio.create_task_group() as tg,
                proxy.http.stream("POST", "/v1/chat/completions", json=body) as stream,
            ):
                lines = stream.aiter_lines()
                await anext(lines)
                tg.start_soon(unload)
                with anyio.fail_after(2):  # the unload is in: QWEN drains under the stream
                    while await model_state(proxy, QWEN) != "draining":  # noqa: ASYNC110
                        await anyio.sleep(0.01)
                assert emulator.instances  # still loaded while the stream runs
                rest = [line async for line in lines]
                order.append("stream done")
        assert "data: [DONE]" in rest
        assert order == ["stream done", "unloaded 200"]
        assert emulator.instances == {}


async def test_pinned_models_hold_their_slot_until_unpinned() -> None:
    emulator = Emulator()
    async with running(emulator, models={"max_loaded": 1}) as proxy:
        await post(proxy, "load", {"model_id": QWEN})
        status, body = await post(proxy, "pin", {"model_id": QWEN})
        assert (status, body["pinned"]) == (200, True)
        refused = await proxy.http.post(
            "/v1/chat/completions", json={"model": LLAMA, "messages": MESSAGES}
        )
        assert refused.status_code == 503
        assert "pinned" in refused.json()["error"]["message"]
        rows = {row["id"]: row for row in (await proxy.http.get("/api/v1/models/")).json()}
        assert rows[QWEN]["pinned"] is True
        status, body = await post(proxy, "unpin", {"model_id": QWEN})
        assert body["message"] == f"Model {QWEN} unpinned successfully"
        ok = await proxy.http.post(
            "/v1/chat/completions", json={"model": LLAMA, "messages": MESSAGES}
        )
        assert ok.status_code == 200


async def test_status_reports_upstream_capacity_and_queue() -> None:
    emulator = Emulator()
    async with running(emulator, models={"memory_budget": "8GiB"}) as proxy:
        await proxy.sdk.chat.completions.create(model=QWEN, messages=MESSAGES)
        status = await proxy.status()
        assert status["upstream"]["reachable"] is True
        assert status["loaded"] == [QWEN]
        assert status["capacity"]["memory_budget"] == 8 * 2**30
        assert status["capacity"]["bytes_used"] == emulator.catalog[QWEN].size_bytes
        assert status["uptime_s"] >= 0
        assert status["version"]


async def test_events_show_loading_then_loaded_then_the_request() -> None:
    emulator = Emulator(load_delay_s=0.1)
    async with running(emulator) as proxy:
        await proxy.wait_ready()  # the snapshot lists the catalogue once the proxy has read it
        seen: list[tuple[str, dict[str, Any]]] = []
        with anyio.fail_after(10):
            async with proxy.http.stream("GET", "/api/v1/events") as stream:
                assert stream.headers["content-type"].startswith("text/event-stream")
                lines = stream.aiter_lines()
                kind = ""
                async with anyio.create_task_group() as tg:
                    async for line in lines:
                        if line.startswith("event: "):
                            kind = line[7:]
                        elif line.startswith("data: "):
                            seen.append((kind, json.loads(line[6:])))
                            if kind == "snapshot":
                                tg.start_soon(
                                    lambda: proxy.sdk.chat.completions.create(
                                        model=QWEN, messages=MESSAGES
                                    )
                                )
                            if kind == "request":
                                break
        kinds = [(k, d.get("state")) for k, d in seen]
        assert kinds == [
            ("snapshot", None),
            ("model", "loading"),
            ("model", "loaded"),
            ("request", None),
        ]
        assert seen[0][1]["models"][0]["id"]
        request = seen[-1][1]
        assert (request["model"], request["status"], request["waited_on_load"]) == (QWEN, 200, True)
        await proxy.wait_for(lambda status: status["event_subscribers"] == 0)


async def test_a_subscriber_that_falls_behind_is_dropped() -> None:
    bus = EventBus(buffer=2)
    with bus.subscribe() as slow, bus.subscribe() as fast:
        for i in range(3):
            bus.publish("model", {"n": i})
            if i < 2:
                assert (await fast.receive())[1] == {"n": i}
        assert bus.subscribers == 1  # the slow one is gone; the fast one stays
        assert bus.dropped == 1
        assert [(await slow.receive())[1] for _ in range(2)] == [{"n": 0}, {"n": 1}]
        with pytest.raises(anyio.EndOfStream):
            await slow.receive()
        assert (await fast.receive())[1] == {"n": 2}
