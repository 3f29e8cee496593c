"""The proxy end to end: real sockets, the emulator upstream, the openai SDK as the client."""

from __future__ import annotations

import json

import anyio
import openai
import pytest

from proxy.emulator import Emulator
from proxy.server import free_port
from tests.helpers import LLAMA, MESSAGES, NOMIC, QWEN, proxy_for, running, serve


async def test_chat_non_streaming_through_the_sdk() -> None:
    """A plain chat completion loads the model and relays LM Studio's answer."""
    emulator = Emulator()
    async with running(emulator) as proxy:
        reply = await proxy.sdk.chat.completions.create(model=QWEN, messages=MESSAGES)
        assert reply.model == QWEN
        assert reply.choices[0].message.content
        assert reply.usage is not None
        assert reply.usage.completion_tokens == emulator.reply_tokens
        assert emulator.load_count(QWEN) == 1
        assert (await proxy.status())["loaded"] == [QWEN]


async def test_chat_streaming_through_the_sdk() -> None:
    """Streamed chunks arrive in order, with the usage chunk when asked for."""
    emulator = Emulator(reply_tokens=8)
    async with running(emulator) as proxy:
        stream = await proxy.sdk.chat.completions.create(
            model=QWEN,
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert len(text.split()) == 8
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 8
        metrics = (await proxy.http.get("/metrics")).text
        assert f'lmswitch_tokens_total{{kind="completion",model="{QWEN}"}} 8.0' in metrics


async def test_stream_chunks_are_relayed_as_they_arrive() -> None:
    """Each upstream chunk reaches the client before the next one is produced."""
    emulator = Emulator(reply_tokens=3, token_delay_s=0.6)
    body = {"model": QWEN, "messages": MESSAGES, "stream": True}
    async with running(emulator) as proxy:
        await proxy.sdk.chat.completions.create(model=QWEN, messages=MESSAGES)  # loaded
        async with proxy.http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["x-accel-buffering"] == "no"
            with anyio.fail_after(0.5):  # well before the 0.6 s the second token takes
                lines = response.aiter_lines()
                first = await anext(lines)
            assert first.startswith("data: ")
            assert '"role":"assistant"' in first.replace(" ", "")
            rest = [line async for line in lines if line]
        assert rest[-1] == "data: [DONE]"


async def test_embeddings_through_the_sdk() -> None:
    emulator = Emulator()
    async with running(emulator) as proxy:
        result = await proxy.sdk.embeddings.create(model=NOMIC, input=["one", "two"])
        assert len(result.data) == 2
        assert len(result.data[0].embedding) > 100
        assert emulator.load_count(NOMIC) == 1


async def test_anthropic_messages_are_routed_by_model() -> None:
    """`/v1/messages` (LM Studio's Anthropic API) is routed and streamed like the others."""
    emulator = Emulator(reply_tokens=5)
    body = {"model": LLAMA, "max_tokens": 64, "messages": MESSAGES}
    async with running(emulator) as proxy:
        response = await proxy.http.post("/v1/messages", json=body)
        assert response.status_code == 200
        message = response.json()
        assert message["type"] == "message"
        assert message["content"][0]["type"] == "text"
        assert message["usage"]["output_tokens"] == 5
        streamed = await proxy.http.post("/v1/messages", json={**body, "stream": True})
        events = [line[7:] for line in streamed.text.splitlines() if line.startswith("event: ")]
        assert events[0] == "message_start"
        assert events[-1] == "message_stop"
        counted = await proxy.http.post("/v1/messages/count_tokens", json=body)
        assert counted.json()["input_tokens"] > 0
        assert emulator.load_count(LLAMA) == 1


async def test_models_lists_catalogue_and_aliases() -> None:
    emulator = Emulator()
    async with running(emulator, models={"aliases": {"gpt-4o-mini": QWEN}}) as proxy:
        ids = [model.id async for model in proxy.sdk.models.list()]
        assert set(emulator.catalog) | {"gpt-4o-mini"} == set(ids)
        one = (await proxy.http.get(f"/v1/models/{QWEN}")).json()
        assert one["id"] == QWEN
        assert one["object"] == "model"
        assert one["loaded"] is False
        alias = await proxy.sdk.models.retrieve("gpt-4o-mini")
        assert alias.id == "gpt-4o-mini"
        with pytest.raises(openai.NotFoundError):
            await proxy.sdk.models.retrieve("no-such-model")


async def test_alias_is_rewritten_and_default_fills_in() -> None:
    """An alias reaches LM Studio as the real key; a request without model uses the default."""
    emulator = Emulator()
    sections = {"models": {"aliases": {"gpt-4o-mini": QWEN}, "default": LLAMA, "max_loaded": 2}}
    async with running(emulator, **sections) as proxy:
        reply = await proxy.sdk.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert reply.model == QWEN
        sent = [c for c in emulator.calls if c.path == "/v1/chat/completions"][-1]
        assert isinstance(sent.body, dict)
        assert sent.body["model"] == QWEN
        response = await proxy.http.post("/v1/chat/completions", json={"messages": MESSAGES})
        assert response.status_code == 200
        assert response.json()["model"] == LLAMA


async def test_missing_model_without_default_is_a_400() -> None:
    async with running(Emulator()) as proxy:
        response = await proxy.http.post("/v1/chat/completions", json={"messages": MESSAGES})
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "model"


async def test_unknown_model_raises_not_found() -> None:
    emulator = Emulator()
    async with running(emulator) as proxy:
        with pytest.raises(openai.NotFoundError) as caught:
            await proxy.sdk.chat.completions.create(model="gpt-5-turbo", messages=MESSAGES)
        assert caught.value.code == "model_not_found"
        assert QWEN in caught.value.message
        assert emulator.load_count() == 0


@pytest.mark.parametrize(
    ("body", "needle"),
    [(b'{"model": "x", ', "not valid JSON"), (b'["model"]', "must be a JSON object")],
)
async def test_bad_bodies_get_400(body: bytes, needle: str) -> None:
    async with running(Emulator()) as proxy:
        response = await proxy.http.post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400
        error = response.json()["error"]
        assert needle in error["message"]
        assert error["type"] == "invalid_request_error"
        assert response.headers["x-request-id"]


async def test_request_id_is_kept_or_made() -> None:
    async with running(Emulator()) as proxy:
        mine = await proxy.http.get("/v1/models", headers={"x-request-id": "abc-123"})
        assert mine.headers["x-request-id"] == "abc-123"
        made = await proxy.http.get("/v1/models")
        assert len(made.headers["x-request-id"]) >= 16


async def test_concurrent_requests_for_one_model_cause_one_load() -> None:
    """Ten requests for an unloaded model share a single load (single-flight)."""
    emulator = Emulator(load_delay_s=0.3)
    async with running(emulator) as proxy:
        replies: list[str | None] = []

        async def ask() -> None:
            reply = await proxy.sdk.chat.completions.create(model=QWEN, messages=MESSAGES)
            replies.append(reply.choices[0].message.content)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for _ in range(10):
                    tg.start_soon(ask)
        assert len(replies) == 10
        assert all(replies)
        assert emulator.load_count(QWEN) == 1
        assert list(emulator.instances) == [QWEN]


async def test_swap_unloads_a_then_loads_b() -> None:
    """With one slot, asking for B after A unloads A and loads B."""
    emulator = Emulator()
    async with running(emulator, models={"max_loaded": 1}) as proxy:
        await proxy.sdk.chat.completions.create(model=QWEN, messages=MESSAGES)
        await proxy.sdk.chat.completions.create(model=LLAMA, messages=MESSAGES)
        assert list(emulator.instances) == [LLAMA]
        assert emulator.unload_count(QWEN) == 1
        assert emulator.load_count(LLAMA) == 1
        unload = [c for c in emulator.calls if c.path == "/api/v1/models/unload"]
        assert [c.body for c in unload] == [{"instance_id": QWEN}]
        assert (await proxy.status())["loaded"] == [LLAMA]


async def test_streaming_request_holds_off_a_swap_until_it_ends() -> None:
    """A model is never unloaded under a running stream, however long B waits."""
    emulator = Emulator(reply_tokens=10, token_delay_s=0.05)
    body = {"model": QWEN, "messages": MESSAGES, "stream": True}
    async with running(emulator, models={"max_loaded": 1}) as proxy:
        b_reply: list[str | None] = []

        async def ask_b() -> None:
            reply = await proxy.sdk.chat.completions.create(model=LLAMA, messages=MESSAGES)
            b_reply.append(reply.model)

        with anyio.fail_after(10):
            async with (
                proxy.http.stream("POST", "/v1/chat/completions", json=body) as response,
                anyio.create_task_group() as tg,
            ):
                chunks = 0
                async for line in response.aiter_lines():
                    if chunks == 0:
                        tg.start_soon(ask_b)
                        await proxy.wait_for(lambda status: LLAMA in status["queue"])
                    if line.startswith("data: {"):
                        chunks += 1
                        assert list(emulator.instances) == [QWEN]
                        assert emulator.load_count(LLAMA) == 0
                assert chunks >= 10
        assert b_reply == [LLAMA]
        assert list(emulator.instances) == [LLAMA]


async def test_client_disconnect_mid_stream_closes_upstream_and_frees_lease() -> None:
    """Dropping the client mid-stream closes the upstream request within a second."""
    emulator = Emulator(reply_tokens=50, token_delay_s=0.05)
    body = {"model": QWEN, "messages": MESSAGES, "stream": True}
    async with running(emulator) as proxy:
        async with proxy.http.stream("POST", "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    break
        await emulator.wait_until(lambda: emulator.streams_closed_early == 1, timeout=1)
        await proxy.wait_for(lambda status: status["in_flight"] == 0)
        metrics = (await proxy.http.get("/metrics")).text
        assert f'lmswitch_client_disconnects_total{{model="{QWEN}"}} 1.0' in metrics


async def test_upstream_failure_mid_stream_ends_with_an_error_event() -> None:
    emulator = Emulator(reply_tokens=20)
    emulator.cut_streams_after = 3
    body = {"model": QWEN, "messages": MESSAGES, "stream": True}
    async with running(emulator) as proxy:
        response = await proxy.http.post("/v1/chat/completions", json=body)
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert len(events) == 4
        assert "error" in json.loads(events[-1])
        assert (await proxy.status())["in_flight"] == 0


async def test_lm_studio_down_gives_503_and_the_proxy_recovers() -> None:
    """With LM Studio stopped: 503 upstream_unavailable; once it is back, requests work."""
    port = free_port()
    upstream_url = f"http://127.0.0.1:{port}"
    async with proxy_for(upstream_url) as proxy:
        assert (await proxy.http.get("/readyz")).status_code == 503
        response = await proxy.http.post(
            "/v1/chat/completions", json={"model": QWEN, "messages": MESSAGES}
        )
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "upstream_unavailable"
        assert int(response.headers["retry-after"]) > 0
        async with serve(Emulator().app, port=port):
            reply = await proxy.sdk.chat.completions.create(model=QWEN, messages=MESSAGES)
            assert reply.model == QWEN
            assert (await proxy.http.get("/readyz")).status_code == 200
        with pytest.raises(openai.APIStatusError) as caught:
            await proxy.sdk.chat.completions.create(model=QWEN, messages=MESSAGES)
        assert caught.value.status_code == 503
        async with serve(Emulator().app, port=port):  # back again, with nothing loaded
            reply = await proxy.sdk.chat.completions.create(model=QWEN, messages=MESSAGES)
            assert reply.model == QWEN


async def test_load_refused_for_memory_is_a_503_model_load_failed() -> None:
    emulator = Emulator(memory_bytes=2 * 2**30)  # qwen2.5-7b needs about 4.7 GB
    async with running(emulator) as proxy:
        response = await proxy.http.post(
            "/v1/chat/completions", json={"model": QWEN, "messages": MESSAGES}
        )
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["code"] == "model_load_failed"
        assert "insufficient system resources" in error["message"]
        assert response.headers["x-should-retry"] == "false"
        # the proxy stays consistent: a model that fits still loads
        reply = await proxy.sdk.chat.completions.create(model=LLAMA, messages=MESSAGES)
        assert reply.model == LLAMA
