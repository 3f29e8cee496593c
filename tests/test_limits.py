"""Body limits: an oversized body gets 413 without the proxy reading it into memory."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx2
import pytest

from proxy.emulator import Emulator
from tests.helpers import proxy_process, serve

MiB = 2**20
CHAT = "/v1/chat/completions"
JSON = {"content-type": "application/json"}


def peak_rss_kib(pid: int) -> int:
    """The process's peak resident set size (`VmHWM`), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


async def chunks(total_bytes: int, size: int = MiB) -> AsyncIterator[bytes]:
    """A body of `total_bytes` sent chunked: no content-length for the proxy to go by."""
    for start in range(0, total_bytes, size):
        yield b" " * min(size, total_bytes - start)


async def post_oversized(http: httpx2.AsyncClient, size: int, *, chunked: bool) -> None:
    content = chunks(size) if chunked else b" " * size
    response = await http.post(CHAT, content=content, headers=JSON)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc/<pid>/status"
)
async def test_oversized_bodies_get_413_without_growing_the_proxy(tmp_path: Path) -> None:
    """20 MiB with content-length and 20 MiB chunked: 413 both, peak memory barely moves."""
    async with (
        serve(Emulator().app) as upstream_url,
        proxy_process(tmp_path, upstream_url, max_body_bytes="1MiB") as proxy,
        httpx2.AsyncClient(base_url=proxy.url, timeout=10) as http,
    ):
        for chunked in (False, True):  # warm up: the refusal's code paths, at the 1 MiB limit
            await post_oversized(http, 2 * MiB, chunked=chunked)
        before_kib = peak_rss_kib(proxy.pid)
        await post_oversized(http, 20 * MiB, chunked=False)
        await post_oversized(http, 20 * MiB, chunked=True)
        grown_kib = peak_rss_kib(proxy.pid) - before_kib
        assert grown_kib < 4 * 1024, f"peak RSS grew by {grown_kib} KiB"
        assert (await http.get("/healthz")).status_code == 200
