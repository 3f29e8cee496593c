"""Feedback while a streaming request waits for its model (DESIGN §11.2), over real sockets: LM
Studio's emulator behind a recorder of the bytes it sends, the proxy in front, and the openai and
anthropic SDKs (and raw HTTP) as clients."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anthropic
import anyio
import httpx2
import openai
import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.emulator import Emulator
from proxy.feedback import describe
from proxy.leases import Progress
from tests.helpers import LLAMA, MESSAGES, QWEN, Proxy, proxy_for, serve

CHAT = {"model": QWEN, "messages": MESSAGES, "stream": True}


class Recorder:
    """An ASGI pass-through in front of the emulator that keeps the body bytes of its answers
    to `/v1/*` requests: what LM Studio sent."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.sent = bytearray()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def recording(message: Message) -> None:
            if message["type"] == "http.response.body" and scope["path"].startswith("/v1/"):
                self.sent += message.get("body", b"")
            await send(message)

        await self.app(scope, receive, recording)


@asynccontextmanager
async def feedback_proxy(
    emulator: Emulator, *, mode: str = "comments", after: float = 0.5, **sections: Any
) -> AsyncIterator[tuple[Proxy, Recorder]]:
    recorder = Recorder(emulator.app)
    scheduler = {"loading_feedback": mode, "loading_feedback_after": after}
    scheduler |= sections.pop("scheduler", {})
    async with serve(recorder) as url, proxy_for(url, scheduler=scheduler, **sections) as proxy:
        await proxy.wait_ready()
        yield proxy, recorder


async def raw_stream(proxy: Proxy, path: str, body: dict[str, Any]) -> httpx2.Response:
    """POST `body` and read the whole streamed answer (the body's bytes as they came)."""
    async with proxy.http.stream("POST", path, json=body, timeout=30) as response:
        await response.aread()
    return response


def split_feedback(body: bytes) -> tuple[list[bytes], bytes]:
    """The leading lines of progress (comment events) and the rest of a stream."""
    comments: list[bytes] = []
    rest = body
    while rest.startswith(b": "):
        event, _, rest = rest.partition(b"\n\n")
        comments.append(event)
    return comments, rest


def chat_text(stream: bytes) -> str:
    """The content an OpenAI chat stream carries, from its bytes."""
    text = ""
    for line in stream.split(b"\n"):
        if line.startswith(b"data: {"):
            for choice in json.loads(line[6:])["choices"]:
                text += choice["delta"].get("content") or ""
    return text


