"""A soak under faults: many clients, models and endpoints while a pool of two LM Studio hosts
misbehaves.

Nothing may be lost: every request ends with a complete answer or a well-formed error before its
deadline and within its own bound (`bound_s`), leases and gauges return to zero (the in-flight
gauges within a second of the last client leaving), the proxy never makes an LM Studio unload an
instance that is answering, run two loads at once on one host (its own, or JIT loads its
forwarded requests cause; a burst for a model gone behind its back loads it once; loads on
different hosts may run at once) or load a model it had seen loaded, an operator's unload during
a load answers once the model is unloaded, its view of the loaded models matches the hosts'
within a poll interval once the faults stop, a host that went away takes work again within
seconds of coming back, and file descriptors and memory come back to where they were.

About a minute by default; `uv run pytest -s tests/test_soak.py --soak-minutes 10` runs longer.
The summary is printed (shown with `-s`) and written to `soak-summary.txt` in the test's tmp_path.
"""

from __future__ import annotations

import contextlib
import contextvars
import gc
import itertools
import json
import logging
import math
import os
import random
import sys
import time
import traceback
import tracemalloc
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from anyio.abc import TaskGroup, TaskStatus
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request
from starlette.responses import Response

from proxy.emulator import Emulator, replies
from proxy.emulator.catalog import DEFAULT_CATALOG, CatalogModel, Instance
from proxy.emulator.state import LoadFailedError
from proxy.leases import FRESH_S
from tests.helpers import LLAMA, MESSAGES, NOMIC, QWEN, Proxy, proxy_for, running, serve

GEMMA = "google/gemma-3-4b"
TEXT_MODELS = (LLAMA, GEMMA, QWEN)
# A small model no client asks for: the faults that judge one model's requests use it alone.
PROBE = "soak/probe-135m"
CATALOG = (
    *DEFAULT_CATALOG,
    CatalogModel(PROBE, "llm", "soak", "Probe 135M", "llama", "Q8_0", 8, 145_000_000, "135M", 8192),
)


@dataclass(frozen=True)
class HostPlan:
    """One LM Studio host of the soak's pool."""

    name: str
    only: str  # the one model no other host has
    memory_bytes: int  # its LM Studio's memory, and the proxy's budget for it
    max_loaded: int

    def catalog(self) -> tuple[CatalogModel, ...]:
        """Every model but those only the other hosts have."""
        theirs = {plan.only for plan in HOSTS if plan is not self}
        return tuple(model for model in CATALOG if model.key not in theirs)

    def upstream(self, url: str) -> dict[str, Any]:
        """Its entry in the proxy's `upstreams`."""
        limits = {"memory_budget": self.memory_bytes, "max_loaded": self.max_loaded}
        return {"name": self.name, "base_url": url, **limits}


# The pool: most models on both hosts. Host a has the probe model, and holds two models in 6 GB
# (Llama fits beside Qwen, the small embedding model beside any one); host b has Gemma, and
# holds one model at a time in 5 GB. Three places for the clients' four models: the hosts keep
# swapping, and placement has real choices. Each host's budget is its LM Studio's memory, so
# the proxy's own loads always fit.
HOSTS = (HostPlan("a", PROBE, 6_000_000_000, 2), HostPlan("b", GEMMA, 5_000_000_000, 1))
CLIENTS = 24
REPLY_TOKENS = 12
TOKEN_DELAY_S = 0.02
LOAD_DELAY_S = 0.15  # a normal load
POLL_S = 0.5
LOAD_TIMEOUT_S = 1.0
SLOW_LOAD_S = 1.6  # a load past the proxy's load_timeout
QUEUE_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 3.0
SECTIONS: dict[str, Any] = {
    "upstream": {
        "poll_interval": POLL_S,
        "load_timeout": LOAD_TIMEOUT_S,
        "read_timeout": READ_TIMEOUT_S,
        "connect_timeout": 1.0,
    },
    "scheduler": {"queue_timeout": QUEUE_TIMEOUT_S, "swap_grace": 0.5},
}
# The longest a request may take: two queue waits (a model unloaded behind the proxy's back is
# reloaded and asked once more), LM Studio's read timeout twice, a stream, and slack.
DEADLINE_S = 2 * QUEUE_TIMEOUT_S + 2 * READ_TIMEOUT_S + 4.0
SLACK_S = 1.0  # on each request's own bound (`bound_s`)
# LM Studio stuck: its listings for this long, or everything (a call it holds meanwhile is never
# answered, and waits until its caller leaves).
HANG_S = (1.5, 4.0)
SILENT_S = (1.0, 3.0)
UNKNOWN = "soak/not-downloaded"  # a model name LM Studio does not have
UNKNOWN_REFRESH_S = 1.05  # the proxy reads LM Studio's models for an unknown name once a second
BURST = 6  # requests at once for a model just gone behind the proxy's back
SLOW_FIRST_TOKEN_S = 2.0  # LM Studio's wait before the first byte, within read_timeout
CARD_LOAD_S = 0.6  # a load an operator's unload comes during
UNLOAD_BOUND_S = 3 * CARD_LOAD_S  # a few load times, well under the queue timeout
GAUGES = ("lmswitch_in_flight_requests", "lmswitch_queued_requests")
# uvicorn closes idle keep-alive connections after 5 s; the proxy's pool expires its own after 4.
KEEPALIVE_EXPIRY_S = 5.5
AWAY_S = (1.0, 3.0)  # a host gone (its server stopped) this long, then back with nothing loaded
# A host back is up again within a poll (its listings are retried every poll interval while it
# is away), and the listing itself.
UP_BOUND_S = POLL_S + 1.0
NATURAL_S = 2.0  # how long a host back waits for the clients' requests before one is sent to it


# --- an emulator that watches what the proxy makes LM Studio do --------------------------------

# The instance the current request resolved to, inside one emulator request's task.
_resolved: contextvars.ContextVar[str | None] = contextvars.ContextVar("resolved", default=None)
# The client's id of the request an emulator request's task answers.
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request", default=None)

# The calls LM Studio never answers while its listings hang.
LISTINGS = frozenset({"/v1/models", "/api/v0/models", "/api/v1/models"})


async def _caller_left(request: Request, wait: Callable[[], Awaitable[object]]) -> bool:
    """Await `wait()`; True if the caller hung up first (and `wait` was cancelled)."""
    left = False
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            nonlocal left
            while (await request.receive())["type"] != "http.disconnect":  # pragma: no cover
                pass
            left = True
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        await wait()
        tg.cancel_scope.cancel()
    return left


def _a_load(key: str, jit_for: str | None) -> str:
    """A load, for a finding: the proxy's, or a JIT load for a request (`jit_for`)."""
    return f"the proxy's load of {key}" if jit_for is None else f"a JIT load of {key} ({jit_for})"


@dataclass
class LoadCall:
    """A `POST /api/v1/models/load` the emulator is answering."""

    model: str
    abandoned: bool = False  # the caller hung up (its load_timeout passed); LM Studio goes on


