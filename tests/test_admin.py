"""Management endpoints and live events, over real sockets against the emulator."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncGenerator
from contextlib import aclosing
from functools import partial
from typing import Any

import anyio
import httpx2
import pytest

from proxy.app import create_app
from proxy.emulator import Emulator
from proxy.events import EventBus
from tests.helpers import LLAMA, MESSAGES, QWEN, Proxy, running, serve, settings_for


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
    models = {"memory_budget": "8GiB", "aliases": {"smart": QWEN, "fast": LLAMA}}
    async with running(emulator, models=models) as proxy:
        await proxy.sdk.chat.completions.create(model=QWEN, messages=MESSAGES)
        status = await proxy.status()
        assert status["aliases"] == {"fast": LLAMA, "smart": QWEN}  # for the page
        assert status["capacity"]["max_loaded"] == status["upstreams"][0]["max_loaded"] == 1
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
        kinds = [(k, d.get("state")) for k, d in seen if k != "queue"]  # queue: tested below
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


async def _events(proxy: Proxy) -> AsyncGenerator[tuple[str, dict[str, Any]], None]:
    """The (kind, data) pairs of `/api/v1/events`, the snapshot first."""
    async with proxy.http.stream("GET", "/api/v1/events") as stream:
        kind = ""
        async for line in stream.aiter_lines():  # pragma: no branch - the caller stops
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                yield kind, json.loads(line.removeprefix("data: "))


async def _chat(proxy: Proxy, *, timeout_s: float = 10) -> None:
    body = {"model": QWEN, "messages": MESSAGES}
    try:
        response = await proxy.http.post("/v1/chat/completions", json=body, timeout=timeout_s)
    except httpx2.TimeoutException:
        return  # a client that gave up waiting
    assert response.status_code == 200, response.text


_TIMES = ("waited_s", "loading_s")  # how long, as of when the rows were made


def _without_times(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in _TIMES} for row in rows]


async def test_queue_events_follow_the_requests_waiting_for_a_load() -> None:
    """A request that joins the queue, one that leaves it (its client gave up), and the load
    that lets them through: each change is a `queue` event with the host's `waiting` rows, as
    the status has them."""
    emulator = Emulator(load_delay_s=1.5)
    async with running(emulator) as proxy:
        await proxy.wait_ready()
        shown: list[list[tuple[str, str, int]]] = []
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg, aclosing(_events(proxy)) as events:
                async for kind, data in events:
                    if kind == "snapshot":
                        assert data["status"]["waiting"] == []
                        tg.start_soon(_chat, proxy)
                    if kind != "queue":
                        continue
                    assert data["upstream"] == "default"
                    rows = [(row["model"], row["state"], row["waiting"]) for row in data["waiting"]]
                    if rows == (shown[-1] if shown else []):
                        continue  # the one event that may come as a subscriber joins
                    shown.append(rows)
                    if len(shown) == 1:
                        status = await proxy.status()
                        assert _without_times(status["waiting"]) == _without_times(data["waiting"])
                        tg.start_soon(partial(_chat, proxy, timeout_s=0.3))
                    if not rows:
                        break
        assert shown == [
            [(QWEN, "loading", 1)],
            [(QWEN, "loading", 2)],
            [(QWEN, "loading", 1)],  # the second client gave up
            [],
        ]
        assert emulator.load_count(QWEN) == 1


class _CountingBus(EventBus):
    """The event bus, counting what is published by kind."""

    def __init__(self) -> None:
        super().__init__()
        self.kinds: Counter[str] = Counter()

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        self.kinds[kind] += 1
        super().publish(kind, data)


async def test_queue_events_cost_nothing_without_subscribers() -> None:
    emulator = Emulator(load_delay_s=0.2)
    bus = _CountingBus()
    async with (
        serve(emulator.app) as upstream_url,
        serve(create_app(settings_for(upstream_url), events=bus)) as url,
        httpx2.AsyncClient(base_url=url, timeout=10) as http,
    ):
        body = {"model": QWEN, "messages": MESSAGES}
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for _ in range(3):  # they queue for the load
                    tg.start_soon(partial(http.post, "/v1/chat/completions", json=body))
        assert bus.kinds["model"] == 2  # loading, loaded: the bus was told of those
        assert bus.kinds["queue"] == 0
