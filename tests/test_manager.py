"""The manager: its background work end to end (preload, idle unload, reconciliation), and the
driver alone over a scripted LM Studio (outcomes fed to the scheduler, then reported)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream
from starlette.types import Receive, Scope, Send

from proxy.config import Settings
from proxy.emulator import Emulator
from proxy.errors import ModelGoneError, ModelLoadError, UpstreamError
from proxy.events import Event, EventBus
from proxy.manager import ModelManager
from proxy.metrics import Metrics
from proxy.scheduling import Phase
from tests.helpers import LLAMA, MESSAGES, QWEN, ScriptedLMStudio, proxy_for, running, serve


async def test_preload_loads_at_start_in_order() -> None:
    """Models in `models.preload` are loaded at start, one at a time, without a request."""
    emulator = Emulator(load_delay_s=0.05)
    async with running(emulator, models={"preload": [LLAMA, QWEN], "max_loaded": 2}) as proxy:
        await emulator.wait_until(lambda: len(emulator.instances) == 2, timeout=3)
        loads = [c.body for c in emulator.calls if c.path == "/api/v1/models/load"]
        assert [load["model"] for load in loads] == [LLAMA, QWEN]  # type: ignore[index]
        await proxy.wait_for(lambda status: sorted(status["loaded"]) == sorted([LLAMA, QWEN]))


async def test_idle_ttl_unloads_an_idle_model() -> None:
    emulator = Emulator()
    async with running(emulator, models={"idle_ttl": 0.3}) as proxy:
        await proxy.sdk.chat.completions.create(model=QWEN, messages=MESSAGES)
        assert QWEN in emulator.instances
        await emulator.wait_until(lambda: not emulator.instances, timeout=3)
        assert emulator.unload_count(QWEN) == 1
        metrics = (await proxy.http.get("/metrics")).text
        idle = (
            f'lmswitch_model_unloads_total{{model="{QWEN}",reason="idle",upstream="default"}} 1.0'
        )
        assert idle in metrics


async def test_request_ttl_sets_the_models_idle_ttl() -> None:
    """A request's `ttl` (LM Studio's field, in seconds) sets that model's idle TTL."""
    emulator = Emulator()
    async with running(emulator) as proxy:
        await proxy.sdk.chat.completions.create(
            model=QWEN, messages=MESSAGES, extra_body={"ttl": 0.3}
        )
        await emulator.wait_until(lambda: not emulator.instances, timeout=3)
        assert emulator.unload_count(QWEN) == 1


async def test_models_loaded_or_unloaded_behind_the_proxys_back_are_noticed() -> None:
    emulator = Emulator()
    async with running(emulator, upstream={"poll_interval": 0.1}) as proxy:
        emulator.load_instance(LLAMA)  # someone loads a model in LM Studio's own UI
        await proxy.wait_for(lambda status: status["loaded"] == [LLAMA])
        rows = {row["id"]: row for row in (await proxy.http.get("/api/v1/models")).json()}
        assert rows[LLAMA]["adopted"] is True
        # the proxy counts it against max_loaded: asking for QWEN evicts it
        await proxy.sdk.chat.completions.create(model=QWEN, messages=MESSAGES)
        assert list(emulator.instances) == [QWEN]
        emulator.unload_instance(QWEN)  # and unloads one there
        await proxy.wait_for(lambda status: status["loaded"] == [])
        reply = await proxy.sdk.chat.completions.create(model=QWEN, messages=MESSAGES)
        assert reply.model == QWEN
        assert emulator.load_count(QWEN) == 2


async def test_model_unloaded_behind_the_proxys_back_is_reloaded_on_the_next_request() -> None:
    """With JIT off, LM Studio refuses a model it no longer has; the proxy reloads it, retries."""
    emulator = Emulator(jit=False)
    async with running(emulator, upstream={"poll_interval": 3600}) as proxy:
        await proxy.sdk.chat.completions.create(model=QWEN, messages=MESSAGES)
        emulator.unload_instance(QWEN)
        reply = await proxy.sdk.chat.completions.create(model=QWEN, messages=MESSAGES)
        assert reply.model == QWEN
        assert emulator.load_count(QWEN) == 2
        assert (await proxy.status())["in_flight"] == 0