class WatchedEmulator(Emulator):
    """The emulator, recording what a proxy must never make LM Studio do.

    `findings` are the proxy's faults: a REST unload of an instance that is streaming an answer
    to a client still reading it (`judge` decides once the streams have ended); a load or unload
    call while a load runs (also one the proxy stopped waiting for: LM Studio goes on with it);
    a load of a model this LM Studio does not have (another host of the pool may);
    a load running beside another where either is a JIT load (every load in the soak is the
    proxy's, or its forwarded request's); a second instance of a model loaded while its first
    load still ran; a REST load of a model that every listing since the proxy's last call showed
    loaded. `notes` count what is nobody's fault (LM Studio's JIT evicting under a request, a
    duplicate from a race with a load behind the proxy's back, ...).

    `forwards` counts the inference calls LM Studio received, by the client's request id (the
    proxy passes `x-request-id` on); `unanswered`, the calls it held (`silent`, `hang_listings`)
    and never answered. `slow_first_token` holds the answers for a model this long before their
    first byte, unless the caller leaves first.
    """

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.answering: Counter[str] = Counter()  # requests inside the handler, per instance
        self.streams: dict[str, set[int]] = {}  # the streams being sent, per instance
        self.endings: dict[int, str] = {}  # how streams under an unload ended: finished, early
        self._serials = itertools.count()
        self._unloaded_streaming: list[tuple[str, frozenset[int]]] = []
        self.findings: list[str] = []
        self.notes: Counter[str] = Counter()
        self.rest_loads = 0
        self.jit_loads = 0
        self.load_calls: list[LoadCall] = []
        self._listings: list[frozenset[str]] = []  # loaded models listed since the last call
        self._rest_unload = False
        # The loads running: model key, and for a JIT load the request it is for.
        self._running: list[tuple[str, str | None]] = []
        self.gone_behind: dict[str, float] = {}  # when a fault last unloaded each model
        self.listed_at = -math.inf  # when LM Studio last answered a listing
        self._unforeseen: set[str] = set()  # running JIT loads the proxy could not foresee
        self.forwards: Counter[str] = Counter()
        self.slow_first_token: dict[str, float] = {}
        self.unanswered = 0  # calls LM Studio held and never answered
        # Per model: loads tried (refused for memory or not) while another of it ran; the most
        # instances held at once (tests reset it); JIT loads started.
        self.stacked: Counter[str] = Counter()
        self.most_copies: Counter[str] = Counter()
        self.jit_started: Counter[str] = Counter()

    def forwarded(self, request_id: str) -> int:
        """How often LM Studio received the request, forgetting it."""
        return self.forwards.pop(request_id, 0)

    def busy(self, instance_id: str) -> bool:
        return self.answering[instance_id] > 0 or bool(self.streams.get(instance_id))

    def judge(self) -> None:
        """Once the streams have ended: an unload under a stream is the proxy's fault unless
        every one of them ended early. The proxy closes a stream whose client left before it
        lets the model go, but this LM Studio (in the same event loop) may take the unload call
        before it has seen the connection close; the real one cancels the generation then."""
        for instance_id, serials in self._unloaded_streaming:
            endings = [self.endings.get(serial, "still open") for serial in serials]
            if all(ending == "early" for ending in endings):
                self.notes["an unload right after a client left mid-stream"] += 1
            else:
                self.findings.append(
                    f"the proxy unloaded {instance_id} while it streamed an answer to a client "
                    f"still reading ({', '.join(sorted(endings))})"
                )
        self._unloaded_streaming.clear()
        self.endings.clear()

    @property
    def loading(self) -> bool:
        return bool(self._loading or self.load_calls)

    def view(self) -> dict[str, list[str]]:
        """Loaded instance ids by model key."""
        view: dict[str, list[str]] = {}
        for instance in self.instances.values():
            view.setdefault(instance.key, []).append(instance.id)
        return {key: sorted(ids) for key, ids in view.items()}

    # calls held, and calls never answered

    async def _receive(self, request: Request) -> object:
        body = await super()._receive(request)
        path, request_id = request.url.path, request.headers.get("x-request-id")
        if request.method == "POST" and path.startswith("/v1/") and request_id is not None:
            self.forwards[request_id] += 1
            self._notify()
        if self.silent or (self.hang_listings and path in LISTINGS):
            self.unanswered += 1  # held until its caller leaves, then answered 499 to nobody
        return body

    # requests being answered

    async def _resolve(self, payload: dict[str, Any], kind: replies.Kind) -> Instance:
        instance = await super()._resolve(payload, kind)
        self.answering[instance.id] += 1
        _resolved.set(instance.id)  # awaited by `_infer`: its context sees this
        return instance

    async def _infer(
        self, request: Request, body: object, *, kind: replies.Kind, v0: bool
    ) -> Response:
        _request_id.set(request.headers.get("x-request-id"))
        model = body.get("model") if isinstance(body, dict) else None
        delay_s = self.slow_first_token.get(str(model))
        # A long prompt, say: nothing is sent meanwhile. A caller that leaves ends it.
        if delay_s and await _caller_left(request, partial(anyio.sleep, delay_s)):
            return Response(status_code=499)
        _resolved.set(None)
        try:
            return await super()._infer(request, body, kind=kind, v0=v0)
        finally:
            if (instance_id := _resolved.get()) is not None:
                self.answering[instance_id] -= 1

    def _stream(self, frames: list[replies.Frame]) -> AsyncGenerator[bytes, None]:
        # `_infer` calls this right after `_resolve`: the instance is the one it resolved.
        return self._counted(_resolved.get(), super()._stream(frames))

    async def _counted(
        self, instance_id: str | None, chunks: AsyncGenerator[bytes, None]
    ) -> AsyncGenerator[bytes, None]:
        if instance_id is None:  # pragma: no cover - every stream comes from `_infer`
            raise AssertionError("a stream without an instance")
        serial = next(self._serials)
        self.streams.setdefault(instance_id, set()).add(serial)
        ending = "early"  # closed from outside (the client left) or cut by a fault
        try:
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    yield chunk
            ending = "finished"
        finally:
            self.streams[instance_id].discard(serial)
            if any(serial in serials for _, serials in self._unloaded_streaming):
                self.endings[serial] = ending

    # listings, loads and unloads

    async def _jit_load(self, model: CatalogModel, ttl: object) -> Instance:
        self.jit_loads += 1
        return await super()._jit_load(model, ttl)

    async def _load(
        self, model: CatalogModel, *, jit: bool, ttl_s: float | None, options: dict[str, Any]
    ) -> Instance:
        self.stacked[model.key] += any(key == model.key for key, _ in self._running)
        try:
            self._check_memory(model)  # as the load itself does first, with nothing in between
        except LoadFailedError:  # refused at once: no load runs
            return await super()._load(model, jit=jit, ttl_s=ttl_s, options=options)
        # A REST load beside REST loads only: `_no_load_running` has found its call.
        running = (model.key, f"request {_request_id.get()}" if jit else None)
        # A request sent just before, or just after, a fault unloaded its model behind the
        # proxy's back makes LM Studio load it (JIT) before the proxy can know: no listing
        # has shown it gone yet. Such a load beside another is LM Studio's, not the proxy's.
        unforeseen = jit and self._gone_lately(model.key)
        if unforeseen:
            self._unforeseen.add(str(running[1]))
        if beside := [_a_load(*other) for other in self._running if jit or other[1]]:
            involved = {running[1], *(other[1] for other in self._running)}
            if involved & self._unforeseen:
                self.notes["a JIT load beside another, for a model a fault had just unloaded"] += 1
            else:
                self.findings.append(f"{_a_load(*running)} ran beside {', '.join(beside)}")
        self.jit_started[model.key] += jit
        self._running.append(running)
        try:
            return await super()._load(model, jit=jit, ttl_s=ttl_s, options=options)
        finally:
            self._running.remove(running)
            self._unforeseen.discard(str(running[1]))

    def _gone_lately(self, key: str) -> bool:
        """Whether a fault unloaded `key` behind the proxy's back within a poll interval, or
        since the last listing LM Studio answered (the proxy cannot have seen it gone)."""
        gone = self.gone_behind.get(key, -math.inf)
        return time.monotonic() - gone < POLL_S or gone > self.listed_at

    def unload_instance(self, instance_id: str) -> None:
        """As LM Studio's UI unloads (the faults do): recorded as gone behind the proxy's back,
        since requests may be on their way to it. (The JIT burst forgets it: its model is
        idle, and the proxy must probe it with one request first.)"""
        if (instance := self.instances.get(instance_id)) is not None:
            self.gone_behind[instance.key] = time.monotonic()
        super().unload_instance(instance_id)

    def _add(
        self,
        model: CatalogModel,
        instance_id: str,
        *,
        jit: bool,
        ttl_s: float | None,
        options: dict[str, Any],
    ) -> Instance:
        instance = super()._add(model, instance_id, jit=jit, ttl_s=ttl_s, options=options)
        copies = len(self._instances_of(model.key))
        self.most_copies[model.key] = max(self.most_copies[model.key], copies)
        return instance

    def _listed(self) -> None:
        self.listed_at = time.monotonic()
        self._listings.append(frozenset(i.key for i in self.instances.values()))
        del self._listings[:-50]

    async def _v0_models(self, request: Request, body: object) -> Response:
        self._listed()
        return await super()._v0_models(request, body)

    async def _v1_models(self, request: Request, body: object) -> Response:
        self._listed()
        return await super()._v1_models(request, body)

    def _no_load_running(self, kind: str, what: str) -> None:
        for call in self.load_calls:
            given_up = " (which the proxy had stopped waiting for)" if call.abandoned else ""
            self.findings.append(
                f"{kind} call of {what} while the load of {call.model}{given_up} ran"
            )

    async def _watch_hang_up(self, request: Request, call: LoadCall) -> None:
        while (await request.receive())["type"] != "http.disconnect":  # pragma: no cover
            pass
        call.abandoned = True
        self._listings.clear()  # the caller is free to make its next call

    async def _load_endpoint(self, request: Request, body: object) -> Response:
        key = body.get("model") if isinstance(body, dict) else None
        if not isinstance(key, str):  # pragma: no cover - the proxy always names the model
            return await super()._load_endpoint(request, body)
        self.rest_loads += 1
        self._no_load_running("a load", key)
        if key not in self.catalog:  # the proxy has read which models this LM Studio has
            self.findings.append(f"the proxy asked to load {key}, which this LM Studio lacks")
        before = {i.id for i in self.instances.values() if i.key == key}
        before |= {i for i, model in self._loading.items() if model.key == key}
        after_abandoned = any(c.abandoned and c.model == key for c in self.load_calls)
        seen_loaded = bool(self._listings) and all(key in seen for seen in self._listings)
        call = LoadCall(key)
        self.load_calls.append(call)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch_hang_up, request, call)
                response = await super()._load_endpoint(request, body)
                tg.cancel_scope.cancel()
        finally:
            self.load_calls.remove(call)
            if not call.abandoned:
                self._listings.clear()
            self._notify()  # for `wait_until(lambda: not emulator.loading)`
        if response.status_code == 200 and before:
            created = json.loads(bytes(response.body))["instance_id"]
            if after_abandoned:
                self.findings.append(f"{key} loaded as {created} while its first load still ran")
            elif seen_loaded:
                self.findings.append(
                    f"the proxy loaded {key} as {created} although every listing since its "
                    f"last call showed it loaded ({', '.join(sorted(before))})"
                )
            else:
                self.notes["a second instance: a race with a load behind the proxy's back"] += 1
        return response

    async def _unload_endpoint(self, request: Request, body: object) -> Response:
        instance_id = body.get("instance_id") if isinstance(body, dict) else None
        self._no_load_running("an unload", str(instance_id))
        if isinstance(instance_id, str) and self.answering[instance_id]:
            # The proxy frees a model the moment a client leaves and cancels its request (bug 3
            # of issue 13); LM Studio sees that connection close a moment later and stops. A
            # request still answered after that moment is one the proxy unloaded under.
            for _ in range(20):
                await anyio.sleep(0.005)
                if not self.answering[instance_id]:
                    self.notes["an unload right after a request's caller hung up"] += 1
                    break
            else:
                self.findings.append(
                    f"the proxy unloaded {instance_id} while it answered a request"
                )
        if isinstance(instance_id, str) and self.streams.get(instance_id):
            self._unloaded_streaming.append((instance_id, frozenset(self.streams[instance_id])))
        self._rest_unload = True  # the handler does not await: `_unload` runs inside it
        try:
            return await super()._unload_endpoint(request, body)
        finally:
            self._rest_unload = False
            self._listings.clear()

    def _unload(self, instance_id: str, *, counted: bool) -> None:
        if not self._rest_unload:  # LM Studio's own (auto-evict, TTL) or a fault's
            if (instance := self.instances.get(instance_id)) is not None:
                self.gone_behind[instance.key] = time.monotonic()
            if self.busy(instance_id):
                self.notes["an instance unloaded under a request (by LM Studio or a fault)"] += 1
        super()._unload(instance_id, counted=counted)


