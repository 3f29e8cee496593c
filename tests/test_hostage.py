"""Never held hostage (issue 13): a client that leaves frees its model at once, a request of the
wrong kind is refused before any load, a dropped connection is LM Studio unavailable, and
`/readyz` follows LM Studio's answers."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import httpx2
import openai
import pytest
from anyio.abc import Process
from starlette.types import Message

from proxy.access import AccessLine
from proxy.bodies import ClientWatch
from proxy.config import Settings
from proxy.emulator import Emulator
from proxy.errors import BadRequestError, UpstreamUnavailableError
from proxy.manager import ModelManager
from proxy.metrics import Metrics
from proxy.server import free_port
from tests.helpers import (
    LLAMA,
    MESSAGES,
    NOMIC,
    QWEN,
    Proxy,
    ScriptedLMStudio,
    proxy_for,
    running,
    serve,
)


def access_lines(caplog: pytest.LogCaptureFixture, model: str) -> list[dict[str, Any]]:
    """The access lines' fields of the requests for `model`."""
    return [
        record.msg.fields
        for record in caplog.records
        if record.name == "lmswitch.access"
        and isinstance(record.msg, AccessLine)
        and record.msg.fields["model"] == model
    ]


async def leave_after(proxy: Proxy, seconds: float, **request: Any) -> float:
    """Ask for a chat answer as the openai SDK does, give up after `seconds`; when it left."""
    impatient = proxy.sdk.with_options(timeout=seconds)
    with pytest.raises(openai.APITimeoutError):
        await impatient.chat.completions.create(model=QWEN, messages=MESSAGES, **request)
    return anyio.current_time()


async def served_quickly(proxy: Proxy, left_at: float) -> float:
    """Ask for another model (a short answer); how long after `left_at` it was served."""
    with anyio.fail_after(5):
        reply = await proxy.sdk.chat.completions.create(
            model=LLAMA, messages=MESSAGES, max_tokens=2
        )
    assert reply.model == LLAMA
    return anyio.current_time() - left_at


# --- bug 3: a client that leaves before LM Studio's answer starts ------------------------------


async def test_a_client_that_leaves_a_long_answer_frees_its_model_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A non-streamed answer that takes 10 s, its client gone after 0.5 s: the upstream request
    is abandoned (LM Studio stops generating), the lease freed at once, and the next model is
    served without waiting for the rest of the generation."""
    caplog.set_level(logging.INFO, logger="lmswitch.access")
    emulator = Emulator(token_delay_s=0.1, reply_tokens=100)
    async with running(emulator, models={"max_loaded": 1}) as proxy:
        left_at = await leave_after(proxy, 0.5)
        with anyio.fail_after(0.5):
            await proxy.wait_for(lambda status: status["in_flight"] == 0)
        await emulator.wait_until(lambda: emulator.predictions_aborted == 1, timeout=0.5)
        assert await served_quickly(proxy, left_at) < 3
        assert list(emulator.instances) == [LLAMA]
    [line] = access_lines(caplog, QWEN)
    assert (line["status"], line["disconnected"]) == (499, True)


async def test_a_stream_left_before_its_first_byte_frees_its_model_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stream whose client leaves while LM Studio still reads the prompt (no byte sent yet)
    is abandoned: the lease is freed at once, and LM Studio stops once the prompt is read."""
    caplog.set_level(logging.INFO, logger="lmswitch.access")
    emulator = Emulator()
    emulator.prompt_delay_s = 1.5
    async with running(emulator, models={"max_loaded": 1}) as proxy:
        left_at = await leave_after(proxy, 0.5, stream=True)
        emulator.prompt_delay_s = 0.0  # the next request's prompt is quick
        with anyio.fail_after(0.5):
            await proxy.wait_for(lambda status: status["in_flight"] == 0)
        assert await served_quickly(proxy, left_at) < 1
        await emulator.wait_until(lambda: emulator.predictions_aborted == 1, timeout=2)
        assert emulator.streams_closed_early == 0  # the stream never started
    [line] = access_lines(caplog, QWEN)
    assert (line["status"], line["disconnected"]) == (499, True)


