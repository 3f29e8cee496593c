"""The LM Studio emulator, exercised over real sockets as the proxy will see it."""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from functools import partial
from typing import Any

import anyio
import httpx2
import openai
import pytest
from anyio.abc import TaskStatus
from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.emulator import Emulator, tools
from tests.helpers import serve

QWEN = "qwen2.5-7b-instruct"
LLAMA = "llama-3.2-1b-instruct"
GEMMA = "google/gemma-3-4b"
QWEN14 = "qwen2.5-14b-instruct"
NOMIC = "text-embedding-nomic-embed-text-v1.5"
CHAT = {"model": QWEN, "messages": [{"role": "user", "content": "Say hello to me"}]}


class AppSwitch:
    """An ASGI app that forwards to whichever emulator the current test plugged in.

    Starting and stopping uvicorn costs ~0.2 s (its shutdown alone sleeps 0.1 s), so the module
    shares one loopback server and each test plugs its own emulator into it.
    """

    def __init__(self) -> None:
        self.app: ASGIApp | None = None
        self._lifespan = Starlette()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        assert self.app is not None, "no emulator plugged in"
        await self.app(scope, receive, send)


Running = Callable[[Emulator], AbstractAsyncContextManager[httpx2.AsyncClient]]


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    # Module scope, so the shared server below lives in one event loop for all tests.
    return "asyncio"


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[tuple[AppSwitch, str]]:
    switch = AppSwitch()
    async with serve(switch) as url:
        yield switch, url


@pytest.fixture
def url(server: tuple[AppSwitch, str]) -> str:
    return server[1]


@pytest.fixture
def running(server: tuple[AppSwitch, str]) -> Running:
    """Plug an emulator into the shared server; yield a client with a 5 s deadline per request."""
    switch, url = server

    @asynccontextmanager
    async def plug(emulator: Emulator) -> AsyncIterator[httpx2.AsyncClient]:
        switch.app = emulator.app
        try:
            async with httpx2.AsyncClient(base_url=url, timeout=5) as client:
                yield client
        finally:
            switch.app = None

    return plug


def sse(text: str) -> list[tuple[str | None, str]]:
    """Split an SSE body into (event name, data) pairs."""
    events: list[tuple[str | None, str]] = []
    for block in text.split("\n\n"):
        if not block:
            continue
        name = None
        data = []
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            else:
                assert line.startswith("data: "), line
                data.append(line.removeprefix("data: "))
        events.append((name, "\n".join(data)))
    return events


def error_message(response: httpx2.Response) -> str:
    message = response.json()["error"]["message"]
    assert isinstance(message, str)
    return message


# --- discovery and listings ------------------------------------------------------------------


async def test_greeting_says_lmstudio(running: Running) -> None:
    """The SDK's discovery probe gets {"lmstudio": true}."""
    async with running(Emulator()) as client:
        response = await client.get("/lmstudio-greeting")
    assert response.status_code == 200
    assert response.json() == {"lmstudio": True}


async def test_openai_models_lists_catalogue_and_duplicates_when_jit_on(running: Running) -> None:
    """With JIT on, /v1/models shows every downloaded key plus loaded `key:2` copies."""
    emulator = Emulator()
    emulator.load_instance(QWEN)
    emulator.load_instance(QWEN)
    async with running(emulator) as client:
        body = (await client.get("/v1/models")).json()
    ids = [entry["id"] for entry in body["data"]]
    assert body["object"] == "list"
    assert ids == [LLAMA, QWEN, f"{QWEN}:2", GEMMA, QWEN14, "openai/gpt-oss-20b", NOMIC]
    assert body["data"][0] == {"id": LLAMA, "object": "model", "owned_by": "organization_owner"}


async def test_openai_models_lists_only_loaded_instances_when_jit_off(running: Running) -> None:
    """With JIT off, /v1/models shows loaded instance ids only."""
    emulator = Emulator(jit=False)
    async with running(emulator) as client:
        assert (await client.get("/v1/models")).json()["data"] == []
        emulator.load_instance(NOMIC)
        emulator.load_instance(NOMIC)
        body = (await client.get("/v1/models")).json()
    assert [entry["id"] for entry in body["data"]] == [NOMIC, f"{NOMIC}:2"]


async def test_v0_models_report_type_state_and_loaded_context(running: Running) -> None:
    """/api/v0/models has v0's type words, state, and a row per loaded instance."""
    emulator = Emulator()
    emulator.load_instance(QWEN)
    emulator.load_instance(QWEN)
    async with running(emulator) as client:
        rows = {row["id"]: row for row in (await client.get("/api/v0/models")).json()["data"]}
        one = await client.get(f"/api/v0/models/{GEMMA}")
        missing = await client.get("/api/v0/models/no/such-model")
    assert rows[QWEN] == {
        "id": QWEN,
        "object": "model",
        "type": "llm",
        "publisher": "lmstudio-community",
        "arch": "qwen2",
        "compatibility_type": "gguf",
        "quantization": "Q4_K_M",
        "state": "loaded",
        "max_context_length": 32768,
        "loaded_context_length": 4096,
        "capabilities": ["tool_use"],
    }
    assert rows[f"{QWEN}:2"]["state"] == "loaded"
    assert rows[NOMIC]["type"] == "embeddings"
    assert rows[NOMIC]["state"] == "not-loaded"
    assert "loaded_context_length" not in rows[NOMIC]
    assert one.json()["type"] == "vlm"
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


async def test_v0_models_show_key_as_not_loaded_when_only_a_copy_remains(running: Running) -> None:
    """Unloading `key` but not `key:2` leaves a not-loaded row for the key itself."""
    emulator = Emulator()
    emulator.load_instance(LLAMA)
    emulator.load_instance(LLAMA)
    emulator.unload_instance(LLAMA)
    async with running(emulator) as client:
        rows = (await client.get("/api/v0/models")).json()["data"]
    states = [(row["id"], row["state"]) for row in rows if row["id"].startswith(LLAMA)]
    assert states == [(LLAMA, "not-loaded"), (f"{LLAMA}:2", "loaded")]
    with pytest.raises(KeyError):
        emulator.unload_instance(LLAMA)