# --- the hosts: upstream servers, stopped and started at will ----------------------------------


class Upstream:
    """One host of the pool: its emulator served on one port, which a fault stops and starts
    again; `only` is the model no other host has."""

    def __init__(self, name: str, emulator: WatchedEmulator, only: str, tg: TaskGroup) -> None:
        self.name = name
        self.emulator = emulator
        self.only = only
        self._tg = tg
        self.port = 0  # a free one the first time, then the same
        self._stop: anyio.Event | None = None
        self._stopped = anyio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._stop is not None

    async def start(self) -> None:
        self._stop, self._stopped = anyio.Event(), anyio.Event()
        with anyio.fail_after(10):
            await self._tg.start(self._serve, self._stop, self._stopped)

    async def stop(self) -> None:
        assert self._stop is not None
        self._stop.set()
        self._stop = None
        with anyio.fail_after(10):  # uvicorn gives open responses 1 s, then cuts them
            await self._stopped.wait()

    async def _serve(
        self, stop: anyio.Event, stopped: anyio.Event, *, task_status: TaskStatus[None]
    ) -> None:
        try:
            async with serve(self.emulator.app, port=self.port) as url:
                self.port = int(url.rsplit(":", 1)[1])
                task_status.started()
                await stop.wait()
        finally:
            stopped.set()


# --- clients ------------------------------------------------------------------------------------


class Malformed(Exception):  # noqa: N818 - a verdict on an answer, raised to end its reading
    """An answer that is neither complete nor a well-formed error."""


@dataclass(frozen=True)
class Endpoint:
    name: str
    path: str
    stream: bool
    models: tuple[str, ...]

    @property
    def anthropic(self) -> bool:
        return self.path == "/v1/messages"

    def body(self, model: str) -> dict[str, Any]:
        if self.path == "/v1/embeddings":
            return {"model": model, "input": ["one", "two"]}
        body: dict[str, Any] = {"model": model, "stream": self.stream}
        if self.path == "/v1/completions":
            body["prompt"] = "Once upon a time"
        else:
            body["messages"] = MESSAGES
        if self.anthropic:
            body["max_tokens"] = 64
        return body


ENDPOINTS = (
    Endpoint("chat", "/v1/chat/completions", False, TEXT_MODELS),
    Endpoint("chat-stream", "/v1/chat/completions", True, TEXT_MODELS),
    Endpoint("completions", "/v1/completions", False, TEXT_MODELS),
    Endpoint("completions-stream", "/v1/completions", True, TEXT_MODELS),
    Endpoint("embeddings", "/v1/embeddings", False, (NOMIC,)),
    Endpoint("messages", "/v1/messages", False, TEXT_MODELS),
    Endpoint("messages-stream", "/v1/messages", True, TEXT_MODELS),
)
CHAT, STREAM, MESSAGES_STREAM = ENDPOINTS[0], ENDPOINTS[1], ENDPOINTS[6]
EMBEDDINGS, MESSAGE = ENDPOINTS[4], ENDPOINTS[5]
# Statuses LM Studio's own errors reach clients with (passed through as LM Studio sent them, in
# OpenAI's envelope whatever the endpoint): 400 for a model gone when JIT loading is off, 500
# for a JIT load that failed.
UPSTREAM_STATUSES = frozenset({400, 500})
PROXY_STATUSES = frozenset({429, 502, 503, 504})


@dataclass
class Timed:
    """A request's time, and its bound."""

    took_s: float = 0.0
    bound_s: float = math.inf
    what: str = "none"

    def __str__(self) -> str:
        return f"{self.took_s:.2f} s of its {self.bound_s:.2f} s bound ({self.what})"


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    endpoints: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    longest: Timed = field(default_factory=Timed)  # the request that took longest
    closest: Timed = field(default_factory=Timed)  # the one that came closest to its bound
    late: int = 0  # requests past their bound
    bursts: list[str] = field(default_factory=list)  # loads per JIT burst, by model
    early_zero_s: list[float | None] = field(default_factory=list)  # gauges after early leavers
    unloads: list[str] = field(default_factory=list)  # unloads during a load, as they went
    aways: list[str] = field(default_factory=list)  # hosts gone and back, as it went
    # Answers by the host that gave them (`x-lmswitch-upstream`): "a 200", "b error", "none
    # error" (the proxy's own, before any host); when each host last answered 200; while a
    # host is away, the outcomes of the requests that ended meanwhile, by host.
    by_host: Counter[str] = field(default_factory=Counter)
    answered_at: dict[str, float] = field(default_factory=dict)
    meanwhile: Counter[str] | None = None

    def fail(self, what: str) -> None:
        self.outcomes["FAILED"] += 1
        self.flag(what)

    def flag(self, what: str) -> None:
        """A failed check (the request itself is counted by its outcome)."""
        if len(self.failures) < 40:
            self.failures.append(what)

    def answered(self, status: int, upstream: str | None) -> None:
        """An answer's status and the host it names."""
        answer = f"{upstream or 'none'} {'200' if status == 200 else 'error'}"
        self.by_host[answer] += 1
        if status == 200 and upstream is not None:
            self.answered_at[upstream] = anyio.current_time()

    def timed(self, what: str, took_s: float, bound_s: float) -> None:
        timed = Timed(took_s, bound_s, what)
        if took_s > self.longest.took_s:
            self.longest = timed
        if took_s / bound_s > self.closest.took_s / self.closest.bound_s:
            self.closest = timed
        if took_s > bound_s:
            self.late += 1
            self.flag(f"{what}: took {took_s:.2f} s, past its bound of {bound_s:.2f} s")


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        raise Malformed(f"not JSON: {raw[:200]!r}") from None


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:  # pragma: no cover - the proxy answers JSON
        return None


def _openai_error(doc: Any) -> str | None:
    """The error's code (or type) if `doc` is OpenAI's envelope, else None."""
    error = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return None
    if not isinstance(error.get("type"), str) or not {"param", "code"} <= error.keys():
        return None
    return str(error["code"] or error["type"])


def _anthropic_error(doc: Any) -> str | None:
    """The error's type if `doc` is Anthropic's envelope, else None."""
    if not isinstance(doc, dict) or doc.get("type") != "error":
        return None
    error = doc.get("error")
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return None
    kind = error.get("type")
    return kind if isinstance(kind, str) else None


def check_error(endpoint: Endpoint, status: int, headers: httpx2.Headers, raw: bytes) -> str:
    doc = _json(raw)
    if endpoint.anthropic and (kind := _anthropic_error(doc)) is not None:
        if status not in PROXY_STATUSES:
            raise Malformed(f"status {status} for the proxy's own error {kind}")
        return f"{status} {kind} (Anthropic's)"
    code = _openai_error(doc)
    if code is None:
        raise Malformed(f"status {status} without an error envelope: {raw[:300]!r}")
    if status in UPSTREAM_STATUSES:
        return f"{status} {code} (LM Studio's)"
    if endpoint.anthropic or status not in PROXY_STATUSES:
        raise Malformed(f"status {status} {code} in OpenAI's envelope on {endpoint.path}")
    if code in ("upstream_unavailable", "queue_timeout") and "retry-after" not in headers:
        raise Malformed(f"{status} {code} without Retry-After")
    return f"{status} {code}"


def check_answer(endpoint: Endpoint, doc: Any) -> str:
    if not isinstance(doc, dict):
        raise Malformed(f"a 200 answer that is not an object: {doc!r:.200}")
    if endpoint.path == "/v1/embeddings":
        data = doc.get("data")
        good = (
            isinstance(data, list)
            and len(data) == 2
            and all(isinstance(d.get("embedding"), list) for d in data)
        )
    elif endpoint.path == "/v1/chat/completions":
        message = (doc.get("choices") or [{}])[0].get("message") or {}
        good = isinstance(message.get("content"), str) and bool(message["content"])
    elif endpoint.path == "/v1/completions":
        good = isinstance((doc.get("choices") or [{}])[0].get("text"), str)
    else:
        content = doc.get("content") or [{}]
        good = doc.get("type") == "message" and content[0].get("type") == "text"
    if not good:
        raise Malformed(f"an incomplete {endpoint.name} answer: {doc!r:.300}")
    return "200 complete"


def _stream_error(endpoint: Endpoint, event: str | None, data: str) -> str | None:
    """The error of a stream's error event, if the event is one."""
    if endpoint.anthropic:
        return _anthropic_error(_json(data.encode())) if event == "error" else None
    if data == "[DONE]":
        return None
    return _openai_error(_json(data.encode()))


async def check_stream(endpoint: Endpoint, response: httpx2.Response, leave_after: int) -> str:
    """Read an SSE answer to its end (or leave after `leave_after` text events, if not 0)."""
    if not response.headers.get("content-type", "").startswith("text/event-stream"):
        raise Malformed(f"a streamed answer as {response.headers.get('content-type')}")
    events: list[tuple[str | None, str]] = []
    event: str | None = None
    texts = 0
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data = line[5:].strip()
            events.append((event, data))
            if (error := _stream_error(endpoint, event, data)) is not None:
                if len(events) > 1 + REPLY_TOKENS + 4:  # pragma: no cover - a broken relay
                    raise Malformed("an error event after the end of the stream")
                return f"200 then an error event ({error})"
            texts += '"text' in data or '"content":"' in data.replace(" ", "")
            if leave_after and texts >= leave_after:
                return "client left mid-stream"
        elif line == "":
            event = None
    if not events:
        raise Malformed("an empty stream")
    last_event, last = events[-1]
    complete = last_event == "message_stop" if endpoint.anthropic else last == "[DONE]"
    if not complete or texts < REPLY_TOKENS:
        raise Malformed(f"a stream cut short without an error event: {events[-3:]}")
    return "200 complete"


