"""The manager's background work, end to end: preload, idle unload, reconciliation."""

from __future__ import annotations

from proxy.emulator import Emulator
from tests.helpers import LLAMA, MESSAGES, QWEN, running


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
        assert f'lmswitch_model_unloads_total{{model="{QWEN}",reason="idle"}} 1.0' in metrics


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