async def test_v1_models_list_sizes_and_loaded_instances(running: Running) -> None:
    """/api/v1/models carries size_bytes and loaded_instances with their config."""
    emulator = Emulator()
    async with running(emulator) as client:
        load = {"model": QWEN, "context_length": 8192, "num_experts": 2}
        assert (await client.post("/api/v1/models/load", json=load)).status_code == 200
        models = {m["key"]: m for m in (await client.get("/api/v1/models")).json()["models"]}
        emulator.v1_loaded_instances_empty = True
        defective = {m["key"]: m for m in (await client.get("/api/v1/models")).json()["models"]}
    qwen = models[QWEN]
    assert qwen["type"] == "llm"
    assert qwen["size_bytes"] == 4_683_073_184
    assert qwen["quantization"] == {"name": "Q4_K_M", "bits_per_weight": 4}
    assert qwen["format"] == "gguf"
    assert qwen["capabilities"] == {"vision": False, "trained_for_tool_use": True}
    assert qwen["loaded_instances"] == [
        {
            "id": QWEN,
            "config": {
                "context_length": 8192,
                "eval_batch_size": 512,
                "parallel": 4,
                "flash_attention": True,
                "offload_kv_cache_to_gpu": True,
                "num_experts": 2,
            },
        }
    ]
    assert models[NOMIC]["type"] == "embedding"
    assert "architecture" not in models[NOMIC]
    assert models[NOMIC]["loaded_instances"] == []
    assert defective[QWEN]["loaded_instances"] == []


# --- load and unload -------------------------------------------------------------------------


async def test_load_always_creates_a_new_instance(running: Running) -> None:
    """A second load of the same key answers `key:2`; echo_load_config echoes the config."""
    emulator = Emulator()
    async with running(emulator) as client:
        first = await client.post("/api/v1/models/load", json={"model": QWEN})
        second = await client.post(
            "/api/v1/models/load", json={"model": QWEN, "echo_load_config": True}
        )
        embedding = await client.post(
            "/api/v1/models/load", json={"model": NOMIC, "echo_load_config": True}
        )
    assert first.status_code == 200
    assert set(first.json()) == {"type", "instance_id", "load_time_seconds", "status"}
    assert first.json()["instance_id"] == QWEN
    assert first.json()["status"] == "loaded"
    assert second.json()["instance_id"] == f"{QWEN}:2"
    assert second.json()["load_config"] == {
        "context_length": 4096,
        "eval_batch_size": 512,
        "flash_attention": True,
        "offload_kv_cache_to_gpu": True,
    }
    assert embedding.json()["type"] == "embedding"
    assert embedding.json()["load_config"] == {"context_length": 2048}
    assert emulator.load_count() == 3
    assert emulator.load_count(QWEN) == 2
    assert emulator.load_instance(QWEN).id == f"{QWEN}:3"
    assert emulator.load_count() == 3  # UI-style loads are not counted
    assert not emulator.instances[QWEN].jit
    assert emulator.instances[QWEN].ttl_s is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"model": QWEN, "ttl": 300}, "Unrecognized key(s) in object: 'ttl'"),
        ({"context_length": 4096}, '"model" is required'),
        ({"model": QWEN, "context_length": "big"}, "Invalid type for 'context_length'"),
        ({"model": QWEN, "flash_attention": 1}, "Invalid type for 'flash_attention'"),
        ({"model": QWEN, "num_experts": True}, "Invalid type for 'num_experts'"),
        (
            {"model": NOMIC, "offload_kv_cache_to_gpu": True},
            "The following configuration values are not supported for embedding models: "
            "offload_kv_cache_to_gpu",
        ),
        ([QWEN], "Request body must be a JSON object."),
        (None, "Request body is required."),
    ],
)
async def test_load_rejects_invalid_bodies(body: object, message: str, running: Running) -> None:
    """The load body is strictly validated, with zod-like messages."""
    emulator = Emulator()
    async with running(emulator) as client:
        content = b"" if body is None else json.dumps(body).encode()
        response = await client.post("/api/v1/models/load", content=content)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request"
    assert error_message(response).startswith(message)
    assert emulator.load_count() == 0


async def test_load_rejects_malformed_json(running: Running) -> None:
    """Malformed JSON is a 400 and is recorded with a None body."""
    emulator = Emulator()
    async with running(emulator) as client:
        response = await client.post("/api/v1/models/load", content=b"{not json")
    assert response.status_code == 400
    assert error_message(response).startswith("Invalid JSON in request body")
    assert emulator.calls[-1].body is None


async def test_load_of_unknown_model_is_404(running: Running) -> None:
    """An unknown key answers 404 model_not_found, as captured from a live server."""
    async with running(Emulator()) as client:
        response = await client.post("/api/v1/models/load", json={"model": "made/up-9000"})
    assert response.status_code == 404
    assert response.json() == {
        "error": {
            "type": "model_not_found",
            "message": "Model made/up-9000 not found in downloaded models",
        }
    }


async def test_load_refused_by_memory_guardrail(running: Running) -> None:
    """A load that would exceed memory_bytes gets LM Studio's guardrail message and a 500."""
    emulator = Emulator(memory_bytes=10_000_000_000)
    async with running(emulator) as client:
        ok = await client.post("/api/v1/models/load", json={"model": QWEN})
        refused = await client.post("/api/v1/models/load", json={"model": QWEN14})
    assert ok.status_code == 200
    assert refused.status_code == 500
    assert refused.json()["error"]["type"] == "internal_error"
    message = error_message(refused)
    assert message.startswith("Model loading was stopped due to insufficient system resources.")
    assert "requires approximately 8.99 GB of memory" in message
    assert list(emulator.instances) == [QWEN]
    assert emulator.load_count() == 1


async def test_memory_counts_a_load_still_in_progress(running: Running) -> None:
    """A model still loading counts toward memory, and is not listed until it has loaded."""
    emulator = Emulator(memory_bytes=10_000_000_000, load_delay_s=0.3)
    async with running(emulator) as client, anyio.create_task_group() as tg:
        tg.start_soon(partial(client.post, "/api/v1/models/load", json={"model": QWEN}))
        await emulator.wait_until(lambda: emulator.load_count() == 1)
        rows = (await client.get("/api/v0/models")).json()["data"]
        assert all(row["state"] == "not-loaded" for row in rows)
        refused = await client.post("/api/v1/models/load", json={"model": QWEN14})
        assert refused.status_code == 500
        await emulator.wait_until(lambda: QWEN in emulator.instances)


async def test_a_load_speed_makes_larger_models_load_longer(running: Running) -> None:
    """With `load_bytes_per_s`, a load takes `load_delay_s` plus the model's size over it, as
    LM Studio's reads of larger files take longer; the answer's load_time_seconds says so."""
    emulator = Emulator(load_delay_s=0.05)
    size = emulator.catalog[QWEN].size_bytes
    emulator.load_bytes_per_s = size / 0.4  # Qwen 7B in 0.4 s, the 1B Llama in a fraction
    async with running(emulator) as client:
        qwen = (await client.post("/api/v1/models/load", json={"model": QWEN})).json()
        llama = (await client.post("/api/v1/models/load", json={"model": LLAMA})).json()
    assert qwen["load_time_seconds"] == pytest.approx(0.45, abs=0.1)
    small = 0.05 + emulator.catalog[LLAMA].size_bytes / emulator.load_bytes_per_s
    assert llama["load_time_seconds"] == pytest.approx(small, abs=0.1)
    assert llama["load_time_seconds"] < qwen["load_time_seconds"]


