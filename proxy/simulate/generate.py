"""Synthetic traces, deterministic per seed: `alternating`, `zipf`, `sessions`, `agentic`.

Models have mixed sizes, and load times as LM Studio's are: a fixed overhead plus the size over
a read speed that falls as models grow (a 2 GB model in about 3 s, a 20 GB one in about a
minute or more), each model off by its own factor. Requests last a lognormal time that grows
with the model. docs/design.md §7.2 describes each kind.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import replace

from proxy.simulate.trace import ModelSpec, Request, Trace

GB = 10**9
DEFAULT_DURATION_S = 4 * 3600.0

# (time it is planned for, ignoring waits; the request)
_Planned = tuple[float, Request]


def model_spec(rng: random.Random, size_gb: float) -> ModelSpec:
    """A model of `size_gb`: overhead 1-2.5 s, plus the size at 1.6 GB/s x (size / 2 GB)^-0.7,
    each model's speed off by up to 25 % either way; unloads take a fraction of a second."""
    overhead_s = rng.uniform(1.0, 2.5)
    speed_gb_s = 1.6 * (size_gb / 2.0) ** -0.7 * rng.uniform(0.8, 1.25)
    unload_s = (0.2 + 0.03 * size_gb) * rng.uniform(0.7, 1.3)
    return ModelSpec(
        int(size_gb * GB), round(overhead_s + size_gb / speed_gb_s, 2), round(unload_s, 2)
    )


def service_s(rng: random.Random, size_gb: float, median_s: float | None = None) -> float:
    """How long a request holds its model: lognormal around a median that grows with size."""
    median = median_s if median_s is not None else 2.0 + 0.4 * size_gb
    return round(min(300.0, rng.lognormvariate(math.log(median), 0.7)), 3)


def _client(n: int) -> str:
    return f"10.0.{n // 200}.{n % 200 + 10}:{41000 + n}"


def _collect(
    streams: list[Iterator[_Planned]], duration_s: float, requests: int | None
) -> list[Request]:
    """The clients' requests in planned order, until `duration_s` or `requests` of them."""
    merged = heapq.merge(*streams, key=lambda planned: planned[0])
    kept: Iterator[_Planned]
    if requests is not None:
        kept = itertools.islice(merged, requests)
    else:
        kept = itertools.takewhile(lambda planned: planned[0] < duration_s, merged)
    # Times to the millisecond, as a trace file holds them.
    return [replace(request, t=round(request.t, 3)) for _, request in kept]


def alternating(rng: random.Random, duration_s: float, requests: int | None) -> Trace:
    """8 clients, each alternating two models back to back (as the fairness tests' workload)."""
    sizes = {"qwen2.5-7b-instruct": 4.7, "qwen2.5-14b-instruct": 9.0}
    models = {key: model_spec(rng, size) for key, size in sizes.items()}
    keys = list(sizes)

    def client(n: int) -> Iterator[_Planned]:
        crng = random.Random(rng.random())  # noqa: S311 - a workload
        t = crng.uniform(0.0, 2.0)
        for step in itertools.count():
            key = keys[(step + n) % 2]
            service = service_s(crng, sizes[key], 3.0)
            after = None if step == 0 else round(crng.uniform(0.05, 0.5), 3)
            yield t, Request(t, key, service, True, _client(n), after)
            t += service + (after or 0.0)

    streams = [client(n) for n in range(8)]
    return Trace(models, _collect(streams, duration_s, requests), source="generated: alternating")


def zipf(rng: random.Random, duration_s: float, requests: int | None) -> Trace:
    """Open-loop arrivals (Poisson, one every 30 s on average) from 40 clients over 8 models
    of 2-20 GB, popularity Zipf s=1.1 in an order drawn apart from size."""
    sizes = {
        "llama-3.2-3b": 2.0,
        "gemma-3-4b": 3.3,
        "qwen2.5-7b": 4.7,
        "mistral-nemo-12b": 7.5,
        "qwen2.5-14b": 9.0,
        "gpt-oss-20b": 12.1,
        "mistral-small-24b": 14.3,
        "qwen2.5-32b": 19.9,
    }
    models = {key: model_spec(rng, size) for key, size in sizes.items()}
    ranked = list(sizes)
    rng.shuffle(ranked)
    weights = [1.0 / (rank**1.1) for rank in range(1, len(ranked) + 1)]

    def arrivals() -> Iterator[_Planned]:
        t = 0.0
        while True:
            t += rng.expovariate(1 / 30.0)
            key = rng.choices(ranked, weights)[0]
            client = _client(rng.randrange(40))
            request = Request(t, key, service_s(rng, sizes[key]), rng.random() < 0.7, client)
            yield t, request

    return Trace(models, _collect([arrivals()], duration_s, requests), source="generated: zipf")


