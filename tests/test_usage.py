"""Usage per key (DESIGN §11.3): the `lmswitch_key_*` metrics, `GET /api/v1/usage` and the
access lines agree, exactly, after a known sequence; busy time is the time a model was held;
no key, raw or hashed, shows anywhere."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from typing import Any

import anyio
import pytest

from proxy.access import RequestRecord, access_log
from proxy.emulator import Emulator
from proxy.events import EventBus
from proxy.metrics import Metrics
from proxy.usage import Usage
from tests.helpers import (
    LLAMA,
    MESSAGES,
    QWEN,
    Exposition,
    Proxy,
    logging_as_serve_does,
    running,
    scrape,
    text_access_lines,
)

GEMMA = "google/gemma-3-4b"
CHAT = "/v1/chat/completions"
API_KEY = "sk-usage-RECOGNISABLE-9191"
ADMIN_KEY = "sk-admin-RECOGNISABLE-8282"


async def usage_when(proxy: Proxy, requests: int, **headers: str) -> dict[str, Any]:
    """`/api/v1/usage` once it has counted `requests` (2 s at most): a request is counted just
    after its last byte."""
    with anyio.fail_after(2):
        while True:
            response = await proxy.http.get("/api/v1/usage", headers=headers)
            assert response.status_code == 200
            body: dict[str, Any] = response.json()
            if sum(row["requests"] for row in body["keys"].values()) >= requests:
                return body
            await anyio.sleep(0.01)


async def stream_with_usage(proxy: Proxy, model: str) -> dict[str, Any]:
    """A streamed chat with `include_usage`: the usage of its last chunk."""
    body = {
        "model": model,
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    usage: dict[str, Any] = {}
    async with proxy.http.stream("POST", CHAT, json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line.removeprefix("data: ")).get("usage") or usage
    assert usage
    return usage


async def promtool_check(text: str) -> None:
    promtool: Any = shutil.which("promtool")
    if promtool is None:
        return  # skipped, not failed: the test's other checks still hold
    with anyio.fail_after(10):
        result = await anyio.run_process(
            [promtool, "check", "metrics"], input=text.encode(), check=False
        )
    report = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, report
    assert report.strip() == ""


async def test_usage_after_a_known_sequence_is_exact_everywhere() -> None:
    """3 chats, 1 stream with usage, a 404 and a failed load: the same counts in the metrics
    (which promtool accepts), in `/api/v1/usage` and in the access lines."""
    emulator = Emulator(reply_tokens=7)
    sections: dict[str, Any] = {"models": {"max_loaded": 1}, "logging": {"level": "info"}}
    with logging_as_serve_does(**sections) as captured:
        async with running(emulator, **sections) as proxy:
            prompt = 0
            for _ in range(3):
                ok = await proxy.http.post(CHAT, json={"model": QWEN, "messages": MESSAGES})
                assert ok.status_code == 200
                assert ok.json()["usage"]["completion_tokens"] == 7
                prompt += ok.json()["usage"]["prompt_tokens"]
            streamed = await stream_with_usage(proxy, QWEN)
            assert streamed["completion_tokens"] == 7
            prompt += streamed["prompt_tokens"]
            unknown = await proxy.http.post(CHAT, json={"model": "nope", "messages": MESSAGES})
            assert unknown.status_code == 404
            emulator.fail_next_loads = 1
            failed = await proxy.http.post(CHAT, json={"model": GEMMA, "messages": MESSAGES})
            assert failed.status_code == 503
            usage = await usage_when(proxy, 6)
            metrics = await scrape(proxy.http)

    assert set(usage["keys"]) == {"anonymous"}
    row = usage["keys"]["anonymous"]
    assert row["requests"] == 6
    assert row["by_status"] == {"200": 4, "404": 1, "503": 1}
    assert row["errors"] == 2
    assert (row["prompt_tokens"], row["completion_tokens"]) == (prompt, 4 * 7)
    assert row["queue_waits"] == 4  # the requests granted their model; the 404 and 503 were not
    assert row["busy_s"] > 0
    assert row["queue_wait_s"] > 0  # the first chat waited for QWEN to load
    assert isinstance(usage["since"], float)

    assert metrics.series("lmswitch_key_requests_total") == {
        ("anonymous", "200"): 4,
        ("anonymous", "404"): 1,
        ("anonymous", "503"): 1,
    }
    assert metrics.series("lmswitch_key_tokens_total") == {
        ("anonymous", "prompt"): prompt,
        ("anonymous", "completion"): 4 * 7,
    }
    busy = metrics.value("lmswitch_key_busy_seconds_total", key="anonymous")
    waited = metrics.value("lmswitch_key_queue_wait_seconds_total", key="anonymous")
    assert busy is not None
    assert waited is not None
    assert row["busy_s"] == pytest.approx(busy, abs=0.001)
    assert row["queue_wait_s"] == pytest.approx(waited, abs=0.001)
    # The per-model series count the same requests and tokens.
    assert sum(metrics.series("lmswitch_requests_total").values()) == 6
    assert sum(metrics.series("lmswitch_tokens_total").values()) == prompt + 4 * 7
    await promtool_check(metrics.text)

    routed = [line for line in text_access_lines(captured) if line["endpoint"] == CHAT]
    assert Counter(line["status"] for line in routed) == {"200": 4, "404": 1, "503": 1}
    assert {line.get("key", "anonymous") for line in routed} == {"anonymous"}
    waits_ms = sum(float(line["queue_wait_ms"]) for line in routed)
    assert waits_ms / 1000 == pytest.approx(row["queue_wait_s"], abs=0.01)


async def test_busy_seconds_are_the_time_a_model_was_held() -> None:
    """With a token delay, the busy time is the generation's, within the request's duration:
    for a plain chat, and for a stream that waited for a load with lines of progress."""
    emulator = Emulator(reply_tokens=10, token_delay_s=0.03, load_delay_s=1.5)
    sections: dict[str, Any] = {"scheduler": {"loading_feedback_after": 0.2}}
    async with running(emulator, **sections) as proxy:
        body = {"model": QWEN, "messages": MESSAGES, "stream": True}
        async with proxy.http.stream("POST", CHAT, json=body) as response:  # loads: feedback
            assert response.status_code == 200
            text = (await response.aread()).decode()
        assert ": " in text  # it got lines of progress while QWEN loaded
        first = await usage_when(proxy, 1)
        chat = await proxy.http.post(CHAT, json={"model": QWEN, "messages": MESSAGES})
        assert chat.status_code == 200
        second = await usage_when(proxy, 2)
    streamed_s = first["keys"]["anonymous"]["busy_s"]
    both_s = second["keys"]["anonymous"]["busy_s"]
    generation_s = 10 * 0.03
    # The stream's 10 tokens come 9 delays apart; the chat's answer comes after 10 of them.
    assert 9 * 0.03 <= streamed_s < generation_s + 1.0  # held after the load, not during it
    assert generation_s <= both_s - streamed_s < generation_s + 1.0
    assert first["keys"]["anonymous"]["queue_wait_s"] >= 1.4  # the load


def test_keys_are_counted_apart_under_their_names() -> None:
    """Each key name gets its own series and row; the request path reuses their children."""
    metrics, usage = Metrics(), Usage()
    log = access_log(metrics, EventBus(), usage)
    for key, status, busy_s in (("alice", 200, 0.5), ("alice", 429, 0.0), ("batch", 200, 2.0)):
        record = RequestRecord("r", "POST", CHAT, QWEN, started=0.0, status=status, key=key)
        record.busy_s, record.granted, record.queue_wait_s = busy_s, busy_s > 0, 0.25
        record.prompt_tokens, record.completion_tokens = (3, 5) if busy_s else (None, None)
        log(record)
    sample = metrics.registry.get_sample_value
    assert sample("lmswitch_key_requests_total", {"key": "alice", "status": "200"}) == 1
    assert sample("lmswitch_key_requests_total", {"key": "alice", "status": "429"}) == 1
    assert sample("lmswitch_key_busy_seconds_total", {"key": "batch"}) == 2.0
    assert sample("lmswitch_key_tokens_total", {"key": "alice", "kind": "completion"}) == 5
    assert sample("lmswitch_key_queue_wait_seconds_total", {"key": "alice"}) == 0.25
    rows = usage.rows()
    assert list(rows) == ["alice", "batch"]
    assert rows["alice"] == {
        "requests": 2,
        "by_status": {"200": 1, "429": 1},
        "errors": 1,
        "prompt_tokens": 3,
        "completion_tokens": 5,
        "busy_s": 0.5,
        "queue_wait_s": 0.25,
        "queue_waits": 1,
    }
    assert rows["batch"]["busy_s"] == 2.0


async def test_usage_is_admin_only_and_no_key_shows_anywhere() -> None:
    """With keys set, `/api/v1/usage` needs the admin key, and no key, raw or as its SHA-256,
    appears in the logs, metrics, events, status or usage."""
    sections: dict[str, Any] = {
        "auth": {"api_keys": [API_KEY], "admin_keys": [ADMIN_KEY]},
        "logging": {"format": "json", "level": "debug"},
    }
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    client = {"authorization": f"Bearer {API_KEY}"}
    secrets = [API_KEY, ADMIN_KEY]
    secrets += [hashlib.sha256(key.encode()).hexdigest() for key in (API_KEY, ADMIN_KEY)]
    seen: list[str] = []
    subscribed = anyio.Event()
    with logging_as_serve_does(**sections) as captured:
        async with running(Emulator(), **sections) as proxy:
            assert (await proxy.http.get("/api/v1/usage")).status_code == 401
            assert (await proxy.http.get("/api/v1/usage", headers=client)).status_code == 401
            async with anyio.create_task_group() as tg:

                async def listen() -> None:
                    async with proxy.http.stream("GET", "/api/v1/events", headers=admin) as events:
                        async for line in events.aiter_lines():
                            seen.append(line)
                            subscribed.set()  # the snapshot is coming
                            if line == "event: request":
                                tg.cancel_scope.cancel()

                tg.start_soon(listen)
                with anyio.fail_after(5):
                    await subscribed.wait()
                    body = {"model": QWEN, "messages": MESSAGES}
                    ok = await proxy.http.post(CHAT, json=body, headers=client)
                    assert ok.status_code == 200
                    wrong = await proxy.http.post(CHAT, json=body, headers=admin)
                    assert wrong.status_code == 401
            with anyio.fail_after(5):
                usage = await usage_when(proxy, 4, **admin)
            shown = [
                json.dumps(usage),
                (await proxy.http.get("/metrics")).text,
                (await proxy.http.get("/api/v1/status", headers=admin)).text,
                *seen,
            ]
    assert set(usage["keys"]) == {"anonymous"}  # unnamed keys are anonymous
    # Refusals count too (as in `lmswitch_requests_total`): the two of the usage, the chat's.
    assert usage["keys"]["anonymous"]["by_status"] == {"200": 1, "401": 3}
    everything = "\n".join([*shown, *captured.lines])
    everything += "".join(repr(record.__dict__) for record in captured.records)
    for secret in secrets:
        assert secret not in everything


async def test_a_key_metric_exposition_lists_every_family_before_any_request() -> None:
    """The four `lmswitch_key_*` families are exposed (HELP and TYPE) from the start."""
    async with running(Emulator()) as proxy:
        metrics: Exposition = await scrape(proxy.http)
        assert metrics.types["lmswitch_key_requests_total"] == "counter"
        assert metrics.types["lmswitch_key_tokens_total"] == "counter"
        assert metrics.types["lmswitch_key_busy_seconds_total"] == "counter"
        assert metrics.types["lmswitch_key_queue_wait_seconds_total"] == "counter"
        assert (await proxy.http.get("/api/v1/usage")).json()["keys"] == {}
        assert (await proxy.http.post(CHAT, json={"model": LLAMA})).status_code == 400
        assert (await usage_when(proxy, 1))["keys"]["anonymous"]["by_status"] == {"400": 1}


async def test_named_keys_are_counted_under_their_names_end_to_end() -> None:
    """Requests with named keys (`auth.keys`) count under the keys' names: in `/api/v1/usage`,
    the `lmswitch_key_*` metrics and the access lines, and nowhere under the keys themselves."""
    alice, batch, ops = "sk-alice-USAGE-1", "sk-batch-USAGE-2", "sk-ops-USAGE-3"
    keys = [
        {"name": "alice", "key": alice},
        {"name": "batch", "key": batch, "models": [LLAMA]},
        {"name": "ops", "key": ops, "admin": True},
    ]
    sections: dict[str, Any] = {"auth": {"keys": keys}}
    body = {"model": QWEN, "messages": MESSAGES}
    with logging_as_serve_does(**sections) as captured:
        async with running(Emulator(reply_tokens=4), **sections) as proxy:
            for key, model, status in ((alice, QWEN, 200), (alice, QWEN, 200), (batch, LLAMA, 200)):
                headers = {"authorization": f"Bearer {key}"}
                answer = await proxy.http.post(CHAT, json={**body, "model": model}, headers=headers)
                assert answer.status_code == status
            refused = await proxy.http.post(
                CHAT, json=body, headers={"authorization": f"Bearer {batch}"}
            )
            assert refused.status_code == 403  # outside batch's models
            usage = await usage_when(proxy, 4, authorization=f"Bearer {ops}")
            metrics = await scrape(proxy.http)
    assert usage["keys"]["alice"]["by_status"] == {"200": 2}
    assert usage["keys"]["batch"]["by_status"] == {"200": 1, "403": 1}
    assert usage["keys"]["alice"]["completion_tokens"] == 8
    assert metrics.value("lmswitch_key_requests_total", key="alice", status="200") == 2
    assert metrics.value("lmswitch_key_requests_total", key="batch", status="403") == 1
    lines = [line for line in text_access_lines(captured) if line["endpoint"] == CHAT]
    assert Counter(line["key"] for line in lines) == {"alice": 2, "batch": 2}
    for secret in (alice, batch, ops):
        digest = hashlib.sha256(secret.encode()).hexdigest()
        for text in (metrics.text, json.dumps(usage), "\n".join(captured.lines)):
            assert secret not in text
            assert digest not in text
