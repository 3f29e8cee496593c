"""`lmswitch demo`: the proxy and the LM Studio emulator in one process, on loopback.

`--hosts N` (N >= 2) runs N emulators of different memory sizes and partly different
catalogues, the proxy's pool (`upstreams`, docs/design.md §3.5) in front of them.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import uvicorn
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream

from proxy.app import create_app
from proxy.config import DEFAULT_HOST, Settings
from proxy.events import Event, EventBus
from proxy.server import QuietServer, configure_logging, handling_signals, listen, uvicorn_config

DEMO_ALIASES = {
    "gpt-4o-mini": "qwen2.5-7b-instruct",
    "text-embedding-3-small": "text-embedding-nomic-embed-text-v1.5",
}
DEMO_READY_TIMEOUT_S = 10.0
GIB = 2**30
# The demo's emulated disks: a load also takes the model's size over this (4 GB/s), so larger
# models load longer and the page's expected load times differ by model.
DEMO_LOAD_BYTES_PER_S = 4e9

logger = logging.getLogger("lmswitch.cli")  # the name its records had before the demo left cli.py


@dataclass(frozen=True)
class DemoHostSpec:
    """One emulated LM Studio host of `--hosts N`: its name, memory, and the models it lacks."""

    name: str
    memory_gib: int | None  # None: no limit
    lacks: frozenset[str] = frozenset()


_GEMMA, _GPT_OSS = "google/gemma-3-4b", "openai/gpt-oss-20b"
# In this order, the first N. Sizes that make placement visible: qwen2.5-14b (8.4 GiB) is on
# the laptop too but fits only elsewhere; gpt-oss-20b is only on the desk, gemma-3 only on the
# laptop; the others are everywhere.
DEMO_HOSTS: tuple[DemoHostSpec, ...] = (
    DemoHostSpec("desk", 24, frozenset({_GEMMA})),
    DemoHostSpec("laptop", 8, frozenset({_GPT_OSS})),
    DemoHostSpec("tower", 48, frozenset({_GEMMA, _GPT_OSS})),
    DemoHostSpec("mini", 16, frozenset({_GEMMA, _GPT_OSS})),
)
MAX_DEMO_HOSTS = len(DEMO_HOSTS)  # four host columns still fit the table in 80 columns


@dataclass(frozen=True)
class DemoHost:
    """One running emulator: its name in the pool, URL, memory (None: no limit) and models."""

    name: str
    url: str
    memory_bytes: int | None
    models: tuple[str, ...]

    def fits(self, size_bytes: int) -> bool:
        """Whether a model this large fits in the host's memory on its own."""
        return self.memory_bytes is None or size_bytes <= self.memory_bytes


@dataclass(frozen=True)
class Demo:
    """A running demo: where its servers listen, its models, and how to stop it."""

    proxy_url: str
    hosts: tuple[DemoHost, ...]
    models: tuple[str, ...]  # every host's, in the emulator's catalogue order
    sizes: Mapping[str, int] = field(repr=False)  # each model's size_bytes
    _proxy: uvicorn.Server = field(repr=False)

    @property
    def emulator_url(self) -> str:
        """The (first) emulator's URL."""
        return self.hosts[0].url

    def stop(self) -> None:
        """Drain the proxy, then stop the emulators: what Ctrl+C does."""
        self._proxy.should_exit = True


def _curl(base: str, *, include: bool = False) -> str:
    flag = "-i " if include else ""
    return (
        f"  curl {flag}{base}/v1/chat/completions -H 'content-type: application/json' \\\n"
        """    -d '{{"model": "{}", "messages": [{{"role": "user", "content": "Hi"}}]}}'"""
    )


def _links(base: str) -> str:
    aliases = ", ".join(f"{alias} -> {target}" for alias, target in DEMO_ALIASES.items())
    return f"""  aliases:  {aliases}
  web page: {base}/ui/
  status:   {base}/api/v1/status    metrics: {base}/metrics"""


def _greeting(demo: Demo) -> str:
    if len(demo.hosts) > 1:
        return _pool_greeting(demo)
    base = demo.proxy_url
    curl = _curl(base)
    return f"""
lmswitch demo: the proxy at {base}/v1, in front of an LM Studio emulator at {demo.emulator_url}
  models:   {", ".join(demo.models)}
{_links(base)}

Ask two models in turn and watch the proxy swap them (one model fits at a time):
{curl.format("qwen2.5-7b-instruct")}
{curl.format("llama-3.2-1b-instruct")}
Press Ctrl+C to stop.
"""