async def test_fail_next_loads_fails_that_many_loads(running: Running) -> None:
    """fail_next_loads makes the next N loads fail with a generic 500, then loads work again."""
    emulator = Emulator()
    emulator.fail_next_loads = 1
    async with running(emulator) as client:
        failed = await client.post("/api/v1/models/load", json={"model": QWEN})
        loaded = await client.post("/api/v1/models/load", json={"model": QWEN})
    assert failed.status_code == 500
    assert "model_load_failed" in error_message(failed)
    assert loaded.status_code == 200
    assert loaded.json()["instance_id"] == QWEN
    assert emulator.fail_next_loads == 0
    assert emulator.load_count(QWEN) == 2


async def test_load_completes_when_the_client_gives_up(running: Running) -> None:
    """A client that times out during the load delay does not stop the load."""
    emulator = Emulator(load_delay_s=0.3)
    async with running(emulator) as client:
        with pytest.raises(httpx2.ReadTimeout):
            await client.post("/api/v1/models/load", json={"model": QWEN}, timeout=0.05)
        await emulator.wait_until(lambda: QWEN in emulator.instances)


async def test_unload_removes_the_instance(running: Running) -> None:
    """Unload answers the instance id; unknown ids are 404 and bad bodies 400."""
    emulator = Emulator()
    emulator.load_instance(QWEN)
    async with running(emulator) as client:
        done = await client.post("/api/v1/models/unload", json={"instance_id": QWEN})
        again = await client.post("/api/v1/models/unload", json={"instance_id": QWEN})
        by_model = await client.post("/api/v1/models/unload", json={"model": QWEN})
        empty = await client.post("/api/v1/models/unload", json={})
    assert done.json() == {"instance_id": QWEN}
    assert emulator.instances == {}
    assert emulator.unload_count() == emulator.unload_count(QWEN) == 1
    assert again.status_code == 404
    assert again.json()["error"]["type"] == "model_not_found"
    assert by_model.status_code == 400
    assert error_message(by_model) == "Unrecognized key(s) in object: 'model'"
    assert empty.status_code == 400
    assert error_message(empty) == '"instance_id" is required'


# --- inference -------------------------------------------------------------------------------


async def test_chat_completion_has_lmstudio_shape(running: Running) -> None:
    """A non-streamed chat answer is deterministic, with LM Studio's extra fields."""
    emulator = Emulator()
    emulator.load_instance(QWEN)
    async with running(emulator) as client:
        body = (await client.post("/v1/chat/completions", json=CHAT)).json()
        short = (await client.post("/v1/chat/completions", json=CHAT | {"max_tokens": 3})).json()
    assert re.fullmatch(r"chatcmpl-[a-z0-9]{22}", body["id"])
    assert body["object"] == "chat.completion"
    assert body["model"] == body["system_fingerprint"] == QWEN
    assert body["stats"] == {}
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"].split()) == 12
    assert body["usage"]["prompt_tokens"] == 4
    assert body["usage"]["completion_tokens"] == 12
    assert body["usage"]["total_tokens"] == 16
    assert short["choices"][0]["finish_reason"] == "length"
    assert short["choices"][0]["message"]["content"] == "Hello from the"


