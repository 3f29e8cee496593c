"""Ollama's API (docs/design.md §4.8), spoken to by the real `ollama` Python client: lmswitch in
front of the emulator, over real sockets; and the translation's pure parts."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any
from unittest.mock import ANY

import anyio
import ollama
import pytest
from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from proxy.emulator import Emulator
from proxy.errors import BadRequestError, UpstreamError
from proxy.metrics import UNKNOWN_MODEL
from proxy.ollama import (
    CHAT,
    EMBED,
    EMBEDDINGS,
    GENERATE,
    Translated,
    chat_request,
    details,
    embed_request,
    embeddings_request,
    expires_at,
    generate_request,
    keep_alive_s,
    model_name,
    show,
)
from proxy.ollama_answers import (
    EmbedTranslator,
    TextTranslator,
    Timing,
    nothing_to_do,
    upstream_error,
)
from proxy.views import ModelView
from tests.helpers import (
    LLAMA,
    NOMIC,
    QWEN,
    Proxy,
    logging_as_serve_does,
    proxy_for,
    running,
    scrape,
    serve,
    text_access_lines,
)

HELLO = [{"role": "user", "content": "Say hello"}]


@asynccontextmanager
async def client(proxy: Proxy, **kwargs: Any) -> AsyncIterator[ollama.AsyncClient]:
    """The `ollama` client pointed at the proxy (it has no `__aenter__` of its own)."""
    ollama_client = ollama.AsyncClient(host=proxy.url, timeout=10, **kwargs)
    try:
        yield ollama_client
    finally:
        await ollama_client.close()  # type: ignore[no-untyped-call] # the client's own


def forwarded(emulator: Emulator, path: str) -> dict[str, Any]:
    """The body LM Studio got last on `path`."""
    body = next(c.body for c in reversed(emulator.calls) if c.path == path)
    assert isinstance(body, dict)
    return body


# --- listings -----------------------------------------------------------------------------------


async def test_list_names_every_model_with_its_details() -> None:
    """`/api/tags`: every model LM Studio has (and the aliases), with size, family, quantisation."""
    async with (
        running(Emulator(), models={"aliases": {"fast": LLAMA}}) as proxy,
        client(proxy) as ollama_client,
    ):
        listed = {model.model: model for model in (await ollama_client.list()).models}
    assert {QWEN, LLAMA, NOMIC, "fast"} <= listed.keys()
    qwen = listed[QWEN]
    assert qwen.size == 4_683_073_184
    assert qwen.details is not None
    assert (qwen.details.family, qwen.details.quantization_level) == ("qwen2", "Q4_K_M")
    assert qwen.details.parameter_size == "7B"
    assert listed["fast"].size == listed[LLAMA].size


async def test_ps_shows_loaded_models_and_when_they_expire() -> None:
    """`/api/ps`: the loaded models only, `expires_at` from the idle TTL (or far off without)."""
    async with (
        running(Emulator(reply_tokens=2), models={"idle_ttl": "10m", "max_loaded": 2}) as proxy,
        client(proxy) as ollama_client,
    ):
        assert (await ollama_client.ps()).models == []
        await ollama_client.chat(model=QWEN, messages=HELLO)
        await ollama_client.chat(model=LLAMA, messages=HELLO, keep_alive=-1)
        running_models = {model.model: model for model in (await ollama_client.ps()).models}
    assert running_models.keys() == {QWEN, LLAMA}
    now = datetime.now(UTC)
    qwen_expires = running_models[QWEN].expires_at
    assert qwen_expires is not None
    assert 590 < (qwen_expires - now).total_seconds() <= 600
    llama_expires = running_models[LLAMA].expires_at
    assert llama_expires is not None
    assert llama_expires.year > now.year + 200  # kept until evicted
    assert running_models[QWEN].size_vram == 4_683_073_184


async def test_show_describes_a_model_and_version_answers() -> None:
    """`/api/show`: details, context length and capabilities; `/api/version`: a version."""
    async with running(Emulator()) as proxy, client(proxy) as ollama_client:
        shown = await ollama_client.show(QWEN)
        embedder = await ollama_client.show(NOMIC)
        version = (await proxy.http.get("/api/version")).json()
    assert shown.details is not None
    assert shown.details.family == "qwen2"
    assert shown.modelinfo is not None
    assert shown.modelinfo["qwen2.context_length"] == 32768
    assert shown.capabilities == ["completion", "tools"]
    assert embedder.capabilities == ["embedding"]
    assert isinstance(version["version"], str)


# --- chat, generate, embed ----------------------------------------------------------------------


async def test_chat_answers_whole_and_streamed() -> None:
    """`/api/chat` with and without streaming: the same words, a last line with counts."""
    async with running(Emulator(reply_tokens=4)) as proxy, client(proxy) as ollama_client:
        whole = await ollama_client.chat(model=QWEN, messages=HELLO)
        parts = [part async for part in await ollama_client.chat(QWEN, HELLO, stream=True)]
    assert whole.message.content == "Hello from the LM"
    assert whole.done
    assert whole.done_reason == "stop"
    assert whole.eval_count == 4
    assert whole.prompt_eval_count == 2
    assert whole.total_duration is not None
    assert whole.total_duration > 0
    assert "".join(part.message.content or "" for part in parts) == "Hello from the LM"
    assert [part.done for part in parts] == [False] * 4 + [True]
    assert parts[-1].eval_count == 4
    assert parts[-1].total_duration is not None
    assert parts[-1].total_duration > 0


async def test_chat_streams_unless_told_not_to() -> None:
    """Without `stream`, the answer is NDJSON lines, as Ollama's is."""
    body = {"model": QWEN, "messages": HELLO}
    async with running(Emulator(reply_tokens=3)) as proxy:
        response = await proxy.http.post("/api/chat", json=body)
    assert response.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert len(lines) == 4
    assert lines[-1]["done"] is True
    assert lines[-1]["message"] == {"role": "assistant", "content": ""}