def _only_on(demo: Demo) -> list[str]:
    """For each host in turn, the first model no other host has (if any)."""
    found = []
    for host in demo.hosts:
        others = {m for h in demo.hosts if h is not host for m in h.models}
        found += [m for m in host.models if m not in others][:1]
    return found


def _pool_greeting(demo: Demo) -> str:
    base = demo.proxy_url
    curl = _curl(base, include=True)
    asks = "\n".join(curl.format(model) for model in _only_on(demo)[:2])
    return f"""
lmswitch demo: the proxy at {base}/v1, in front of {len(demo.hosts)} LM Studio emulators
{_links(base)}

Ask models only one host has: the proxy sends each there (see x-lmswitch-upstream):
{asks}

{fits_table(demo.hosts, demo.sizes)}

Press Ctrl+C to stop.
"""


def _gib(size_bytes: int) -> str:
    return f"{size_bytes / GIB:.1f} GiB"


def fits_table(hosts: Sequence[DemoHost], sizes: Mapping[str, int]) -> str:
    """The hosts (name, URL, memory), then which model fits where: per model and host, `yes`
    (downloaded there and fits in its memory alone), `no` (downloaded, too big) or `-`."""
    name_width = max(len(host.name) for host in hosts)
    lines = ["Hosts, each an emulator whose memory is its memory_budget in the proxy:"]
    for host in hosts:
        memory = "no limit" if host.memory_bytes is None else f"{host.memory_bytes // GIB} GiB"
        lines.append(f"  {host.name:<{name_width}}  {host.url:<24} {memory:>8}")
    model_width = max(len("model"), *(len(model) for model in sizes))
    columns = [max(len(host.name), 3) + 2 for host in hosts]
    header = "".join(f"{host.name:<{width}}" for host, width in zip(hosts, columns, strict=True))
    lines += [
        "",
        "Which model fits where (yes: downloaded there and fits in its memory alone;",
        "no: downloaded there but too big; -: not downloaded there):",
        f"  {'model':<{model_width}}  {'size':>8}  {header}".rstrip(),
    ]
    for model, size in sizes.items():
        cells = "".join(
            f"{_cell(host, model, size):<{width}}"
            for host, width in zip(hosts, columns, strict=True)
        )
        lines.append(f"  {model:<{model_width}}  {_gib(size):>8}  {cells}".rstrip())
    return "\n".join(lines)


def _cell(host: DemoHost, model: str, size: int) -> str:
    if model not in host.models:
        return "-"
    return "yes" if host.fits(size) else "no"


def _listen(port: int) -> socket.socket:
    (sock,) = listen("127.0.0.1", port)  # one address, one socket
    return sock


async def wait_for_hosts(
    events: MemoryObjectReceiveStream[Event],
    hosts: Collection[str],
    timeout_s: float = DEMO_READY_TIMEOUT_S,
) -> bool:
    """Read `events` (subscribed to before the proxy started) until every one of `hosts` has
    said it is up in an `upstream` event: LM Studio's models read, its last call answered;
    False after `timeout_s`, or if the stream ends first.

    The proxy answers 503 `upstream_unavailable` to a request that comes while it is still
    taking its first look at LM Studio, so the demo greets only once that look is done. It
    waits in-process, on the proxy's own events, rather than polling `/readyz`: no requests,
    so no access lines of its own among the user's.
    """
    waiting = set(hosts)
    with anyio.move_on_after(timeout_s):
        async for kind, data in events:
            if kind == "upstream" and data["up"]:
                waiting.discard(data["upstream"])
            elif kind == "upstream":
                waiting.add(data["upstream"])  # down again
            if not waiting:
                return True
    return False


def _settings(hosts: Sequence[DemoHost], proxy_port: int) -> Settings:
    common: dict[str, Any] = {
        "scheduler": {"swap_grace": 5},
        "server": {"port": proxy_port, "drain_timeout": 3},
    }
    models = {"max_loaded": 1, "aliases": DEMO_ALIASES, "default": "qwen2.5-7b-instruct"}
    if len(hosts) == 1:  # one model at a time, to watch the proxy swap them
        return Settings(
            upstream={"base_url": hosts[0].url, "poll_interval": 5}, models=models, **common
        )
    # No count limit: each host holds whatever fits in its memory.
    pool = [{"name": h.name, "base_url": h.url, "memory_budget": h.memory_bytes} for h in hosts]
    return Settings(
        upstream={"poll_interval": 5}, upstreams=pool, models=models | {"max_loaded": 0}, **common
    )