async def test_chat_stream_is_sse_with_usage_and_done(running: Running) -> None:
    """Streamed chat: role first, one chunk per word, finish, usage chunk, then [DONE]."""
    emulator = Emulator(reply_tokens=5)
    emulator.load_instance(QWEN)
    request = CHAT | {"stream": True, "stream_options": {"include_usage": True}}
    async with running(emulator) as client:
        response = await client.post("/v1/chat/completions", json=request)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse(response.text)
    assert all(name is None for name, _ in events)
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Hello"}
    content = [c["choices"][0]["delta"].get("content") for c in chunks[:5]]
    assert "".join(content) == "Hello from the LM Studio"
    assert chunks[5]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert chunks[6]["choices"] == []
    assert chunks[6]["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
    assert len(chunks) == 7
    assert emulator.streams_open == 0
    assert emulator.streams_closed_early == 0


async def test_stream_of_an_empty_reply_still_sends_a_role_delta(running: Running) -> None:
    """reply_tokens=0 streams a role-only delta, a finish chunk and [DONE]."""
    emulator = Emulator(reply_tokens=0)
    async with running(emulator) as client:
        response = await client.post("/v1/chat/completions", json=CHAT | {"stream": True})
    chunks = [data for _, data in sse(response.text)]
    assert json.loads(chunks[0])["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert json.loads(chunks[1])["choices"][0]["finish_reason"] == "stop"
    assert chunks[2:] == ["[DONE]"]


async def test_openai_sdk_streams_chat_and_embeds(running: Running, url: str) -> None:
    """The official openai SDK can stream chat and read embeddings from the emulator."""
    emulator = Emulator()
    async with running(emulator):
        sdk = openai.AsyncOpenAI(base_url=url + "/v1", api_key="lm-studio", timeout=5)
        async with sdk:
            stream = await sdk.chat.completions.create(
                model=QWEN,
                messages=[{"role": "user", "content": "hi there"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            pieces = []
            usage = None
            async for chunk in stream:
                pieces += [c.delta.content or "" for c in chunk.choices]
                usage = chunk.usage or usage
            embedded = await sdk.embeddings.create(model=NOMIC, input=["one", "two", "one"])
            responses = await sdk.responses.create(model=QWEN, input="hello", stream=True)
            kinds = [event.type async for event in responses]
            legacy = await sdk.completions.create(model=QWEN, prompt="once upon", stream=True)
            texts = [choice.text async for chunk in legacy for choice in chunk.choices]
    assert len("".join(pieces).split()) == 12
    assert usage is not None
    assert usage.completion_tokens == 12
    vectors = [item.embedding for item in embedded.data]
    assert [len(v) for v in vectors] == [768, 768, 768]
    assert math.isclose(math.fsum(x * x for x in vectors[0]), 1.0)
    assert vectors[0] == vectors[2] != vectors[1]
    assert embedded.usage.prompt_tokens == 3
    assert kinds[0] == "response.created"
    assert kinds.count("response.output_text.delta") == 12
    assert kinds[-1] == "response.completed"
    assert len("".join(texts).split()) == 12


async def test_completions_and_v0_variants(running: Running) -> None:
    """Legacy completions and the /api/v0 variants, with v0's stats/model_info/runtime."""
    emulator = Emulator(reply_tokens=4)
    async with running(emulator) as client:
        plain = (await client.post("/v1/completions", json={"model": QWEN, "prompt": "a b"})).json()
        v0 = (await client.post("/api/v0/completions", json={"model": QWEN, "prompt": "a"})).json()
        v0_chat = (await client.post("/api/v0/chat/completions", json=CHAT)).json()
        v0_embed = await client.post("/api/v0/embeddings", json={"model": NOMIC, "input": "x y"})
        streamed = await client.post(
            "/v1/completions",
            json={
                "model": QWEN,
                "prompt": "a",
                "stream": True,
                "max_tokens": 2,
                "stream_options": {"include_usage": True},
            },
        )
    assert re.fullmatch(r"cmpl-[a-z0-9]{22}", plain["id"])
    assert plain["object"] == "text_completion"
    assert plain["choices"][0]["text"] == "Hello from the LM"
    assert plain["usage"]["prompt_tokens"] == 2
    assert "model_info" not in plain
    assert v0["model_info"] == {
        "arch": "qwen2",
        "quant": "Q4_K_M",
        "format": "gguf",
        "context_length": 4096,
    }
    assert v0_chat["stats"]["stop_reason"] == "eosFound"
    assert v0_chat["runtime"]["supported_formats"] == ["gguf"]
    assert v0_embed.json()["usage"] == {"prompt_tokens": 2, "total_tokens": 2}
    chunks = [data for _, data in sse(streamed.text)]
    texts = [json.loads(c)["choices"][0]["text"] for c in chunks[:3]]
    assert texts == ["Hello", " from", ""]
    assert json.loads(chunks[2])["choices"][0]["finish_reason"] == "length"
    assert json.loads(chunks[3])["usage"]["completion_tokens"] == 2
    assert chunks[-1] == "[DONE]"


async def test_responses_api_bodies_and_event_framing(running: Running) -> None:
    """/v1/responses: a response object, and `event:` + `data:` SSE frames."""
    emulator = Emulator(reply_tokens=3)
    request = {"model": QWEN, "input": [{"role": "user", "content": "two words"}]}
    async with running(emulator) as client:
        body = (await client.post("/v1/responses", json=request)).json()
        short = await client.post("/v1/responses", json=request | {"max_output_tokens": 1})
        streamed = await client.post("/v1/responses", json=request | {"stream": True})
    assert body["object"] == "response"
    assert body["status"] == "completed"
    assert body["output"][0]["content"][0]["text"] == "Hello from the"
    assert body["usage"] == {"input_tokens": 2, "output_tokens": 3, "total_tokens": 5}
    assert short.json()["status"] == "incomplete"
    events = sse(streamed.text)
    names = [name for name, _ in events]
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    payloads = [json.loads(data) for _, data in events]
    assert [p["type"] for p in payloads] == names
    assert [p["sequence_number"] for p in payloads] == list(range(len(names)))
    assert payloads[-1]["response"]["output"][0]["content"][0]["text"] == "Hello from the"


async def test_messages_api_bodies_and_event_framing(running: Running) -> None:
    """/v1/messages answers in Anthropic's shape and frames its SSE events as Anthropic does."""
    emulator = Emulator(reply_tokens=2)
    request = {
        "model": QWEN,
        "max_tokens": 100,
        "system": "be brief",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi you"}]}],
    }
    async with running(emulator) as client:
        body = (await client.post("/v1/messages", json=request)).json()
        streamed = await client.post("/v1/messages", json=request | {"stream": True})
        counted = await client.post("/v1/messages/count_tokens", json=request)
        unknown = await client.post("/v1/messages/count_tokens", json=request | {"model": "x"})
    assert re.fullmatch(r"msg_[a-z0-9]{21}", body["id"])
    assert {k: v for k, v in body.items() if k != "id"} == {
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": "Hello from"}],
        "model": QWEN,
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 4, "output_tokens": 2},
    }
    events = sse(streamed.text)
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    payloads = [json.loads(data) for _, data in events]
    assert all(p["type"] == name for p, (name, _) in zip(payloads, events, strict=True))
    assert payloads[2]["delta"] == {"type": "text_delta", "text": "Hello"}
    assert payloads[5]["delta"]["stop_reason"] == "end_turn"
    assert payloads[5]["usage"] == {"output_tokens": 2}
    assert counted.json() == {"input_tokens": 4}
    assert unknown.status_code == 400


# --- tool calls ------------------------------------------------------------------------------

WEATHER_TOOL = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
}
CHAT_TOOLS = [
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_TOOL}},
]
RESPONSE_TOOLS = [
    {"type": "mcp", "server_label": "exa", "server_url": "https://mcp.exa.ai/mcp"},
    {"type": "function", "name": "get_time", "parameters": {}},
    {"type": "function", "name": "get_weather", "parameters": WEATHER_TOOL},
]
ANTHROPIC_TOOLS = [
    {"type": "web_search_20250305", "name": "web_search"},
    {"name": "get_time", "input_schema": {"type": "object"}},
    {"name": "get_weather", "input_schema": WEATHER_TOOL},
]
ASK = [{"role": "user", "content": "What is the weather?"}]


@pytest.mark.parametrize(
    ("kind", "request_body", "called"),
    [
        # OpenAI chat: required, a named function, auto by name, auto without, none, a result.
        ("chat", {"messages": ASK, "tools": CHAT_TOOLS, "tool_choice": "required"}, "get_time"),
        (
            "chat",
            {
                "messages": ASK,
                "tools": CHAT_TOOLS,
                "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            },
            "get_weather",
        ),
        (
            "chat",
            {
                "messages": ASK,
                "tools": CHAT_TOOLS,
                "tool_choice": {"type": "function", "function": {"name": "not_offered"}},
            },
            "get_time",
        ),
        (
            "chat",
            {"messages": [{"role": "user", "content": "Call GET_WEATHER"}], "tools": CHAT_TOOLS},
            "get_weather",
        ),
        (
            "chat",
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "run get_weather"}]},
                    {"role": "assistant", "content": "It is sunny."},
                    {"role": "user", "content": "and now get_time please"},
                ],
                "tools": CHAT_TOOLS,
            },
            "get_time",
        ),
        ("chat", {"messages": ASK, "tools": CHAT_TOOLS}, None),
        (
            "chat",
            {"messages": [{"role": "system", "content": "get_time"}], "tools": CHAT_TOOLS},
            None,
        ),
        ("chat", {"messages": ASK, "tools": CHAT_TOOLS, "tool_choice": "none"}, None),
        ("chat", {"messages": ASK, "tool_choice": "required"}, None),
        ("chat", {"messages": ASK, "tools": [], "tool_choice": "required"}, None),
        (
            "chat",
            {
                "messages": [*ASK, {"role": "tool", "tool_call_id": "1", "content": "sunny"}],
                "tools": CHAT_TOOLS,
                "tool_choice": "required",
            },
            None,
        ),
        # Responses: function tools only; the named form has a flat name.
        (
            "response",
            {"input": "hi", "tools": RESPONSE_TOOLS, "tool_choice": "required"},
            "get_time",
        ),
        (
            "response",
            {
                "input": "hi",
                "tools": RESPONSE_TOOLS,
                "tool_choice": {"type": "function", "name": "get_weather"},
            },
            "get_weather",
        ),
        ("response", {"input": "use get_weather", "tools": RESPONSE_TOOLS}, "get_weather"),
        (
            "response",
            {
                "input": [
                    {"role": "user", "content": [{"type": "input_text", "text": "get_time"}]}
                ],
                "tools": RESPONSE_TOOLS,
            },
            "get_time",
        ),
        (
            "response",
            {
                "input": [
                    {"role": "user", "content": "get_time"},
                    {
                        "type": "function_call",
                        "call_id": "1",
                        "name": "get_time",
                        "arguments": "{}",
                    },
                    {"type": "function_call_output", "call_id": "1", "output": "noon"},
                ],
                "tools": RESPONSE_TOOLS,
            },
            None,
        ),
        # Anthropic: any, a named tool, none; server tools are not the model's to call.
        (
            "message",
            {"messages": ASK, "tools": ANTHROPIC_TOOLS, "tool_choice": {"type": "any"}},
            "get_time",
        ),
        (
            "message",
            {
                "messages": ASK,
                "tools": ANTHROPIC_TOOLS,
                "tool_choice": {"type": "tool", "name": "get_weather"},
            },
            "get_weather",
        ),
        (
            "message",
            {"messages": ASK, "tools": ANTHROPIC_TOOLS, "tool_choice": {"type": "none"}},
            None,
        ),
        (
            "message",
            {"messages": ASK, "tools": ANTHROPIC_TOOLS[:1], "tool_choice": {"type": "any"}},
            None,
        ),
        (
            "message",
            {
                "messages": [
                    *ASK,
                    {
                        "role": "assistant",
                        "content": [
                            {"type": "tool_use", "id": "1", "name": "get_time", "input": {}}
                        ],
                    },
                    {
                        "role": "user",
                        "content": [{"type": "tool_result", "tool_use_id": "1", "content": "noon"}],
                    },
                ],
                "tools": ANTHROPIC_TOOLS,
                "tool_choice": {"type": "any"},
            },
            None,
        ),
        # What no client should send is not a call, nor a crash.
        (
            "chat",
            {
                "messages": ["garbage", 42],
                "tools": [
                    42,
                    {"type": "custom", "custom": {"name": "get_time"}},
                    {"type": "function", "function": {"parameters": {}}},
                    {"type": "function", "function": {"name": ""}},
                ],
                "tool_choice": "required",
            },
            None,
        ),
        (
            "chat",
            {"messages": ["garbage"], "tools": CHAT_TOOLS, "tool_choice": "required"},
            "get_time",
        ),
        ("chat", {"messages": "get_time", "tools": CHAT_TOOLS}, None),
        ("chat", {"messages": [], "tools": CHAT_TOOLS, "tool_choice": "sometimes"}, None),
        (
            "response",
            {"input": "hi", "tools": RESPONSE_TOOLS, "tool_choice": {"type": "allowed_tools"}},
            None,
        ),
        # Legacy completions never call tools.
        (
            "completion",
            {"prompt": "get_time", "tools": CHAT_TOOLS, "tool_choice": "required"},
            None,
        ),
    ],
)
def test_tool_choice_decides_whether_and_which_tool_is_called(
    kind: str, request_body: dict[str, Any], called: str | None
) -> None:
    """Required, any or a named tool: a call (the named one if offered, else the first); auto:
    the first tool the last user message names; none, no tools, or a tool's result: words."""
    call = tools.pick(kind, request_body)
    assert (call.name if call is not None else None) == called


