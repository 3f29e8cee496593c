"""`lmswitch demo`: the proxy and the LM Studio emulator in one process, on loopback."""

from __future__ import annotations

import contextlib
import logging
import socket
from dataclasses import dataclass, field

import anyio
import httpx2
import uvicorn
from anyio.abc import TaskStatus

from proxy.app import create_app
from proxy.config import Settings
from proxy.server import QuietServer, configure_logging, handling_signals, uvicorn_config

DEMO_ALIASES = {
    "gpt-4o-mini": "qwen2.5-7b-instruct",
    "text-embedding-3-small": "text-embedding-nomic-embed-text-v1.5",
}
DEMO_READY_TIMEOUT_S = 10.0

logger = logging.getLogger("lmswitch.cli")  # the name its records had before the demo left cli.py


@dataclass(frozen=True)
class Demo:
    """A running demo: where its two servers listen, its models, and how to stop it."""

    proxy_url: str
    emulator_url: str
    models: tuple[str, ...]
    _proxy: uvicorn.Server = field(repr=False)

    def stop(self) -> None:
        """Drain the proxy, then stop the emulator: what Ctrl+C does."""
        self._proxy.should_exit = True


def _greeting(demo: Demo) -> str:
    base = demo.proxy_url
    aliases = ", ".join(f"{alias} -> {target}" for alias, target in DEMO_ALIASES.items())
    curl = (
        f"  curl {base}/v1/chat/completions -H 'content-type: application/json' \\\n"
        """    -d '{{"model": "{}", "messages": [{{"role": "user", "content": "Hi"}}]}}'"""
    )
    return f"""
lmswitch demo: the proxy at {base}/v1, in front of an LM Studio emulator at {demo.emulator_url}
  models:   {", ".join(demo.models)}
  aliases:  {aliases}
  web page: {base}/ui/
  status:   {base}/api/v1/status    metrics: {base}/metrics

Ask two models in turn and watch the proxy swap them (one model fits at a time):
{curl.format("qwen2.5-7b-instruct")}
{curl.format("llama-3.2-1b-instruct")}
Press Ctrl+C to stop.
"""


class CannotListenError(Exception):
    """The demo's port is taken (or otherwise cannot be bound)."""


def _listen(port: int) -> socket.socket:
    try:
        return socket.create_server(("127.0.0.1", port))
    except OSError as exc:
        raise CannotListenError(f"cannot listen on 127.0.0.1:{port}: {exc.strerror}") from exc


async def wait_until_ready(url: str, timeout_s: float = DEMO_READY_TIMEOUT_S) -> bool:
    """Poll the proxy's `/readyz` until it has reached LM Studio; False after `timeout_s`.

    The proxy answers 503 `upstream_unavailable` to a request that comes while it is still
    taking its first look at LM Studio, so the demo greets only once that look is done.
    Each poll has its own 5 s timeout; the loop stops polling once `timeout_s` has passed.
    """
    deadline = anyio.current_time() + timeout_s
    async with httpx2.AsyncClient(base_url=url, timeout=5) as http:
        while anyio.current_time() < deadline:
            with contextlib.suppress(httpx2.TransportError):  # e.g. stopped meanwhile
                if (await http.get("/readyz")).status_code == 200:
                    return True
            await anyio.sleep(0.02)
    return False


async def run_demo(
    port: int = 8000,
    load_delay_s: float = 2.0,
    *,
    ready_timeout_s: float = DEMO_READY_TIMEOUT_S,
    task_status: TaskStatus[Demo] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run the proxy on 127.0.0.1:`port` (0: a free port) in front of the emulator until stopped.

    Both sockets listen before either server starts, so the proxy's first look at LM Studio
    finds the emulator. Once the proxy is ready, prints the greeting and hands `task_status`
    a `Demo`. SIGINT/SIGTERM (or `Demo.stop()`) drain the proxy; the emulator stops after it,
    since in-flight requests need it. Raises CannotListenError if `port` is taken.
    """
    from proxy.emulator import Emulator  # not imported by `serve`: it costs memory

    emulator = Emulator(load_delay_s=load_delay_s, token_delay_s=0.05, reply_tokens=24)
    with _listen(0) as emulator_sock, _listen(port) as proxy_sock:
        emulator_port = emulator_sock.getsockname()[1]
        emulator_url = f"http://127.0.0.1:{emulator_port}"
        proxy_port = proxy_sock.getsockname()[1]
        settings = Settings(
            upstream={"base_url": emulator_url, "poll_interval": 5},
            models={"max_loaded": 1, "aliases": DEMO_ALIASES, "default": "qwen2.5-7b-instruct"},
            scheduler={"swap_grace": 5},
            server={"port": proxy_port, "drain_timeout": 3},
        )
        configure_logging(settings)
        emulator_config = uvicorn.Config(
            emulator.app, log_level="warning", lifespan="off", access_log=False
        )
        emulator_server = QuietServer(emulator_config, on_started=lambda: None)
        proxy_started = anyio.Event()
        proxy_server = QuietServer(
            uvicorn_config(create_app(settings), settings), on_started=proxy_started.set
        )
        demo = Demo(
            proxy_url=f"http://127.0.0.1:{proxy_port}",
            emulator_url=emulator_url,
            models=tuple(emulator.catalog),
            _proxy=proxy_server,
        )

        waiting = anyio.CancelScope()

        async def serve_proxy() -> None:
            await proxy_server.serve([proxy_sock])
            waiting.cancel()  # stopped before it was ready: greet, hand over, and finish
            emulator_server.should_exit = True

        # One handler for the two servers, for the whole run: a second Ctrl+C while the emulator
        # stops still reaches uvicorn (force exit) rather than asyncio's KeyboardInterrupt.
        with handling_signals(proxy_server.handle_exit):
            async with anyio.create_task_group() as tg:
                tg.start_soon(emulator_server.serve, [emulator_sock])
                tg.start_soon(serve_proxy)
                await proxy_started.wait()  # set by startup, which otherwise raises SystemExit
                with waiting:
                    if not await wait_until_ready(demo.proxy_url, ready_timeout_s):
                        logger.warning("the proxy has not reached the emulator yet")
                print(_greeting(demo), flush=True)  # noqa: T201 - the demo's greeting is its output
                task_status.started(demo)