async def test_a_model_lm_studio_still_refuses_after_a_reload_gets_its_own_answer() -> None:
    """Asked once more after the reload, LM Studio says again that the model is not loaded: the
    client gets LM Studio's answer as it is, and nothing stays held."""
    emulator = Emulator(jit=False)

    async def unloading_first(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/v1/chat/completions":
            for instance in list(emulator.instances):  # gone again, whatever the proxy does
                emulator.unload_instance(instance)
        await emulator.app(scope, receive, send)

    body = {"model": QWEN, "messages": MESSAGES}
    async with serve(unloading_first) as url, proxy_for(url) as proxy:
        response = await proxy.http.post("/v1/chat/completions", json=body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["message"].startswith("No models loaded")
        completions = [c for c in emulator.calls if c.path == "/v1/chat/completions"]
        assert len(completions) == 2  # the first try, and one more after the reload
        assert emulator.load_count(QWEN) == 2
        assert (await proxy.status())["in_flight"] == 0


async def test_duplicate_instances_are_reported_and_counted() -> None:
    emulator = Emulator()
    emulator.load_instance(QWEN)
    emulator.load_instance(QWEN)  # LM Studio's own JIT or UI made a second copy
    async with running(emulator, models={"max_loaded": 2}) as proxy:
        await proxy.wait_for(lambda status: status["duplicates"] == {QWEN: [f"{QWEN}:2"]})
        status = await proxy.status()
        assert status["capacity"]["instances"] == 2
        # both slots are taken by QWEN's two copies: LLAMA needs one unloaded first
        await proxy.sdk.chat.completions.create(model=LLAMA, messages=MESSAGES)
        assert sorted(emulator.instances) == sorted([f"{QWEN}:2", LLAMA])


# --- the driver alone: a scripted LM Studio, no sockets -------------------------------------


@asynccontextmanager
async def driving(
    lmstudio: ScriptedLMStudio, **models: Any
) -> AsyncIterator[tuple[ModelManager, Metrics, MemoryObjectReceiveStream[Event]]]:
    """A running manager over `lmstudio`, its metrics, and a subscription to its events."""
    metrics, bus = Metrics(), EventBus()
    manager = ModelManager({"default": lmstudio}, Settings(models=models), metrics, events=bus)
    with bus.subscribe() as events:
        async with anyio.create_task_group() as tg:
            await tg.start(manager.run)
            with anyio.fail_after(5):
                while manager.readiness() is not None:  # noqa: ASYNC110 - no event for it
                    await anyio.sleep(0.001)
            yield manager, metrics, events
            tg.cancel_scope.cancel()


def model_events(events: MemoryObjectReceiveStream[Event]) -> list[tuple[str, str, bool]]:
    """The `model` events published so far (publishing is synchronous: they are all here)."""
    seen: list[tuple[str, str, bool]] = []
    while True:
        try:
            kind, event = events.receive_nowait()
        except anyio.WouldBlock:
            return seen
        if kind == "model":
            seen.append((event["model"], event["state"], event["loaded"]))


async def test_the_manager_feeds_a_load_to_the_scheduler_then_says_so() -> None:
    """A request's load: the reconciler's outcome reaches the scheduler (the lease is granted,
    the view says loaded), then the metrics and a `loaded` event that says it is loaded."""
    lmstudio = ScriptedLMStudio({QWEN: 4_000_000_000, LLAMA: 1_000_000_000})
    async with driving(lmstudio) as (manager, metrics, events):
        with anyio.fail_after(5):
            lease = await manager.acquire(QWEN)
        view = manager.view(QWEN)
        assert (view.state, view.loaded, view.in_flight, view.instance_id) == (
            "ready",
            True,
            1,
            QWEN,
        )
        assert model_events(events) == [(QWEN, "loading", False), (QWEN, "loaded", True)]
        sample = metrics.registry.get_sample_value
        ok = {"model": QWEN, "result": "ok", "upstream": "default"}
        assert sample("lmswitch_model_loads_total", ok) == 1
        assert sample("lmswitch_model_loaded", {"model": QWEN, "upstream": "default"}) == 1
        lease.release()
        lease.release()  # idempotent
        assert manager.view(QWEN).in_flight == 0
        assert manager.status().resident == [QWEN]
    assert lmstudio.names() == ["catalog", "catalog", "load"]


async def test_a_failed_load_fails_its_waiters_and_leaves_the_model_absent() -> None:
    lmstudio = ScriptedLMStudio({QWEN: 4_000_000_000})
    lmstudio.fail["load"].append(ModelLoadError("LM Studio failed to load model: no"))
    async with driving(lmstudio) as (manager, metrics, events):
        with anyio.fail_after(5), pytest.raises(ModelLoadError, match="no"):
            await manager.acquire(QWEN)
        assert (manager.view(QWEN).state, manager.view(QWEN).loaded) == ("absent", False)
        assert model_events(events) == [(QWEN, "loading", False), (QWEN, "failed", False)]
        sample = metrics.registry.get_sample_value
        failed = {"model": QWEN, "result": "failed", "upstream": "default"}
        assert sample("lmswitch_model_loads_total", failed) == 1
        with anyio.fail_after(5):  # the next request may try again, and this time it loads
            (await manager.acquire(QWEN)).release()
        assert manager.view(QWEN).loaded


async def test_a_refresh_feeds_lm_studios_own_changes_to_the_scheduler() -> None:
    """Models loaded and unloaded behind the proxy's back reach the view through the manager."""
    lmstudio = ScriptedLMStudio({QWEN: 4_000_000_000, LLAMA: 1_000_000_000})
    async with driving(lmstudio) as (manager, metrics, events):
        lmstudio.instances[LLAMA] = [LLAMA, f"{LLAMA}:2"]
        await manager.refresh()
        view = manager.view(LLAMA)
        assert (view.state, view.adopted, view.duplicates) == ("ready", True, (f"{LLAMA}:2",))
        assert manager.status().duplicates == {LLAMA: [f"{LLAMA}:2"]}
        lmstudio.instances[LLAMA] = []
        await manager.refresh()
        assert manager.view(LLAMA).state == "absent"
        assert model_events(events) == [(LLAMA, "loaded", True), (LLAMA, "unloaded", False)]
        sample = metrics.registry.get_sample_value
        labels = {"model": LLAMA, "reason": "external", "upstream": "default"}
        assert sample("lmswitch_model_unloads_total", labels) == 1


async def test_a_wait_cancelled_as_it_is_granted_gives_the_lease_back() -> None:
    """A client that leaves cancels its request's wait from outside (issue 13, bug 3); if the
    grant lands in the same moment, nobody holds that lease: the manager must release it."""
    lmstudio = ScriptedLMStudio({QWEN: 4_000_000_000})
    async with driving(lmstudio) as (manager, _, _):
        waiting = anyio.CancelScope()
        host = manager.hosts["default"]
        kick = host._kick

        def leave_then_kick() -> None:
            model = host._scheduler.models.get(QWEN)
            if model is not None and model.phase is Phase.READY and host._scheduler.waiters:
                waiting.cancel()  # the client leaves just as the load it waits for is done
            kick()

        host._kick = leave_then_kick  # type: ignore[method-assign]
        with anyio.fail_after(5):
            with waiting:
                await manager.acquire(QWEN)
            assert waiting.cancelled_caught
            assert host._scheduler.models[QWEN].leases == 0
            assert manager.view(QWEN).in_flight == 0


async def test_a_request_is_not_sent_to_a_model_gone_while_it_held_its_lease() -> None:
    """A model found unloaded behind the proxy's back while a request holds a lease on it: the
    request is not sent (LM Studio would load it by JIT, beside the proxy's own loads) but
    answered `ModelGoneError`, which the route takes as "reload and ask again"."""
    lmstudio = ScriptedLMStudio({QWEN: 4_000_000_000}, loaded={QWEN: [QWEN]})
    async with driving(lmstudio) as (manager, _, _):
        with anyio.fail_after(5):
            lease = await manager.acquire(QWEN)
            lmstudio.instances.clear()  # unloaded in LM Studio's UI
            await manager.refresh()
            sent: list[str] = []

            async def call() -> Any:
                sent.append("sent")
                raise AssertionError("sent to a model that is gone")

            with pytest.raises(ModelGoneError, match="behind the proxy's back"):
                await manager.send(lease, call)
            lease.release()
        assert sent == []
        assert not manager.view(QWEN).loaded


async def test_a_host_going_down_and_up_is_an_upstream_event_and_a_gauge() -> None:
    """A failed listing marks the host down at once (event and `lmswitch_upstream_up` 0); the
    next listing that is read brings it up again. Only changes are published."""
    lmstudio = ScriptedLMStudio({QWEN: 4_000_000_000})
    async with driving(lmstudio) as (manager, metrics, events):
        sample = metrics.registry.get_sample_value
        assert sample("lmswitch_upstream_up", {"upstream": "default"}) == 1
        lmstudio.fail["catalog"].append(UpstreamError("LM Studio answered 500"))
        await manager.refresh()
        assert sample("lmswitch_upstream_up", {"upstream": "default"}) == 0
        await manager.refresh()  # read again: up
        await manager.refresh()  # no change: no event
        ups = []
        while True:
            try:
                kind, event = events.receive_nowait()
            except anyio.WouldBlock:
                break
            if kind == "upstream":
                ups.append((event["upstream"], event["up"]))
        assert ups == [("default", True), ("default", False), ("default", True)]  # start: up
        assert sample("lmswitch_upstream_up", {"upstream": "default"}) == 1


async def test_a_request_queued_on_a_host_that_goes_down_is_placed_again() -> None:
    """Both hosts full with a busy model, a request for a third model queues on the first; when
    that host's listing fails it is down: the request leaves its queue and waits on the other
    host instead, with its first budget, and is served there once that host's model is free."""
    sizes = {QWEN: 4_000_000_000, LLAMA: 1_000_000_000, "third": 2_000_000_000}
    a, b = ScriptedLMStudio(sizes), ScriptedLMStudio(sizes)
    settings = Settings(
        upstreams=[
            {"name": "a", "base_url": "http://a.invalid"},
            {"name": "b", "base_url": "http://b.invalid"},
        ],
        models={"max_loaded": 1},
        scheduler={"swap_grace": 0.2},
    )
    manager = ModelManager({"a": a, "b": b}, settings, Metrics())
    async with anyio.create_task_group() as tg:
        await tg.start(manager.run)
        with anyio.fail_after(5):
            while not all(host.up for host in manager.hosts.values()):  # noqa: ASYNC110
                await anyio.sleep(0.001)
            on_a = await manager.acquire(QWEN)
            on_b = await manager.acquire(LLAMA)
            assert (on_a.upstream, on_b.upstream) == ("a", "b")
            hosts: list[str] = []
            async with anyio.create_task_group() as waiting:
                leases = []

                async def third() -> None:
                    leases.append(await manager.acquire("third", placed=hosts.append))

                waiting.start_soon(third)
                while not manager.hosts["a"].status().queued:  # noqa: ASYNC110
                    await anyio.sleep(0.001)
                a.fail["catalog"].append(UpstreamError("LM Studio answered 500"))
                await manager.refresh("a")  # a is down: "third" leaves its queue there
                while not manager.hosts["b"].status().queued:  # noqa: ASYNC110
                    await anyio.sleep(0.001)
                assert manager.hosts["a"].status().queued == 0
                on_b.release()  # b's model is free: b swaps to "third"
            assert hosts == ["a", "b"]
            [lease] = leases
            assert lease.upstream == "b"
            assert [call.target for call in b.calls if call.name == "load"] == [LLAMA, "third"]
            assert not [call for call in a.calls if call.target == "third"]
            lease.release()
            on_a.release()
        tg.cancel_scope.cancel()