async def exchange(
    http: httpx2.AsyncClient,
    endpoint: Endpoint,
    model: str,
    leave_after: int,
    request_id: str,
    tally: Tally,
) -> tuple[str, str | None]:
    """One request; the outcome and the host that answered (None if the proxy did, before
    any host), or `Malformed`. Its status and host go to `tally.answered` as they come."""
    body, headers = endpoint.body(model), {"x-request-id": request_id}
    try:
        async with http.stream("POST", endpoint.path, json=body, headers=headers) as response:
            if (echoed := response.headers.get("x-request-id")) is None:
                raise Malformed("no x-request-id")
            if echoed != request_id:  # pragma: no cover - the proxy echoes the client's id
                raise Malformed(f"x-request-id {echoed!r} for a request sent as {request_id!r}")
            upstream = response.headers.get("x-lmswitch-upstream")
            tally.answered(response.status_code, upstream)
            if response.status_code != 200:
                raw = await response.aread()
                return check_error(endpoint, response.status_code, response.headers, raw), upstream
            if endpoint.stream:
                return await check_stream(endpoint, response, leave_after), upstream
            return check_answer(endpoint, _json(await response.aread())), upstream
    except httpx2.TransportError as exc:
        raise Malformed(f"the connection failed: {exc!r}") from None


def bound_s(forwards: int) -> float:
    """How long a request may take, from the soak's settings, by how often LM Studio saw it.

    The proxy's own answer comes within a queue wait (`queue_timeout`: the wait for the model,
    a load's `load_timeout` within it, and any reading of LM Studio's state the request waits
    for, which counts toward it). A forwarded request adds LM Studio's answer head
    (`read_timeout`), then the answer itself: its tokens, or a stream cut by LM Studio's restart
    after uvicorn's second of grace. A request LM Studio saw twice (its model unloaded behind
    the proxy's back, JIT off) was asked again after a reading of LM Studio's state and a second
    queue wait, each a queue timeout at most, and a second head. Slack covers the one event loop
    that the clients, the proxy and LM Studio share. `DEADLINE_S` still caps them all.
    """
    bound = QUEUE_TIMEOUT_S + SLACK_S
    if forwards:
        bound += READ_TIMEOUT_S + REPLY_TOKENS * TOKEN_DELAY_S + 1.0
    return bound + max(0, forwards - 1) * (2 * QUEUE_TIMEOUT_S + READ_TIMEOUT_S)


def _no_forwards(request_id: str) -> int:
    return 0


async def ask(
    http: httpx2.AsyncClient,
    tally: Tally,
    request_id: str,
    endpoint: Endpoint,
    model: str,
    *,
    leave_after: int = 0,
    cancel_after_s: float = math.inf,
    forwards: Callable[[str], int] = _no_forwards,
) -> str | None:
    """One request, judged: its outcome tallied (None if it failed), its time held against its
    bound; `forwards(request_id)` says how often LM Studio saw it."""
    what = f"{request_id} {endpoint.name} {model}"
    outcome, upstream = "client cancelled", None
    started = anyio.current_time()
    with anyio.move_on_after(DEADLINE_S) as deadline:
        try:
            with anyio.move_on_after(cancel_after_s):
                outcome, upstream = await exchange(
                    http, endpoint, model, leave_after, request_id, tally
                )
        except Malformed as exc:
            forwards(request_id)
            tally.fail(f"{what}: {exc}")
            return None
    took_s, seen = anyio.current_time() - started, forwards(request_id)
    if deadline.cancelled_caught:
        tally.fail(f"{what}: no answer within {DEADLINE_S:g} s")
        return None
    tally.outcomes[outcome] += 1
    if tally.meanwhile is not None:
        tally.meanwhile[f"{upstream or 'none'}: {outcome}"] += 1
    if outcome != "client cancelled":
        tally.timed(f"{what}: {outcome}, LM Studio saw it {seen}x", took_s, bound_s(seen))
    return outcome


async def client(
    http: httpx2.AsyncClient,
    rng: random.Random,
    tally: Tally,
    until: Callable[[], bool],
    name: str = "client",
    forwards: Callable[[str], int] = _no_forwards,
) -> None:
    """Requests one after another: mostly read to the end, some left mid-stream or cancelled
    (in the queue, during a load, or mid-answer). Request ids are `name-<n>`."""
    for n in itertools.count():
        if until():
            return
        endpoint = rng.choice(ENDPOINTS)
        model = rng.choice(endpoint.models)
        mode = rng.choices(("full", "leave", "cancel"), (80, 10 if endpoint.stream else 0, 10))[0]
        tally.endpoints[endpoint.name] += 1
        leave_after = rng.randint(1, 3) if mode == "leave" else 0
        cancel_after_s = rng.uniform(0.01, 1.5) if mode == "cancel" else math.inf
        await ask(
            http,
            tally,
            f"{name}-{n}",
            endpoint,
            model,
            leave_after=leave_after,
            cancel_after_s=cancel_after_s,
            forwards=forwards,
        )
        await anyio.sleep(rng.uniform(0, 0.03))


# --- faults -------------------------------------------------------------------------------------


