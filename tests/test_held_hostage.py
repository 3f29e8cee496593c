"""LM Studio that stops answering part of its API, loads behind the proxy's back, and an unload
asked for during a load: no request waits past its own bound, nothing is evicted on a state that
could not be read, and N concurrent requests cause one load even with JIT loading on."""

from __future__ import annotations

import time
from typing import Any

import anyio
import httpx2
import pytest

from proxy.emulator import Emulator
from tests.helpers import LLAMA, MESSAGES, QWEN, Proxy, running

CHAT = "/v1/chat/completions"
LISTING_S = 0.5  # the listing deadline in these tests (upstream.connect_timeout)
SECTIONS: dict[str, Any] = {
    "upstream": {"poll_interval": 0.2, "connect_timeout": LISTING_S},
    "scheduler": {"queue_timeout": 5},
}


async def chat(proxy: Proxy, model: str, **body: Any) -> tuple[httpx2.Response, float]:
    started = time.perf_counter()
    response = await proxy.http.post(CHAT, json={"model": model, "messages": MESSAGES, **body})
    return response, time.perf_counter() - started


async def burst(proxy: Proxy, model: str, n: int) -> list[httpx2.Response]:
    """`n` chats for `model` at once (5 s at most), their answers."""
    answers: list[httpx2.Response] = []

    async def one() -> None:
        answers.append((await chat(proxy, model))[0])

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(one)
    return answers


async def reachable(proxy: Proxy) -> bool:
    return bool((await proxy.status())["upstream"]["reachable"])


async def wait_reachable(proxy: Proxy, want: bool, timeout_s: float) -> None:
    with anyio.fail_after(timeout_s):
        while await reachable(proxy) is not want:  # noqa: ASYNC110 - state seen over HTTP
            await anyio.sleep(0.02)


async def test_a_silent_listing_holds_no_request_and_evicts_nothing() -> None:
    emulator = Emulator()
    async with running(emulator, **SECTIONS) as proxy:
        await proxy.wait_ready()
        assert (await chat(proxy, QWEN))[0].status_code == 200
        emulator.hang_listings = True
        # The poll's listing fails at its own deadline, not after 30 s.
        await wait_reachable(proxy, False, timeout_s=LISTING_S + 1.0)

        # The loaded model answers at once.
        response, took = await chat(proxy, QWEN)
        assert response.status_code == 200
        assert took < 0.5

        # Another model needs a load: refused at once (within one listing deadline), with
        # Retry-After, and the working model is not evicted on a state that was not read.
        answers: list[tuple[httpx2.Response, float]] = []

        async def other() -> None:
            answers.append(await chat(proxy, LLAMA))

        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(other)
        for response, took in answers:
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "upstream_unavailable"
            assert "cannot be read" in response.json()["error"]["message"]
            assert response.headers["retry-after"] == "5"
            assert took < LISTING_S + 0.5
        assert list(emulator.instances) == [QWEN]
        assert emulator.load_count(LLAMA) == 0
        assert emulator.unload_count() == 0

        # An unknown name is answered from the last catalogue read, at once.
        response, took = await chat(proxy, "no-such-model")
        assert response.status_code == 404
        assert took < 0.3

        # Once LM Studio lists again, the swap happens.
        emulator.hang_listings = False
        await wait_reachable(proxy, True, timeout_s=2.0)
        response, took = await chat(proxy, LLAMA)
        assert response.status_code == 200
        assert list(emulator.instances) == [LLAMA]


async def test_a_stuck_listing_is_not_waited_for_once_lm_studio_answers_again() -> None:
    """A listing stuck since before LM Studio recovered holds nobody: a new one is asked for."""
    emulator = Emulator()
    deadline_s = 2.0
    sections = {**SECTIONS, "upstream": {"poll_interval": 60, "connect_timeout": deadline_s}}
    async with running(emulator, **sections) as proxy:
        await proxy.wait_ready()

        def listed() -> int:
            return sum(1 for call in emulator.calls if call.path == "/api/v1/models")

        emulator.hang_listings = True
        await anyio.sleep(1.1)  # an unknown name may ask LM Studio again (once a second)
        response, took = await chat(proxy, "no-such-model")
        assert response.status_code == 404  # from the last catalogue, after the stuck listing
        assert took < deadline_s + 0.5
        # The failed listing is retried within a second, and that retry is stuck too.
        stuck = listed()
        await emulator.wait_until(lambda: listed() > stuck, timeout=2)
        await anyio.sleep(0.35)
        emulator.hang_listings = False
        response, took = await chat(proxy, LLAMA)
        assert response.status_code == 200, response.text
        assert took < 0.5


