"""`lmswitch bench --streams N`: many concurrent slow streams, direct and through the proxy."""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from dataclasses import dataclass

from proxy.bench.loadgen import (
    Load,
    builtin_run,
    chat_body,
    http_request,
    percentile,
    read_response,
)
from proxy.bench.stack import cpu_s, progress, rss_mb, start_stack


@dataclass
class StreamsResult:
    """Many concurrent slow streams through the proxy."""

    streams: int
    tokens_per_s: float
    completed: int
    errors: int
    proxy_rss_mb: float
    proxy_cpu_percent: float
    added_delay_p50_ms: float
    added_delay_p99_ms: float
    direct_delay_p50_ms: float
    proxied_delay_p50_ms: float
    proxied_delay_p99_ms: float


async def _one_stream(url: str, tokens: int, delays: list[float], errors: list[int]) -> bool:
    body = chat_body(stream=True, max_tokens=tokens)
    host, port, request = http_request(url, "/v1/chat/completions", body)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(request)

    def on_chunk(data: bytes) -> None:
        now = time.time()
        delays.extend(now - float(m.group(1)) for m in re.finditer(rb": sent=([\d.]+)", data))

    try:
        status = await read_response(reader, on_chunk)
    except (OSError, asyncio.IncompleteReadError):
        errors.append(0)
        return False
    finally:
        writer.close()
    if status != 200:
        errors.append(status)
    return status == 200


async def _streams_at(url: str, streams: int, tokens: int) -> tuple[list[float], int, list[int]]:
    delays: list[float] = []
    errors: list[int] = []
    done = await asyncio.gather(*(_one_stream(url, tokens, delays, errors) for _ in range(streams)))
    return delays, sum(done), errors


async def run_streams(streams: int, tokens_per_s: float, reply_tokens: int) -> StreamsResult:
    with start_stack(
        token_delay_s=1 / tokens_per_s, reply_tokens=reply_tokens, stamp=True
    ) as stack:
        await builtin_run(
            stack.proxy_url, Load(stream=False, concurrency=1, seconds=0.2)
        )  # load it
        progress(f"bench: {streams} streams direct ...")
        direct, _, _ = await _streams_at(stack.emulator_url, streams, reply_tokens)
        progress(f"bench: {streams} streams through the proxy ...")
        cpu_before, started = cpu_s(stack.proxy_pid), time.monotonic()
        peak_rss = 0.0

        async def sample_rss() -> None:
            nonlocal peak_rss
            while True:
                peak_rss = max(peak_rss, rss_mb(stack.proxy_pid))
                await asyncio.sleep(0.2)

        sampler = asyncio.ensure_future(sample_rss())
        try:
            proxied, completed, errors = await _streams_at(stack.proxy_url, streams, reply_tokens)
        finally:
            sampler.cancel()
        cpu = (cpu_s(stack.proxy_pid) - cpu_before) / (time.monotonic() - started) * 100
        progress("")
    direct_p50 = statistics.median(direct) if direct else float("nan")
    return StreamsResult(
        streams=streams,
        tokens_per_s=tokens_per_s,
        completed=completed,
        errors=len(errors),
        proxy_rss_mb=round(peak_rss, 1),
        proxy_cpu_percent=round(cpu, 1),
        added_delay_p50_ms=round((percentile(proxied, 0.5) - direct_p50) * 1000, 3),
        added_delay_p99_ms=round((percentile(proxied, 0.99) - direct_p50) * 1000, 3),
        direct_delay_p50_ms=round(direct_p50 * 1000, 3),
        proxied_delay_p50_ms=round(percentile(proxied, 0.5) * 1000, 3),
        proxied_delay_p99_ms=round(percentile(proxied, 0.99) * 1000, 3),
    )
