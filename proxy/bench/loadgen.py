"""The bench's load: a lean built-in generator (raw HTTP/1.1 over keep-alive connections), `wrk`
and its report parser, both giving a `Result`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

MODEL = "llama-3.2-1b-instruct"
_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 12}


def chat_body(*, stream: bool, max_tokens: int = 12) -> bytes:
    return json.dumps({**_CHAT, "stream": stream, "max_tokens": max_tokens}).encode()


@dataclass(frozen=True)
class Endpoint:
    """Where the proxied load goes, and what it sends; the direct load is always OpenAI chat."""

    path: str
    body: Callable[..., bytes]


def ollama_chat_body(*, stream: bool, max_tokens: int = 12) -> bytes:
    """The same chat as `chat_body`, in Ollama's terms (`/api/chat`)."""
    chat = {"model": MODEL, "messages": _CHAT["messages"], "stream": stream}
    return json.dumps({**chat, "options": {"num_predict": max_tokens}}).encode()


OPENAI = Endpoint("/v1/chat/completions", chat_body)
ENDPOINTS = {"openai": OPENAI, "ollama": Endpoint("/api/chat", ollama_chat_body)}


@dataclass(frozen=True)
class Load:
    """One measurement's load: the kind of chat, how many clients, for how long, with what key,
    through what endpoint."""

    stream: bool
    concurrency: int
    seconds: float
    key: str | None = None
    endpoint: Endpoint = OPENAI


@dataclass
class Result:
    """One measurement: a target, a kind of request and a concurrency."""

    target: str  # "direct" (the emulator) or "proxied"
    stream: bool
    concurrency: int
    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    generator: str
    # CPU the proxy process used per request (user + system), where /proc tells: steadier than
    # throughput on a busy machine, since other processes' load does not count in it.
    proxy_cpu_us: float = float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- the built-in load generator ----------------------------------------------------------------


def http_request(
    url: str, path: str, body: bytes, key: str | None = None
) -> tuple[str, int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    auth = "" if key is None else f"authorization: Bearer {key}\r\n"
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
        f"{auth}content-length: {len(body)}\r\n\r\n"
    )
    return host, int(port), head.encode() + body


async def read_response(reader: asyncio.StreamReader, on_chunk: object = None) -> int:
    """Read one HTTP/1.1 response (content-length or chunked); return its status."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            if callable(on_chunk) and size:
                on_chunk(data[:-2])
            if size == 0:
                return status
    match = re.search(rb"content-length: *(\d+)", lower)
    if match:
        await reader.readexactly(int(match.group(1)))
    return status


async def _worker(
    host: str, port: int, request: bytes, until: float, latencies: list[float], errors: list[int]
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while (start := time.perf_counter()) < until:
            writer.write(request)
            status = await read_response(reader)
            latencies.append(time.perf_counter() - start)
            if status != 200:
                errors.append(status)
    finally:
        writer.close()


async def builtin_run(url: str, load: Load) -> Result:
    body = load.endpoint.body(stream=load.stream)
    host, port, request = http_request(url, load.endpoint.path, body, load.key)
    latencies: list[float] = []
    errors: list[int] = []
    started = time.perf_counter()
    until = started + load.seconds
    await asyncio.gather(
        *(_worker(host, port, request, until, latencies, errors) for _ in range(load.concurrency))
    )
    elapsed = time.perf_counter() - started
    return Result(
        target="",
        stream=load.stream,
        concurrency=load.concurrency,
        requests=len(latencies),
        errors=len(errors),
        seconds=round(elapsed, 2),
        rps=round(len(latencies) / elapsed, 1),
        p50_ms=round(percentile(latencies, 0.50) * 1000, 3),
        p99_ms=round(percentile(latencies, 0.99) * 1000, 3),
        generator="built-in",
    )


# --- wrk ----------------------------------------------------------------------------------------

_WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.body = [[%s]]
"""
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _wrk_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if match is None:
        return float("nan")
    return float(match.group(1)) * _UNITS[match.group(2)]


def wrk_run(url: str, load: Load) -> Result:
    wrk = shutil.which("wrk")
    assert wrk is not None  # noqa: S101 - callers check
    stream, concurrency, seconds = load.stream, load.concurrency, load.seconds
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_WRK_SCRIPT % load.endpoint.body(stream=stream).decode())
        if load.key is not None:
            script.write(f'wrk.headers["authorization"] = "Bearer {load.key}"\n')
    try:
        threads = min(concurrency, 2)
        command = [
            wrk, f"-t{threads}", f"-c{concurrency}", f"-d{seconds:g}s", "--latency",
            "-s", script.name, f"{url}{load.endpoint.path}",
        ]  # fmt: skip
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout  # noqa: S603
    finally:
        os.unlink(script.name)
    return parse_wrk(output, stream=stream, concurrency=concurrency, seconds=seconds)


def parse_wrk(output: str, *, stream: bool, concurrency: int, seconds: float) -> Result:
    """A `Result` from wrk's `--latency` report."""
    requests = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(r"Socket errors: .*", output)
    errors = int(non_2xx.group(1)) if non_2xx else 0
    if socket_errors:
        errors += sum(int(n) for n in re.findall(r"\d+", socket_errors.group(0)))
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", output, re.MULTILINE))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    return Result(
        target="",
        stream=stream,
        concurrency=concurrency,
        requests=requests,
        errors=errors,
        seconds=seconds,
        rps=round(rps, 1),
        p50_ms=round(_wrk_ms(latency.get("50", "")), 3),
        p99_ms=round(_wrk_ms(latency.get("99", "")), 3),
        generator="wrk",
    )
