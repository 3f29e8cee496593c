"""Metrics over real sockets: docs/metrics.md's instruments, their exact values, labels and lint."""

from __future__ import annotations

import importlib.util
import math
import shutil
import uuid
from collections.abc import Callable
from typing import Any

import anyio
import httpx2
import pytest

from proxy.access import RequestRecord, access_log
from proxy.app import create_app
from proxy.emulator import Emulator
from proxy.events import EventBus
from proxy.metrics import UNKNOWN_MODEL, Metrics
from proxy.openai_routes import PROXIED_PATHS
from proxy.usage import Usage
from tests.helpers import (
    LLAMA,
    MESSAGES,
    QWEN,
    Exposition,
    Proxy,
    running,
    scrape,
    serve,
    settings_for,
)

GEMMA = "google/gemma-3-4b"
CHAT = "/v1/chat/completions"

# docs/metrics.md, frozen: name -> (type, labels).
FROZEN: dict[str, tuple[str, frozenset[str]]] = {
    "lmswitch_requests_total": ("counter", frozenset({"model", "endpoint", "status"})),
    "lmswitch_request_duration_seconds": ("histogram", frozenset({"model", "endpoint"})),
    "lmswitch_time_to_first_byte_seconds": ("histogram", frozenset({"model", "endpoint"})),
    "lmswitch_queue_wait_seconds": ("histogram", frozenset({"model"})),
    "lmswitch_model_loads_total": ("counter", frozenset({"model", "result", "upstream"})),
    "lmswitch_model_load_duration_seconds": ("histogram", frozenset({"model", "upstream"})),
    "lmswitch_model_unloads_total": ("counter", frozenset({"model", "reason", "upstream"})),
    "lmswitch_model_loaded": ("gauge", frozenset({"model", "upstream"})),
    "lmswitch_in_flight_requests": ("gauge", frozenset({"model"})),
    "lmswitch_queued_requests": ("gauge", frozenset({"model"})),
    "lmswitch_tokens_total": ("counter", frozenset({"model", "kind"})),
    "lmswitch_client_disconnects_total": ("counter", frozenset({"model"})),
    "lmswitch_upstream_up": ("gauge", frozenset({"upstream"})),
    "lmswitch_key_requests_total": ("counter", frozenset({"key", "status"})),
    "lmswitch_key_tokens_total": ("counter", frozenset({"key", "kind"})),
    "lmswitch_key_busy_seconds_total": ("counter", frozenset({"key"})),
    "lmswitch_key_queue_wait_seconds_total": ("counter", frozenset({"key"})),
}
HISTOGRAMS = [name for name, (kind, _) in FROZEN.items() if kind == "histogram"]

# `lmswitch serve` runs on uvloop where it is installed, whose clock ticks in milliseconds.
HAS_UVLOOP = importlib.util.find_spec("uvloop") is not None
UVLOOP = pytest.param(
    ("asyncio", {"use_uvloop": True}),
    id="uvloop",
    marks=pytest.mark.skipif(not HAS_UVLOOP, reason="uvloop is not installed"),
)


async def settled(http: httpx2.AsyncClient, done: Callable[[Exposition], bool]) -> Exposition:
    """Scrape until `done` holds (2 s at most): a request is counted just after its last byte."""
    with anyio.fail_after(2):
        while not done(metrics := await scrape(http)):  # noqa: ASYNC110 - seen over HTTP
            await anyio.sleep(0.01)
    return metrics


def observed(series: dict[tuple[str, ...], float]) -> dict[tuple[str, ...], float]:
    """The series that counted something (a child may exist, at 0, before its first count)."""
    return {labels: value for labels, value in series.items() if value}


def answered(metrics: Exposition) -> float:
    return sum(metrics.series("lmswitch_requests_total").values())


async def chat(proxy: Proxy, model: str) -> httpx2.Response:
    return await proxy.http.post(CHAT, json={"model": model, "messages": MESSAGES})


