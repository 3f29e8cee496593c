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

from proxy.server import free_port
from tests.helpers import MESSAGES, QWEN, proxy_for

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