def sessions(rng: random.Random, duration_s: float, requests: int | None) -> Trace:
    """16 people, closed loop: each stays with one model for a session (12 requests on
    average, 30 s of reading and typing between them), then is away (20 min on average) and
    may come back to another model (each person has favourites)."""
    sizes = {
        "gemma-3-4b": 3.3,
        "qwen2.5-7b": 4.7,
        "qwen2.5-14b": 9.0,
        "gpt-oss-20b": 12.1,
        "mistral-small-24b": 14.3,
        "qwen2.5-32b": 19.9,
    }
    models = {key: model_spec(rng, size) for key, size in sizes.items()}
    keys = list(sizes)

    def person(n: int) -> Iterator[_Planned]:
        prng = random.Random(rng.random())  # noqa: S311 - a workload
        favourites = keys[:]
        prng.shuffle(favourites)
        weights = [1.0 / (rank**1.1) for rank in range(1, len(favourites) + 1)]
        t = prng.uniform(0.0, 1800.0)
        after: float | None = None
        while True:
            key = prng.choices(favourites, weights)[0]
            for _ in range(1 + int(prng.expovariate(1 / 11.0))):
                service = service_s(prng, sizes[key])
                yield t, Request(t, key, service, True, _client(n), after)
                after = round(prng.lognormvariate(math.log(30.0), 0.8), 3)
                t += service + after
            away = round(prng.expovariate(1 / 1200.0), 3)
            t += away
            after = round((after or 0.0) + away, 3)

    streams = [person(n) for n in range(16)]
    return Trace(models, _collect(streams, duration_s, requests), source="generated: sessions")


def agentic(rng: random.Random, duration_s: float, requests: int | None) -> Trace:
    """4 agent pipelines, closed loop: each task embeds its input, then runs 3-12 steps of a
    small model choosing a tool and a large model doing the work, with tool calls of up to a
    few seconds between them, and a pause between tasks (5 min on average)."""
    sizes = {
        "text-embedding-nomic": 0.08,
        "qwen3-4b": 2.6,
        "gemma-3-4b": 3.3,
        "gpt-oss-20b": 12.1,
        "qwen3-32b": 19.8,
    }
    models = {key: model_spec(rng, size) for key, size in sizes.items()}
    pipelines = [
        ("qwen3-4b", "qwen3-32b"),
        ("qwen3-4b", "qwen3-32b"),
        ("qwen3-4b", "gpt-oss-20b"),
        ("gemma-3-4b", "gpt-oss-20b"),
    ]

    def agent(n: int) -> Iterator[_Planned]:
        arng = random.Random(rng.random())  # noqa: S311 - a workload
        small, large = pipelines[n]
        t = arng.uniform(0.0, 600.0)
        after: float | None = None

        def call(key: str, median_s: float) -> Iterator[_Planned]:
            nonlocal t, after
            service = service_s(arng, sizes[key], median_s)
            yield t, Request(t, key, service, key != "text-embedding-nomic", _client(n), after)
            after = round(arng.uniform(0.2, 3.0), 3)  # the tool call, or the next prompt
            t += service + after

        while True:
            yield from call("text-embedding-nomic", 0.2)
            for _ in range(arng.randint(3, 12)):
                yield from call(small, 1.5)
                yield from call(large, 15.0)
            pause = round(arng.expovariate(1 / 300.0), 3)
            t += pause
            after = round((after or 0.0) + pause, 3)

    streams = [agent(n) for n in range(len(pipelines))]
    return Trace(models, _collect(streams, duration_s, requests), source="generated: agentic")


KINDS: dict[str, Callable[[random.Random, float, int | None], Trace]] = {
    "alternating": alternating,
    "zipf": zipf,
    "sessions": sessions,
    "agentic": agentic,
}


def generate(
    kind: str, seed: int, *, duration_s: float = DEFAULT_DURATION_S, requests: int | None = None
) -> Trace:
    """A trace of `kind` for `seed`: `duration_s` of traffic, or `requests` requests."""
    trace = KINDS[kind](random.Random(seed), duration_s, requests)  # noqa: S311 - a workload
    trace.source += f", seed {seed}"
    return trace