@pytest.mark.parametrize("anyio_backend", ["asyncio", UVLOOP])
async def test_every_metric_has_the_values_a_known_sequence_implies() -> None:
    """Load, request, swap, disconnect, 404 and failed load: every §6 series, exactly."""
    emulator = Emulator(reply_tokens=7)
    async with running(emulator, models={"max_loaded": 1}) as proxy:
        on_a = await chat(proxy, QWEN)  # loads A
        assert on_a.status_code == 200
        on_b = await chat(proxy, LLAMA)  # evicts A, loads B
        assert on_b.status_code == 200

        emulator.token_delay_s = 0.05  # a client that leaves mid-stream, on B
        body = {"model": LLAMA, "messages": MESSAGES, "stream": True}
        async with proxy.http.stream("POST", CHAT, json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    break
        await emulator.wait_until(lambda: emulator.streams_closed_early == 1, timeout=2)
        emulator.token_delay_s = 0.0

        unknown = await chat(proxy, "no-such-model")
        assert unknown.status_code == 404

        emulator.fail_next_loads = 1  # evicts B, then the load of C fails
        failed = await chat(proxy, GEMMA)
        assert failed.status_code == 503
        assert failed.json()["error"]["code"] == "model_load_failed"

        metrics = await settled(proxy.http, lambda m: answered(m) == 5)

    a_usage, b_usage = on_a.json()["usage"], on_b.json()["usage"]
    assert metrics.series("lmswitch_requests_total") == {
        (CHAT, QWEN, "200"): 1,
        (CHAT, LLAMA, "200"): 2,  # the stream's status was 200 when its client left
        (CHAT, UNKNOWN_MODEL, "404"): 1,
        (CHAT, GEMMA, "503"): 1,
    }
    assert observed(metrics.series("lmswitch_request_duration_seconds_count")) == {
        (CHAT, QWEN): 1,
        (CHAT, LLAMA): 2,
        (CHAT, UNKNOWN_MODEL): 1,
        (CHAT, GEMMA): 1,
    }
    # First bytes are timed on relayed answers; the proxy's own errors have none.
    assert observed(metrics.series("lmswitch_time_to_first_byte_seconds_count")) == {
        (CHAT, QWEN): 1,
        (CHAT, LLAMA): 2,
    }
    # Waits are timed for requests that got their model; C's failed.
    assert observed(metrics.series("lmswitch_queue_wait_seconds_count")) == {
        (QWEN,): 1,
        (LLAMA,): 2,
    }
    # The host's name is the `upstream` label: one host, named `default`.
    assert metrics.series("lmswitch_model_loads_total") == {
        (QWEN, "ok", "default"): 1,
        (LLAMA, "ok", "default"): 1,
        (GEMMA, "failed", "default"): 1,
    }
    assert observed(metrics.series("lmswitch_model_load_duration_seconds_count")) == {
        (QWEN, "default"): 1,
        (LLAMA, "default"): 1,
    }
    assert metrics.series("lmswitch_model_unloads_total") == {
        (QWEN, "evicted", "default"): 1,
        (LLAMA, "evicted", "default"): 1,
    }
    # Every catalogue model has its gauges from the first look at LM Studio.
    every_model_at_zero = {(key,): 0 for key in emulator.catalog}
    on_the_host = {(key, "default"): 0 for key in emulator.catalog}
    assert metrics.series("lmswitch_model_loaded") == on_the_host
    assert metrics.series("lmswitch_in_flight_requests") == every_model_at_zero
    assert metrics.series("lmswitch_queued_requests") == every_model_at_zero
    assert metrics.series("lmswitch_tokens_total") == {
        ("completion", QWEN): 7,
        ("prompt", QWEN): a_usage["prompt_tokens"],
        ("completion", LLAMA): 7,
        ("prompt", LLAMA): b_usage["prompt_tokens"],
    }
    assert metrics.series("lmswitch_client_disconnects_total") == {(LLAMA,): 1}
    assert metrics.value("lmswitch_upstream_up", upstream="default") == 1
    for name in HISTOGRAMS:
        counts = metrics.series(f"{name}_count")
        infinite = {
            tuple(v for k, v in sorted(labels) if k != "le"): value
            for labels, value in metrics.samples[f"{name}_bucket"].items()
            if ("le", "+Inf") in labels
        }
        assert infinite == counts, name


def test_a_request_timed_at_zero_seconds_is_still_observed() -> None:
    """Every answered request lands in the duration histogram, however short it was."""
    metrics = Metrics()
    log = access_log(metrics, EventBus(), Usage())
    log(RequestRecord("r-1", "POST", CHAT, UNKNOWN_MODEL, started=5.0, status=400))  # 0.0 s
    sample = metrics.registry.get_sample_value
    labels = {"model": UNKNOWN_MODEL, "endpoint": CHAT}
    assert sample("lmswitch_requests_total", {**labels, "status": "400"}) == 1
    assert sample("lmswitch_request_duration_seconds_count", labels) == 1


@pytest.mark.skipif(not HAS_UVLOOP, reason="uvloop is not installed")
@pytest.mark.parametrize("anyio_backend", [("asyncio", {"use_uvloop": True})], ids=["uvloop"])
async def test_durations_are_finer_than_uvloops_millisecond_clock() -> None:
    """Request durations come from a fine clock, not the event loop's (whole ms on uvloop)."""
    async with running(Emulator()) as proxy:
        for _ in range(5):  # answered by the proxy itself, in well under a millisecond
            assert (await proxy.http.post(CHAT, json={"messages": MESSAGES})).status_code == 400
        metrics = await settled(proxy.http, lambda m: answered(m) == 5)
    total_s = metrics.value(
        "lmswitch_request_duration_seconds_sum", model=UNKNOWN_MODEL, endpoint=CHAT
    )
    assert total_s is not None
    assert total_s > 0
    whole_ms = total_s * 1000
    assert not math.isclose(whole_ms, round(whole_ms), abs_tol=1e-6), f"{total_s} s"


async def test_exposition_has_exactly_the_frozen_names_types_and_labels() -> None:
    """Nothing beyond docs/metrics.md is exposed (no `_created` gauges), with its types and
    labels."""
    emulator = Emulator()
    async with running(emulator, models={"max_loaded": 1}) as proxy:
        assert (await chat(proxy, QWEN)).status_code == 200
        assert (await chat(proxy, LLAMA)).status_code == 200
        metrics = await settled(proxy.http, lambda m: answered(m) == 2)
    assert metrics.types == {name: kind for name, (kind, _) in FROZEN.items()}
    for sample_name, by_labels in metrics.samples.items():
        family = next(name for name in FROZEN if sample_name.startswith(name))
        expected = FROZEN[family][1] | ({"le"} if sample_name.endswith("_bucket") else set())
        for labels in by_labels:
            assert {key for key, _ in labels} == expected, sample_name
    assert "_created" not in metrics.text


async def test_client_input_never_becomes_a_label_value() -> None:
    """Unknown names, missing models and bad bodies are `unknown`; aliases count as their key."""
    emulator = Emulator()
    models = {"aliases": {"gpt-4o-mini": QWEN}}
    async with running(emulator, models=models) as proxy:
        for _ in range(3):
            assert (await chat(proxy, f"random-{uuid.uuid4().hex}")).status_code == 404
        anthropic = {"model": "claude-nonsense", "max_tokens": 8, "messages": MESSAGES}
        assert (await proxy.http.post("/v1/messages", json=anthropic)).status_code == 404
        no_model = await proxy.http.post(CHAT, json={"messages": MESSAGES})
        assert no_model.status_code == 400
        bad = await proxy.http.post(CHAT, content=b"{not json", headers={"x": "y"})
        assert bad.status_code == 400
        assert (await chat(proxy, "gpt-4o-mini")).status_code == 200
        metrics = await settled(proxy.http, lambda m: answered(m) == 7)
    assert metrics.model_labels() <= set(emulator.catalog) | {UNKNOWN_MODEL}
    assert metrics.series("lmswitch_requests_total") == {
        (CHAT, UNKNOWN_MODEL, "404"): 3,
        ("/v1/messages", UNKNOWN_MODEL, "404"): 1,
        (CHAT, UNKNOWN_MODEL, "400"): 2,
        (CHAT, QWEN, "200"): 1,
    }
    endpoints = {
        value
        for by_labels in metrics.samples.values()
        for labels in by_labels
        for key, value in labels
        if key == "endpoint"
    }
    assert endpoints <= set(PROXIED_PATHS)


async def test_two_apps_in_one_process_do_not_share_a_registry() -> None:
    """Each app owns its registry: a request on one shows in its metrics only."""
    async with serve(Emulator().app) as one_upstream, serve(Emulator().app) as two_upstream:
        first = create_app(settings_for(one_upstream))
        second = create_app(settings_for(two_upstream))
        async with (
            serve(first) as first_url,
            serve(second) as second_url,
            httpx2.AsyncClient(base_url=first_url, timeout=10) as one,
            httpx2.AsyncClient(base_url=second_url, timeout=10) as two,
        ):
            reply = await one.post(CHAT, json={"model": QWEN, "messages": MESSAGES})
            assert reply.status_code == 200
            first_metrics = await settled(one, lambda m: answered(m) == 1)
            second_metrics = await scrape(two)
    assert first_metrics.text != second_metrics.text
    assert first_metrics.value("lmswitch_model_loaded", model=QWEN, upstream="default") == 1
    assert first_metrics.series("lmswitch_model_loads_total") == {(QWEN, "ok", "default"): 1}
    assert second_metrics.series("lmswitch_requests_total") == {}
    assert second_metrics.series("lmswitch_model_loads_total") == {}
    assert set(second_metrics.series("lmswitch_model_loaded").values()) == {0}


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (Debian: apt-get install prometheus; .ci/run installs it)",
)
async def test_metrics_text_passes_promtool() -> None:
    """`promtool check metrics` finds nothing to lint once every kind of series exists."""
    emulator = Emulator()
    async with running(emulator, models={"max_loaded": 1}) as proxy:
        assert (await chat(proxy, QWEN)).status_code == 200
        assert (await chat(proxy, LLAMA)).status_code == 200
        assert (await chat(proxy, "no-such-model")).status_code == 404
        metrics = await settled(proxy.http, lambda m: answered(m) == 3)
    promtool: Any = shutil.which("promtool")
    with anyio.fail_after(10):
        result = await anyio.run_process(
            [promtool, "check", "metrics"], input=metrics.text.encode(), check=False
        )
    report = (result.stdout + result.stderr).decode()
    assert result.returncode == 0, report
    assert report.strip() == ""