@pytest.mark.parametrize(
    ("schema", "value"),
    [
        ({"type": "string"}, "example"),
        ({"type": "number"}, 1),
        ({"type": "integer"}, 1),
        ({"type": "boolean"}, True),
        ({"type": "array", "items": {"type": "string"}, "minItems": 2}, []),
        ({"type": "null"}, None),
        ({"enum": ["b", "a"]}, "b"),
        ({"const": 7}, 7),
        ({"type": ["null", "integer"]}, 1),
        ({"anyOf": [{"type": "null"}, {"type": "boolean"}]}, True),
        ({"oneOf": [{"type": "number"}, {"type": "string"}]}, 1),
        ({}, "example"),
        (True, "example"),
        ({"anyOf": [True]}, "example"),
        ({"$ref": "https://example.com/schema.json"}, "example"),
        ({"type": "object"}, {}),
        (
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "age": {"type": "integer"},
                    "nickname": {"type": "string"},
                    "address": {
                        "properties": {"street": {"type": "string"}, "zip": {"type": "string"}},
                        "required": ["zip"],
                    },
                },
                "required": ["name", "age", "address", "undeclared"],
            },
            {"name": "example", "age": 1, "address": {"zip": "example"}, "undeclared": "example"},
        ),
        (  # pydantic's shape: $defs and $ref, an Optional as anyOf with null
            {
                "$defs": {
                    "Unit": {"enum": ["celsius", "fahrenheit"], "type": "string"},
                    "Place": {
                        "properties": {
                            "city": {"type": "string"},
                            "unit": {"$ref": "#/$defs/Unit"},
                        },
                        "required": ["city", "unit"],
                        "type": "object",
                    },
                },
                "properties": {
                    "place": {"$ref": "#/$defs/Place"},
                    "when": {"anyOf": [{"type": "string", "format": "date"}, {"type": "null"}]},
                    "lost": {"$ref": "#/$defs/Nowhere"},
                },
                "required": ["place", "when", "lost"],
                "type": "object",
            },
            {"place": {"city": "example", "unit": "celsius"}, "when": "example", "lost": "example"},
        ),
    ],
)
def test_tool_arguments_are_built_from_the_schema(schema: object, value: object) -> None:
    """Required properties only, each with a plausible value of its type, deterministically."""
    assert tools.example(schema) == value


def test_recursive_schemas_end_in_null() -> None:
    """A schema that requires itself through $ref ends, nested, in null."""
    node = {"type": "object", "properties": {"next": {"$ref": "#"}}, "required": ["next"]}
    value = tools.example(node)
    depth = 0
    while isinstance(value, dict):
        value = value["next"]
        depth += 1
    assert value is None
    assert 1 < depth < 10


