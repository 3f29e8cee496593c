"""`lmswitch bench`: the proxy against the emulator, direct vs proxied (DESIGN §9).

The emulator and the proxy run as their own processes, started the way `lmswitch emulator` and
`lmswitch serve` start; the load comes from `wrk` when it is installed, else from a lean built-in
generator (raw HTTP/1.1 over keep-alive connections) in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

MODEL = "llama-3.2-1b-instruct"
_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 12}


def chat_body(*, stream: bool, max_tokens: int = 12) -> bytes:
    return json.dumps({**_CHAT, "stream": stream, "max_tokens": max_tokens}).encode()


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


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- processes ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Stack:
    """The emulator and the proxy, each in its own process."""

    emulator_url: str
    proxy_url: str
    proxy_pid: int
    _processes: list[subprocess.Popen[bytes]] = field(default_factory=list)


def _wait_http(port: int, path: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    request = f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n".encode()
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
            s.sendall(request)
            if s.recv(64).startswith(b"HTTP/1.1 200"):
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing answered 200 on 127.0.0.1:{port}{path} in {timeout_s:g} s")


@contextlib.contextmanager
def start_stack(
    *, token_delay_s: float = 0.0, stamp: bool = False, reply_tokens: int = 12
) -> Iterator[Stack]:
    """Start the emulator (no load delay) and the proxy in front of it; stop both after."""
    emulator_port, proxy_port = _free_port(), _free_port()
    python = [sys.executable, "-m", "proxy"]
    emulator_args = ["--port", str(emulator_port), "--load-delay", "0", "--quiet"]
    emulator_args += ["--token-delay", str(token_delay_s), "--reply-tokens", str(reply_tokens)]
    emulator_args += ["--stamp-chunks"] if stamp else []
    processes: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp, "bench.yaml")
        config.write_text(
            f"upstream:\n  base_url: http://127.0.0.1:{emulator_port}\n"
            "models:\n  max_loaded: 1\n"
            "scheduler:\n  max_queue: 4096\n"
            "logging:\n  level: warning\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("LMSWITCH_")}
        try:
            processes.append(subprocess.Popen([*python, "emulator", *emulator_args], env=env))  # noqa: S603
            _wait_http(emulator_port, "/lmstudio-greeting")
            serve = [*python, "serve", "--config", str(config), "--port", str(proxy_port)]
            processes.append(subprocess.Popen(serve, env=env))  # noqa: S603
            _wait_http(proxy_port, "/readyz")
            yield Stack(
                f"http://127.0.0.1:{emulator_port}",
                f"http://127.0.0.1:{proxy_port}",
                processes[-1].pid,
                processes,
            )
        finally:
            for process in reversed(processes):
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


# --- the built-in load generator ----------------------------------------------------------------


def _request(url: str, path: str, body: bytes) -> tuple[str, int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return host, int(port), head.encode() + body


async def _read_response(reader: asyncio.StreamReader, on_chunk: object = None) -> int:
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
            status = await _read_response(reader)
            latencies.append(time.perf_counter() - start)
            if status != 200:
                errors.append(status)
    finally:
        writer.close()


async def builtin_run(url: str, *, stream: bool, concurrency: int, seconds: float) -> Result:
    host, port, request = _request(url, "/v1/chat/completions", chat_body(stream=stream))
    latencies: list[float] = []
    errors: list[int] = []
    started = time.perf_counter()
    until = started + seconds
    await asyncio.gather(
        *(_worker(host, port, request, until, latencies, errors) for _ in range(concurrency))
    )
    elapsed = time.perf_counter() - started
    return Result(
        target="",
        stream=stream,
        concurrency=concurrency,
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


def wrk_run(url: str, *, stream: bool, concurrency: int, seconds: float) -> Result:
    wrk = shutil.which("wrk")
    assert wrk is not None  # noqa: S101 - callers check
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_WRK_SCRIPT % chat_body(stream=stream).decode())
    try:
        threads = min(concurrency, 2)
        command = [
            wrk, f"-t{threads}", f"-c{concurrency}", f"-d{seconds:g}s", "--latency",
            "-s", script.name, f"{url}/v1/chat/completions",
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


# --- scenarios ----------------------------------------------------------------------------------


def _progress(message: str) -> None:
    print(f"\r\x1b[K{message}", end="", file=sys.stderr, flush=True)  # noqa: T201


async def _measure(
    url: str, *, stream: bool, concurrency: int, seconds: float, use_wrk: bool
) -> Result:
    if use_wrk:
        return await asyncio.to_thread(
            wrk_run, url, stream=stream, concurrency=concurrency, seconds=seconds
        )
    return await builtin_run(url, stream=stream, concurrency=concurrency, seconds=seconds)


async def run_matrix(
    stack: Stack, *, seconds: float, concurrencies: Sequence[int], use_wrk: bool
) -> list[Result]:
    results: list[Result] = []
    # One request first, so that the model is loaded before anything is timed.
    await builtin_run(stack.proxy_url, stream=False, concurrency=1, seconds=0.2)
    for stream in (False, True):
        for concurrency in concurrencies:
            for target, url in (("direct", stack.emulator_url), ("proxied", stack.proxy_url)):
                kind = "streaming" if stream else "non-streaming"
                _progress(f"bench: {kind} chat, concurrency {concurrency}, {target} ...")
                cpu_before = _cpu_s(stack.proxy_pid)
                result = await _measure(
                    url, stream=stream, concurrency=concurrency, seconds=seconds, use_wrk=use_wrk
                )
                result.target = target
                if target == "proxied" and result.requests:
                    cpu = _cpu_s(stack.proxy_pid) - cpu_before
                    result.proxy_cpu_us = round(cpu / result.requests * 1e6, 1)
                results.append(result)
    _progress("")
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


# --- many slow streams --------------------------------------------------------------------------


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")  # not Linux: the figure is not available


def _cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


async def _one_stream(url: str, tokens: int, delays: list[float], errors: list[int]) -> bool:
    body = chat_body(stream=True, max_tokens=tokens)
    host, port, request = _request(url, "/v1/chat/completions", body)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(request)

    def on_chunk(data: bytes) -> None:
        now = time.time()
        delays.extend(now - float(m.group(1)) for m in re.finditer(rb": sent=([\d.]+)", data))

    try:
        status = await _read_response(reader, on_chunk)
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
        await builtin_run(stack.proxy_url, stream=False, concurrency=1, seconds=0.2)  # load it
        _progress(f"bench: {streams} streams direct ...")
        direct, _, _ = await _streams_at(stack.emulator_url, streams, reply_tokens)
        _progress(f"bench: {streams} streams through the proxy ...")
        cpu_before, started = _cpu_s(stack.proxy_pid), time.monotonic()
        peak_rss = 0.0

        async def sample_rss() -> None:
            nonlocal peak_rss
            while True:
                peak_rss = max(peak_rss, _rss_mb(stack.proxy_pid))
                await asyncio.sleep(0.2)

        sampler = asyncio.ensure_future(sample_rss())
        try:
            proxied, completed, errors = await _streams_at(stack.proxy_url, streams, reply_tokens)
        finally:
            sampler.cancel()
        cpu = (_cpu_s(stack.proxy_pid) - cpu_before) / (time.monotonic() - started) * 100
        _progress("")
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
    with start_stack() as stack:
        results = _run(
            run_matrix(
                stack,
                seconds=options.seconds,
                concurrencies=options.concurrencies,
                use_wrk=use_wrk,
            )
        )
    generator = "wrk" if use_wrk else "built-in (asyncio, raw HTTP/1.1)"
    if options.json:
        print(json.dumps({"generator": generator, "results": [asdict(r) for r in results]}))  # noqa: T201
    else:
        print(f"load generator: {generator}; {options.seconds:g} s per measurement")  # noqa: T201
        print(format_table(results))  # noqa: T201
    return 0