class Injector:
    """Random faults, each on its own, every 1.2 s on average, dealt from a shuffled deck (so
    that every kind comes up, and in every order), each on one host of the pool: one picked at
    random, or for the cards that judge the probe model's requests, the host that has it. A
    lasting fault clears itself; a fault that sends requests of its own (through `http`, to the
    proxy) waits for them, each within its deadline, or leaves a probe running in the
    injector's task group."""

    FAULTS = (
        "fail_loads",
        "slow_loads",
        "cut_streams",
        "restart",
        "host_away",
        "unload_behind",
        "load_behind",
        "hang_listings",
        "silent",
        "jit_burst",
        "leave_early",
        "unload_during_load",
    )
    # The cards about the probe model's requests act on its host.
    ON_PROBE_HOST = frozenset({"jit_burst", "leave_early", "unload_during_load"})

    def __init__(
        self,
        hosts: tuple[Upstream, ...],
        rng: random.Random,
        tally: Tally,
        http: httpx2.AsyncClient,
    ) -> None:
        self.hosts = hosts
        self.probe_host = next(host for host in hosts if host.only == PROBE)
        self.rng = rng
        self.tally = tally
        self.http = http
        self._until: dict[tuple[str, Upstream], float] = {}  # when a lasting fault ends
        self._deck: list[str] = []
        self._restarts = 0
        self._serial = itertools.count()  # for the request ids of the faults' own requests
        self._probes: TaskGroup | None = None

    def forwarded(self, request_id: str) -> int:
        """How often the hosts' LM Studios received the request, forgetting it."""
        return sum(host.emulator.forwarded(request_id) for host in self.hosts)

    async def run(self, until: Callable[[], bool]) -> None:
        async with anyio.create_task_group() as self._probes:
            while not until():
                await anyio.sleep(0.1)
                for host in self.hosts:
                    host.emulator.calls.clear()  # its record of every call would only grow
                now = anyio.current_time()
                for knob in [k for k, end in self._until.items() if end <= now]:
                    self._revert(*knob)
                if self.rng.random() < 0.1 / 1.2:
                    if not self._deck:
                        self._deck = self.rng.sample(self.FAULTS, len(self.FAULTS))
                    fault = self._deck.pop()
                    on_probe_host = fault in self.ON_PROBE_HOST
                    host = self.probe_host if on_probe_host else self.rng.choice(self.hosts)
                    self.tally.faults[f"{fault}@{host.name}"] += 1
                    await getattr(self, fault)(host)
            for host in self.hosts:
                self.calm(host)  # a restart ends before the loop goes on: every host is up

    def _revert(self, knob: str, host: Upstream) -> None:
        del self._until[knob, host]
        emulator = host.emulator
        if knob == "slow_loads":
            emulator.load_delay_s = LOAD_DELAY_S
        elif knob == "cut_streams":
            emulator.cut_streams_after = None
        elif knob == "hang_listings":
            emulator.hang_listings = False
        else:
            emulator.silent = False

    def _last(self, knob: str, host: Upstream, low_s: float, high_s: float) -> None:
        """A lasting fault on `host` ends in `low_s` to `high_s` from now."""
        self._until[knob, host] = anyio.current_time() + self.rng.uniform(low_s, high_s)

    async def _outlast(self, host: Upstream, *knobs: str) -> None:
        """Wait for these lasting faults on `host` to end (each within seconds), and end them."""
        for knob in knobs:
            if (end := self._until.get((knob, host))) is not None:
                await anyio.sleep(max(0.0, end - anyio.current_time()))
                self._revert(knob, host)

    def calm(self, host: Upstream) -> None:
        """Every fault on `host` ends."""
        for knob in [knob for knob in self._until if knob[1] is host]:
            del self._until[knob]
        emulator = host.emulator
        emulator.load_delay_s = LOAD_DELAY_S
        emulator.cut_streams_after = None
        emulator.fail_next_loads = 0
        emulator.hang_listings = emulator.silent = False

    def _during(self) -> str:
        """The lasting faults now, for a flag."""
        return ", ".join(sorted(f"{k}@{h.name}" for k, h in self._until)) or "no lasting fault"

    def _request_id(self, fault: str) -> str:
        return f"{fault}-{next(self._serial)}"

    async def fail_loads(self, host: Upstream) -> None:
        host.emulator.fail_next_loads += self.rng.randint(1, 2)

    async def slow_loads(self, host: Upstream) -> None:
        host.emulator.load_delay_s = SLOW_LOAD_S
        self._last("slow_loads", host, 1, 3)

    async def cut_streams(self, host: Upstream) -> None:
        host.emulator.cut_streams_after = self.rng.randint(0, 4)
        self._last("cut_streams", host, 0.5, 2)

    async def restart(self, host: Upstream) -> None:
        """LM Studio goes away for a while. Every other time it comes back with nothing loaded
        (restarted, not just unreachable), and either way with JIT loading on or off."""
        await host.stop()
        self._restarts += 1
        if self._restarts % 2:
            self.tally.faults["restart: nothing loaded"] += 1
            for instance_id in list(host.emulator.instances):
                host.emulator.unload_instance(instance_id)
        host.emulator.jit = self.rng.random() < 0.7
        await anyio.sleep(self.rng.uniform(0.1, 1.0))
        await host.start()

    async def unload_behind(self, host: Upstream) -> None:
        loaded = list(host.emulator.instances)
        for instance_id in self.rng.sample(loaded, min(1, len(loaded))):
            host.emulator.unload_instance(instance_id)

    async def load_behind(self, host: Upstream) -> None:
        """Mostly a model that is not loaded (clients will soon ask for it), else another copy."""
        emulator = host.emulator
        models = [m for m in (*TEXT_MODELS, NOMIC) if m in emulator.catalog]
        absent = [m for m in models if m not in emulator.view()]
        chosen = self.rng.choice(absent if absent and self.rng.random() < 0.7 else models)
        emulator.load_instance(chosen, jit=True)

    # a host gone, and back

    async def host_away(self, host: Upstream) -> None:
        """A host goes away for 1-3 s (its server stops: connections refused, running streams
        broken off) and comes back on its port with nothing loaded and none of its faults, as a
        restarted LM Studio. Meanwhile requests are answered within their bounds as ever (by
        the other host for the models it has; one for a model only the host away has may get
        503 upstream_unavailable). Once back, the proxy sees it up within a poll, and it answers
        a request again within seconds: a client's, or else one for the model only it has."""
        away_s = self.rng.uniform(*AWAY_S)
        during = self._during()
        await host.stop()  # uvicorn's second of grace for open responses, then cut
        for instance_id in list(host.emulator.instances):
            host.emulator.unload_instance(instance_id)
        self.calm(host)
        self.tally.meanwhile = meanwhile = Counter[str]()
        try:
            await anyio.sleep(away_s)
            await host.start()
        finally:
            self.tally.meanwhile = None
        back = anyio.current_time()
        up_s = await wait_until(partial(self._host_up, host), UP_BOUND_S)

        def answered_s() -> float | None:
            at = self.tally.answered_at.get(host.name, -math.inf)
            return at - back if at > back else None

        async def answered() -> bool:
            return answered_s() is not None

        how = "a client's request"
        if await wait_until(answered, NATURAL_S) is None:
            how = f"a request for {host.only}"
            for _ in range(2):  # the first may wait out the queue behind its other models
                request_id = self._request_id(f"back-{host.name}")
                await ask(
                    self.http, self.tally, request_id, CHAT, host.only, forwards=self.forwarded
                )
                if await answered():
                    break
        took_s = answered_s()
        answers = listed(meanwhile)
        work = "no answer" if took_s is None else f"answered {how} {took_s:.2f} s after"
        self.tally.aways.append(
            f"{host.name} away {away_s:.1f} s during {during}; up {seconds(up_s)} after it came "
            f"back, {work}; meanwhile: {answers}"
        )
        if up_s is None or took_s is None:
            self.tally.flag(
                f"host {host.name}, back after {away_s:.1f} s away (during {during}): up "
                f"{seconds(up_s)} after (bound {UP_BOUND_S:g} s), {work}"
            )

    async def _host_up(self, host: Upstream) -> bool:
        status = (await self.http.get("/api/v1/status")).json()
        return any(row["name"] == host.name and row["up"] for row in status["upstreams"])

    # LM Studio hung

    async def hang_listings(self, host: Upstream) -> None:
        """LM Studio's model listings hang while inference works; a probe waits on one."""
        host.emulator.hang_listings = True
        self._last("hang_listings", host, *HANG_S)
        assert self._probes is not None
        self._probes.start_soon(self._unknown_model)

    async def silent(self, host: Upstream) -> None:
        """LM Studio accepts connections and answers nothing; a probe waits on a listing."""
        host.emulator.silent = True
        self._last("silent", host, *SILENT_S)
        assert self._probes is not None
        self._probes.start_soon(self._unknown_model)

    async def _unknown_model(self) -> None:
        """A request for a model no LM Studio has: the proxy reads the hosts' models again
        before it answers 404 (or 503 if it cannot tell), and the hung host's reading hangs.

        It asks once the proxy's limit of one such reading a second has passed: every reading
        since the fault began hangs, so the last one that ended is older than that.
        """
        await anyio.sleep(UNKNOWN_REFRESH_S)
        request_id = self._request_id("unknown")
        what = f"{request_id} chat {UNKNOWN}"
        headers = {"x-request-id": request_id}
        started = anyio.current_time()
        with anyio.move_on_after(DEADLINE_S) as deadline:
            try:
                response = await self.http.post(CHAT.path, json=CHAT.body(UNKNOWN), headers=headers)
            except httpx2.TransportError as exc:  # pragma: no cover - a broken proxy
                self.tally.fail(f"{what}: the connection failed: {exc!r}")
                return
        took_s = anyio.current_time() - started
        if deadline.cancelled_caught:
            self.tally.fail(f"{what}: no answer within {DEADLINE_S:g} s")
            return
        code = _openai_error(_json_or_none(response.content))
        if response.status_code not in (404, 503) or code is None:  # pragma: no cover
            self.tally.fail(f"{what}: {response.status_code} {response.text[:200]!r}")
            return
        outcome = f"{response.status_code} {code} (a model LM Studio does not have)"
        self.tally.outcomes[outcome] += 1
        self.tally.timed(f"{what}: {outcome}", took_s, bound_s(0))

    # what the proxy makes LM Studio load

    async def jit_burst(self, host: Upstream) -> None:
        """The issue's sequence: a model the proxy loaded goes behind its back while nobody
        uses it, and a burst of requests for it follows at once, with LM Studio's JIT loading
        on and stacking a copy per request: LM Studio must load it once for them all (the
        proxy's load, or one request's). The probe model, which no client uses and only one
        host has, is the one.

        (A model unloaded behind the proxy's back while its requests run is `unload_behind`'s:
        requests already on their way find it gone before the proxy can know.)"""
        await self._outlast(host, "silent", "hang_listings")  # LM Studio answers, and may load
        key, endpoint = PROBE, CHAT
        emulator = host.emulator
        await self._admin("load")  # if it cannot load now, the burst finds it not loaded
        # Idle: the proxy trusts a confirmation of the model for FRESH_S (its load, an answer,
        # or a listing that showed it, as of when the listing began), and a model gone within
        # that window is as unseeable as one gone under a request on its way (docs/design.md
        # §4.1). So it goes once that long has passed since the load and since the last listing
        # LM Studio answered (on a quiet host one poll in two came within it), with nothing
        # awaited between that check and the unload.
        await anyio.sleep(FRESH_S + 0.05)
        with anyio.move_on_after(2 * POLL_S + 1) as listed:
            # Time passing, not an event: sleep until then, and again if LM Studio listed.
            while (left_s := emulator.listed_at + FRESH_S + 0.05 - time.monotonic()) >= 0:  # noqa: ASYNC110
                await anyio.sleep(left_s + 0.01)
        if listed.cancelled_caught:  # pragma: no cover - the proxy lists once a poll at rest
            self.tally.bursts.append(f"{key}: not judged, the proxy listed it without a pause")
            return
        burst = f"burst-{next(self._serial)}"
        jit, shares = emulator.jit, emulator.jit_shares_loads
        emulator.jit, emulator.jit_shares_loads = True, False

        def figures() -> tuple[int, ...]:
            return emulator.load_count(key), emulator.jit_started[key], emulator.stacked[key]

        before = figures()
        during = self._during()
        outcomes: Counter[str | None] = Counter()

        async def request(request_id: str) -> None:
            forwards = self.forwarded
            outcomes[
                await ask(self.http, self.tally, request_id, endpoint, key, forwards=forwards)
            ] += 1

        try:
            for instance in [i.id for i in emulator.instances.values() if i.key == key]:
                emulator.unload_instance(instance)
            emulator.gone_behind.pop(key, None)  # idle: the proxy must see to it
            emulator.most_copies[key] = 0
            async with anyio.create_task_group() as tg:
                for n in range(BURST):
                    tg.start_soon(request, f"{burst}.{n}")
        finally:
            emulator.jit, emulator.jit_shares_loads = jit, shares
        # One load after another (the first failed, or the model went again) is no fault; two
        # copies at once, or a load tried while another of the model ran (refused for memory or
        # not), are.
        loads, jit_loads, stacked = (now - was for now, was in zip(figures(), before, strict=True))
        copies = emulator.most_copies[key]
        answers = ", ".join(f"{n} {outcome}" for outcome, n in outcomes.items())
        made = f"{loads} loads ({jit_loads} JIT), {copies} copies at most, {stacked} stacked"
        self.tally.bursts.append(f"{key}: {made} ({answers})")
        if copies > 1 or stacked:
            self.tally.flag(
                f"{burst} ({burst}.0-{BURST - 1}, during {during}): for {BURST} requests at "
                f"once for {key} after it went behind the proxy's back, LM Studio {host.name} "
                f"made {made}; answers: {answers}"
            )

    # clients that leave

    async def leave_early(self, host: Upstream) -> None:
        """Clients that leave before the first byte of their answer, streaming or not, while
        the proxy loads their model or while LM Studio sits on its first token: within a second
        of the last one leaving, no request for the model is counted in flight or queued."""
        host.emulator.slow_first_token[PROBE] = SLOW_FIRST_TOKEN_S
        ids = f"early-{next(self._serial)}"
        try:
            async with anyio.create_task_group() as tg:
                for n, endpoint in enumerate((CHAT, STREAM, MESSAGE, MESSAGES_STREAM)):
                    upstream = not endpoint.anthropic  # else wherever it is then
                    leave_s = self.rng.uniform(0.02, 0.3 if upstream else 0.6)
                    tg.start_soon(
                        self._leave_before_first_byte,
                        host,
                        f"{ids}.{n}",
                        endpoint,
                        leave_s,
                        upstream,
                    )
            zero_s = await wait_until(partial(gauges_at_zero, self.http, PROBE), 1.0)
            self.tally.early_zero_s.append(zero_s)
            if zero_s is None:
                left = await gauges_left(self.http, PROBE)
                self.tally.flag(
                    f"{ids} ({ids}.0-3): a second after the last of them left before the first "
                    f"byte, the proxy still counted {', '.join(left)}"
                )
            # The next fault finds every request for the probe model over, LM Studio's too.
            await wait_until(partial(gauges_at_zero, self.http, PROBE), READ_TIMEOUT_S + 1)
        finally:
            del host.emulator.slow_first_token[PROBE]

    async def _leave_before_first_byte(
        self, host: Upstream, request_id: str, endpoint: Endpoint, leave_s: float, upstream: bool
    ) -> None:
        """Leave `leave_s` after asking, or after LM Studio has the request if `upstream`."""
        body, headers = endpoint.body(PROBE), {"x-request-id": request_id}
        outcome = "client left before the first byte"
        async with anyio.create_task_group() as tg:

            async def send() -> None:
                nonlocal outcome
                async with self.http.stream(
                    "POST", endpoint.path, json=body, headers=headers
                ) as response:
                    outcome = f"{response.status_code} before the client left"  # proxy's error
                    await response.aread()
                tg.cancel_scope.cancel()

            tg.start_soon(send)
            if upstream:
                with anyio.move_on_after(QUEUE_TIMEOUT_S + 1):  # then it is the proxy's 503
                    forwards = host.emulator.forwards
                    await host.emulator.wait_until(lambda: forwards[request_id] > 0, math.inf)
            await anyio.sleep(leave_s)
            tg.cancel_scope.cancel()
        self.forwarded(request_id)
        self.tally.outcomes[outcome] += 1

    # an operator's calls

    async def unload_during_load(self, host: Upstream) -> None:
        """An operator unloads the probe model while the proxy loads it: the unload answers
        once the load has ended and the model is unloaded, within a few load times, and the
        model stays unloaded (no client wants it)."""
        await self._outlast(host, "silent", "hang_listings")  # LM Studio answers, and may load
        await wait_until(partial(self._host_up, host), 2 * POLL_S + 1)  # the proxy read it again
        emulator = host.emulator
        delay_s, emulator.load_delay_s = emulator.load_delay_s, CARD_LOAD_S
        try:
            # The load waits its turn behind the clients' models, a queue timeout at most: if
            # it never started, once more.
            for attempt in (1, 2):
                if await self._unload_during_load(emulator) or attempt == 2:
                    return
        finally:
            emulator.load_delay_s = delay_s

    async def _unload_during_load(self, emulator: WatchedEmulator) -> bool:
        """One attempt; False if the proxy did not get the model loading in time."""
        if PROBE in emulator.view():  # an earlier fault's requests loaded it
            await self._admin("unload")
        load: list[tuple[int, str] | None] = []
        unload: tuple[int, str] | None = None

        def probe_loading() -> bool:
            return any(call.model == PROBE for call in emulator.load_calls)

        async with anyio.create_task_group() as tg:

            async def call_load() -> None:
                load.append(await self._admin("load"))

            tg.start_soon(call_load)
            with anyio.move_on_after(QUEUE_TIMEOUT_S + 1) as waited:
                await emulator.wait_until(probe_loading, math.inf)
            if not waited.cancelled_caught:
                await anyio.sleep(self.rng.uniform(0.2, 0.4))
                during = probe_loading()
                started = anyio.current_time()
                unload = await self._admin("unload")
                took_s = anyio.current_time() - started
        if waited.cancelled_caught:  # the proxy could not load it then: nothing to judge
            self.tally.unloads.append(f"not judged: the load answered {load[0]}")
            return False
        held = emulator.view().get(PROBE)  # once the load call has ended too
        when = "during its load" if during else "right after its load"
        answer = "no answer" if unload is None else f"{unload[0]} {unload[1]!r}"
        status = "no answer" if unload is None else unload[0]
        self.tally.unloads.append(
            f"{status} in {took_s:.2f} s {when}, then {'loaded' if held else 'unloaded'}"
        )
        if unload is None or unload[0] != 200 or took_s > UNLOAD_BOUND_S or held:
            self.tally.flag(
                f"an unload of {PROBE} {when} answered {answer} in {took_s:.2f} s (bound "
                f"{UNLOAD_BOUND_S:g} s); the load answered {load[0] if load else 'nothing'}, "
                f"and LM Studio then held {held or 'none'}"
            )
        return True

    async def _admin(self, action: str) -> tuple[int, str] | None:
        """The proxy's `POST /api/v1/models/<action>` of the probe model: status and message."""
        with anyio.move_on_after(QUEUE_TIMEOUT_S + 2):
            response = await self.http.post(f"/api/v1/models/{action}", json={"model_id": PROBE})
            doc = _json_or_none(response.content)
            message = doc.get("message") if isinstance(doc, dict) else None
            if not isinstance(message, str):
                message = _openai_error(doc) or response.text[:200]
            return response.status_code, message
        return None


