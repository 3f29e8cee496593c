"""Graceful shutdown (docs/design.md §4.5): `lmswitch serve` in a subprocess, signalled
mid-stream."""

from __future__ import annotations

import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx2
import pytest

from proxy.emulator import Emulator
from tests.helpers import MESSAGES, QWEN, proxy_process, serve

pytestmark = pytest.mark.skipif(
    sys.platform == "win32", reason="POSIX signals: Windows has no SIGTERM to send a process"
)

CHAT = "/v1/chat/completions"
STREAM = {"model": QWEN, "messages": MESSAGES, "stream": True}


async def refuses_connections(port: int, timeout_s: float) -> None:
    """Return once a new connection to `port` is refused; TimeoutError after `timeout_s`."""
    with anyio.fail_after(timeout_s):
        while True:
            try:
                stream = await anyio.connect_tcp("127.0.0.1", port)
            except OSError:
                return
            await stream.aclose()
            await anyio.sleep(0.02)


async def read_into(received: list[str], lines: AsyncIterator[str]) -> None:
    """Append lines as they come, so that those before an error are kept."""
    async for line in lines:
        received.append(line)  # noqa: PERF401 - a comprehension would lose them on error


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_drains_a_running_stream_then_exits_0(
    tmp_path: Path, signum: signal.Signals
) -> None:
    """Signalled mid-stream: no new connections, the stream ends with [DONE], exit 0 in time."""
    drain_timeout_s = 5.0
    emulator = Emulator(reply_tokens=30, token_delay_s=0.05)  # a 1.5 s stream
    async with (
        serve(emulator.app) as upstream_url,
        proxy_process(tmp_path, upstream_url, drain_timeout=drain_timeout_s) as proxy,
        httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http,
    ):
        with anyio.fail_after(10):
            async with http.stream("POST", CHAT, json=STREAM) as response:
                assert response.status_code == 200
                lines = response.aiter_lines()
                assert (await anext(lines)).startswith("data: {")
                proxy.process.send_signal(signum)
                signalled = anyio.current_time()
                await refuses_connections(proxy.port, timeout_s=1)
                assert emulator.streams_open == 1  # refused while the stream still runs
                rest = [line async for line in lines if line]
            assert rest[-1] == "data: [DONE]"
            assert len([line for line in rest if line.startswith("data: {")]) >= 30
        code = await proxy.exit_code(timeout_s=drain_timeout_s)
        assert anyio.current_time() - signalled < drain_timeout_s
        assert code == 0, proxy.log()
    assert emulator.streams_closed_early == 0


async def test_a_stream_past_drain_timeout_is_cut_at_the_deadline(tmp_path: Path) -> None:
    """A stream longer than `server.drain_timeout` is cut when it passes; the process exits 0."""
    drain_timeout_s = 1.0
    emulator = Emulator(reply_tokens=400, token_delay_s=0.05)  # 20 s: far past the drain
    async with (
        serve(emulator.app) as upstream_url,
        proxy_process(tmp_path, upstream_url, drain_timeout=drain_timeout_s) as proxy,
        httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http,
    ):
        received: list[str] = []
        with anyio.fail_after(drain_timeout_s + 5):
            async with http.stream("POST", CHAT, json=STREAM) as response:
                lines = response.aiter_lines()
                received.append(await anext(lines))
                proxy.process.send_signal(signal.SIGTERM)
                signalled = anyio.current_time()
                with pytest.raises(httpx2.RemoteProtocolError):  # the body ends incomplete
                    await read_into(received, lines)
            cut_after_s = anyio.current_time() - signalled
        assert drain_timeout_s <= cut_after_s < drain_timeout_s + 1.5
        assert "data: [DONE]" not in received
        assert len(received) > 10  # it did stream until the deadline
        code = await proxy.exit_code(timeout_s=5)
        assert code == 0, proxy.log()
        await emulator.wait_until(lambda: emulator.streams_open == 0, timeout=2)
    assert emulator.streams_closed_early == 1


async def test_an_open_event_stream_does_not_hold_up_shutdown(tmp_path: Path) -> None:
    """A live `/api/v1/events` stream (the web page keeps one) ends at once on SIGTERM.

    It never finishes by itself, so if it waited for the drain every shutdown with the page
    open would last the whole `drain_timeout` and end with a cancelled-task traceback.
    """
    drain_timeout_s = 5.0
    ended_cleanly = True
    async with (
        serve(Emulator().app) as upstream_url,
        proxy_process(tmp_path, upstream_url, drain_timeout=drain_timeout_s) as proxy,
        httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http,
    ):
        with anyio.fail_after(drain_timeout_s + 5):
            async with http.stream("GET", "/api/v1/events") as response:
                lines = response.aiter_lines()
                first = await anext(lines)
                proxy.process.send_signal(signal.SIGTERM)
                signalled = anyio.current_time()
                try:
                    await read_into([], lines)
                except httpx2.RemoteProtocolError:  # cut at the drain deadline instead
                    ended_cleanly = False
            ended_after_s = anyio.current_time() - signalled
        code = await proxy.exit_code(timeout_s=drain_timeout_s + 2)
        exited_after_s = anyio.current_time() - signalled
        log = proxy.log()
    # Checked once every server has stopped, so that a failure leaves nothing running.
    assert first == "event: snapshot"
    assert ended_cleanly, f"the event stream was cut after {ended_after_s:.1f} s"
    assert ended_after_s < 1, f"the event stream held on for {ended_after_s:.1f} s"
    assert exited_after_s < 2, f"exited {exited_after_s:.1f} s after the signal"
    assert code == 0, log
    assert "Traceback" not in log