async def test_generate_answers_whole_and_streamed() -> None:
    """`/api/generate` goes to the chat endpoint (the model's template applies), `raw` to the
    completions endpoint."""
    emulator = Emulator(reply_tokens=3)
    async with running(emulator) as proxy, client(proxy) as ollama_client:
        whole = await ollama_client.generate(model=LLAMA, prompt="Say hello", system="Be brief")
        chat_body = forwarded(emulator, "/v1/chat/completions")
        parts = [
            part
            async for part in await ollama_client.generate(
                LLAMA, "Say hello", raw=True, stream=True
            )
        ]
        raw_body = forwarded(emulator, "/v1/completions")
    assert whole.response == "Hello from the"
    assert whole.done
    assert whole.eval_count == 3
    assert chat_body["messages"] == [
        {"role": "system", "content": "Be brief"},
        {"role": "user", "content": "Say hello"},
    ]
    assert "".join(part.response or "" for part in parts) == "Hello from the"
    assert parts[-1].done
    assert parts[-1].done_reason == "stop"
    assert raw_body["prompt"] == "Say hello"


async def test_embed_and_the_older_embeddings() -> None:
    """`/api/embed` answers a vector per input; `/api/embeddings` one for its prompt."""
    async with running(Emulator()) as proxy, client(proxy) as ollama_client:
        embedded = await ollama_client.embed(model=NOMIC, input=["one", "two"])
        older = await ollama_client.embeddings(model=NOMIC, prompt="one")
    assert len(embedded.embeddings) == 2
    assert embedded.embeddings[0] != embedded.embeddings[1]
    assert list(older.embedding) == list(embedded.embeddings[0])


