"""Priorities with aging over real sockets (docs/design.md §2.4): with one slot, an interactive
key is not stuck behind a batch job, and a low-priority request behind a steady stream of
higher priority still gets its turn within its bound.

A request's priority comes from its key (`auth.keys`); here a test-only middleware inside the
proxy's own sets it from a header, so that these tests need no keys. The product has no such
header.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.access import record_of
from proxy.app import create_app
from proxy.emulator import Emulator
from tests.helpers import LLAMA, MESSAGES, QWEN, serve, settings_for

A, B, C = QWEN, LLAMA, "google/gemma-3-4b"
PRIORITY_HEADER = b"x-test-priority"


class PriorityFromHeader:
    """Test-only: the request's priority, as its key would set it, from `x-test-priority`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == PRIORITY_HEADER:
                    record_of(scope).priority = int(value)
        await self.app(scope, receive, send)


@asynccontextmanager
async def prioritized(emulator: Emulator, **sections: Any) -> AsyncIterator[httpx2.AsyncClient]:
    """The emulator and the proxy in front of it, the proxy reading `x-test-priority`."""
    async with serve(emulator.app) as upstream_url:
        app = create_app(settings_for(upstream_url, **sections))
        # Innermost of the proxy's middleware: inside the one that makes the request's record.
        app.user_middleware.append(Middleware(PriorityFromHeader))
        async with serve(app) as url, httpx2.AsyncClient(base_url=url, timeout=30) as http:
            yield http


async def ask(http: httpx2.AsyncClient, model: str, priority: int) -> float:
    """One chat completion for `model` at `priority`; when it was answered."""
    response = await http.post(
        "/v1/chat/completions",
        json={"model": model, "messages": MESSAGES},
        headers={"x-test-priority": str(priority)},
    )
    assert response.status_code == 200, response.text
    assert response.json()["model"] == model
    return anyio.current_time()


async def test_an_interactive_key_is_served_before_a_batch_job() -> None:
    """One slot: a batch key (priority 0) floods A and queues requests for C; an interactive
    key (priority 10) then asks for B. B goes ahead of C and is served within swap_grace + one
    A request + one swap; C's requests, queued first, are served after it."""
    load_s, grace, request_s = 0.8, 1.0, 0.1
    emulator = Emulator(load_delay_s=load_s, reply_tokens=5, token_delay_s=request_s / 5)
    sections = {"models": {"max_loaded": 1}, "scheduler": {"swap_grace": grace}}
    async with prioritized(emulator, **sections) as http:
        stop = anyio.Event()
        c_done: list[float] = []

        async def batch_on_a() -> None:
            while not stop.is_set():
                await ask(http, A, 0)

        async def batch_on_c() -> None:
            c_done.append(await ask(http, C, 0))

        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                await ask(http, A, 0)  # A is loaded
                for _ in range(3):
                    tg.start_soon(batch_on_a)
                await anyio.sleep(0.2)
                for _ in range(2):
                    tg.start_soon(batch_on_c)
                await anyio.sleep(0.1)  # C's requests wait, first in the queue
                started = anyio.current_time()
                b_done = await ask(http, B, 10)
                stop.set()
        waited = b_done - started
        # grace + one A request + unload (instant here) + load + B's own request, with slack
        assert waited < grace + request_s + load_s + request_s + 0.8, waited
        assert len(c_done) == 2
        assert all(b_done < done for done in c_done)  # B went ahead of the batch's C
        assert emulator.load_count(B) == 1


async def test_aging_serves_a_low_priority_request_behind_a_steady_stream() -> None:
    """One slot; a stream of priority 1 alternates between A and B (so one of them always
    waits for a load, ahead of anything of priority 0) for far longer than the bound; a
    request of priority 0 for C is served within its bound: priority_aging (after which no
    new request is ahead of it) + three swaps, each at most swap_grace + one request + one
    unload and one load."""
    load_s, grace, request_s, aging = 0.2, 0.3, 0.05, 1.0
    emulator = Emulator(load_delay_s=load_s, reply_tokens=5, token_delay_s=request_s / 5)
    sections = {
        "models": {"max_loaded": 1},
        "scheduler": {"swap_grace": grace, "priority_aging": aging},
    }
    bound = aging + 3 * (grace + request_s + load_s) + request_s
    stream_s = 3 * bound  # without aging, C would wait this long
    async with prioritized(emulator, **sections) as http:
        with anyio.fail_after(stream_s + 20):
            async with anyio.create_task_group() as tg:
                await ask(http, A, 1)
                start = anyio.current_time()

                async def stream() -> None:
                    i = 0
                    while anyio.current_time() - start < stream_s:
                        tg.start_soon(ask, http, (A, B)[i % 2], 1)
                        i += 1
                        await anyio.sleep(0.05)

                tg.start_soon(stream)
                await anyio.sleep(0.5)  # the stream is going: A and B take turns
                started = anyio.current_time()
                c_done = await ask(http, C, 0)
                stream_left = stream_s - (c_done - start)
        waited = c_done - started
        assert waited < bound + 1.0, (waited, bound)  # with slack for a shared machine
        assert stream_left > 0  # served while the stream of higher priority still ran