async def run_demo(
    port: int = 8000,
    load_delay_s: float = 2.0,
    *,
    hosts: int = 1,
    ready_timeout_s: float = DEMO_READY_TIMEOUT_S,
    task_status: TaskStatus[Demo] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run the proxy on 127.0.0.1:`port` (0: a free port) in front of the emulator until stopped.

    With `hosts` >= 2 (at most MAX_DEMO_HOSTS), the first `hosts` of DEMO_HOSTS: one emulator
    each, with its memory and catalogue, the proxy's `upstreams` with that memory as budget.
    All sockets listen before any server starts, so the proxy's first look at LM Studio finds
    the emulators. Once the proxy is ready, prints the greeting and hands `task_status` a
    `Demo`. SIGINT/SIGTERM (or `Demo.stop()`) drain the proxy; the emulators stop after it,
    since in-flight requests need them. Raises proxy.server.CannotListenError if `port`
    is taken.
    """
    from proxy.emulator import Emulator  # not imported by `serve`: it costs memory
    from proxy.emulator.catalog import DEFAULT_CATALOG

    if not 1 <= hosts <= MAX_DEMO_HOSTS:
        raise ValueError(f"hosts must be 1 to {MAX_DEMO_HOSTS}, not {hosts}")
    specs = [DemoHostSpec(DEFAULT_HOST, None)] if hosts == 1 else DEMO_HOSTS[:hosts]
    emulators = [
        Emulator(
            [model for model in DEFAULT_CATALOG if model.key not in spec.lacks],
            load_delay_s=load_delay_s,
            load_bytes_per_s=DEMO_LOAD_BYTES_PER_S,
            memory_bytes=None if spec.memory_gib is None else spec.memory_gib * GIB,
            token_delay_s=0.05,
            reply_tokens=24,
        )
        for spec in specs
    ]
    with contextlib.ExitStack() as sockets:
        emulator_socks = [sockets.enter_context(_listen(0)) for _ in emulators]
        proxy_sock = sockets.enter_context(_listen(port))
        demo_hosts = tuple(
            DemoHost(
                name=spec.name,
                url=f"http://127.0.0.1:{sock.getsockname()[1]}",
                memory_bytes=emulator.memory_bytes,
                models=tuple(emulator.catalog),
            )
            for spec, emulator, sock in zip(specs, emulators, emulator_socks, strict=True)
        )
        proxy_port = proxy_sock.getsockname()[1]
        settings = _settings(demo_hosts, proxy_port)
        configure_logging(settings)
        emulator_servers = [
            QuietServer(
                uvicorn.Config(emulator.app, log_level="warning", lifespan="off", access_log=False),
                on_started=lambda: None,
            )
            for emulator in emulators
        ]
        proxy_started = anyio.Event()
        events = EventBus()
        proxy_server = QuietServer(
            # uvicorn's own lines (start-up, shutdown) would only repeat the greeting
            uvicorn_config(create_app(settings, events=events), settings, log_level="warning"),
            on_started=proxy_started.set,
            on_shutdown=events.close,  # the page's event stream ends, rather than hold the drain
        )
        present = {m.key for emulator in emulators for m in emulator.catalog.values()}
        sizes = {m.key: m.size_bytes for m in DEFAULT_CATALOG if m.key in present}
        demo = Demo(
            proxy_url=f"http://127.0.0.1:{proxy_port}",
            hosts=demo_hosts,
            models=tuple(sizes),
            sizes=sizes,
            _proxy=proxy_server,
        )

        waiting = anyio.CancelScope()

        async def serve_proxy() -> None:
            await proxy_server.serve([proxy_sock])
            waiting.cancel()  # stopped before it was ready: greet, hand over, and finish
            for server in emulator_servers:
                server.should_exit = True

        # One handler for all the servers, for the whole run: a second Ctrl+C while the
        # emulators stop still reaches uvicorn (force exit) rather than asyncio's
        # KeyboardInterrupt.
        with handling_signals(proxy_server.handle_exit):
            async with anyio.create_task_group() as tg:
                with events.subscribe() as news:  # before the proxy's first look at the hosts
                    for server, sock in zip(emulator_servers, emulator_socks, strict=True):
                        tg.start_soon(server.serve, [sock])
                    tg.start_soon(serve_proxy)
                    await proxy_started.wait()  # set by startup, else it raises SystemExit
                    with waiting:
                        names = [host.name for host in demo_hosts]
                        if not await wait_for_hosts(news, names, ready_timeout_s):
                            logger.warning("the proxy has not reached the emulator yet")
                print(_greeting(demo), flush=True)  # noqa: T201 - the demo's greeting is its output
                task_status.started(demo)