def test_a_call_streams_its_arguments_in_json_token_pieces() -> None:
    """Arguments stream as a model writes JSON, and their pieces make the whole."""
    call = tools.ToolCall("123456789", "f", '{"city":"San Francisco","days":[1,2]}')
    assert call.fragments == (
        '{"',
        "city",
        '":"',
        "San Francisco",
        '","',
        "days",
        '":[',
        "1",
        ",",
        "2",
        "]}",
    )
    assert call.tokens == 1 + len(call.fragments)
    assert call.input == {"city": "San Francisco", "days": [1, 2]}


async def test_tool_calls_have_lmstudio_shapes(running: Running) -> None:
    """A call is the chat message's tool_calls (content null, finish tool_calls, v0 stop reason
    toolCalls), a Responses `function_call` item, an Anthropic `tool_use` block."""
    emulator = Emulator()
    emulator.load_instance(QWEN)
    chat = {"model": QWEN, "messages": ASK, "tools": CHAT_TOOLS, "tool_choice": "required"}
    responses = {"model": QWEN, "input": "hi", "tools": RESPONSE_TOOLS, "tool_choice": "required"}
    anthropic = {
        "model": QWEN,
        "max_tokens": 64,
        "messages": ASK,
        "tools": ANTHROPIC_TOOLS,
        "tool_choice": {"type": "tool", "name": "get_weather"},
    }
    async with running(emulator) as client:
        completion = (await client.post("/v1/chat/completions", json=chat)).json()
        v0 = (await client.post("/api/v0/chat/completions", json=chat)).json()
        response = (await client.post("/v1/responses", json=responses)).json()
        message = (await client.post("/v1/messages", json=anthropic)).json()
    choice = completion["choices"][0]
    call_id = choice["message"]["tool_calls"][0]["id"]
    assert re.fullmatch(r"[0-9]{9}", call_id)
    assert choice == {
        "index": 0,
        "message": {
            "role": "assistant",
            "content": None,
            "reasoning_content": "",
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "get_time", "arguments": "{}"},
                }
            ],
        },
        "logprobs": None,
        "finish_reason": "tool_calls",
    }
    assert completion["usage"]["completion_tokens"] == 2  # the name, then "{}"
    assert v0["stats"]["stop_reason"] == "toolCalls"
    [item] = response["output"]
    assert re.fullmatch(r"fc_[a-z0-9]{22}", item.pop("id"))
    assert re.fullmatch(r"[0-9]{9}", item.pop("call_id"))
    assert item == {
        "type": "function_call",
        "status": "completed",
        "name": "get_time",
        "arguments": "{}",
    }
    assert response["status"] == "completed"
    assert message["stop_reason"] == "tool_use"
    [block] = message["content"]
    assert re.fullmatch(r"[0-9]{9}", block.pop("id"))
    assert block == {
        "type": "tool_use",
        "name": "get_weather",
        "input": {"city": "example", "unit": "c"},
    }


async def test_a_streamed_call_opens_with_its_name_then_its_arguments(running: Running) -> None:
    """The first chunk names the call with empty arguments; each argument piece is a chunk."""
    emulator = Emulator()
    chat = {
        "model": QWEN,
        "messages": ASK,
        "tools": CHAT_TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "stream": True,
    }
    async with running(emulator) as client:
        streamed = await client.post("/v1/chat/completions", json=chat)
    chunks = [json.loads(data) for _, data in sse(streamed.text)[:-1]]
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks]
    opening = deltas[0]["tool_calls"][0]
    assert deltas[0] == {
        "role": "assistant",
        "tool_calls": [
            {
                "index": 0,
                "id": opening["id"],
                "type": "function",
                "function": {"name": "get_weather", "arguments": ""},
            }
        ],
    }
    pieces = [delta["tool_calls"][0] for delta in deltas[1:-1]]
    assert all(piece.keys() == {"index", "function"} for piece in pieces)
    arguments = "".join(piece["function"]["arguments"] for piece in pieces)
    assert arguments == '{"city":"example","unit":"c"}'
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert sse(streamed.text)[-1] == (None, "[DONE]")


async def test_cut_streams_after_counts_a_calls_name_and_pieces(running: Running) -> None:
    """A call's name and each piece of its arguments are tokens: a cut stream stops among them."""
    emulator = Emulator()
    emulator.cut_streams_after = 2
    request = {
        "model": QWEN,
        "max_tokens": 64,
        "messages": ASK,
        "tools": ANTHROPIC_TOOLS,
        "tool_choice": {"type": "tool", "name": "get_weather"},
        "stream": True,
    }
    received: list[str] = []

    async def read(client: httpx2.AsyncClient) -> None:
        async with client.stream("POST", "/v1/messages", json=request) as response:
            async for line in response.aiter_lines():
                received.extend([line] if line.startswith("event: ") else [])

    async with running(emulator) as client:
        with pytest.raises(httpx2.RemoteProtocolError):
            await read(client)
        await emulator.wait_until(lambda: emulator.streams_open == 0)
    assert received == [
        "event: message_start",
        "event: content_block_start",
        "event: content_block_delta",
    ]


# --- JIT, TTL and inference errors -----------------------------------------------------------


async def test_jit_load_evicts_the_previous_jit_model_only(running: Running) -> None:
    """JIT loads on first use, honours `ttl`, and evicts earlier JIT loads but not REST ones."""
    emulator = Emulator(load_delay_s=0.05)
    async with running(emulator) as client:
        assert (await client.post("/api/v1/models/load", json={"model": GEMMA})).status_code == 200
        first = await client.post("/v1/chat/completions", json=CHAT | {"ttl": 300})
        assert first.status_code == 200
        assert emulator.instances[QWEN].jit
        assert emulator.instances[QWEN].ttl_s == 300
        second = await client.post("/v1/chat/completions", json=CHAT | {"model": LLAMA})
        assert second.json()["model"] == LLAMA
    assert set(emulator.instances) == {GEMMA, LLAMA}
    assert emulator.instances[LLAMA].ttl_s == 3600
    assert emulator.unload_count(QWEN) == 1
    assert emulator.load_count() == 3


async def test_jit_keeps_earlier_models_when_auto_evict_is_off(running: Running) -> None:
    """With auto-evict off, JIT-loaded models stay loaded side by side."""
    emulator = Emulator(auto_evict=False)
    async with running(emulator) as client:
        await client.post("/v1/chat/completions", json=CHAT)
        await client.post("/v1/embeddings", json={"model": NOMIC, "input": "x"})
    assert set(emulator.instances) == {QWEN, NOMIC}
    assert emulator.unload_count() == 0


