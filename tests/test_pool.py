"""A pool of LM Studio hosts behind one proxy (docs/design.md §3.5), over real sockets: two
emulators, each under uvicorn on its own loopback port, as the hosts `a` and `b`."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import httpx2
import pytest
from anyio.abc import TaskGroup, TaskStatus
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import ASGIApp

from proxy.emulator import Emulator
from proxy.emulator.catalog import DEFAULT_CATALOG, CatalogModel
from tests.helpers import LLAMA, MESSAGES, NOMIC, QWEN, Proxy, pool, pool_for, serve

GEMMA = "google/gemma-3-4b"
CHAT = "/v1/chat/completions"
UPSTREAM = "x-lmswitch-upstream"
SIZES = {model.key: model.size_bytes for model in DEFAULT_CATALOG}


def catalog_without(*keys: str) -> list[CatalogModel]:
    """The emulator's catalogue but `keys`: a host that has not downloaded them."""
    return [model for model in DEFAULT_CATALOG if model.key not in keys]


def chat(model: str, **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, **fields}


async def counted(
    http: httpx2.AsyncClient, name: str, *labels: str
) -> dict[tuple[str, ...], float]:
    """The metric `name` summed by the values of `labels`, where it counted something."""
    text = (await http.get("/metrics")).text
    found: dict[tuple[str, ...], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.value:
                by = tuple(sample.labels[label] for label in labels)
                found[by] = found.get(by, 0.0) + sample.value
    return found


async def gauge(http: httpx2.AsyncClient, name: str, **labels: str) -> float | None:
    text = (await http.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float) -> None:
    """Poll the async `check()` until it is true, `timeout_s` at most."""
    with anyio.fail_after(timeout_s):
        while not await check():  # noqa: ASYNC110 - state seen over HTTP
            await anyio.sleep(0.02)


def host_row(status: dict[str, Any], name: str) -> dict[str, Any]:
    rows: list[dict[str, Any]] = [row for row in status["upstreams"] if row["name"] == name]
    assert len(rows) == 1
    return rows[0]


async def model_row(proxy: Proxy, key: str) -> dict[str, Any]:
    rows: list[dict[str, Any]] = (await proxy.http.get("/api/v1/models")).json()
    found = [row for row in rows if row["id"] == key]
    assert len(found) == 1
    return found[0]


# --- 1. the workload that made the pool worth having ----------------------------------------

CLIENTS, ROUNDS = 8, 5


def swapping_host() -> Emulator:
    """A host with room for either model, never both (4.7 GB and 0.8 GB in 5 GB)."""
    return Emulator(
        load_delay_s=0.3, memory_bytes=5_000_000_000, reply_tokens=5, token_delay_s=0.02
    )


async def alternate(proxy: Proxy) -> tuple[float, list[tuple[str, str]]]:
    """8 clients, each asking for A then B then A... (half of them starting with B); the time
    it took and each answer's (model, host)."""
    served: list[tuple[str, str]] = []

    async def client(first: str, second: str) -> None:
        for i in range(ROUNDS):
            model = first if i % 2 == 0 else second
            response = await proxy.http.post(CHAT, json=chat(model))
            assert response.status_code == 200, response.text
            assert response.json()["model"] == model
            served.append((model, response.headers[UPSTREAM]))

    started = time.perf_counter()
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for i in range(CLIENTS):
                tg.start_soon(client, *((QWEN, LLAMA) if i % 2 == 0 else (LLAMA, QWEN)))
    assert len(served) == CLIENTS * ROUNDS
    return time.perf_counter() - started, served


SWAPPING = {"models": {"max_loaded": 1}, "scheduler": {"swap_grace": 1}}


async def test_two_models_each_filling_a_host_load_once_each() -> None:
    """Two hosts that each fit one of two models: 8 clients alternating between them need 2
    loads and no unload, where one host swaps back and forth."""
    a, b = swapping_host(), swapping_host()
    async with pool({"a": a, "b": b}, **SWAPPING) as proxy:
        pool_s, served = await alternate(proxy)
        loads = await counted(
            proxy.http, "lmswitch_model_loads_total", "model", "result", "upstream"
        )
        unloads = await counted(proxy.http, "lmswitch_model_unloads_total", "model", "upstream")
    assert (a.load_count(), b.load_count()) == (1, 1)
    assert (a.unload_count(), b.unload_count()) == (0, 0)
    hosts = {model: {host for m, host in served if m == model} for model in (QWEN, LLAMA)}
    assert {len(names) for names in hosts.values()} == {1}  # each model on one host, always
    assert hosts[QWEN] | hosts[LLAMA] == {"a", "b"}
    assert loads == {(model, "ok", host): 1 for model, (host,) in hosts.items()}
    assert unloads == {}

    alone = swapping_host()
    async with pool({"a": alone}, **SWAPPING) as proxy:
        one_s, _ = await alternate(proxy)
        one_loads = await counted(proxy.http, "lmswitch_model_loads_total", "upstream")
    assert alone.load_count() >= 3
    assert one_loads == {("a",): alone.load_count()}
    print(  # noqa: T201 - the figures for the issue, shown with -s
        f"\n{CLIENTS} clients x {ROUNDS} requests alternating two models, each filling a host:"
        f"\n  two hosts: {a.load_count() + b.load_count()} loads, {pool_s:.2f} s"
        f"\n  one host:  {alone.load_count()} loads, {alone.unload_count()} unloads, {one_s:.2f} s"
    )


# --- 2. loads on different hosts run at once -------------------------------------------------


async def test_two_cold_models_on_two_hosts_load_at_the_same_time() -> None:
    """Two requests for two models, neither loaded: each host loads one, both at once, and
    both are answered after about one load, not two."""
    load_s = 1.0
    emulators = {"a": Emulator(load_delay_s=load_s), "b": Emulator(load_delay_s=load_s)}
    async with pool(emulators) as proxy:
        spans: dict[str, tuple[float, float]] = {}
        answers: dict[str, httpx2.Response] = {}
        ended: list[float] = []

        async def watch(name: str, emulator: Emulator) -> None:
            await emulator.wait_until(lambda: emulator.load_count() == 1)
            began = time.perf_counter()
            await emulator.wait_until(lambda: len(emulator.instances) == 1)
            spans[name] = (began, time.perf_counter())

        async def ask(model: str) -> None:
            answers[model] = await proxy.http.post(CHAT, json=chat(model))
            ended.append(time.perf_counter())

        started = time.perf_counter()
        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                for name, emulator in emulators.items():
                    tg.start_soon(watch, name, emulator)
                tg.start_soon(ask, QWEN)
                tg.start_soon(ask, LLAMA)
        elapsed = max(ended) - started
    assert all(answer.status_code == 200 for answer in answers.values())
    where = {model: answer.headers[UPSTREAM] for model, answer in answers.items()}
    assert sorted(where.values()) == ["a", "b"]
    for model, host in where.items():
        assert emulators[host].load_count() == emulators[host].load_count(model) == 1
    assert load_s <= elapsed < 1.7 * load_s
    assert max(began for began, _ in spans.values()) < min(done for _, done in spans.values())


# --- 3. a host that goes away, and comes back -----------------------------------------------


class Restartable:
    """An app served by a task of its own in `tg`, so that a test can stop it and serve it again
    on the same port."""

    def __init__(self, app: ASGIApp, tg: TaskGroup) -> None:
        self._app, self._tg = app, tg
        self._stop = self._stopped = anyio.Event()
        self.port = 0

    async def start(self) -> str:
        self._stop, self._stopped = anyio.Event(), anyio.Event()
        url: str = await self._tg.start(self._serve)
        self.port = int(url.rsplit(":", 1)[1])
        return url

    async def stop(self) -> None:
        self._stop.set()
        await self._stopped.wait()

    async def _serve(self, *, task_status: TaskStatus[str]) -> None:
        try:
            async with serve(self._app, port=self.port) as url:
                task_status.started(url)
                await self._stop.wait()
        finally:
            self._stopped.set()


async def test_a_host_stopped_under_load_fails_over_and_comes_back() -> None:
    """Streams on the stopped host end with the error event; its models that the other host
    has too are served there, within a poll and a load; it is down in the status and the
    metrics, and takes work again once it is back on the same port."""
    load_s, poll_s = 0.5, 1.0
    a = Emulator(load_delay_s=load_s, token_delay_s=0.1, reply_tokens=100)
    b = Emulator(catalog_without(GEMMA), load_delay_s=load_s)  # GEMMA: only on a
    async with anyio.create_task_group() as hosts:
        host_a = Restartable(a.app, hosts)
        url_a = await host_a.start()
        async with (
            serve(b.app) as url_b,
            pool_for({"a": url_a, "b": url_b}, upstream={"poll_interval": poll_s}) as proxy,
        ):
            await proxy.wait_for(lambda status: all(host["up"] for host in status["upstreams"]))
            assert await gauge(proxy.http, "lmswitch_upstream_up", upstream="a") == 1
            streaming = anyio.Event()
            streams: list[list[str]] = []

            async def stream() -> None:
                body = chat(QWEN, stream=True)
                async with proxy.http.stream("POST", CHAT, json=body) as answer:
                    assert answer.status_code == 200
                    assert answer.headers[UPSTREAM] == "a"
                    lines: list[str] = []
                    streams.append(lines)
                    async for line in answer.aiter_lines():
                        if line.startswith("data: "):
                            lines.append(line[6:])
                            if all(len(each) >= 2 for each in streams) and len(streams) == 2:
                                streaming.set()

            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(stream)
                    tg.start_soon(stream)
                    await streaming.wait()  # both mid-stream on a (10 s of tokens each)
                    await host_a.stop()
                    stopped = time.perf_counter()
            for lines in streams:
                assert len(lines) < 50
                assert json.loads(lines[-1])["error"]["code"] == "upstream_unavailable"
            assert (await proxy.status())["in_flight"] == 0

            # Its model, which b has too, is served by b: within a poll and a load, at most.
            answered: list[tuple[int, str, float]] = []

            async def ask() -> None:
                answer = await proxy.http.post(CHAT, json=chat(QWEN))
                host = answer.headers.get(UPSTREAM, "-")
                answered.append((answer.status_code, host, time.perf_counter()))

            with anyio.fail_after(poll_s + load_s + 2):
                async with anyio.create_task_group() as tg:
                    for _ in range(4):
                        tg.start_soon(ask)
            assert [(status, host) for status, host, _ in answered] == [(200, "b")] * 4
            assert max(at for _, _, at in answered) - stopped < poll_s + load_s
            assert b.load_count(QWEN) == 1

            async def a_is_down() -> bool:
                status = await proxy.status()
                metric = await gauge(proxy.http, "lmswitch_upstream_up", upstream="a")
                return host_row(status, "a")["up"] is False and metric == 0

            await until(a_is_down, poll_s + 1)
            # A model only a has: an answer at once, not a wait.
            with anyio.fail_after(3):
                answer = await proxy.http.post(CHAT, json=chat(GEMMA))
            assert answer.status_code == 503
            assert answer.json()["error"]["code"] == "upstream_unavailable"
            assert answer.headers[UPSTREAM] == "a"  # where it was placed, and failed

            a.token_delay_s = 0.0
            await host_a.start()  # on the same port

            async def a_is_up() -> bool:
                status = await proxy.status()
                metric = await gauge(proxy.http, "lmswitch_upstream_up", upstream="a")
                return host_row(status, "a")["up"] is True and metric == 1

            await until(a_is_up, poll_s + 1)
            with anyio.fail_after(load_s + 3):
                answer = await proxy.http.post(CHAT, json=chat(GEMMA))
            assert answer.status_code == 200
            assert answer.headers[UPSTREAM] == "a"
            assert answer.json()["model"] == GEMMA
            await host_a.stop()


# --- 4. placement follows the catalogues ------------------------------------------------------


async def test_a_model_only_one_host_has_goes_only_there() -> None:
    """b alone has GEMMA: it goes to b, though a comes first and has room; a never hears of it.
    A model no host has is still a 404."""
    a, b = Emulator(catalog_without(GEMMA)), Emulator()
    async with pool({"a": a, "b": b}) as proxy:
        with anyio.fail_after(5):
            answer = await proxy.http.post(CHAT, json=chat(GEMMA))
            unknown = await proxy.http.post(CHAT, json=chat("no-such-model"))
    assert answer.status_code == 200
    assert answer.headers[UPSTREAM] == "b"
    assert answer.json()["model"] == GEMMA
    assert b.load_count(GEMMA) == 1
    assert a.load_count() == 0
    assert not [call for call in a.calls if GEMMA in json.dumps(call.body)]
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"
    assert UPSTREAM not in unknown.headers  # placed nowhere


# --- 5. what the pool shows -------------------------------------------------------------------


async def read_events(proxy: Proxy, into: list[dict[str, Any]], ready: anyio.Event) -> None:
    """The `model` events of /api/v1/events, into `into` (until cancelled)."""
    async with proxy.http.stream("GET", "/api/v1/events") as events:
        kind = None
        async for line in events.aiter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                if kind == "snapshot":
                    ready.set()
                elif kind == "model":
                    into.append(json.loads(line[6:]))


async def test_routed_answers_events_and_access_lines_name_the_host(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every routed answer names its host in `x-lmswitch-upstream`, a 503 for a load that
    failed on a host included; so do the `model` events and the access lines."""
    caplog.set_level(logging.INFO, logger="lmswitch.access")
    a, b = Emulator(catalog_without(GEMMA)), Emulator()
    async with pool({"a": a, "b": b}) as proxy:
        events: list[dict[str, Any]] = []
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                subscribed = anyio.Event()
                tg.start_soon(read_events, proxy, events, subscribed)
                await subscribed.wait()
                answers = {
                    "chat": await proxy.http.post(CHAT, json=chat(QWEN)),
                    "stream": await proxy.http.post(CHAT, json=chat(QWEN, stream=True)),
                    "embeddings": await proxy.http.post(
                        "/v1/embeddings", json={"model": NOMIC, "input": "hi"}
                    ),
                }
                b.fail_next_loads = 1
                failed = await proxy.http.post(CHAT, json=chat(GEMMA))
                answers["after a failed load"] = await proxy.http.post(CHAT, json=chat(GEMMA))

                def settled() -> bool:
                    return any(e["model"] == GEMMA and e["state"] == "loaded" for e in events)

                while not settled():  # noqa: ASYNC110 - events seen over HTTP
                    await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
    for name, answer in answers.items():
        assert answer.status_code == 200, name
    hosts = {name: answer.headers[UPSTREAM] for name, answer in answers.items()}
    assert hosts["chat"] == hosts["stream"] == "a"
    assert hosts["after a failed load"] == "b"
    assert hosts["embeddings"] == "b"  # where it fits, evicting nothing
    assert (a.load_count(NOMIC), b.load_count(NOMIC)) == (0, 1)
    # A load that failed on b: 503, from b.
    assert failed.status_code == 503
    assert failed.json()["error"]["code"] == "model_load_failed"
    assert failed.headers[UPSTREAM] == "b"
    # `model` events say on which host.
    seen = {(e["model"], e["state"], e["upstream"]) for e in events}
    assert {(QWEN, "loading", "a"), (QWEN, "loaded", "a")} <= seen
    assert {(GEMMA, "failed", "b"), (GEMMA, "loading", "b"), (GEMMA, "loaded", "b")} <= seen
    assert all(e["upstream"] in ("a", "b") for e in events)
    # So do access lines.
    lines = [r.getMessage() for r in caplog.records if r.name == "lmswitch.access"]
    routed = [line for line in lines if " endpoint=/v1/" in line]
    assert len(routed) == 5
    assert sum(" upstream=a " in line for line in routed) == 2
    assert next(line for line in routed if " status=503 " in line).count(" upstream=b ") == 1


async def test_status_and_listings_show_every_host() -> None:
    """/api/v1/status has a row per host; /v1/models lists the union of their catalogues with
    the hosts that have each model, /api/v1/models also the hosts holding it."""
    a = Emulator(catalog_without(GEMMA), token_delay_s=0.05, reply_tokens=100)
    b = Emulator(catalog_without(NOMIC))
    budget = 20_000_000_000
    async with pool({"a": a, "b": b}, models={"memory_budget": budget}) as proxy:
        with anyio.fail_after(10):
            body = chat(QWEN, stream=True)
            async with proxy.http.stream("POST", CHAT, json=body) as answer:
                assert answer.headers[UPSTREAM] == "a"
                lines = answer.aiter_lines()
                await anext(lines)  # mid-stream on a
                status = await proxy.status()
                models = (await proxy.http.get("/v1/models")).json()["data"]
                rows = (await proxy.http.get("/api/v1/models")).json()
    urls = {row["name"]: row["url"] for row in status["upstreams"]}
    assert [row["name"] for row in status["upstreams"]] == ["a", "b"]
    assert urls["a"] != urls["b"]
    assert all(url.startswith("http://127.0.0.1:") for url in urls.values())
    learned = {name: host_row(status, name).pop("learned") for name in ("a", "b")}
    assert learned["a"]["fit"]["bytes"] == SIZES[QWEN]  # what each host held (§2.8)
    assert learned["b"]["fit"] is None
    assert learned["a"]["learned_bytes"] is None  # nothing refused: no limit known
    assert host_row(status, "a") == {
        "name": "a",
        "url": urls["a"],
        "up": True,
        "loaded": [QWEN],
        "instances": 1,
        "bytes_used": SIZES[QWEN],
        "max_loaded": 1,
        "memory_budget": budget,
        "learned_bytes": None,
        "in_flight": 1,
        "queued": 0,
    }
    assert host_row(status, "b") == {
        "name": "b",
        "url": urls["b"],
        "up": True,
        "loaded": [],
        "instances": 0,
        "bytes_used": 0,
        "max_loaded": 1,
        "memory_budget": budget,
        "learned_bytes": None,
        "in_flight": 0,
        "queued": 0,
    }
    assert status["in_flight"] == 1
    assert status["loaded"] == [QWEN]
    # /v1/models: the union of the catalogues, each model with the hosts that have it.
    listed = {model["id"]: model["upstreams"] for model in models}
    assert set(listed) == set(SIZES)
    assert listed[QWEN] == ["a", "b"]
    assert listed[GEMMA] == ["b"]
    assert listed[NOMIC] == ["a"]
    # /api/v1/models: the hosts holding it, and those that have it.
    by_key = {row["id"]: row for row in rows}
    assert set(by_key) == set(SIZES)
    assert (by_key[QWEN]["upstreams"], by_key[QWEN]["available_on"]) == (["a"], ["a", "b"])
    assert (by_key[GEMMA]["upstreams"], by_key[GEMMA]["available_on"]) == ([], ["b"])
    assert (by_key[NOMIC]["upstreams"], by_key[NOMIC]["available_on"]) == ([], ["a"])
    assert by_key[QWEN]["state"] == "ready"
    assert by_key[QWEN]["in_flight"] == 1


async def test_operators_load_and_unload_on_a_host_or_everywhere() -> None:
    """`upstream` in a management call names the host; an unknown one is a 400 naming the
    pool's hosts; an unload without it unloads the model wherever it is loaded."""
    a, b = Emulator(), Emulator()
    async with pool({"a": a, "b": b}) as proxy:

        async def manage(action: str, **body: Any) -> httpx2.Response:
            with anyio.fail_after(5):
                return await proxy.http.post(f"/api/v1/models/{action}", json=body)

        async def holders() -> list[str]:
            upstreams: list[str] = (await model_row(proxy, QWEN))["upstreams"]
            return upstreams

        loaded = await manage("load", model_id=QWEN, upstream="b")
        assert loaded.status_code == 200
        assert loaded.json()["message"] == f"Model {QWEN} loaded successfully"
        assert (a.load_count(), b.load_count(QWEN)) == (0, 1)
        assert await holders() == ["b"]
        again = await manage("load", model_id=QWEN, upstream="b")
        assert again.json()["message"] == f"Model {QWEN} is already loaded"
        assert await holders() == ["b"]
        assert (await manage("load", model_id=QWEN, upstream="a")).status_code == 200
        assert (a.load_count(QWEN), b.load_count(QWEN)) == (1, 1)
        assert await holders() == ["a", "b"]

        for action in ("load", "unload"):
            unknown = await manage(action, model_id=QWEN, upstream="c")
            assert unknown.status_code == 400
            error = unknown.json()["error"]
            assert error["param"] == "upstream"
            assert "'c'" in error["message"]
            assert "a, b" in error["message"]
        assert (a.load_count(), b.load_count()) == (1, 1)

        unloaded = await manage("unload", model_id=QWEN, upstream="a")
        assert unloaded.json()["message"] == f"Model {QWEN} unloaded successfully"
        assert (a.unload_count(QWEN), b.unload_count()) == (1, 0)
        assert await holders() == ["b"]
        nothing = await manage("unload", model_id=QWEN, upstream="a")
        assert nothing.json()["message"] == f"Model {QWEN} is not loaded"
        assert (await manage("load", model_id=QWEN, upstream="a")).status_code == 200
        everywhere = await manage("unload", model_id=QWEN)
        assert everywhere.json()["message"] == f"Model {QWEN} unloaded successfully"
        assert (a.unload_count(QWEN), b.unload_count(QWEN)) == (2, 1)
        assert await holders() == []
        assert (a.instances, b.instances) == ({}, {})
        # Without `upstream`, a load goes where placement puts it: the first host with room.
        assert (await manage("load", model_id=QWEN)).status_code == 200
        assert await holders() == ["a"]
        assert (a.load_count(QWEN), b.load_count(QWEN)) == (3, 1)


# --- 6. replicas --------------------------------------------------------------------------------


async def test_a_busy_model_gets_a_second_replica_and_never_a_third() -> None:
    """`replicas: 2`: while every request goes to the ready copy on a, and a is busy, a second
    copy is loaded on b (no request waits for it); then both serve, and no third load comes."""
    load_s = 0.5
    a, b = (Emulator(load_delay_s=load_s, reply_tokens=5, token_delay_s=0.04) for _ in "ab")
    async with pool({"a": a, "b": b}, models={"replicas": {QWEN: 2}}) as proxy:
        served: list[tuple[str, float]] = []
        stop = anyio.Event()

        async def client() -> None:
            while not stop.is_set():
                answer = await proxy.http.post(CHAT, json=chat(QWEN))
                assert answer.status_code == 200, answer.text
                served.append((answer.headers[UPSTREAM], time.perf_counter()))

        with anyio.fail_after(15):
            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(client)
                await b.wait_until(lambda: b.load_count() == 1)
                began = time.perf_counter()
                await b.wait_until(lambda: QWEN in b.instances)
                done = time.perf_counter()
                while sum(host == "b" for host, _ in served) < 10:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
                stop.set()
            row = await model_row(proxy, QWEN)
    assert (a.load_count(), b.load_count()) == (1, 1)
    assert (a.load_count(QWEN), b.load_count(QWEN)) == (1, 1)
    assert (a.unload_count(), b.unload_count()) == (0, 0)
    # Served all along, on a, while b loaded its copy.
    assert sum(host == "a" and began < at < done for host, at in served) >= 4
    assert row["upstreams"] == ["a", "b"]


# --- 7. a real client ---------------------------------------------------------------------------


async def test_the_openai_sdk_against_the_pool() -> None:
    """The openai SDK, a chat and a streamed chat, each answered by the host that has or
    holds its model."""
    a, b = Emulator(catalog_without(GEMMA)), Emulator()
    async with pool({"a": a, "b": b}) as proxy:
        with anyio.fail_after(10):
            raw = await proxy.sdk.chat.completions.with_raw_response.create(
                model=GEMMA, messages=MESSAGES
            )
            reply = raw.parse()
            async with proxy.sdk.chat.completions.with_streaming_response.create(
                model=QWEN, messages=MESSAGES, stream=True
            ) as streamed:
                chunks = [chunk async for chunk in await streamed.parse()]
    assert raw.headers[UPSTREAM] == "b"
    assert reply.model == GEMMA
    assert reply.choices[0].message.content
    assert streamed.headers[UPSTREAM] == "a"
    assert {chunk.model for chunk in chunks} == {QWEN}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