def counted(metrics_text: str, status: int, model: str = QWEN) -> float:
    """`lmswitch_requests_total` for chat completions of `model` with `status`."""
    for line in metrics_text.splitlines():
        if (
            line.startswith("lmswitch_requests_total{")
            and f'model="{model}"' in line
            and 'endpoint="/v1/chat/completions"' in line
            and f'status="{status}"' in line
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def sdk_stream_error(proxy: Proxy) -> openai.APIError:
    """The error the openai SDK raises while it reads a chat stream."""
    stream = await proxy.sdk.chat.completions.create(
        model=QWEN, messages=MESSAGES, stream=True, timeout=30
    )
    with pytest.raises(openai.APIError) as caught:
        async for _chunk in stream:
            pass
    return caught.value


def access_fields(caplog: pytest.LogCaptureFixture) -> list[dict[str, str]]:
    lines = [r.getMessage() for r in caplog.records if r.name == "lmswitch.access"]
    return [dict(pair.split("=", 1) for pair in line.split(" ")) for line in lines]


async def test_a_slow_load_sends_comments_then_lm_studios_stream_byte_for_byte() -> None:
    emulator = Emulator(load_delay_s=3.0)
    async with feedback_proxy(emulator, after=1.0) as (proxy, recorder):
        response = await raw_stream(proxy, "/v1/chat/completions", CHAT)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    comments, rest = split_feedback(response.content)
    # At 1 s and 3 s into a 3 s load (give or take the emulator's scheduling): one or two.
    assert 1 <= len(comments) <= 2, comments
    assert comments[0].startswith(f": lmswitch: loading model {QWEN}: 1 s waited".encode())
    assert b"no estimate yet, 0 requests ahead" in comments[0]  # its first load: nothing learned
    assert rest == bytes(recorder.sent)  # LM Studio's stream, byte for byte
    assert rest.endswith(b"data: [DONE]\n\n")


async def test_the_openai_sdk_reads_lm_studios_text_through_the_comments() -> None:
    emulator = Emulator(load_delay_s=2.0)
    async with feedback_proxy(emulator) as (proxy, recorder):
        stream = await proxy.sdk.chat.completions.create(
            model=QWEN, messages=MESSAGES, stream=True, timeout=30
        )
        text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
    assert b": lmswitch: loading model" not in recorder.sent
    assert text == chat_text(bytes(recorder.sent))
    assert text  # LM Studio said something


async def test_the_anthropic_sdk_streams_messages_through_pings() -> None:
    emulator = Emulator(load_delay_s=2.0)
    async with feedback_proxy(emulator) as (proxy, recorder):
        async with (
            anthropic.AsyncAnthropic(
                base_url=proxy.url, api_key="sk-test", max_retries=0, timeout=30
            ) as client,
            client.messages.stream(model=QWEN, max_tokens=64, messages=MESSAGES) as stream,
        ):
            text = await stream.get_final_text()
        raw = await raw_stream(
            proxy,
            "/v1/messages",
            {"model": LLAMA, "max_tokens": 64, "messages": MESSAGES, "stream": True},
        )
    sent = "".join(
        json.loads(line[6:])["delta"].get("text", "")
        for line in bytes(recorder.sent).decode().splitlines()
        if line.startswith("data: ") and '"content_block_delta"' in line
    )
    assert text
    assert text in sent  # the first of the two streams LM Studio sent
    # A stream of pings, each with its line of progress as a comment, then LM Studio's events.
    pings = raw.content.split(b"event: message_start")[0]
    assert b"event: ping\n" in pings
    assert f": lmswitch: loading model {LLAMA}".encode() in pings


async def test_reasoning_mode_sends_reasoning_content_chunks_then_the_answer() -> None:
    emulator = Emulator(load_delay_s=2.0)
    async with feedback_proxy(emulator, mode="reasoning") as (proxy, recorder):
        stream = await proxy.sdk.chat.completions.create(
            model=QWEN, messages=MESSAGES, stream=True, timeout=30
        )
        chunks = [chunk async for chunk in stream]
    thoughts = [
        (chunk.choices[0].delta.model_extra or {}).get("reasoning_content") for chunk in chunks
    ]
    fed = [t for t in thoughts if t and t.startswith("lmswitch: ")]
    assert fed, thoughts
    assert fed[0].startswith(f"lmswitch: loading model {QWEN}: 0 s waited")
    assert all(t.endswith("\n") for t in fed)
    first_answer = next(i for i, c in enumerate(chunks) if c.choices[0].delta.content)
    assert all(i < first_answer for i, t in enumerate(thoughts) if t in fed)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert text == chat_text(bytes(recorder.sent))


async def test_a_load_that_fails_after_feedback_began_is_an_error_not_a_200(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="lmswitch.access")
    emulator = Emulator(load_delay_s=1.5)
    emulator.fail_next_loads = 1
    async with feedback_proxy(emulator) as (proxy, _):
        caught = await sdk_stream_error(proxy)
        metrics = (await proxy.http.get("/metrics")).text
    assert f"LM Studio failed to load model {QWEN!r}" in caught.message
    (line,) = [f for f in access_fields(caplog) if f.get("endpoint") == "/v1/chat/completions"]
    assert line["status"] == "503"
    assert int(line["feedback"]) >= 1
    assert counted(metrics, 503) == 1
    assert counted(metrics, 200) == 0


async def test_a_queue_timeout_after_feedback_began_is_an_error_not_a_200(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="lmswitch.access")
    emulator = Emulator(load_delay_s=5.0)
    async with feedback_proxy(emulator, scheduler={"queue_timeout": 2.0}) as (proxy, _):
        response = await raw_stream(proxy, "/v1/chat/completions", CHAT)
        caught = await sdk_stream_error(proxy)
        metrics = (await proxy.http.get("/metrics")).text
    comments, rest = split_feedback(response.content)
    assert comments
    error = json.loads(rest.removeprefix(b"data: "))["error"]
    assert error["message"] == f"timed out after 2 s waiting for model {QWEN!r}"
    assert caught.message == error["message"]
    statuses = [
        f["status"] for f in access_fields(caplog) if f.get("endpoint") == "/v1/chat/completions"
    ]
    assert statuses == ["503", "503"]
    assert counted(metrics, 503) == 2
    assert counted(metrics, 200) == 0


async def test_feedback_off_is_lm_studios_answer_byte_for_byte() -> None:
    emulator = Emulator(load_delay_s=1.5)
    async with feedback_proxy(emulator, mode="off") as (proxy, recorder):
        response = await raw_stream(proxy, "/v1/chat/completions", CHAT)
    assert response.content == bytes(recorder.sent)
    assert not response.content.startswith(b":")


async def test_a_load_done_before_feedback_after_sends_no_comment() -> None:
    emulator = Emulator(load_delay_s=0.3)
    async with feedback_proxy(emulator, after=1.0) as (proxy, recorder):
        response = await raw_stream(proxy, "/v1/chat/completions", CHAT)
        assert response.content == bytes(recorder.sent)
        # A load that fails in time is the plain error answer, as without feedback.
        emulator.fail_next_loads = 1
        failed = await proxy.http.post("/v1/chat/completions", json={**CHAT, "model": LLAMA})
    assert failed.status_code == 503
    assert failed.json()["error"]["code"] == "model_load_failed"


async def test_a_request_behind_another_models_load_is_told_its_place() -> None:
    emulator = Emulator(load_delay_s=1.5, reply_tokens=3)
    async with feedback_proxy(emulator, models={"max_loaded": 1}, scheduler={"swap_grace": 0}) as (
        proxy,
        _,
    ):
        results: dict[str, bytes] = {}
        status: dict[str, Any] = {}

        async def ask(model: str) -> None:
            response = await raw_stream(proxy, "/v1/chat/completions", {**CHAT, "model": model})
            results[model] = response.content

        async with anyio.create_task_group() as tg:
            tg.start_soon(ask, QWEN)
            await proxy.wait_for(lambda s: s["waiting"] and s["waiting"][0]["model"] == QWEN)
            tg.start_soon(ask, LLAMA)
            await proxy.wait_for(lambda s: len(s["waiting"]) == 2)
            status = await proxy.status()
    first, second = status["waiting"]
    assert (first["model"], first["position"], first["state"]) == (QWEN, 1, "loading")
    assert (first["waiting"], first["ahead"]) == (1, 0)
    assert (second["model"], second["position"], second["ahead"]) == (LLAMA, 2, 1)
    comments, _ = split_feedback(results[LLAMA])
    assert b"waiting for its turn to load model " + LLAMA.encode() in comments[0]
    assert comments[0].endswith(b"1 request ahead")
    assert chat_text(results[QWEN])
    assert chat_text(results[LLAMA])


async def test_a_client_that_leaves_during_feedback_is_a_499_and_frees_its_place(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="lmswitch.access")
    emulator = Emulator(load_delay_s=2.0)
    async with feedback_proxy(emulator) as (proxy, _):
        async with proxy.http.stream("POST", "/v1/chat/completions", json=CHAT) as response:
            assert response.status_code == 200
            with anyio.fail_after(5):
                first = await response.aiter_raw().__anext__()
            assert first.startswith(b": lmswitch: ")
        await proxy.wait_for(lambda s: not s["queue"])  # it left the queue at once
        await proxy.wait_for(lambda s: not s["waiting"])  # and the load went on to its end
    (line,) = [f for f in access_fields(caplog) if f.get("endpoint") == "/v1/chat/completions"]
    assert (line["status"], line["disconnected"]) == ("499", "True")


async def test_the_expected_load_time_is_learned_from_three_loads() -> None:
    emulator = Emulator(load_delay_s=0.6)
    async with feedback_proxy(emulator) as (proxy, _):
        taken = []
        for _ in range(3):
            started = anyio.current_time()
            loaded = await proxy.http.post("/api/v1/models/load", json={"model_id": QWEN})
            assert loaded.status_code == 200
            taken.append(anyio.current_time() - started)
            unloaded = await proxy.http.post("/api/v1/models/unload", json={"model_id": QWEN})
            assert unloaded.status_code == 200
        rows = {row["id"]: row for row in (await proxy.http.get("/api/v1/models")).json()}
        # Another model, never loaded, is estimated from its size at the speed seen.
        other = rows[LLAMA]
    expected = rows[QWEN]["expected_load_s"]
    real = sorted(taken)[1]
    assert abs(expected - real) <= 0.2 * real, (expected, taken)
    speed = rows[QWEN]["size_bytes"] / expected
    assert other["expected_load_s"] == pytest.approx(other["size_bytes"] / speed, rel=0.01)
    assert rows[QWEN]["loading_s"] is None


async def test_loading_events_and_rows_carry_the_expected_time() -> None:
    emulator = Emulator(load_delay_s=0.8)
    async with feedback_proxy(emulator) as (proxy, _):
        loaded = await proxy.http.post("/api/v1/models/load", json={"model_id": QWEN})
        assert loaded.status_code == 200
        await proxy.http.post("/api/v1/models/unload", json={"model_id": QWEN})
        event: dict[str, Any] = {}
        seen = anyio.Event()

        async def watch(stream: httpx2.Response) -> None:
            async for line in stream.aiter_lines():
                if line.startswith("data: ") and '"state": "loading"' in line:
                    event.update(json.loads(line[6:]))
                    seen.set()
                    return

        async def load() -> None:
            await proxy.http.post("/api/v1/models/load", json={"model_id": QWEN})

        async with (
            proxy.http.stream("GET", "/api/v1/events") as stream,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(watch, stream)
            tg.start_soon(load)
            with anyio.fail_after(5):
                await seen.wait()
            rows = (await proxy.http.get("/api/v1/models")).json()
            tg.cancel_scope.cancel()
    row = next(r for r in rows if r["id"] == QWEN)
    assert event["expected_load_s"] == pytest.approx(0.8, rel=0.2)
    assert row["state"] == "loading"
    assert 0 <= row["loading_s"] < 0.8
    assert row["expected_load_s"] == event["expected_load_s"]


def test_a_line_of_progress_says_what_it_waits_for() -> None:
    def line(loading: bool = True, ahead: int = 0, expected_s: float | None = 30.2) -> str:
        return describe(Progress(QWEN, "desk", 5.7, loading, expected_s, ahead), pool=False)

    assert line() == (
        f"lmswitch: loading model {QWEN}: 5 s waited, about 31 s expected in all, 0 requests ahead"
    )
    assert line(loading=False, ahead=1, expected_s=None) == (
        f"lmswitch: waiting for its turn to load model {QWEN}: 5 s waited, no estimate yet, "
        "1 request ahead"
    )
    assert line(loading=False).startswith(f"lmswitch: waiting for model {QWEN}: ")
    pooled = describe(Progress(QWEN, "desk", 1.0, True, None, 3), pool=True)
    assert pooled.startswith(f"lmswitch: loading model {QWEN} on desk: 1 s waited")
    assert pooled.endswith("3 requests ahead")