async def test_a_burst_after_an_unload_behind_the_proxys_back_loads_once_with_jit() -> None:
    """LM Studio stacks one JIT copy per concurrent request; the proxy lets one through."""
    emulator = Emulator(load_delay_s=0.3)
    emulator.jit_shares_loads = False
    async with running(emulator, **SECTIONS) as proxy:
        await proxy.wait_ready()
        response = await proxy.http.post("/api/v1/models/load", json={"model_id": QWEN})
        assert response.status_code == 200
        emulator.unload_instance(QWEN)  # from LM Studio's UI, between two polls
        loads_before = emulator.load_count(QWEN)

        answers = await burst(proxy, QWEN, 6)
        assert [r.status_code for r in answers] == [200] * 6
        assert emulator.load_count(QWEN) - loads_before == 1
        assert emulator.most_loads_at_once == 1
        assert list(emulator.instances) == [QWEN]


async def test_a_burst_after_a_restart_of_lm_studio_loads_once_with_jit() -> None:
    """LM Studio restarted with nothing loaded, unseen: the burst makes one copy, and the proxy
    sees the model LM Studio loaded for it at once, not at the next poll."""
    emulator = Emulator(load_delay_s=0.3)
    emulator.jit_shares_loads = False
    sections = {**SECTIONS, "upstream": {"poll_interval": 60, "connect_timeout": LISTING_S}}
    async with running(emulator, **sections) as proxy:
        await proxy.wait_ready()
        assert (await chat(proxy, QWEN))[0].status_code == 200
        await anyio.sleep(1.1)  # nothing confirms the model any more
        emulator.unload_instance(QWEN)  # as a restart leaves it
        answers = await burst(proxy, QWEN, 6)
        assert [r.status_code for r in answers] == [200] * 6
        assert emulator.most_loads_at_once == 1
        assert list(emulator.instances) == [QWEN]


async def test_an_unload_during_a_load_answers_when_the_model_is_unloaded() -> None:
    emulator = Emulator(load_delay_s=1.0)
    async with running(emulator, **SECTIONS) as proxy:
        await proxy.wait_ready()
        outcome: dict[str, tuple[int, float]] = {}
        started = time.perf_counter()

        async def call(action: str) -> None:
            response = await proxy.http.post(f"/api/v1/models/{action}", json={"model_id": QWEN})
            outcome[action] = (response.status_code, time.perf_counter() - started)

        with anyio.fail_after(4):
            async with anyio.create_task_group() as tg:
                tg.start_soon(call, "load")
                await anyio.sleep(0.3)
                tg.start_soon(call, "unload")
        assert outcome["load"][0] == 200
        assert outcome["unload"][0] == 200
        assert outcome["unload"][1] < 1.0 + 0.8  # the load's end, then a quick unload
        assert emulator.instances == {}
        assert emulator.load_count(QWEN) == 1
        rows = (await proxy.http.get("/api/v1/models")).json()
        assert next(row["state"] for row in rows if row["id"] == QWEN) == "absent"


@pytest.mark.parametrize("first", [QWEN, LLAMA])
async def test_a_jit_load_a_request_causes_never_runs_beside_the_proxys_load(first: str) -> None:
    """A request to a model that LM Studio dropped unseen makes LM Studio load it (JIT); the
    proxy's own load of another model waits for it, or it for the proxy's load."""
    emulator = Emulator(load_delay_s=0.5)
    sections = {**SECTIONS, "models": {"max_loaded": 2}}
    sections["upstream"] = {"poll_interval": 60, "connect_timeout": LISTING_S}
    async with running(emulator, **sections) as proxy:
        await proxy.wait_ready()
        assert (await chat(proxy, QWEN))[0].status_code == 200
        await anyio.sleep(1.1)  # nothing confirms QWEN any more
        emulator.unload_instance(QWEN)  # LM Studio dropped it; the proxy has not seen it
        answers: dict[str, int] = {}

        async def one(model: str) -> None:
            answers[model] = (await chat(proxy, model))[0].status_code

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(one, first)
                await anyio.sleep(0.1)
                tg.start_soon(one, LLAMA if first == QWEN else QWEN)
        assert answers == {QWEN: 200, LLAMA: 200}
        assert emulator.load_count(QWEN) == 2  # the proxy's first load, then LM Studio's JIT
        assert emulator.most_loads_at_once == 1
        assert sorted(emulator.instances) == sorted([QWEN, LLAMA])
