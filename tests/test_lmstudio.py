"""LMStudioClient against canned answers (httpx2.MockTransport) and against the emulator."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx2
import pytest

from proxy.emulator import Emulator
from proxy.errors import (
    ModelLoadError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from proxy.lmstudio import (
    LMStudioClient,
    Loaded,
    create_http_client,
    request_headers,
    response_headers,
)
from tests.helpers import serve

Handler = Callable[[httpx2.Request], httpx2.Response]


def client_for(handler: Handler, **kwargs: Any) -> LMStudioClient:
    http = httpx2.AsyncClient(
        base_url="http://lmstudio.test", transport=httpx2.MockTransport(handler)
    )
    return LMStudioClient(http, **kwargs)


def test_hop_by_hop_and_credentials_are_not_forwarded_up() -> None:
    headers = [
        (b"Host", b"proxy"),
        (b"Authorization", b"Bearer client-key"),
        (b"x-api-key", b"client-key"),
        (b"Connection", b"keep-alive, x-private"),
        (b"x-private", b"1"),
        (b"Content-Length", b"12"),
        (b"Transfer-Encoding", b"chunked"),
        (b"content-type", b"application/json"),
        (b"x-stainless-lang", b"python"),
    ]
    assert request_headers(headers) == [
        (b"content-type", b"application/json"),
        (b"x-stainless-lang", b"python"),
    ]


def test_hop_by_hop_are_not_relayed_down() -> None:
    headers = [
        (b"Connection", b"close"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Date", b"today"),
        (b"X-Powered-By", b"Express"),
        (b"Content-Type", b"text/event-stream"),
    ]
    assert response_headers(headers) == [
        (b"x-powered-by", b"Express"),
        (b"content-type", b"text/event-stream"),
    ]


async def test_catalogue_cross_checks_loaded_state_with_v0() -> None:
    """Some builds report `loaded_instances` empty; `/api/v0/models` tells the truth."""
    emulator = Emulator()
    emulator.v1_loaded_instances_empty = True
    emulator.load_instance("qwen2.5-7b-instruct")
    emulator.load_instance("qwen2.5-7b-instruct")
    async with serve(emulator.app) as url, httpx2.AsyncClient(base_url=url) as http:
        catalog = {m.key: m for m in await LMStudioClient(http).catalog()}
    qwen = catalog["qwen2.5-7b-instruct"]
    assert qwen.instances == ("qwen2.5-7b-instruct", "qwen2.5-7b-instruct:2")
    assert qwen.size_bytes > 4 * 10**9
    assert qwen.context_length == 4096
    assert catalog["text-embedding-nomic-embed-text-v1.5"].type == "embedding"
    assert catalog["llama-3.2-1b-instruct"].instances == ()


async def test_load_sends_options_and_token_and_reads_either_id_field() -> None:
    seen: list[httpx2.Request] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        answer = {"model_instance_id": "m:2", "load_config": {"context_length": 8192}}
        return httpx2.Response(200, json=answer)

    client = client_for(handler, api_token="sk-lm-abc:def")
    assert await client.load("m", {"context_length": 8192}) == Loaded("m:2", 8192)
    sent = json.loads(seen[0].content)
    assert sent == {"model": "m", "context_length": 8192, "echo_load_config": True}
    assert seen[0].headers["authorization"] == "Bearer sk-lm-abc:def"


@pytest.mark.parametrize(
    ("status", "body", "retry"),
    [
        (500, {"error": {"message": "insufficient system resources to load"}}, "false"),
        (500, {"error": "engine crashed"}, "true"),
        (404, {"error": {"type": "model_not_found", "message": "Model m not found"}}, "false"),
    ],
)
async def test_load_failures_become_model_load_errors(
    status: int, body: dict[str, Any], retry: str
) -> None:
    client = client_for(lambda _: httpx2.Response(status, json=body))
    with pytest.raises(ModelLoadError) as caught:
        await client.load("m", {})
    assert caught.value.status_code == 503
    assert caught.value.headers()["x-should-retry"] == retry
    assert "m" in caught.value.message


async def test_unexpected_endpoint_answer_is_an_error_not_data() -> None:
    """LM Studio answers unknown routes with 200 and an error string (an old server)."""
    body = b'{"error":"Unexpected endpoint or method. (GET /api/v1/models)"}'
    client = client_for(lambda _: httpx2.Response(200, content=body))
    with pytest.raises(UpstreamError) as caught:
        await client.catalog()
    assert "0.4 or later" in caught.value.message
    assert caught.value.code == "upstream_unsupported"


async def test_unauthorised_names_the_token_setting() -> None:
    body = {"error": {"type": "invalid_request", "message": "An LM Studio API token is required"}}
    client = client_for(lambda _: httpx2.Response(401, json=body))
    with pytest.raises(UpstreamError) as caught:
        await client.catalog()
    assert "upstream.api_token" in caught.value.message


async def test_invalid_json_and_plain_text_errors() -> None:
    client = client_for(lambda _: httpx2.Response(200, content=b"<html>"))
    with pytest.raises(UpstreamError, match="invalid JSON"):
        await client.catalog()
    client = client_for(lambda _: httpx2.Response(502, content=b"Bad Gateway"))
    with pytest.raises(UpstreamError, match="Bad Gateway"):
        await client.catalog()


async def test_unload_of_a_gone_instance_counts_as_done() -> None:
    body = {"error": {"message": "no such instance"}}
    client = client_for(lambda _: httpx2.Response(404, json=body))
    await client.unload("m")  # no error
    client = client_for(lambda _: httpx2.Response(500, json=body))
    with pytest.raises(UpstreamError):
        await client.unload("m")


async def test_connection_refused_is_unavailable() -> None:
    def refuse(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ConnectError("refused", request=request)

    client = client_for(refuse)
    with pytest.raises(UpstreamUnavailableError):
        await client.catalog()
    with pytest.raises(UpstreamUnavailableError):
        await client.open_completion("/v1/chat/completions", b"{}", [])


async def test_timeouts() -> None:
    def slow(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ReadTimeout("slow", request=request)

    client = client_for(slow)
    with pytest.raises(UpstreamTimeoutError):
        await client.open_completion("/v1/chat/completions", b"{}", [])
    with pytest.raises(UpstreamUnavailableError):
        await client.unload("m")


async def test_load_timeout_is_a_504_naming_the_setting() -> None:
    emulator = Emulator(load_delay_s=5)
    async with (
        serve(emulator.app) as url,
        create_http_client(url, connect_timeout_s=1, read_timeout_s=10) as http,
    ):
        client = LMStudioClient(http, load_timeout_s=0.2)
        with pytest.raises(UpstreamTimeoutError) as caught:
            await client.load("llama-3.2-1b-instruct", {})
    assert caught.value.status_code == 504
    assert "load_timeout" in caught.value.message


async def test_a_get_on_a_stale_connection_is_retried_once() -> None:
    attempts: list[str] = []

    def flaky(request: httpx2.Request) -> httpx2.Response:
        attempts.append(request.url.path)
        if len(attempts) == 1:
            raise httpx2.RemoteProtocolError("server closed the connection", request=request)
        if request.url.path == "/api/v1/models":
            return httpx2.Response(200, json={"models": []})
        return httpx2.Response(200, json={"data": []})

    assert await client_for(flaky).catalog() == []
    assert attempts == ["/api/v1/models", "/api/v1/models", "/api/v0/models"]
