"""Capacity learned from LM Studio, and room made on its memory refusals (docs/design.md §2.8).

The pure learning rule (`proxy.capacity`), the scheduler's make-room rule, and the emulator's
guardrail behind the proxy: one host, a busy model, a pool of two.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
import httpx2

from proxy import scheduling as sch
from proxy.capacity import Capacity, Held
from proxy.config import Settings
from proxy.emulator import Emulator
from proxy.emulator.catalog import CatalogModel
from proxy.errors import InsufficientMemoryError, ModelLoadError
from proxy.lmstudio import refused_for_memory
from proxy.scheduler import Scheduler
from proxy.scheduling import Phase, Policy
from tests.helpers import MESSAGES, Proxy, pool, running

GB = 10**9
logger = logging.getLogger(__name__)
CHAT = "/v1/chat/completions"


def _model(key: str, size: int) -> CatalogModel:
    return CatalogModel(key, "llm", "test", key.upper(), "llama", "Q4_K_M", 4, size, "7B", 32768)


SMALL, MID, BIG = "small-4.7", "mid-4.9", "big-8.1"
CATALOG = (_model(SMALL, 4_700_000_000), _model(MID, 4_900_000_000), _model(BIG, 8_100_000_000))
AUTO = {"models": {"max_loaded": 0, "memory_budget": "auto"}}


def held(*models: tuple[str, int], context: int | None = 4096) -> list[Held]:
    return [Held(key, context, 1, size) for key, size in models]


# -- the pure learning rule ---------------------------------------------------------------------


def test_nothing_refused_means_no_limit_known() -> None:
    capacity = Capacity()
    assert capacity.learned_bytes is None
    assert capacity.fitted(held(("a", 5 * GB), ("b", 4 * GB)), 1.0)
    assert capacity.learned_bytes is None  # it held 9 GB, and may hold more
    assert capacity.fit is not None
    assert capacity.fit.total == 9 * GB
    assert "refused nothing" in capacity.how()


def test_a_refusal_makes_the_largest_set_that_fit_the_capacity() -> None:
    capacity = Capacity()
    capacity.fitted(held(("a", 5 * GB), ("b", 4 * GB)), 1.0)
    assert capacity.refused_load(held(("a", 5 * GB), ("b", 4 * GB), ("c", 8 * GB)), 2.0)
    assert capacity.learned_bytes == 9 * GB
    assert not capacity.fitted(held(("c", 8 * GB)), 3.0)  # smaller: nothing new
    assert not capacity.refused_load(held(("b", 4 * GB), ("c", 8 * GB), ("a", 5 * GB)), 4.0)
    assert capacity.learned_bytes == 9 * GB
    assert capacity.refused is not None
    assert capacity.refused.total == 17 * GB
    row = capacity.row()
    assert row["learned_bytes"] == 9 * GB
    assert row["fit"]["bytes"] == 9 * GB
    assert [m["model"] for m in row["refused"]["models"]] == ["a", "b", "c"]
    assert "9.00 GB" in row["how"]
    assert "17.00 GB" in row["how"]


def test_a_refusal_with_no_fit_known_keeps_the_capacity_below_it() -> None:
    capacity = Capacity()
    capacity.refused_load(held(("c", 8 * GB)), 1.0)
    assert capacity.learned_bytes == 8 * GB - 1
    assert "nothing smaller" in capacity.how()


def test_a_larger_set_that_fits_raises_the_capacity_and_forgets_a_smaller_refusal() -> None:
    capacity = Capacity()
    capacity.fitted(held(("a", 5 * GB)), 1.0)
    capacity.refused_load(held(("a", 5 * GB), ("c", 8 * GB)), 2.0)
    assert capacity.learned_bytes == 5 * GB
    capacity.fitted(held(("a", 5 * GB), ("b", 4 * GB)), 3.0)  # a larger set loaded
    assert capacity.learned_bytes == 9 * GB
    capacity.fitted(held(("a", 5 * GB), ("c", 8 * GB)), 4.0)  # memory was freed
    assert capacity.refused is None
    assert capacity.row()["learned_bytes"] is None  # no limit known any more
    assert capacity.fit is not None
    assert capacity.fit.total == 13 * GB


def test_a_refusal_below_what_fitted_forgets_the_fit() -> None:
    capacity = Capacity()
    capacity.fitted(held(("a", 5 * GB), ("b", 4 * GB)), 1.0)
    capacity.refused_load(held(("a", 5 * GB), ("c", 8 * GB)), 2.0)
    capacity.refused_load(held(("a", 5 * GB), ("b", 4 * GB)), 3.0)  # memory was taken
    assert capacity.fit is None
    assert capacity.learned_bytes == 9 * GB - 1
    capacity.fitted(held(("a", 5 * GB)), 4.0)  # what fits is learned again
    assert capacity.learned_bytes == 5 * GB


def test_a_fact_learned_at_another_context_length_is_forgotten() -> None:
    capacity = Capacity()
    capacity.fitted(held(("a", 5 * GB), ("b", 4 * GB)), 1.0)
    capacity.refused_load(held(("a", 5 * GB), ("b", 4 * GB), ("c", 8 * GB)), 2.0)
    assert not capacity.context_seen("a", 4096)  # the same context: still true
    assert not capacity.context_seen("a", None)  # unknown: nothing to go on
    assert capacity.learned_bytes == 9 * GB
    assert capacity.context_seen("a", 32768)  # a's cache is larger now: both facts count it
    assert capacity.fit is None
    assert capacity.refused is None
    assert capacity.learned_bytes is None


def test_an_unknown_context_length_matches_any() -> None:
    capacity = Capacity()
    capacity.fitted(held(("a", 5 * GB), context=None), 1.0)
    assert not capacity.context_seen("a", 8192)
    assert capacity.fit is not None


def test_empty_sets_teach_nothing() -> None:
    capacity = Capacity()
    assert not capacity.fitted([], 1.0)
    assert not capacity.refused_load([Held("x", None, 1, 0)], 1.0)
    assert capacity.row() == {
        "learned_bytes": None,
        "fit": None,
        "refused": None,
        "how": "nothing learned yet",
    }


def test_the_guardrails_wording_is_recognised_in_one_place() -> None:
    message = (
        "Model loading was stopped due to insufficient system resources. Under the current "
        "settings, this model requires approximately 22.92 GB of memory"
    )
    assert refused_for_memory(message)
    assert refused_for_memory(message.upper())
    assert not refused_for_memory("Failed to load model: the engine process exited")
    assert issubclass(InsufficientMemoryError, ModelLoadError)


# -- the scheduler: make room on a refusal ------------------------------------------------------


def scheduler(**policy: Any) -> Scheduler:
    s = Scheduler(Policy(**{"max_loaded": 0, "swap_grace_s": 10.0, **policy}))
    s.set_catalog({SMALL: 4_700_000_000, MID: 4_900_000_000, BIG: 8_100_000_000})
    return s


def loaded(s: Scheduler, key: str, now: float) -> None:
    waiter = s.arrive(key, now)
    assert sch.Load(key) in s.decide(now)
    s.load_done(key, key, now)
    assert sch.Grant(waiter) in s.decide(now)
    s.release(key, now)


def test_a_refusal_evicts_by_policy_and_tries_again_until_it_loads() -> None:
    s = scheduler()
    loaded(s, SMALL, 0.0)
    loaded(s, MID, 1.0)
    waiter = s.arrive(BIG, 10.0)
    assert s.decide(10.0) == [sch.Load(BIG)]  # no limit known: try it
    error = InsufficientMemoryError("no room")
    s.load_refused(BIG, error, 10.5)
    assert s.waiters == {waiter.id: waiter}  # not answered: room is made first
    # The least recently used goes first; once one of the set it was refused beside is gone,
    # it is tried again.
    assert s.decide(10.5) == [sch.Unload(SMALL, SMALL, sch.UnloadReason.EVICTED)]
    s.unload_done(SMALL)
    assert s.decide(11.0) == [sch.Load(BIG)]
    s.load_refused(BIG, error, 11.5)  # still too much beside MID
    assert s.decide(11.5) == [sch.Unload(MID, MID, sch.UnloadReason.EVICTED)]
    s.unload_done(MID)
    assert s.decide(12.0) == [sch.Load(BIG)]
    s.load_done(BIG, BIG, 12.5)
    assert s.decide(12.5) == [sch.Grant(waiter)]
    assert s.refusals == {}


def test_a_learned_capacity_evicts_ahead_of_time() -> None:
    s = scheduler(learn_capacity=True)
    loaded(s, SMALL, 0.0)
    loaded(s, MID, 1.0)
    assert s.capacity.learned_bytes is None
    s.arrive(BIG, 10.0)
    assert s.decide(10.0) == [sch.Load(BIG)]
    s.load_refused(BIG, InsufficientMemoryError("no room"), 10.5)
    assert s.budget == 9_600_000_000  # the two that fitted together
    # Both must go for BIG to fit within it: no second refusal.
    assert s.decide(10.5) == [sch.Unload(SMALL, SMALL, sch.UnloadReason.EVICTED)]
    s.unload_done(SMALL)
    assert s.decide(11.0) == [sch.Unload(MID, MID, sch.UnloadReason.EVICTED)]
    s.unload_done(MID)
    assert s.decide(11.5) == [sch.Load(BIG)]


def test_a_refusal_beside_only_pinned_models_is_answered() -> None:
    s = scheduler()
    loaded(s, SMALL, 0.0)
    s.pin(SMALL, True)
    waiter = s.arrive(BIG, 1.0)
    assert s.decide(1.0) == [sch.Load(BIG)]
    error = InsufficientMemoryError("no room")
    s.load_refused(BIG, error, 1.5)
    actions = s.decide(1.5)
    assert actions == [sch.Fail(waiter, sch.FailReason.LOAD_FAILED, "no room", error)]
    assert s.refusals == {}  # answered: the next request tries again
    s.arrive(BIG, 2.0)
    assert s.decide(2.0) == [sch.Load(BIG)]


def test_a_refusal_alone_is_answered_at_once() -> None:
    s = scheduler(learn_capacity=True)
    waiter = s.arrive(BIG, 0.0)
    assert s.decide(0.0) == [sch.Load(BIG)]
    error = InsufficientMemoryError("no room")
    s.load_refused(BIG, error, 0.5)
    assert [type(a) for a in s.decide(0.5)] == [sch.Fail]
    assert waiter.id not in s.waiters
    # The learned capacity never keeps a model from being tried beside nothing that may go.
    assert s.budget == 8_100_000_000 - 1
    loaded(s, SMALL, 1.0)
    s.arrive(BIG, 2.0)
    actions = s.decide(2.0 + sch.IDLE_GAP_S)
    assert actions == [sch.Unload(SMALL, SMALL, sch.UnloadReason.EVICTED)]
    s.unload_done(SMALL)
    assert s.decide(3.0) == [sch.Load(BIG)]


def test_a_busy_model_is_drained_not_unloaded_for_a_refusal() -> None:
    s = scheduler(swap_grace_s=2.0)
    loaded(s, SMALL, 0.0)
    busy = s.arrive(SMALL, 1.0)
    assert s.decide(1.0) == [sch.Grant(busy)]  # a long request on SMALL
    waiter = s.arrive(BIG, 1.0)
    assert s.decide(1.0) == [sch.Load(BIG)]
    s.load_refused(BIG, InsufficientMemoryError("no room"), 1.5)
    assert s.decide(1.5) == []  # SMALL is busy: BIG waits, within the fairness rule
    assert s.decide(3.0) == [sch.Drain(SMALL)]  # BIG waited swap_grace
    assert s.decide(5.0) == []  # never unloaded under its lease
    s.release(SMALL, 6.0)
    assert s.decide(6.0) == [sch.Unload(SMALL, SMALL, sch.UnloadReason.EVICTED)]
    s.unload_done(SMALL)
    assert s.decide(6.5) == [sch.Load(BIG)]
    s.load_done(BIG, BIG, 7.0)
    assert s.decide(7.0) == [sch.Grant(waiter)]


def test_a_listing_of_a_larger_set_raises_the_learned_capacity() -> None:
    s = scheduler(learn_capacity=True)
    loaded(s, SMALL, 0.0)
    s.arrive(BIG, 1.0)
    s.decide(1.0)
    s.load_refused(BIG, InsufficientMemoryError("no room"), 1.5)
    assert s.budget == 4_700_000_000
    # LM Studio loaded MID beside SMALL behind the proxy's back: that fits too.
    s.observed({SMALL: [SMALL], MID: [MID]}, 2.0)
    assert s.budget == 9_600_000_000
    assert s.models[MID].phase is Phase.READY


def test_a_model_loaded_at_another_context_forgets_what_was_learned() -> None:
    s = scheduler(learn_capacity=True)
    s.set_contexts({SMALL: 4096})
    loaded(s, SMALL, 0.0)
    s.arrive(BIG, 1.0)
    s.decide(1.0)
    s.load_refused(BIG, InsufficientMemoryError("no room"), 1.5)
    assert s.budget == 4_700_000_000
    s.set_contexts({SMALL: 32768})
    assert s.budget is None


# -- behind the proxy, against the emulator's guardrail --------------------------------------


async def chat(proxy: Proxy, model: str, **fields: Any) -> httpx2.Response:
    body = {"model": model, "messages": MESSAGES, **fields}
    return await proxy.http.post(CHAT, json=body)


async def sequence(proxy: Proxy) -> tuple[list[int], float]:
    """The two small models, then the big one; the statuses and the longest wait."""
    statuses, longest = [], 0.0
    for model in (SMALL, MID, BIG):
        started = time.monotonic()
        with anyio.fail_after(15):
            response = await chat(proxy, model)
        longest = max(longest, time.monotonic() - started)
        statuses.append(response.status_code)
        if model == MID:
            status = (await proxy.http.get("/api/v1/status")).json()
            assert status["loaded"] == [SMALL, MID], "the first two stay loaded together"
    return statuses, longest


async def test_the_third_model_is_served_after_making_room_and_a_repeat_is_never_refused() -> None:
    emulator = Emulator(CATALOG, memory_bytes=10 * GB, load_delay_s=0.05)
    async with running(emulator, **AUTO) as proxy:
        first, _wait_1 = await sequence(proxy)
        assert first == [200, 200, 200], "served, never a 503"
        refused_first = emulator.refusals
        assert refused_first >= 1  # LM Studio said no once, then the proxy made room
        status = (await proxy.http.get("/api/v1/status")).json()
        capacity = status["capacity"]
        assert capacity["memory_budget"] == "auto"
        assert capacity["learned_bytes"] == 9_600_000_000
        assert capacity["learned"]["fit"]["bytes"] == 9_600_000_000
        assert capacity["learned"]["refused"]["bytes"] == 17_700_000_000
        assert "9.60 GB" in capacity["learned"]["how"]
        row = status["upstreams"][0]
        assert row["memory_budget"] == "auto"
        assert row["learned_bytes"] == 9_600_000_000
        loads_first = emulator.load_count()

        second, _wait_2 = await sequence(proxy)
        assert second == [200, 200, 200]
        assert emulator.refusals == refused_first, "the repeat met no refusal at all"
        emulator.load_count() - loads_first


async def test_without_auto_a_refusal_still_makes_room() -> None:
    emulator = Emulator(CATALOG, memory_bytes=10 * GB)
    async with running(emulator, models={"max_loaded": 0}) as proxy:
        statuses, _ = await sequence(proxy)
        assert statuses == [200, 200, 200]
        assert emulator.refusals == 2  # beside both, then beside MID
        status = (await proxy.http.get("/api/v1/status")).json()
        assert status["capacity"]["memory_budget"] is None
        assert status["capacity"]["learned"]["auto"] is False


async def test_a_model_too_big_for_the_host_is_answered_with_the_refusal() -> None:
    emulator = Emulator(CATALOG, memory_bytes=8 * GB)
    async with running(emulator, **AUTO) as proxy:
        assert (await chat(proxy, SMALL)).status_code == 200
        response = await chat(proxy, BIG)
        assert response.status_code == 503
        assert response.headers["x-should-retry"] == "false"
        error = response.json()["error"]
        assert error["code"] == "model_load_failed"
        assert "insufficient system resources" in error["message"]
        assert emulator.refusals == 2  # beside SMALL, then alone: nothing more may go
        assert (await chat(proxy, SMALL)).status_code == 200


async def test_a_refusal_while_the_other_model_is_busy_waits_for_it() -> None:
    emulator = Emulator(CATALOG, memory_bytes=10 * GB, token_delay_s=0.05, reply_tokens=20)
    sections = {**AUTO, "scheduler": {"swap_grace": 0.2}}
    async with running(emulator, **sections) as proxy:
        assert (await chat(proxy, SMALL)).status_code == 200
        stream_done = anyio.Event()
        ended_at: list[float] = []

        async def long_stream() -> None:
            body = {"model": SMALL, "messages": MESSAGES, "stream": True}
            async with proxy.http.stream("POST", CHAT, json=body) as response:
                assert response.status_code == 200
                stream_done.set()  # begun
                async for _ in response.aiter_bytes():
                    pass
            ended_at.append(time.monotonic())

        async with anyio.create_task_group() as tg:
            tg.start_soon(long_stream)
            with anyio.fail_after(5):
                await stream_done.wait()
            with anyio.fail_after(15):
                response = await chat(proxy, BIG)
            served_at = time.monotonic()
        assert response.status_code == 200
        assert ended_at, "the busy model's stream ended"
        assert ended_at[0] <= served_at, "served after the busy model's stream"
        assert emulator.refusals == 1
        assert emulator.unload_count(SMALL) == 1  # unloaded once its stream ended


async def test_each_host_of_a_pool_learns_its_own_capacity() -> None:
    big = Emulator(CATALOG, memory_bytes=10 * GB)
    small = Emulator(CATALOG, memory_bytes=6 * GB)
    upstreams_settings = {"models": {"max_loaded": 0, "memory_budget": "auto"}}
    async with pool({"big": big, "small": small}, **upstreams_settings) as proxy:
        # Each host is asked for its models directly (an operator's load names the host).
        for host, model in (("big", SMALL), ("big", MID), ("small", SMALL)):
            body = {"model_id": model, "upstream": host}
            with anyio.fail_after(10):
                answer = await proxy.http.post("/api/v1/models/load", json=body)
            assert answer.status_code == 200, answer.text
        for host, model in (("big", BIG), ("small", MID)):
            body = {"model_id": model, "upstream": host}
            with anyio.fail_after(10):
                answer = await proxy.http.post("/api/v1/models/load", json=body)
            assert answer.status_code == 200, answer.text
        status = (await proxy.http.get("/api/v1/status")).json()
        rows = {row["name"]: row for row in status["upstreams"]}
        assert rows["big"]["learned_bytes"] == 9_600_000_000
        assert rows["small"]["learned_bytes"] == 4_900_000_000  # MID, once SMALL made room
        assert status["capacity"]["learned_bytes"] == 14_500_000_000
        assert big.refusals == 1
        assert small.refusals == 1


def test_auto_is_accepted_for_the_pool_and_each_host() -> None:
    settings = Settings(
        models={"memory_budget": "auto"},
        upstreams=[
            {"name": "a", "base_url": "http://127.0.0.1:1"},
            {"name": "b", "base_url": "http://127.0.0.1:2", "memory_budget": "8GiB"},
            {"name": "c", "base_url": "http://127.0.0.1:3", "memory_budget": "AUTO"},
        ],
    )
    hosts = {host.name: host for host in settings.hosts()}
    assert (hosts["a"].memory_budget, hosts["a"].learn_capacity) == (None, True)
    assert (hosts["b"].memory_budget, hosts["b"].learn_capacity) == (8 * 2**30, False)
    assert hosts["c"].learn_capacity
    assert not Settings().hosts()[0].learn_capacity  # the default stays as it was