async def test_a_client_that_leaves_a_silent_lm_studio_frees_its_model_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Against an LM Studio that never answers, a client that leaves does not hold the lease
    until `upstream.read_timeout`."""
    caplog.set_level(logging.INFO, logger="lmswitch.access")
    emulator = Emulator()
    async with running(emulator) as proxy:
        await proxy.sdk.chat.completions.create(model=QWEN, messages=MESSAGES)  # loaded
        emulator.silent = True
        try:
            await leave_after(proxy, 0.5)
            with anyio.fail_after(0.5):
                await proxy.wait_for(lambda status: status["in_flight"] == 0)
        finally:
            emulator.silent = False
    statuses = [(line["status"], line["disconnected"]) for line in access_lines(caplog, QWEN)]
    assert statuses == [(200, False), (499, True)]


# --- bug 5: a request of the wrong kind for its model ------------------------------------------

WRONG_KIND = [
    ("/v1/chat/completions", {"model": NOMIC, "messages": MESSAGES}),
    ("/v1/completions", {"model": NOMIC, "prompt": "Say hello"}),
    ("/v1/responses", {"model": NOMIC, "input": "Say hello"}),
    ("/v1/messages", {"model": NOMIC, "max_tokens": 8, "messages": MESSAGES}),
    ("/v1/messages/count_tokens", {"model": NOMIC, "messages": MESSAGES}),
    ("/v1/embeddings", {"model": QWEN, "input": "hello"}),
    ("/v1/chat/completions", {"model": "embedder", "messages": MESSAGES}),  # an alias
]


@pytest.mark.parametrize(("path", "body"), WRONG_KIND)
async def test_a_request_of_the_wrong_kind_is_refused_before_any_load(
    path: str, body: dict[str, Any]
) -> None:
    """The catalogue says each model's type: a request the model cannot answer is a 400 in the
    route's envelope, and the loaded model stays loaded."""
    emulator = Emulator()
    async with running(emulator, models={"aliases": {"embedder": NOMIC}}) as proxy:
        await proxy.sdk.chat.completions.create(model=LLAMA, messages=MESSAGES)
        loads, calls = emulator.load_count(), len(emulator.calls)
        response = await proxy.http.post(path, json=body)
        assert response.status_code == 400
        doc = response.json()
        if path.startswith("/v1/messages"):
            assert doc["type"] == "error"
            assert doc["error"]["type"] == "invalid_request_error"
            message = doc["error"]["message"]
        else:
            error = doc["error"]
            assert (error["code"], error["param"]) == ("model_wrong_type", "model")
            message = error["message"]
        model, needed = (QWEN, "embedding") if path == "/v1/embeddings" else (NOMIC, "'llm'")
        assert model in message
        assert needed in message
        assert path in message
        assert emulator.load_count() == loads
        assert list(emulator.instances) == [LLAMA]
        assert not [call for call in emulator.calls[calls:] if call.path.startswith("/v1/")]


async def test_the_sdk_reads_the_wrong_kind_as_a_bad_request() -> None:
    """As an openai SDK user meets it: chat from an embedding model, embeddings from a chat
    model, each a `BadRequestError` with the code, and no load."""
    emulator = Emulator()
    async with running(emulator) as proxy:
        with pytest.raises(openai.BadRequestError) as chat:
            await proxy.sdk.chat.completions.create(model=NOMIC, messages=MESSAGES)
        with pytest.raises(openai.BadRequestError) as embeddings:
            await proxy.sdk.embeddings.create(model=QWEN, input="hello")
        assert emulator.load_count() == 0
    assert (chat.value.code, chat.value.param) == ("model_wrong_type", "model")
    assert (embeddings.value.code, embeddings.value.param) == ("model_wrong_type", "model")
    assert "embedding model" in chat.value.message
    assert "embedding model" in embeddings.value.message


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
    manager = ModelManager({"default": lmstudio}, Settings(), Metrics())
    async with anyio.create_task_group() as tg:
        await tg.start(manager.run)
        with anyio.fail_after(2):
            while manager.readiness() is not None:  # noqa: ASYNC110 - no event for it
                await anyio.sleep(0.001)
        assert (manager.model_type(QWEN), manager.model_type(NOMIC)) == ("llm", "embedding")
        assert manager.model_type("not-downloaded") is None
        manager.upstream_failed("default", UpstreamUnavailableError("gone", retry_after_s=5))
        assert manager.readiness() == "LM Studio did not answer the last call to it"
        with anyio.fail_after(2):
            while manager.readiness() is not None:  # noqa: ASYNC110 - no event for it
                await anyio.sleep(0.001)
        tg.cancel_scope.cancel()


# --- the watch itself ---------------------------------------------------------------------------


class Messages:
    """A request's `receive`: the messages given, then (once `leave` is set) the disconnect."""

    def __init__(self, *messages: Message) -> None:
        self._messages = list(messages)
        self.leave = anyio.Event()

    async def __call__(self) -> Message:
        if self._messages:
            return self._messages.pop(0)
        await self.leave.wait()
        return {"type": "http.disconnect"}


async def test_the_watch_cancels_its_block_when_the_client_leaves() -> None:
    receive = Messages({"type": "http.request", "body": b"", "more_body": False})
    with anyio.fail_after(1):
        async with ClientWatch(receive) as watch:
            watch.start()
            receive.leave.set()
            await anyio.sleep_forever()
    assert watch.gone


async def test_the_watch_lets_an_exception_through_as_it_is() -> None:
    """Not wrapped in an ExceptionGroup, so the app's handlers still see a `ProxyError`."""
    watch = ClientWatch(Messages())

    async def refuse() -> None:
        async with watch:
            watch.start()
            await anyio.lowlevel.checkpoint()  # the watcher waits
            raise BadRequestError("no")

    with anyio.fail_after(1), pytest.raises(BadRequestError):
        await refuse()
    assert not watch.gone


async def test_a_client_that_leaves_after_the_last_byte_has_not_disconnected() -> None:
    receive = Messages()
    with anyio.fail_after(1):
        async with ClientWatch(receive) as watch:
            watch.start()
            watch.complete = True
            receive.leave.set()  # as uvicorn answers `receive` once the response is sent
    assert not watch.gone