async def test_options_format_and_tools_reach_lm_studio() -> None:
    """`options` become OpenAI's fields (unknown ones dropped), `format` a response_format,
    tools pass through, and a tool call comes back with its arguments as an object."""
    emulator = Emulator()
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    options = {"temperature": 0.2, "top_p": 0.9, "seed": 7, "num_predict": 5, "stop": ["x"]}
    async with running(emulator) as proxy, client(proxy) as ollama_client:
        await ollama_client.chat(
            QWEN, HELLO, format="json", options={**options, "num_ctx": 8192, "mirostat": 1}
        )
        sent = forwarded(emulator, "/v1/chat/completions")
        messages = [{"role": "user", "content": "What is the get_weather in Paris?"}]
        answer = await ollama_client.chat(QWEN, messages, tools=[tool])
        tools_sent = forwarded(emulator, "/v1/chat/completions")["tools"]
        streamed = [
            part
            async for part in await ollama_client.chat(QWEN, messages, tools=[tool], stream=True)
        ]
    assert {k: sent[k] for k in ("temperature", "top_p", "seed", "stop")} == {
        "temperature": 0.2,
        "top_p": 0.9,
        "seed": 7,
        "stop": ["x"],
    }
    assert sent["max_tokens"] == 5
    assert "num_ctx" not in sent
    assert "mirostat" not in sent
    assert "options" not in sent
    assert sent["response_format"]["type"] == "json_schema"
    assert tools_sent[0]["function"]["name"] == "get_weather"
    calls = answer.message.tool_calls
    assert calls is not None
    assert calls[0].function.name == "get_weather"
    assert isinstance(calls[0].function.arguments, dict)
    assert "city" in calls[0].function.arguments
    streamed_calls = [call for part in streamed for call in part.message.tool_calls or []]
    assert [call.function.arguments for call in streamed_calls] == [calls[0].function.arguments]


# --- models: swaps, keep_alive ------------------------------------------------------------------


async def test_chat_swaps_between_two_models() -> None:
    """With one slot, two models asked for at once are both answered, one after the other."""
    emulator = Emulator(reply_tokens=2, token_delay_s=0.01)
    async with (
        running(emulator, models={"max_loaded": 1}, scheduler={"swap_grace": 0}) as proxy,
        client(proxy) as ollama_client,
    ):
        answers: dict[str, str] = {}

        async def ask(model: str) -> None:
            answer = await ollama_client.chat(model=model, messages=HELLO)
            answers[model] = answer.message.content or ""

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(ask, QWEN)
                tg.start_soon(ask, LLAMA)
    assert answers == {QWEN: "Hello from", LLAMA: "Hello from"}
    assert emulator.load_count(QWEN) == emulator.load_count(LLAMA) == 1
    assert emulator.unload_count() == 1  # the first was unloaded for the second


async def test_keep_alive_zero_unloads_the_model_after_the_request() -> None:
    """`keep_alive: 0` answers, then unloads the model at once; the next request without it
    keeps the model loaded (the TTL was that instance's)."""
    emulator = Emulator(reply_tokens=2)
    async with running(emulator) as proxy, client(proxy) as ollama_client:
        answer = await ollama_client.chat(model=QWEN, messages=HELLO, keep_alive=0)
        assert answer.message.content == "Hello from"
        await emulator.wait_until(lambda: emulator.unload_count(QWEN) == 1, timeout=2)
        await proxy.wait_for(lambda status: status["loaded"] == [])
        await ollama_client.chat(model=QWEN, messages=HELLO)
        await proxy.wait_for(lambda status: status["loaded"] == [QWEN])
        with anyio.move_on_after(0.3):
            await emulator.wait_until(lambda: emulator.unload_count(QWEN) == 2)
        assert emulator.unload_count(QWEN) == 1


async def test_empty_requests_load_and_keep_alive_zero_unloads() -> None:
    """Ollama's idioms: a chat with no messages loads the model; `generate` with no prompt and
    `keep_alive: 0` unloads it (what `ollama stop` sends)."""
    emulator = Emulator()
    async with running(emulator) as proxy, client(proxy) as ollama_client:
        loaded = await ollama_client.chat(model=QWEN, messages=[])
        assert QWEN in emulator.instances
        unloaded = await ollama_client.generate(model=QWEN, keep_alive=0)
        assert QWEN not in emulator.instances
    assert loaded.done_reason == "load"
    assert unloaded.done_reason == "unload"


# --- errors -------------------------------------------------------------------------------------