async def test_requests_reuse_loaded_instances_by_key_or_id(running: Running) -> None:
    """A loaded model answers by key or instance id, and an omitted model uses what is loaded."""
    emulator = Emulator()
    emulator.load_instance(QWEN)
    emulator.load_instance(QWEN)
    async with running(emulator) as client:
        by_id = await client.post("/v1/chat/completions", json=CHAT | {"model": f"{QWEN}:2"})
        omitted = await client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": None}]}
        )
    assert by_id.json()["model"] == f"{QWEN}:2"
    assert omitted.json()["model"] == QWEN
    assert omitted.json()["usage"]["prompt_tokens"] == 0
    assert emulator.load_count() == 0


async def test_concurrent_requests_share_one_jit_load(running: Running) -> None:
    """Requests arriving while a JIT load runs wait for it instead of loading again."""
    emulator = Emulator(load_delay_s=0.2)
    statuses: list[int] = []

    async def chat(client: httpx2.AsyncClient) -> None:
        statuses.append((await client.post("/v1/chat/completions", json=CHAT)).status_code)

    async with running(emulator) as client:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(chat, client)
    assert statuses == [200, 200, 200]
    assert emulator.load_count() == 1
    assert list(emulator.instances) == [QWEN]


async def test_idle_jit_instance_expires_after_its_ttl(running: Running) -> None:
    """An instance idle past its TTL is unloaded when the next request arrives."""
    emulator = Emulator()
    emulator.load_instance(QWEN, jit=True).last_used -= 4000
    async with running(emulator) as client:
        rows = (await client.get("/api/v0/models")).json()["data"]
    assert all(row["state"] == "not-loaded" for row in rows)
    assert emulator.unload_count(QWEN) == 1


async def test_jit_off_answers_no_models_or_invalid_identifier(running: Running) -> None:
    """With JIT off, an unloaded model is an error in the OpenAI envelope."""
    emulator = Emulator(jit=False)
    async with running(emulator) as client:
        none_loaded = await client.post("/v1/chat/completions", json=CHAT)
        emulator.load_instance(LLAMA)
        other_loaded = await client.post("/v1/chat/completions", json=CHAT)
    assert none_loaded.status_code == 400
    assert none_loaded.json() == {
        "error": {
            "message": "No models loaded. Please load a model in the developer page or use the "
            "'lms load' command.",
            "type": "invalid_request_error",
            "param": "model",
            "code": None,
        }
    }
    assert other_loaded.status_code == 400
    assert other_loaded.json()["error"]["code"] == "model_not_found"
    assert error_message(other_loaded) == (
        f'Invalid model identifier "{QWEN}". Please specify a valid downloaded model '
        f"(e.g., {LLAMA})."
    )
    assert emulator.load_count() == 0


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        (
            "/v1/chat/completions",
            CHAT | {"model": "o4-mini"},
            'Invalid model identifier "o4-mini". Please specify a valid downloaded model '
            f"(e.g., {LLAMA}, {QWEN}, {GEMMA}).",
        ),
        ("/v1/chat/completions", {"model": QWEN}, "'messages' is required"),
        ("/v1/chat/completions", CHAT | {"model": NOMIC}, f'Model "{NOMIC}" is an embedding'),
        ("/v1/embeddings", {"model": QWEN, "input": "x"}, f'Model "{QWEN}" is not an embedding'),
        ("/v1/completions", "just a string", "Request body must be a JSON object."),
    ],
)
async def test_inference_errors_use_the_openai_envelope(
    path: str, body: object, message: str, running: Running
) -> None:
    """Bad inference requests are 400s in OpenAI's error envelope, and load nothing."""
    emulator = Emulator()
    async with running(emulator) as client:
        response = await client.post(path, json=body)
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert error_message(response).startswith(message)
    assert emulator.load_count() == 0


async def test_inference_rejects_malformed_json(running: Running) -> None:
    """Malformed JSON on an inference endpoint is a 400 in the OpenAI envelope."""
    async with running(Emulator()) as client:
        response = await client.post("/v1/chat/completions", content=b'{"model": ')
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_failed_jit_loads_are_server_errors(running: Running) -> None:
    """A JIT load refused by the guardrail or failed by the engine answers 500."""
    emulator = Emulator(memory_bytes=1_000_000_000)
    async with running(emulator) as client:
        refused = await client.post("/v1/chat/completions", json=CHAT)
        emulator.fail_next_loads = 1
        failed = await client.post("/v1/chat/completions", json=CHAT | {"model": LLAMA})
    assert refused.status_code == failed.status_code == 500
    assert "insufficient system resources" in error_message(refused)
    assert failed.json()["error"]["code"] == "model_load_failed"
    assert emulator.instances == {}


# --- routing, auth and records ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v0/load"),
        ("POST", "/api/v0/models/load"),
        ("GET", "/v1/chat/completions"),
        ("GET", "/v1/models/"),
        ("POST", "/v1/models/unload"),
    ],
)
async def test_unknown_routes_answer_200_with_an_error_string(
    method: str, path: str, running: Running
) -> None:
    """Unknown routes and methods get Express's 200 'Unexpected endpoint' body."""
    emulator = Emulator()
    async with running(emulator) as client:
        response = await client.request(method, path)
    assert response.status_code == 200
    assert response.json() == {"error": f"Unexpected endpoint or method. ({method} {path})"}
    assert emulator.calls[-1].path == path