# --- measuring and settling ---------------------------------------------------------------------


def open_fds() -> int:
    """File descriptors open in this process (0 where the system does not list them)."""
    folder = next((f for f in ("/proc/self/fd", "/dev/fd") if os.path.isdir(f)), None)
    return len(os.listdir(folder)) if folder is not None else 0


def traced() -> tracemalloc.Snapshot:
    """Memory allocated and still held, leaving out the log records pytest keeps."""
    gc.collect()
    return tracemalloc.take_snapshot().filter_traces(
        [
            tracemalloc.Filter(False, "*/logging/__init__.py"),
            tracemalloc.Filter(False, "*/_pytest/logging.py"),
            tracemalloc.Filter(False, tracemalloc.__file__),
            tracemalloc.Filter(False, "*/linecache.py"),  # source lines of logged tracebacks
        ]
    )


def rss_mib() -> float:
    """Resident memory in MiB (0 where /proc is missing)."""
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.exists() else []
    return next((int(n.split()[1]) / 1024 for n in lines if n.startswith("VmRSS:")), 0.0)


async def metric_samples(
    http: httpx2.AsyncClient,
) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    text = (await http.get("/metrics")).text
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples


async def leases_left(proxy: Proxy) -> list[str]:
    """What still holds or waits for a model, as the proxy reports it; empty when all is back."""
    status = await proxy.status()
    left = [f"status: in_flight {status['in_flight']}, queue {status['queue']}"]
    left = left if status["in_flight"] or status["queue"] else []
    rows = (await proxy.http.get("/api/v1/models")).json()
    left += [f"model {r['id']}: {r['in_flight']}/{r['queued']}" for r in rows if r["in_flight"]]
    left += [f"model {r['id']}: queued {r['queued']}" for r in rows if r["queued"]]
    left += [
        f"model {r['id']} is {r['state']}" for r in rows if r["state"] not in ("ready", "absent")
    ]
    return left + await gauges_left(proxy.http)


async def gauges_left(http: httpx2.AsyncClient, model: str | None = None) -> list[str]:
    """The requests the proxy's gauges count in flight or queued (for `model`, or any)."""
    samples = await metric_samples(http)
    return [
        f"{gauge}{dict(labels)} = {value:g}"
        for gauge in GAUGES
        for labels, value in samples.get(gauge, {}).items()
        if value and model in (None, dict(labels).get("model"))
    ]


async def gauges_at_zero(http: httpx2.AsyncClient, model: str | None = None) -> bool:
    return not await gauges_left(http, model)


# A model as the pool holds it: the hosts holding it, and the loaded instance ids of the first
# of them (the proxy's merged row shows the host where the model is most nearly ready, the first
# in configuration order among equals).
Held = dict[str, list[str]]


async def proxy_view(proxy: Proxy) -> dict[str, Held]:
    """The loaded models by key, as the proxy sees them."""
    rows = (await proxy.http.get("/api/v1/models")).json()
    return {
        r["id"]: {
            "hosts": sorted(r["upstreams"]),
            "instances": sorted([r["instance_id"], *r["duplicates"]]),
        }
        for r in rows
        if r["state"] != "absent"
    }


def pool_view(hosts: tuple[Upstream, ...]) -> dict[str, Held]:
    """The loaded models by key, as the hosts' LM Studios hold them."""
    view: dict[str, Held] = {}
    for host in hosts:  # in configuration order
        for key, instances in host.emulator.view().items():
            view.setdefault(key, {"hosts": [], "instances": instances})["hosts"].append(host.name)
    return view


async def wait_until(check: Callable[[], Awaitable[bool]], timeout_s: float) -> float | None:
    """Seconds until `check()` held, or None if it did not within `timeout_s`."""
    start = anyio.current_time()
    with anyio.move_on_after(timeout_s) as waited:
        while not await check():  # noqa: ASYNC110 - the state is seen over HTTP
            await anyio.sleep(0.02)
    return None if waited.cancelled_caught else anyio.current_time() - start