async def test_unknown_model_and_bad_bodies_get_ollamas_errors() -> None:
    """Errors are `{"error": "..."}` with Ollama's statuses and its wording for a model it lacks."""
    async with running(Emulator()) as proxy, client(proxy) as ollama_client:
        with pytest.raises(ollama.ResponseError) as missing:
            await ollama_client.chat(model="no-such-model", messages=HELLO)
        with pytest.raises(ollama.ResponseError) as streamed_missing:
            async for _ in await ollama_client.generate("no-such-model", "hi", stream=True):
                pass
        with pytest.raises(ollama.ResponseError) as wrong_type:
            await ollama_client.embed(model=QWEN, input="x")
        not_json = await proxy.http.post("/api/chat", content=b"{nope")
        bad_field = await proxy.http.post("/api/chat", json={"model": QWEN, "messages": "hi"})
        bad_keep = await proxy.http.post("/api/generate", json={"model": QWEN, "keep_alive": "x"})
        bad_show = await proxy.http.post("/api/show", json={"model": "nope"})
        wrong_method = await proxy.http.get("/api/chat")
    assert missing.value.status_code == 404
    assert missing.value.error == 'model "no-such-model" not found, try pulling it first'
    assert streamed_missing.value.status_code == 404
    assert wrong_type.value.status_code == 400
    for response, status in [
        (not_json, 400),
        (bad_field, 400),
        (bad_keep, 400),
        (bad_show, 404),
        (wrong_method, 405),
    ]:
        assert response.status_code == status
        assert set(response.json()) == {"error"}
        assert isinstance(response.json()["error"], str)
    assert bad_keep.json()["error"] == 'time: invalid duration "x"'


async def test_lm_studios_error_keeps_its_status_in_ollamas_envelope() -> None:
    """An error answer from LM Studio (here, to every raw completion) keeps its status; its
    message moves into `{"error": "..."}`."""
    emulator = Emulator()

    async def refusing(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/v1/completions":
            error = {"error": {"message": "'prompt' is too long", "type": "invalid_request"}}
            await JSONResponse(error, status_code=400)(scope, receive, send)
        else:
            await emulator.app(scope, receive, send)

    async with serve(refusing) as upstream_url, proxy_for(upstream_url) as proxy:
        body = {"model": QWEN, "prompt": "hi", "raw": True}
        response = await proxy.http.post("/api/generate", json=body)
        assert (await proxy.status())["in_flight"] == 0
    assert response.status_code == 400
    assert response.json() == {"error": "'prompt' is too long"}


async def test_upstream_failure_mid_stream_ends_with_an_error_line() -> None:
    """LM Studio breaking off a stream: the last line is `{"error": ...}`, which the client
    raises; the model is freed."""
    emulator = Emulator(reply_tokens=20)
    emulator.cut_streams_after = 3
    async with running(emulator) as proxy, client(proxy) as ollama_client:
        parts: list[ollama.ChatResponse] = []

        async def read() -> None:
            async for part in await ollama_client.chat(QWEN, HELLO, stream=True):
                parts.append(part)  # noqa: PERF401 - the lines before the error are kept

        with pytest.raises(ollama.ResponseError):
            await read()
        assert len(parts) == 3
        assert (await proxy.status())["in_flight"] == 0


async def test_keys_are_asked_for_as_on_v1() -> None:
    """With client keys set, Ollama's routes need one (401 in Ollama's shape without), and a
    client key is enough: they are not management routes."""
    sections: dict[str, Any] = {"auth": {"api_keys": ["sk-client"], "admin_keys": ["sk-admin"]}}
    async with running(Emulator(reply_tokens=2), **sections) as proxy:
        async with client(proxy) as anonymous:
            with pytest.raises(ollama.ResponseError) as refused:
                await anonymous.list()
        headers = {"authorization": "Bearer sk-client"}
        async with client(proxy, headers=headers) as keyed:
            listed = await keyed.list()
            answer = await keyed.chat(model=QWEN, messages=HELLO)
    assert refused.value.status_code == 401
    assert "API key" in refused.value.error
    assert QWEN in {model.model for model in listed.models}
    assert answer.message.content == "Hello from"


# --- the request's life: disconnects, metrics ---------------------------------------------------


async def test_client_leaving_mid_stream_frees_the_model() -> None:
    """A client that disconnects mid-stream closes LM Studio's stream and releases the lease:
    nothing in flight, in the status and in the gauge, within a second."""
    emulator = Emulator(reply_tokens=50, token_delay_s=0.05)
    body = {"model": QWEN, "messages": HELLO}
    async with running(emulator) as proxy:
        async with proxy.http.stream("POST", "/api/chat", json=body) as response:
            async for line in response.aiter_lines():
                assert json.loads(line)["done"] is False
                break
        await emulator.wait_until(lambda: emulator.streams_closed_early == 1, timeout=1)
        await proxy.wait_for(lambda status: status["in_flight"] == 0)
        exposition = await scrape(proxy.http)
    assert exposition.value("lmswitch_in_flight_requests", model=QWEN) == 0
    assert exposition.value("lmswitch_client_disconnects_total", model=QWEN) == 1


async def test_ollama_requests_count_under_their_endpoint_labels() -> None:
    """Chat, generate and both embedding routes count as ollama_chat, ollama_generate and
    ollama_embed, with their tokens, in the metrics and the access lines."""
    text: dict[str, Any] = {"logging": {"format": "text"}}
    with logging_as_serve_does(**text) as captured:
        async with (
            running(Emulator(reply_tokens=2), **text) as proxy,
            client(proxy) as ollama_client,
        ):
            await ollama_client.chat(model=QWEN, messages=HELLO)
            await ollama_client.generate(model=QWEN, prompt="hi")
            await ollama_client.embed(model=NOMIC, input="one")
            await ollama_client.embeddings(model=NOMIC, prompt="two")
            with pytest.raises(ollama.ResponseError):
                await ollama_client.chat(model="nope", messages=HELLO)
            exposition = await scrape(proxy.http)
    lines = [line for line in text_access_lines(captured) if line["endpoint"].startswith("ol")]
    assert [(line["endpoint"], line["model"], line["status"]) for line in lines] == [
        ("ollama_chat", QWEN, "200"),
        ("ollama_generate", QWEN, "200"),
        ("ollama_embed", NOMIC, "200"),
        ("ollama_embed", NOMIC, "200"),
        ("ollama_chat", UNKNOWN_MODEL, "404"),
    ]
    requests = exposition.series("lmswitch_requests_total")  # endpoint, model, status
    assert requests[("ollama_chat", QWEN, "200")] == 1
    assert requests[("ollama_generate", QWEN, "200")] == 1
    assert requests[("ollama_embed", NOMIC, "200")] == 2
    assert requests[("ollama_chat", UNKNOWN_MODEL, "404")] == 1
    assert exposition.value("lmswitch_tokens_total", model=QWEN, kind="completion") == 4


# --- the translation, pure ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        (0, 0.0),
        ("0", 0.0),
        (300, 300.0),
        (1.5, 1.5),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("250ms", 0.25),
        ("30s", 30.0),
        ("-1", math.inf),
        (-1, math.inf),
        ("-1m", math.inf),
    ],
    ids=repr,
)
def test_keep_alive_reads_numbers_and_go_durations(value: object, seconds: float | None) -> None:
    assert keep_alive_s(value) == seconds


