"""Shared fixtures: a clean environment, the asyncio backend, and loopback servers."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import anyio
import pytest
import uvicorn
from starlette.types import ASGIApp

from proxy.server import free_port

__all__ = ["free_port", "serve"]  # free_port: for the tests that restart a server in place


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak-minutes",
        type=float,
        default=0.75,
        help="how long tests/test_soak.py drives load and faults (default 0.75: about a minute)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Soak tests run for --soak-minutes: their timeout follows (plus set-up and checks)."""
    minutes: float = config.getoption("--soak-minutes")
    for item in items:
        if item.get_closest_marker("soak") is not None:
            item.add_marker(pytest.mark.timeout(minutes * 60 + 120))


@pytest.fixture
def anyio_backend() -> str:
    # uvicorn.Server is asyncio-only, as in uvicorn's own test suite.
    return "asyncio"


@pytest.fixture(autouse=True)
def clean_environ() -> Iterator[None]:
    """Tests never see the developer's LMSWITCH_* variables."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("LMSWITCH_")}
    for key in saved:
        del os.environ[key]
    yield
    for key in [k for k in os.environ if k.startswith("LMSWITCH_")]:
        del os.environ[key]
    os.environ.update(saved)


@asynccontextmanager
async def serve(app: ASGIApp, *, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Run `app` under a real uvicorn server on a pre-bound loopback port; yield its URL.

    Port 0 (the default) picks a free port; a given port lets a test restart a server in place.
    """
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets that name it, and without
    # it every request after the first on a kept-alive connection waits ~40 ms for Nagle.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))  # no port race: the socket is ours before uvicorn starts
    config = uvicorn.Config(
        app,
        log_config=None,  # uvicorn's records reach pytest's capture, not stderr directly
        log_level="warning",
        timeout_graceful_shutdown=1,
        lifespan="on",
        access_log=False,
    )
    server = uvicorn.Server(config)
    stopped = anyio.Event()

    async def run() -> None:
        try:
            await server.serve([sock])
        finally:
            stopped.set()

    with sock:  # closed however the server ends
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            with anyio.fail_after(5):
                while not server.started:  # uvicorn only exposes a flag
                    if server.should_exit:
                        raise RuntimeError("server failed to start")
                    await anyio.sleep(0.01)
            bound_host, port = sock.getsockname()
            try:
                yield f"http://{bound_host}:{port}"
            finally:
                # Let it shut down even when the test failed: cancelled mid-serve, uvicorn leaves
                # its listening server open, and closing a uvloop loop then blocks for good.
                server.should_exit = True
                with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                    await stopped.wait()