async def answers_every_model(url: str) -> list[str]:
    """One request per model, each answered in full: the proxy recovered by itself."""
    asked = [("/v1/chat/completions", chat(model)) for model in TEXT_MODELS]
    asked.append(("/v1/embeddings", {"model": NOMIC, "input": "one"}))
    async with httpx2.AsyncClient(base_url=url, timeout=DEADLINE_S) as http:
        answers = [(body["model"], await http.post(path, json=body)) for path, body in asked]
    return [f"after the soak, {m}: {r.status_code} {r.text}" for m, r in answers if r.is_error]


class CountingHandler(logging.Handler):
    """Counts log records by logger and level, and keeps none."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        what = f"{record.name} {record.levelname}"
        if record.exc_info and record.exc_info[0] is not None:
            frames = traceback.extract_tb(record.exc_info[2])
            app = "the proxy" if any(f.filename.endswith("/proxy/app.py") for f in frames) else ""
            what += f" ({record.exc_info[0].__name__}{' in ' + app if app else ''})"
        self.counts[what] += 1

    def unhandled(self) -> list[str]:
        """Exceptions that reached the proxy's HTTP server (the emulator's are its faults)."""
        return [f"{what}: {n}" for what, n in self.counts.items() if "in the proxy)" in what]


@contextlib.contextmanager
def counted_logs() -> Iterator[CountingHandler]:
    """Log records counted instead of captured: pytest keeps every record (and the request ids,
    paths and exceptions it holds) for the test's report, which over a soak reads as a leak."""
    root = logging.getLogger()
    handlers, root.handlers = root.handlers, []
    counting = CountingHandler()
    root.addHandler(counting)
    try:
        yield counting
    finally:
        root.handlers = handlers


@contextlib.asynccontextmanager
async def tracing() -> AsyncIterator[None]:
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


# --- the soak -----------------------------------------------------------------------------------


@dataclass
class Settled:
    """How the proxy and LM Studio ended up once the faults and the clients stopped."""

    quiet_s: float | None  # until LM Studio had no load running
    zero_s: float | None  # until no lease, waiter or gauge was left
    left: list[str]  # what was left then
    converged_s: float | None  # until the proxy's view matched the hosts'
    views: tuple[dict[str, Held], dict[str, Held]]  # the proxy's, the hosts'
    recovered: list[str]  # requests that failed afterwards


async def settle(proxy: Proxy, hosts: tuple[Upstream, ...]) -> Settled:
    async def quiet() -> bool:
        return not any(host.emulator.loading for host in hosts)

    async def back_to_zero() -> bool:
        return not await leases_left(proxy)

    async def views_match() -> bool:
        return await proxy_view(proxy) == pool_view(hosts)

    quiet_s = await wait_until(quiet, SLOW_LOAD_S + 2)  # a load the proxy gave up on, ending
    zero_s = await wait_until(back_to_zero, READ_TIMEOUT_S + 2)
    left = await leases_left(proxy)
    converged_s = await wait_until(views_match, POLL_S + 1)  # one poll, and the poll itself
    views = (await proxy_view(proxy), pool_view(hosts))
    return Settled(quiet_s, zero_s, left, converged_s, views, await answers_every_model(proxy.url))


def counted(samples: dict[tuple[tuple[str, str], ...], float], *labels: str) -> str:
    """The samples' values summed by the values of `labels`."""
    totals: Counter[str] = Counter()
    for sample, value in samples.items():
        totals[" ".join(dict(sample)[label] for label in labels)] += int(value)
    return listed(totals)


def seconds(took_s: float | None) -> str:
    return "not within 1 s" if took_s is None else f"{took_s:.2f} s"


def listed(counts: Counter[str], empty: str = "none") -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or empty