@pytest.mark.parametrize("value", ["5 minutes", "m", "", True, [1], "nan"])
def test_keep_alive_refuses_what_is_not_a_duration(value: object) -> None:
    with pytest.raises(BadRequestError):
        keep_alive_s(value)


def test_messages_with_images_and_tool_turns_become_openai_messages() -> None:
    """Images become content parts; an assistant's tool calls get ids (arguments as JSON text),
    and the tool messages that answer them refer to those ids."""
    translated = chat_request(
        {
            "messages": [
                {"role": "user", "content": "look", "images": ["/9j/4AAQSkZJRg=="]},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}],
                },
                {"role": "tool", "content": "42", "tool_name": "f"},
            ],
            "stream": False,
        }
    )
    user, assistant, tool = translated.body["messages"]
    assert user["content"][1]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    call = assistant["tool_calls"][0]
    assert call["function"] == {"name": "f", "arguments": '{"a": 1}'}
    assert tool == {"role": "tool", "content": "42", "tool_call_id": call["id"], "name": "f"}
    assert translated.stream is False
    assert generate_request({"prompt": "hi"}).stream is True


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"content": "no role"}]}, "messages"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages"),
        ({"messages": [{"role": "user", "images": "x"}]}, "images"),
        ({"messages": [{"role": "user", "images": [3]}]}, "images"),
        ({"messages": [{"role": "user", "images": ["!!"]}]}, "images"),
        ({"messages": [{"role": "assistant", "tool_calls": "f"}]}, "messages"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"function": {}}]}]}, "messages"),
        ({"options": []}, "options"),
        ({"options": {"temperature": "hot"}}, "options"),
        ({"options": {"num_predict": 1.5}}, "options"),
        ({"options": {"stop": [1]}}, "options"),
        ({"format": "yaml"}, "format"),
        ({"tools": {"name": "f"}}, "tools"),
    ],
    ids=repr,
)
def test_chat_requests_that_cannot_be_translated_are_400s(
    payload: dict[str, Any], param: str
) -> None:
    with pytest.raises(BadRequestError) as refused:
        chat_request(payload)
    assert refused.value.param == param


