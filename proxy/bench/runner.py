"""`lmswitch bench`: the proxy against the emulator, direct vs proxied (docs/design.md §6).

The emulator and the proxy run as their own processes, started the way `lmswitch emulator` and
`lmswitch serve` start (`proxy.bench.stack`); the load comes from `wrk` when it is installed, else
from a lean built-in generator (raw HTTP/1.1 over keep-alive connections) in this process
(`proxy.bench.loadgen`). `--streams N` runs `proxy.bench.streams` instead.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from proxy.bench.loadgen import (
    ENDPOINTS,
    OPENAI,
    Endpoint,
    Load,
    Result,
    builtin_run,
    wrk_run,
)
from proxy.bench.stack import Stack, cpu_s, progress, start_stack
from proxy.bench.streams import run_streams

T = TypeVar("T")


# --- scenarios ----------------------------------------------------------------------------------


async def _measure(url: str, load: Load, *, use_wrk: bool) -> Result:
    if use_wrk:
        return await asyncio.to_thread(wrk_run, url, load)
    return await builtin_run(url, load)


async def run_matrix(
    stack: Stack,
    *,
    seconds: float,
    concurrencies: Sequence[int],
    use_wrk: bool,
    endpoint: Endpoint = OPENAI,
) -> list[Result]:
    """Each kind of chat at each concurrency, direct (OpenAI chat on the emulator) then
    proxied (the same chat through `endpoint`)."""
    results: list[Result] = []
    # One request first, so that the model is loaded before anything is timed.
    await builtin_run(
        stack.proxy_url, Load(stream=False, concurrency=1, seconds=0.2, key=stack.key)
    )
    for stream in (False, True):
        for concurrency in concurrencies:
            targets = (
                ("direct", stack.emulator_url, OPENAI),
                ("proxied", stack.proxy_url, endpoint),
            )
            for target, url, through in targets:
                kind = "streaming" if stream else "non-streaming"
                progress(f"bench: {kind} chat, concurrency {concurrency}, {target} ...")
                cpu_before = cpu_s(stack.proxy_pid)
                # The emulator, with no token of its own, ignores the key.
                load = Load(stream, concurrency, seconds, stack.key, through)
                result = await _measure(url, load, use_wrk=use_wrk)
                result.target = target
                if target == "proxied" and result.requests:
                    cpu = cpu_s(stack.proxy_pid) - cpu_before
                    result.proxy_cpu_us = round(cpu / result.requests * 1e6, 1)
                results.append(result)
    progress("")
    return results


def format_table(results: Sequence[Result]) -> str:
    lines = [
        f"{'request':<14}{'conc':>5}  {'direct rps':>11}{'proxied rps':>12}{'ratio':>7}"
        f"  {'p50 direct':>11}{'p50 proxied':>12}{'added':>9}  {'p99 direct':>11}"
        f"{'p99 proxied':>12}{'errors':>7}{'proxy CPU/req':>15}"
    ]
    pairs: dict[tuple[bool, int], dict[str, Result]] = {}
    for result in results:
        pairs.setdefault((result.stream, result.concurrency), {})[result.target] = result
    for (stream, concurrency), pair in pairs.items():
        d, p = pair["direct"], pair["proxied"]
        lines.append(
            f"{'streaming' if stream else 'non-streaming':<14}{concurrency:>5}  {d.rps:>11.1f}"
            f"{p.rps:>12.1f}{p.rps / d.rps if d.rps else 0:>7.2f}  {d.p50_ms:>9.2f}ms"
            f"{p.p50_ms:>10.2f}ms{p.p50_ms - d.p50_ms:>7.2f}ms  {d.p99_ms:>9.2f}ms"
            f"{p.p99_ms:>10.2f}ms{d.errors + p.errors:>7}{p.proxy_cpu_us:>13.0f}us"
        )
    return "\n".join(lines)


# --- the command --------------------------------------------------------------------------------


@dataclass
class BenchOptions:
    seconds: float = 5.0
    concurrencies: tuple[int, ...] = (1, 32)
    json: bool = False
    generator: str = "auto"  # "auto", "wrk" or "built-in"
    streams: int = 0  # > 0: the many-streams mode instead
    tokens_per_s: float = 20.0
    stream_seconds: float = 5.0  # how long each of the many streams lasts
    keys: int = 0  # > 0: the proxy has this many named keys, and the load sends one
    endpoint: str = "openai"  # the proxied load's API: "openai" or "ollama" (`ENDPOINTS`)


def _run(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` on uvloop where it is installed (the load generator must not be the
    bottleneck), without changing the process's event loop policy."""
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # pragma: no cover - Windows, or not installed
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def run(options: BenchOptions) -> int:
    """Run the bench and print its results; returns the exit status."""
    if options.streams:
        # Long enough streams that they are all open at once.
        tokens = max(1, round(options.tokens_per_s * options.stream_seconds))
        result = _run(run_streams(options.streams, options.tokens_per_s, tokens))
        if options.json:
            print(json.dumps(asdict(result), indent=2))  # noqa: T201
        else:
            for key, value in asdict(result).items():
                print(f"{key:>22}: {value}")  # noqa: T201
        return 0
    use_wrk = options.generator == "wrk" or (
        options.generator == "auto" and shutil.which("wrk") is not None
    )
    if use_wrk and shutil.which("wrk") is None:
        print("lmswitch bench: wrk is not installed", file=sys.stderr)  # noqa: T201
        return 2
    with start_stack(keys=options.keys) as stack:
        results = _run(
            run_matrix(
                stack,
                seconds=options.seconds,
                concurrencies=options.concurrencies,
                use_wrk=use_wrk,
                endpoint=ENDPOINTS[options.endpoint],
            )
        )
    generator = "wrk" if use_wrk else "built-in (asyncio, raw HTTP/1.1)"
    if options.json:
        print(json.dumps({"generator": generator, "results": [asdict(r) for r in results]}))  # noqa: T201
    else:
        print(f"load generator: {generator}; {options.seconds:g} s per measurement")  # noqa: T201
        if options.endpoint != "openai":
            path = ENDPOINTS[options.endpoint].path
            print(f"proxied: {path}; direct: /v1/chat/completions on the emulator")  # noqa: T201
        print(format_table(results))  # noqa: T201
    return 0
