"""The reconciler against a scripted LM Studio client: no sockets, no scheduler, no event bus.

Every outcome comes back as a value (`LoadSucceeded`, `LoadFailed`, `Observation`, an error) for
the manager to feed to the scheduler; what the reconciler keeps is LM Studio's catalogue, its
reachability and the loaded context lengths.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from proxy.config import Settings
from proxy.errors import (
    ModelLoadError,
    ProxyError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from proxy.reconciler import LoadFailed, LoadSucceeded, Observation, Reconciler
from tests.helpers import LLAMA, QWEN, ScriptedLMStudio

SIZES = {QWEN: 4_000_000_000, LLAMA: 1_000_000_000}


def reconciler_for(lmstudio: ScriptedLMStudio, **models: Any) -> Reconciler:
    ticks = itertools.count(100.0, 0.5)  # each reading of the clock is half a second later
    return Reconciler(lmstudio, Settings(models=models), clock=lambda: next(ticks))


async def test_load_checks_lm_studios_state_then_loads_with_the_models_options() -> None:
    lmstudio = ScriptedLMStudio(SIZES)
    upstream = reconciler_for(lmstudio, load_options={QWEN: {"flash_attention": True}})
    upstream.context_overrides[QWEN] = 8192  # an operator's load asked for it

    result = await upstream.load(QWEN, timeout_s=60)

    assert result == LoadSucceeded(QWEN, elapsed_s=0.5, existing=False)
    assert lmstudio.names() == ["catalog", "load"]
    load = lmstudio.calls[1]
    assert (load.target, load.options, load.timeout_s) == (
        QWEN,
        {"flash_attention": True, "context_length": 8192},
        60,
    )
    assert upstream.context_lengths[QWEN] == 8192
    assert upstream.reachable


@pytest.mark.parametrize(
    ("instances", "expected"),
    [([QWEN], QWEN), ([f"{QWEN}:2", QWEN], QWEN), ([f"{QWEN}:2"], f"{QWEN}:2")],
    ids=["its-own", "named-like-the-key-first", "another"],
)
async def test_a_model_lm_studio_holds_already_is_not_loaded_again(
    instances: list[str], expected: str
) -> None:
    """Loading a loaded model would make a second instance: the existing one is used."""
    lmstudio = ScriptedLMStudio(SIZES, loaded={QWEN: instances})
    upstream = reconciler_for(lmstudio)

    result = await upstream.load(QWEN, timeout_s=60)

    assert result == LoadSucceeded(expected, elapsed_s=0.5, existing=True)
    assert lmstudio.names() == ["catalog"]
    assert upstream.context_lengths[QWEN] == lmstudio.context_length


@pytest.mark.parametrize(
    ("error", "reachable"),
    [
        (ModelLoadError("LM Studio failed to load: insufficient system resources"), True),
        (UpstreamTimeoutError("took longer", code="model_load_timeout"), True),
        (UpstreamUnavailableError("not reachable", retry_after_s=5), False),
    ],
    ids=["refused", "timeout", "unreachable"],
)
async def test_a_failed_load_is_returned_not_raised(error: ProxyError, reachable: bool) -> None:
    lmstudio = ScriptedLMStudio(SIZES)
    lmstudio.fail["load"].append(error)
    upstream = reconciler_for(lmstudio)

    result = await upstream.load(QWEN, timeout_s=60)

    assert result == LoadFailed(error)
    assert upstream.reachable is reachable
    assert QWEN not in upstream.context_lengths


async def test_a_load_that_cannot_read_lm_studios_state_fails_before_loading() -> None:
    lmstudio = ScriptedLMStudio(SIZES)
    error = UpstreamUnavailableError("not reachable", retry_after_s=5)
    lmstudio.fail["catalog"].append(error)
    upstream = reconciler_for(lmstudio)

    assert await upstream.load(QWEN, timeout_s=60) == LoadFailed(error)
    assert lmstudio.names() == ["catalog"]  # no load on a state it could not read
    assert not upstream.reachable


async def test_unload_returns_the_error_or_none() -> None:
    lmstudio = ScriptedLMStudio(SIZES, loaded={QWEN: [QWEN]})
    upstream = reconciler_for(lmstudio)
    error = UpstreamError("boom (HTTP 500 from /api/v1/models/unload)", code="upstream_500")
    lmstudio.fail["unload"].append(error)

    assert await upstream.unload(QWEN) is error
    assert lmstudio.instances[QWEN] == [QWEN]
    assert upstream.reachable  # LM Studio answered, with an error

    assert await upstream.unload(QWEN) is None
    assert lmstudio.instances[QWEN] == []
    assert [(c.name, c.target) for c in lmstudio.calls] == [("unload", QWEN), ("unload", QWEN)]


async def test_observe_returns_sizes_and_instances_and_keeps_the_catalogue() -> None:
    lmstudio = ScriptedLMStudio(SIZES, loaded={LLAMA: [LLAMA, f"{LLAMA}:2"]})
    upstream = reconciler_for(lmstudio)
    assert upstream.catalog == {}

    observation = await upstream.observe()

    assert observation == Observation(
        sizes=SIZES, instances={LLAMA: (LLAMA, f"{LLAMA}:2")}, started=100.0
    )
    assert sorted(upstream.catalog) == sorted(SIZES)
    assert upstream.catalog[LLAMA].display_name == LLAMA.upper()
    assert upstream.context_lengths == {LLAMA: lmstudio.context_length}
    assert upstream.catalog_known
    assert upstream.reachable
    assert upstream.last_error is None
    assert upstream.last_refresh == 100.0
    upstream.require_catalog()  # known: nothing to raise


async def test_a_failed_observation_keeps_the_last_good_catalogue() -> None:
    lmstudio = ScriptedLMStudio(SIZES)
    upstream = reconciler_for(lmstudio)
    await upstream.observe()
    error = UpstreamUnavailableError("LM Studio is not reachable", retry_after_s=5)
    lmstudio.fail["catalog"].append(error)

    assert await upstream.observe() is error

    assert upstream.last_error is error
    assert not upstream.reachable
    assert sorted(upstream.catalog) == sorted(SIZES)
    assert upstream.catalog_known
    assert upstream.last_refresh == 100.5  # the failed read counts as a read


async def test_require_catalog_says_why_the_models_are_unknown() -> None:
    lmstudio = ScriptedLMStudio(SIZES)
    upstream = reconciler_for(lmstudio)
    with pytest.raises(UpstreamUnavailableError, match="not reachable at http://lmstudio"):
        upstream.require_catalog()  # nothing read yet

    too_old = UpstreamError("needs LM Studio 0.4", code="upstream_unsupported")
    lmstudio.fail["catalog"].append(too_old)
    assert await upstream.observe() is too_old
    with pytest.raises(UpstreamError) as raised:
        upstream.require_catalog()
    assert raised.value is too_old