def test_options_and_formats_map_to_openai_fields() -> None:
    """Single stop strings become lists, no-limit `num_predict` is left out, None options are
    skipped; a schema `format` is a strict json_schema; streams ask for usage."""
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    options = {"stop": "x", "num_predict": -1, "top_k": 40, "seed": None}
    body = chat_request({"messages": HELLO, "options": options, "format": schema}).body
    assert body["stop"] == ["x"]
    assert "max_tokens" not in body
    assert "seed" not in body
    assert body["top_k"] == 40
    assert body["response_format"]["json_schema"] == {
        "name": "schema",
        "strict": True,
        "schema": schema,
    }
    assert body["stream_options"] == {"include_usage": True}
    assert "response_format" not in chat_request({"messages": HELLO, "format": ""}).body


@pytest.mark.parametrize(
    ("translate", "payload"),
    [
        (generate_request, {"prompt": 3}),
        (generate_request, {"prompt": "hi", "system": 3}),
        (embed_request, {"input": 3}),
        (embed_request, {"input": ["a", 1]}),
        (embed_request, {"input": "a", "dimensions": 0}),
        (embeddings_request, {}),
    ],
    ids=repr,
)
def test_generate_and_embed_bodies_are_checked(
    translate: Callable[[dict[str, Any]], Translated], payload: dict[str, Any]
) -> None:
    with pytest.raises(BadRequestError):
        translate(payload)


def test_images_become_data_urls_of_their_kind() -> None:
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n....").decode()
    webp = base64.b64encode(b"RIFF\x00\x00\x00\x00WEBPVP8 ").decode()
    translated = generate_request({"prompt": "see", "system": "be brief", "images": [png, webp]})
    system, user = translated.body["messages"]
    assert system == {"role": "system", "content": "be brief"}
    urls = [part["image_url"]["url"] for part in user["content"][1:]]
    assert urls[0].startswith("data:image/png;base64,")
    assert urls[1].startswith("data:image/webp;base64,")
    assert embed_request({"input": "x", "dimensions": 8}).body == {"input": "x", "dimensions": 8}


def test_model_names_drop_ollamas_default_tag() -> None:
    assert model_name({"model": "qwen:latest"}) == "qwen"
    assert model_name({"name": "qwen:7b"}) == "qwen:7b"  # the older `name`; other tags stay
    assert model_name({}) is None


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"error": {"message": "bad prompt"}}', "bad prompt"),
        (b'{"error": "model crashed"}', "model crashed"),
        (b'{"detail": 1}', "LM Studio answered 400"),
        (b"Bad Gateway", "Bad Gateway"),
        (b"", "LM Studio answered 400"),
    ],
    ids=repr,
)
def test_lm_studios_error_messages_are_read_from_any_envelope(body: bytes, message: str) -> None:
    assert upstream_error(body, 400) == message


def _timing() -> Timing:
    return Timing(total_s=0.5, load_s=0.2, first_byte_s=0.3)


def _sse(*docs: Any) -> bytes:
    return b"".join(f"data: {json.dumps(doc)}\n\n".encode() for doc in docs)