@pytest.mark.soak
async def test_soak_under_faults_loses_nothing(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Clients, models and faults for --soak-minutes: every request answered, nothing leaks."""
    minutes: float = request.config.getoption("--soak-minutes")
    seed = random.SystemRandom().randrange(2**32)
    tally = Tally()
    with counted_logs() as logs:
        async with tracing(), anyio.create_task_group() as servers:
            hosts = tuple(
                Upstream(
                    plan.name,
                    WatchedEmulator(
                        catalog=plan.catalog(),
                        memory_bytes=plan.memory_bytes,
                        load_delay_s=LOAD_DELAY_S,
                        token_delay_s=TOKEN_DELAY_S,
                        reply_tokens=REPLY_TOKENS,
                    ),
                    plan.only,
                    servers,
                )
                for plan in HOSTS
            )
            for host in hosts:
                await host.start()
            upstreams = [plan.upstream(h.url) for plan, h in zip(HOSTS, hosts, strict=True)]
            async with proxy_for(hosts[0].url, upstreams=upstreams, **SECTIONS) as proxy:
                warm = await answers_every_model(
                    proxy.url
                )  # every code path once, before measuring
                fds_before, memory_before, rss_before = open_fds(), traced(), rss_mib()
                rng = random.Random(seed)  # noqa: S311 - test traffic, not secrets
                started = anyio.current_time()
                end = started + minutes * 60

                def over() -> bool:
                    return anyio.current_time() >= end

                limits = httpx2.Limits(max_connections=None, max_keepalive_connections=CLIENTS)
                async with (
                    httpx2.AsyncClient(base_url=proxy.url, timeout=None, limits=limits) as http,
                    anyio.create_task_group() as tg,
                ):
                    injector = Injector(hosts, rng, tally, http)
                    for n in range(CLIENTS):
                        rng_n = random.Random(seed + n)  # noqa: S311 - test traffic, not secrets
                        tg.start_soon(client, http, rng_n, tally, over, f"c{n}", injector.forwarded)
                    tg.start_soon(injector.run, over)
                # The last client has left (the faults' own requests too).
                zero_s = await wait_until(partial(gauges_at_zero, proxy.http), 1.0)
                ran_s = anyio.current_time() - started
                settled = await settle(proxy, hosts)
                for host in hosts:
                    host.emulator.judge()
                await anyio.sleep(KEEPALIVE_EXPIRY_S)  # idle connections expire on both sides...
                settled.recovered += await answers_every_model(
                    proxy.url
                )  # ...and the pool drops them
                for host in hosts:
                    host.emulator.forwards.clear()  # forwards of requests whose clients had left
                fds_after, memory_after, rss_after = open_fds(), traced(), rss_mib()
                samples = await metric_samples(proxy.http)
            for host in hosts:
                await host.stop()

    requests = sum(tally.outcomes.values())
    grown = memory_after.compare_to(memory_before, "lineno")
    growth_mib = sum(stat.size_diff for stat in grown) / 2**20
    findings = [f"{host.name}: {finding}" for host in hosts for finding in host.emulator.findings]
    notes = sum((host.emulator.notes for host in hosts), Counter[str]())
    loads = samples.get("lmswitch_model_loads_total", {})
    summary = "\n".join(
        [
            f"soak: {ran_s:.0f} s of load and faults, {CLIENTS} clients, {len(hosts)} hosts, "
            f"seed {seed}",
            f"requests: {requests} ({requests / ran_s:.0f}/s)",
            *(f"  {n:7d}  {outcome}" for outcome, n in sorted(tally.outcomes.items())),
            f"by endpoint: {listed(tally.endpoints)}",
            f"answers by host (x-lmswitch-upstream): {listed(tally.by_host)}",
            f"faults: {listed(tally.faults)}",
            f"longest request: {tally.longest}; closest to its bound: {tally.closest}; "
            f"{tally.late} past their bound",
            f"JIT bursts of {BURST} requests, LM Studio's loads of the model each: "
            f"{', '.join(tally.bursts) or 'none'}",
            f"unloads during a load: {'; '.join(tally.unloads) or 'none'}",
            f"hosts away and back: {len(tally.aways) or 'none'}",
            *(f"  {away}" for away in tally.aways),
            f"in-flight gauges at 0 after the last client left: {seconds(zero_s)}; after clients "
            f"left before the first byte: {', '.join(map(seconds, tally.early_zero_s)) or '-'}",
            "calls LM Studio never answered (their callers hung up): "
            + ", ".join(f"{host.name} {host.emulator.unanswered}" for host in hosts),
            f"loads by the proxy: {counted(loads, 'upstream', 'result')}",
            *(
                f"  {host.name}: LM Studio saw {host.emulator.rest_loads} by the proxy, "
                f"{host.emulator.jit_loads} JIT; most loads at once: "
                f"{host.emulator.most_loads_at_once}"
                for host in hosts
            ),
            "unloads by the proxy: "
            + counted(samples.get("lmswitch_model_unloads_total", {}), "upstream", "reason"),
            f"not the proxy's doing: {listed(notes)}",
            f"proxy's faults seen by LM Studio: {len(findings)}",
            f"log records: {listed(logs.counts)}",
            *(f"  {finding}" for finding in findings[:20]),
            f"after the faults: LM Studio quiet in {settled.quiet_s} s, leases back to zero in "
            f"{settled.zero_s} s, views matched in {settled.converged_s} s",
            f"open fds {fds_before} -> {fds_after}; RSS {rss_before:.0f} -> {rss_after:.0f} MiB; "
            f"traced memory {growth_mib:+.2f} MiB, most grown:",
            *(f"  {stat}" for stat in grown[:5]),
            *(f"FAILED: {failure}" for failure in tally.failures),
            *(f"LEFT: {left}" for left in settled.left),
            *(f"NOT RECOVERED: {failed}" for failed in warm + settled.recovered),
        ]
    )
    (tmp_path / "soak-summary.txt").write_text(summary + "\n")
    print(f"\n{summary}")  # noqa: T201 - the soak's report, shown with -s

    assert not tally.failures, summary
    assert zero_s is not None, summary
    # Two loads at once on a host are findings, unless one was LM Studio's JIT load for a
    # request on its way to a model a fault had just unloaded (noted; `most_loads_at_once`
    # counts them too). Loads on different hosts may run at once.
    assert not findings, summary
    assert not logs.unhandled(), summary
    assert settled.quiet_s is not None, summary
    assert not settled.left, summary
    assert settled.converged_s is not None, f"{summary}\nviews: {settled.views}"
    assert not [*warm, *settled.recovered], summary
    assert tally.outcomes["200 complete"] > requests / 4, summary
    assert fds_after - fds_before <= 12, summary  # pooled connections, give or take
    assert growth_mib < 4 + minutes, summary
    # Coarse: the process also holds the emulators, the clients and tracemalloc's own records,
    # and the allocator keeps freed arenas; the traced growth above is the precise check.
    assert rss_after - rss_before < 32, summary


@pytest.mark.parametrize("then", [QWEN, LLAMA])
async def test_a_load_past_load_timeout_is_not_overlapped(then: str) -> None:
    """LM Studio finishes a load the proxy stopped waiting for: no other load runs meanwhile."""
    emulator = WatchedEmulator(load_delay_s=0.5)  # past load_timeout, well within twice that
    upstream = {"load_timeout": 0.3, "poll_interval": 0.1}
    async with running(emulator, upstream=upstream) as proxy:
        first = await proxy.http.post("/v1/chat/completions", json=chat(QWEN))
        assert first.status_code == 504
        emulator.load_delay_s = 0  # for the next load; Qwen's goes on
        second = await proxy.http.post("/v1/chat/completions", json=chat(then))
        assert second.status_code == 200  # after Qwen's load, which it waited for
        await emulator.wait_until(lambda: not emulator.loading, timeout=5)
    assert not emulator.findings  # no call while the given-up load ran, so no second copy
    assert emulator.most_loads_at_once == 1  # nor another model loading beside it: memory overrun
    assert emulator.rest_loads == (1 if then == QWEN else 2)  # Qwen's load was adopted


def chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES}


# --- the soak's judges, judged ------------------------------------------------------------------


def _error(code: str | None, **extra: Any) -> bytes:
    return json.dumps(
        {"error": {"message": "m", "type": "t", "param": None, "code": code}}
    ).encode()


ANTHROPIC_ERROR = json.dumps(
    {"type": "error", "error": {"type": "overloaded_error", "message": "m"}}
).encode()


@pytest.mark.parametrize(
    ("endpoint", "status", "raw", "headers", "verdict"),
    [
        (MESSAGE, 503, ANTHROPIC_ERROR, {}, "503 overloaded_error (Anthropic's)"),
        (CHAT, 500, _error("model_load_failed"), {}, "500 model_load_failed (LM Studio's)"),
        (CHAT, 503, _error("queue_timeout"), {"retry-after": "5"}, "503 queue_timeout"),
        (MESSAGE, 400, ANTHROPIC_ERROR, {}, "400 for the proxy's own error"),
        (CHAT, 503, b"Service Unavailable", {}, "not JSON"),
        (CHAT, 503, b'{"error": "busy"}', {}, "without an error envelope"),
        (CHAT, 503, b'{"error": {"message": "m", "type": "t"}}', {}, "without an error envelope"),
        (MESSAGE, 503, b'{"type": "error", "error": "m"}', {}, "without an error envelope"),
        (MESSAGE, 503, b'{"type": "error", "error": {"message": "m"}}', {}, "without an error"),
        (MESSAGE, 503, _error("upstream_unavailable"), {}, "in OpenAI's envelope on /v1/messages"),
        (CHAT, 418, _error(None), {}, "418 t in OpenAI's envelope"),
        (CHAT, 503, _error("upstream_unavailable"), {}, "without Retry-After"),
    ],
)
def test_the_soak_judges_errors(
    endpoint: Endpoint, status: int, raw: bytes, headers: dict[str, str], verdict: str
) -> None:
    """Only the proxy's own errors in the client's envelope, or LM Studio's passed through."""
    try:
        outcome = check_error(endpoint, status, httpx2.Headers(headers), raw)
    except Malformed as exc:
        outcome = str(exc)
    assert verdict in outcome


@pytest.mark.parametrize(
    ("endpoint", "doc", "verdict"),
    [
        (EMBEDDINGS, {"data": [{"embedding": [0.5]}, {"embedding": [0.5]}]}, "200 complete"),
        (CHAT, [], "not an object"),
        (CHAT, {"choices": []}, "an incomplete chat answer"),
        (MESSAGE, {"type": "message", "content": []}, "an incomplete messages answer"),
    ],
)
def test_the_soak_judges_answers(endpoint: Endpoint, doc: Any, verdict: str) -> None:
    try:
        outcome = check_answer(endpoint, doc)
    except Malformed as exc:
        outcome = str(exc)
    assert verdict in outcome


SSE = {"content-type": "text/event-stream"}


@pytest.mark.parametrize(
    ("endpoint", "headers", "body", "verdict"),
    [
        (STREAM, SSE, b': ping\n\ndata: {"error": {"message": "m", "type": "t", '
         b'"param": null, "code": "upstream_error"}}\n\n', "an error event (upstream_error)"),
        (MESSAGES_STREAM, SSE, b"event: error\ndata: " + ANTHROPIC_ERROR + b"\n\n",
         "an error event (overloaded_error)"),
        (STREAM, {"content-type": "application/json"}, b"{}", "a streamed answer as"),
        (STREAM, SSE, b"", "an empty stream"),
        (STREAM, SSE, b'data: {"choices": []}\n\n', "cut short without an error event"),
        (MESSAGES_STREAM, SSE, b"event: ping\ndata: {}\n\n", "cut short without an error"),
    ],
)  # fmt: skip
async def test_the_soak_judges_streams(
    endpoint: Endpoint, headers: dict[str, str], body: bytes, verdict: str
) -> None:
    response = httpx2.Response(200, headers=headers, content=body)
    try:
        outcome = await check_stream(endpoint, response, 0)
    except Malformed as exc:
        outcome = str(exc)
    assert verdict in outcome


async def test_the_soak_client_fails_bad_answers_and_hangs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client counts an answer without a request id, a broken connection and a hang."""
    monkeypatch.setattr(sys.modules[__name__], "DEADLINE_S", 0.2)
    answers = iter(["no id", "broken", "hang"])

    async def lm_switch(request: httpx2.Request) -> httpx2.Response:
        answer = next(answers, "hang")
        if answer == "broken":
            raise httpx2.ConnectError("refused", request=request)
        if answer == "hang":
            await anyio.sleep_forever()
        return httpx2.Response(200, json={})

    tally = Tally()
    rng = random.Random(0)  # noqa: S311 - test traffic
    transport = httpx2.MockTransport(lm_switch)
    async with httpx2.AsyncClient(transport=transport, base_url="http://lmswitch") as http:
        with anyio.fail_after(5):
            await client(http, rng, tally, lambda: tally.outcomes["FAILED"] >= 3)
    assert tally.outcomes == {"FAILED": 3}
    assert "no x-request-id" in tally.failures[0]
    assert "the connection failed" in tally.failures[1]
    assert "no answer within 0.2 s" in tally.failures[2]


async def test_the_watched_emulator_sees_what_a_proxy_must_not_do() -> None:
    """Two loads at once, a load of a listed model, an unload under a stream: findings."""
    emulator = WatchedEmulator(load_delay_s=0.2, token_delay_s=0.05)
    async with serve(emulator.app) as url, httpx2.AsyncClient(base_url=url, timeout=5) as http:

        async def load(model: str) -> httpx2.Response:
            return await http.post("/api/v1/models/load", json={"model": model})

        async with anyio.create_task_group() as tg:
            tg.start_soon(load, QWEN)
            tg.start_soon(load, LLAMA)
        await http.get("/api/v1/models")
        assert (await load(QWEN)).json()["instance_id"] == f"{QWEN}:2"
        emulator.load_instance(GEMMA)  # behind the caller's back, since its last listing
        assert (await load(GEMMA)).json()["instance_id"] == f"{GEMMA}:2"
        body = {**chat(LLAMA), "stream": True}
        for leaves in (False, True):  # a client that reads on to the end, one that leaves
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                lines = response.aiter_lines()
                await anext(lines)
                await http.post("/api/v1/models/unload", json={"instance_id": LLAMA})
                if not leaves:
                    async for _ in lines:
                        pass
        await emulator.wait_until(lambda: not emulator.streams.get(LLAMA), timeout=2)
    emulator.judge()
    assert [f.split(" ")[:4] for f in emulator.findings] == [
        ["a", "load", "call", "of"],
        ["the", "proxy", "loaded", QWEN],
        ["the", "proxy", "unloaded", LLAMA],
    ]
    assert "a client still reading (finished)" in emulator.findings[-1]
    assert emulator.notes == {
        "a second instance: a race with a load behind the proxy's back": 1,
        "an unload right after a client left mid-stream": 1,
    }


async def test_the_watched_emulator_sees_jit_loads_beside_others_and_counts_forwards() -> None:
    """A JIT load beside a REST load is a finding; inference calls are counted by request id,
    and the calls LM Studio never answers."""
    emulator = WatchedEmulator(load_delay_s=0.2)
    async with serve(emulator.app) as url, httpx2.AsyncClient(base_url=url, timeout=5) as http:
        headers = {"x-request-id": "r1"}
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(http.post, "/api/v1/models/load", json={"model": QWEN}))
            await emulator.wait_until(lambda: emulator.loading)
            tg.start_soon(
                partial(http.post, "/v1/chat/completions", json=chat(LLAMA), headers=headers)
            )
        emulator.hang_listings = True
        with anyio.move_on_after(0.2):
            await http.get("/api/v1/models")
        emulator.hang_listings = False
        await http.get("/api/v1/models")
    assert emulator.findings == [
        f"a JIT load of {LLAMA} (request r1) ran beside the proxy's load of {QWEN}"
    ]
    assert emulator.most_loads_at_once == 2
    assert emulator.forwarded("r1") == 1
    assert emulator.forwarded("r1") == 0  # forgotten once read
    assert emulator.unanswered == 1