async def test_api_token_is_required_everywhere_but_the_greeting(running: Running) -> None:
    """With api_token set, requests need the Bearer token (or x-api-key on /v1/messages)."""
    token = "sk-lm-abcdefgh:abcdefghijklmnopqrst"
    emulator = Emulator(api_token=token)
    good = {"Authorization": f"Bearer {token}"}
    message = {"model": QWEN, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    async with running(emulator) as client:
        greeting = await client.get("/lmstudio-greeting")
        missing = await client.get("/api/v1/models")
        wrong = await client.get("/v1/models", headers={"Authorization": "Bearer nope"})
        unknown = await client.get("/v1/nothing")
        allowed = await client.get("/v1/models", headers=good)
        x_api_key = await client.post("/v1/messages", json=message, headers={"x-api-key": token})
        x_api_key_elsewhere = await client.get("/v1/models", headers={"x-api-key": token})
        bad_x_api_key = await client.post("/v1/messages", json=message, headers={"x-api-key": "no"})
    assert greeting.status_code == 200
    assert missing.status_code == wrong.status_code == unknown.status_code == 401
    assert missing.json()["error"]["type"] == "invalid_request"
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert error_message(missing).startswith("An LM Studio API token is required")
    assert error_message(wrong).startswith("The provided LM Studio API token is invalid")
    assert allowed.status_code == x_api_key.status_code == 200
    assert x_api_key_elsewhere.status_code == bad_x_api_key.status_code == 401
    assert error_message(bad_x_api_key).startswith("The provided LM Studio API token is invalid")
    assert len(emulator.calls) == 8


async def test_calls_record_method_path_and_parsed_body(running: Running) -> None:
    """Every request is recorded, with its JSON body parsed."""
    emulator = Emulator()
    async with running(emulator) as client:
        await client.get("/v1/models")
        await client.post("/v1/chat/completions", json=CHAT)
    assert [(c.method, c.path) for c in emulator.calls] == [
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
    ]
    assert emulator.calls[0].body is None
    assert emulator.calls[1].body == CHAT


# --- streams that end badly ------------------------------------------------------------------


async def test_cut_streams_after_breaks_the_clients_stream(running: Running) -> None:
    """cut_streams_after drops the connection mid-body, without the terminating chunk."""
    emulator = Emulator()
    emulator.cut_streams_after = 3
    received: list[str] = []

    async def read(client: httpx2.AsyncClient) -> None:
        async with client.stream(
            "POST", "/v1/chat/completions", json=CHAT | {"stream": True}
        ) as response:
            async for line in response.aiter_lines():
                received.extend([line] if line else [])

    async with running(emulator) as client:
        with pytest.raises(httpx2.RemoteProtocolError):
            await read(client)
        await emulator.wait_until(lambda: emulator.streams_open == 0)
    assert len(received) == 3
    assert "[DONE]" not in received[-1]
    assert emulator.streams_closed_early == 0


async def test_client_disconnect_mid_stream_counts_as_closed_early(running: Running) -> None:
    """A client that goes away mid-stream ends the stream on the emulator's side."""
    emulator = Emulator(token_delay_s=0.02, reply_tokens=200)
    async with running(emulator) as client:
        with anyio.fail_after(5):
            async with client.stream(
                "POST", "/v1/chat/completions", json=CHAT | {"stream": True}
            ) as response:
                async for _ in response.aiter_lines():
                    break
        assert emulator.streams_open == 1
        await emulator.wait_until(
            lambda: emulator.streams_closed_early == 1 and emulator.streams_open == 0
        )


async def test_an_answer_not_streamed_comes_whole_after_its_generation(running: Running) -> None:
    """Not streamed, the answer takes `token_delay_s` per token, like a stream of it."""
    emulator = Emulator(token_delay_s=0.05, reply_tokens=6)
    emulator.load_instance(QWEN)
    async with running(emulator) as client:
        started = anyio.current_time()
        response = await client.post("/v1/chat/completions", json=CHAT)
        assert anyio.current_time() - started >= 0.3
    assert response.json()["usage"]["completion_tokens"] == 6
    assert emulator.predictions_aborted == 0


async def test_a_client_that_leaves_stops_the_generation(running: Running) -> None:
    """A client gone before its answer stops the prediction, as LM Studio's does ("Client
    disconnected. Stopping generation...")."""
    emulator = Emulator(token_delay_s=0.1, reply_tokens=100)  # 10 s
    emulator.load_instance(QWEN)
    async with running(emulator) as client:
        with pytest.raises(httpx2.ReadTimeout):
            await client.post("/v1/chat/completions", json=CHAT, timeout=0.3)
        await emulator.wait_until(lambda: emulator.predictions_aborted == 1, timeout=1)


async def test_the_prompt_is_read_to_its_end_before_a_prediction_stops(running: Running) -> None:
    """`prompt_delay_s` passes before the first byte, even of a stream; a client that leaves
    meanwhile stops the prediction once the prompt is read ("if the model is busy processing
    the prompt, it will finish first")."""
    emulator = Emulator()
    emulator.load_instance(QWEN)
    emulator.prompt_delay_s = 0.5
    async with running(emulator) as client:
        started = anyio.current_time()
        with pytest.raises(httpx2.ReadTimeout):
            await client.post("/v1/chat/completions", json=CHAT | {"stream": True}, timeout=0.1)
        await emulator.wait_until(lambda: emulator.predictions_aborted == 1, timeout=2)
        assert anyio.current_time() - started >= 0.5
        assert (emulator.streams_open, emulator.streams_closed_early) == (0, 0)
        emulator.prompt_delay_s = 0.2
        started = anyio.current_time()
        async with client.stream(
            "POST", "/v1/chat/completions", json=CHAT | {"stream": True}
        ) as response:
            assert anyio.current_time() - started >= 0.2  # the headers come with the first token
            await response.aread()
    assert emulator.predictions_aborted == 1


async def test_wait_until_wakes_every_waiter(running: Running) -> None:
    """Several tasks can wait at once; one state change wakes them all."""
    emulator = Emulator()
    woken: list[int] = []

    async def wait(number: int, *, task_status: TaskStatus[None]) -> None:
        task_status.started()  # runs on, without a checkpoint, into wait_until's wait
        await emulator.wait_until(lambda: bool(emulator.calls))
        woken.append(number)

    async with running(emulator) as client:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                await tg.start(wait, 1)
                await tg.start(wait, 2)
                await client.get("/lmstudio-greeting")
    assert sorted(woken) == [1, 2]


async def test_wait_until_raises_timeout_error() -> None:
    """wait_until gives up with TimeoutError after its timeout."""
    with pytest.raises(TimeoutError):
        await Emulator().wait_until(lambda: False, timeout=0.05)


async def test_a_load_dies_with_its_server() -> None:
    """uvicorn cancels a running load at shutdown: it leaves no reservation (memory, an id)."""
    emulator = Emulator(load_delay_s=5)
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg, serve(emulator.app) as url:

            async def load() -> None:
                async with httpx2.AsyncClient(base_url=url) as http:
                    with contextlib.suppress(httpx2.TransportError):
                        await http.post("/api/v1/models/load", json={"model": NOMIC})

            tg.start_soon(load)
            await emulator.wait_until(lambda: bool(emulator.calls))
            await anyio.sleep(0.05)  # inside the load's delay
        emulator.load_delay_s = 0
        async with serve(emulator.app) as url, httpx2.AsyncClient(base_url=url) as http:
            loaded = await http.post("/api/v1/models/load", json={"model": NOMIC})
    assert loaded.json()["instance_id"] == NOMIC  # not NOMIC:2: the first id was given back


async def test_deeply_nested_requests_are_no_server_error(running: Running) -> None:
    """Counting the prompt's words does not recurse (two frames a level), and nesting deeper
    than `json.loads` reads is a 400 like any malformed body."""

    def nested(depth: int) -> str:
        deep = "[" * depth + '"two words"' + "]" * depth
        return f'{{"model": "{QWEN}", "messages": {deep}}}'

    async with running(Emulator()) as http:
        counted = await http.post("/v1/chat/completions", content=nested(600))
        too_deep = await http.post("/v1/chat/completions", content=nested(5000))
    assert counted.status_code == 200
    assert counted.json()["usage"]["prompt_tokens"] == 2
    assert too_deep.status_code == 400