def test_a_stream_reads_thinking_skips_noise_and_relays_lm_studios_error() -> None:
    translator = TextTranslator(GENERATE, "m", stream=True, timing=_timing)
    delta = {"choices": [{"delta": {"reasoning_content": "hm"}}]}
    out = translator.feed(_sse(delta, [1], {"choices": []}) + b"data: {nope\n\n: comment\n\n")
    assert [json.loads(line) for line in out.splitlines()] == [
        {"model": "m", "created_at": ANY, "response": "", "thinking": "hm", "done": False}
    ]
    error = json.loads(translator.feed(_sse({"error": {"message": "overloaded"}})))
    assert error == {"error": "overloaded"}
    with pytest.raises(UpstreamError):
        translator.end()  # no [DONE]: cut short


def test_a_whole_answer_with_tool_calls_and_thinking() -> None:
    """Not streamed: the one document, tool arguments as objects (kept, if not JSON), counts."""
    translator = TextTranslator(CHAT, "m", stream=False, timing=_timing)
    calls = [
        {"function": {"name": "f", "arguments": '{"a": 1}'}},
        {"function": {"name": "g", "arguments": {"b": 2}}},
        {"function": {"name": "h", "arguments": "not json"}},
        "junk",
    ]
    message = {"content": None, "reasoning_content": "so", "tool_calls": calls}
    doc = {
        "choices": [{"message": message, "finish_reason": "tool_calls"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7},
    }
    assert translator.feed(json.dumps(doc).encode()) == b""
    answer = json.loads(translator.end())
    assert answer["message"]["thinking"] == "so"
    assert [call["function"]["arguments"] for call in answer["message"]["tool_calls"]] == [
        {"a": 1},
        {"b": 2},
        {"arguments": "not json"},
    ]
    assert (answer["done_reason"], answer["prompt_eval_count"], answer["eval_count"]) == (
        "stop",
        5,
        7,
    )
    assert (answer["total_duration"], answer["load_duration"]) == (500_000_000, 200_000_000)
    assert answer["prompt_eval_duration"] == 100_000_000
    broken = TextTranslator(CHAT, "m", stream=False, timing=_timing)
    broken.feed(b'{"choices": []}')
    with pytest.raises(UpstreamError):
        broken.end()
    assert json.loads(broken.error(UpstreamError("gone"))) == {"error": "gone"}


def test_embeddings_answers_and_their_failures() -> None:
    older = EmbedTranslator(EMBEDDINGS, "m", timing=_timing)
    older.feed(b'{"data": []}')
    assert json.loads(older.end()) == {"embedding": []}
    newer = EmbedTranslator(EMBED, "m", timing=_timing)
    newer.feed(b'{"data": [{"index": 1, "embedding": [2]}, {"index": 0, "embedding": [1]}]}')
    answer = json.loads(newer.end())
    assert answer["embeddings"] == [[1], [2]]
    assert answer["prompt_eval_count"] == 0  # no usage given
    broken = EmbedTranslator(EMBED, "m", timing=_timing)
    broken.feed(b'{"data": "x"}')
    with pytest.raises(UpstreamError):
        broken.end()
    assert json.loads(broken.error(UpstreamError("gone"))) == {"error": "gone"}


def test_nothing_to_do_answers_in_each_routes_shape() -> None:
    assert nothing_to_do(EMBEDDINGS, "m", unloaded=False) == {"embedding": []}
    assert nothing_to_do(EMBED, "m", unloaded=True) == {"model": "m", "embeddings": []}
    generated = nothing_to_do(GENERATE, "m", unloaded=True)
    assert (generated["response"], generated["done_reason"]) == ("", "unload")


def test_expiry_counts_from_the_last_use_of_an_idle_model() -> None:
    view = ModelView(
        key="m", name="m", type="llm", state="ready", loaded=True, resident=True,
        size_bytes=1, pinned=False, adopted=False, in_flight=0, queued=0, last_used_at=1000.0,
        instance_id="m", duplicates=(), context_length=None, max_context_length=None,
        upstreams=(), available_on=(), expected_load_s=None, loading_s=None, idle_ttl_s=60.0,
    )  # fmt: skip
    assert expires_at(view, now_s=1030.0) == "1970-01-01T00:17:40+00:00"  # 1000 + 60
    busy = replace(view, in_flight=1)
    assert expires_at(busy, now_s=1030.0) == "1970-01-01T00:18:10+00:00"  # now + 60
    assert details(None)["family"] == ""
    assert show(view, None, 0.0)["capabilities"] == ["completion"]
