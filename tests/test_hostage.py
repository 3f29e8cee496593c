"""Never held hostage (issue 13): a client that leaves frees its model at once, a request of the
wrong kind is refused before any load, a dropped connection is LM Studio unavailable, and
`/readyz` follows LM Studio's answers."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx2
import openai
import pytest
from anyio.abc import Process

from proxy.config import Settings
from proxy.emulator import Emulator
from proxy.errors import UpstreamUnavailableError
from proxy.manager import ModelManager
from proxy.metrics import Metrics
from proxy.server import free_port
from tests.helpers import MESSAGES, NOMIC, QWEN, ScriptedLMStudio, proxy_for, serve

# --- bug 6: LM Studio killed with requests in flight --------------------------------------------


@asynccontextmanager
async def emulator_process(*options: str) -> AsyncIterator[tuple[str, Process]]:
    """`lmswitch emulator` in a child process (to be killed), once it answers; its URL."""
    port = free_port()
    command = [sys.executable, "-m", "proxy", "emulator", "--port", str(port), "--quiet"]
    process = await anyio.open_process(
        [*command, *options], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    async with process, httpx2.AsyncClient(base_url=url, timeout=2) as http:
        try:
            with anyio.fail_after(15):  # a cold interpreter importing the emulator
                while True:
                    try:
                        if (await http.get("/lmstudio-greeting")).status_code == 200:
                            break
                    except httpx2.TransportError:  # not listening yet
                        pass
                    await anyio.sleep(0.05)
            yield url, process
        finally:
            with anyio.move_on_after(5, shield=True):
                if process.returncode is None:
                    process.kill()
                await process.wait()


async def test_requests_in_flight_when_lm_studio_is_killed_get_503_with_retry_after() -> None:
    """LM Studio killed mid-answer drops its connections unanswered: each request gets 503
    upstream_unavailable with Retry-After, and the proxy sees LM Studio unreachable."""
    options = ("--load-delay", "0", "--token-delay", "0.1", "--reply-tokens", "100")
    async with emulator_process(*options) as (url, process), proxy_for(url) as proxy:
        await proxy.sdk.chat.completions.create(model=QWEN, messages=MESSAGES, max_tokens=1)
        errors: list[openai.APIStatusError] = []

        async def ask() -> None:
            with pytest.raises(openai.APIStatusError) as caught:
                await proxy.sdk.chat.completions.create(model=QWEN, messages=MESSAGES)
            errors.append(caught.value)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(ask)
                await proxy.wait_for(lambda status: status["in_flight"] == 3)
                await anyio.sleep(0.3)  # the requests reach LM Studio (it answers in 10 s)
                process.kill()
        for error in errors:
            assert error.status_code == 503
            assert error.code == "upstream_unavailable"
            assert error.response.headers["retry-after"] == "5"
        assert len(errors) == 3
        status = await proxy.status()
        assert status["upstream"]["reachable"] is False
        assert status["in_flight"] == 0


# --- bug 7: /readyz follows LM Studio's answers -------------------------------------------------


async def test_readyz_turns_503_while_lm_studio_does_not_answer_and_back() -> None:
    """Ready with LM Studio up; 503 with the reason once calls to it fail; ready again once
    it answers, within a few poll intervals."""
    port = free_port()
    emulator = Emulator()
    async with proxy_for(f"http://127.0.0.1:{port}", upstream={"poll_interval": 0.2}) as proxy:
        async with serve(emulator.app, port=port):
            await proxy.wait_ready()
            ready = await proxy.http.get("/readyz")
            assert ready.json() == {"status": "ready", "upstream_reachable": True}
        with anyio.fail_after(2):
            while (response := await proxy.http.get("/readyz")).status_code == 200:  # noqa: ASYNC110 - state seen over HTTP
                await anyio.sleep(0.05)
        assert response.status_code == 503
        doc = response.json()
        assert doc["upstream_reachable"] is False
        assert f"127.0.0.1:{port}" in doc["status"]
        async with serve(emulator.app, port=port):
            with anyio.fail_after(1):
                await proxy.wait_ready()


async def test_readiness_says_why_while_lm_studio_is_unreachable() -> None:
    """A request that found LM Studio gone makes the manager unready at once, with a reason,
    and the read it starts makes it ready again once LM Studio answers."""
    lmstudio = ScriptedLMStudio({QWEN: 4_000_000_000, NOMIC: 100_000_000})
    manager = ModelManager(lmstudio, Settings(), Metrics())
    async with anyio.create_task_group() as tg:
        await tg.start(manager.run)
        with anyio.fail_after(2):
            while manager.readiness() is not None:  # noqa: ASYNC110 - no event for it
                await anyio.sleep(0.001)
        manager.upstream_failed(UpstreamUnavailableError("gone", retry_after_s=5))
        assert manager.readiness() == "LM Studio did not answer the last call to it"
        with anyio.fail_after(2):
            while manager.readiness() is not None:  # noqa: ASYNC110 - no event for it
                await anyio.sleep(0.001)
        tg.cancel_scope.cancel()
