"""The shared test helpers: running proxy, emulator, ports.

`serve` runs an ASGI app on a loopback port; `running` puts the emulator and the proxy behind
real sockets, and `pool_for` the proxy in front of a pool of hosts; `proxy_process` runs
`lmswitch serve` as a child process; `ScriptedLMStudio` stands in for LM Studio's client with no
sockets at all; `readme` and `readme_block` read README.md. Ports for servers started later come
from `proxy.server.free_port`.
"""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx2
import openai
import pytest
import uvicorn
from anyio.abc import Process
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import ASGIApp

from proxy.app import create_app
from proxy.config import Settings
from proxy.emulator import Emulator
from proxy.errors import ProxyError
from proxy.lmstudio import Loaded, ModelInfo
from proxy.server import configure_logging, free_port

QWEN = "qwen2.5-7b-instruct"
LLAMA = "llama-3.2-1b-instruct"
NOMIC = "text-embedding-nomic-embed-text-v1.5"
MESSAGES: list[Any] = [{"role": "user", "content": "Say hello"}]
README = Path(__file__).resolve().parent.parent / "README.md"

# --- LM Studio, scripted ---------------------------------------------------------------------


@dataclass
class Call:
    """One call a `ScriptedLMStudio` received."""

    name: str  # "catalog", "load" or "unload"
    target: str | None = None  # the model key loaded, or the instance id unloaded
    options: Mapping[str, Any] | None = None
    timeout_s: float | None = None


class ScriptedLMStudio:
    """LM Studio's client (`proxy.reconciler.LMStudioCalls`) with no network: models and their
    loaded instances are plain data, every call is recorded in `calls`, a call fails with the
    next error queued in `fail[name]`, and a load waits for `release_load` when `hold_loads`."""

    base_url = "http://lmstudio.scripted"

    def __init__(
        self, sizes: Mapping[str, int], loaded: Mapping[str, list[str]] | None = None
    ) -> None:
        self.sizes = dict(sizes)
        self.instances = {key: list(ids) for key, ids in (loaded or {}).items()}
        self.context_length = 4096
        self.calls: list[Call] = []
        self.fail: dict[str, list[ProxyError]] = {"catalog": [], "load": [], "unload": []}
        self.hold_loads = False
        self.release_load = anyio.Event()

    def _failure(self, name: str) -> None:
        if self.fail[name]:
            raise self.fail[name].pop(0)

    async def catalog(self) -> list[ModelInfo]:
        self.calls.append(Call("catalog"))
        self._failure("catalog")
        return [
            ModelInfo(
                key=key,
                type="embedding" if "embed" in key else "llm",
                size_bytes=size,
                max_context_length=32768,
                display_name=key.upper(),
                instances=tuple(self.instances.get(key, ())),
                context_length=self.context_length if self.instances.get(key) else None,
            )
            for key, size in self.sizes.items()
        ]

    async def load(
        self, key: str, options: Mapping[str, Any], *, timeout_s: float | None = None
    ) -> Loaded:
        self.calls.append(Call("load", key, dict(options), timeout_s))
        if self.hold_loads:
            await self.release_load.wait()
        self._failure("load")
        ids = self.instances.setdefault(key, [])
        instance = key if not ids else f"{key}:{len(ids) + 1}"
        ids.append(instance)
        context = options.get("context_length", self.context_length)
        return Loaded(instance, context if isinstance(context, int) else None)

    async def unload(self, instance_id: str) -> None:
        self.calls.append(Call("unload", instance_id))
        self._failure("unload")
        for ids in self.instances.values():
            if instance_id in ids:
                ids.remove(instance_id)

    def names(self) -> list[str]:
        """The calls made so far, by name."""
        return [call.name for call in self.calls]


# --- servers on loopback ---------------------------------------------------------------------


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


# --- the proxy in front of the emulator -------------------------------------------------------


@dataclass
class Proxy:
    url: str
    http: httpx2.AsyncClient
    sdk: openai.AsyncOpenAI

    async def status(self) -> dict[str, Any]:
        response = await self.http.get("/api/v1/status")
        assert response.status_code == 200
        result: dict[str, Any] = response.json()
        return result

    async def wait_ready(self) -> None:
        """Wait until the proxy has read LM Studio's models: `/readyz` is 200 (2 s at most)."""
        with anyio.fail_after(2):
            while (await self.http.get("/readyz")).status_code != 200:  # noqa: ASYNC110
                await anyio.sleep(0.01)

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool]) -> None:
        """Poll the status endpoint until `predicate` holds (2 s at most)."""
        with anyio.fail_after(2):
            while not predicate(await self.status()):  # noqa: ASYNC110 - state seen over HTTP
                await anyio.sleep(0.01)


def settings_for(upstream_url: str, **sections: Any) -> Settings:
    upstream = {"base_url": upstream_url, **sections.pop("upstream", {})}
    return Settings(upstream=upstream, **sections)


def pool_settings(urls: Mapping[str, str], **sections: Any) -> Settings:
    """A pool of LM Studio hosts (`upstreams`), by name and URL, in this order."""
    upstreams = [{"name": name, "base_url": url} for name, url in urls.items()]
    return Settings(upstreams=upstreams, **sections)


@asynccontextmanager
async def proxy_for(upstream_url: str, **sections: Any) -> AsyncIterator[Proxy]:
    async with _proxy(settings_for(upstream_url, **sections)) as proxy:
        yield proxy


@asynccontextmanager
async def pool_for(urls: Mapping[str, str], **sections: Any) -> AsyncIterator[Proxy]:
    """The proxy in front of a pool of hosts (`upstreams`: name -> URL, in this order)."""
    async with _proxy(pool_settings(urls, **sections)) as proxy:
        yield proxy


@asynccontextmanager
async def _proxy(settings: Settings) -> AsyncIterator[Proxy]:
    app = create_app(settings)
    async with (
        serve(app) as url,
        httpx2.AsyncClient(base_url=url, timeout=10) as http,
        openai.AsyncOpenAI(
            base_url=f"{url}/v1", api_key="sk-test", timeout=10, max_retries=0
        ) as sdk,
    ):
        yield Proxy(url, http, sdk)


@asynccontextmanager
async def pool(emulators: Mapping[str, Emulator], **sections: Any) -> AsyncIterator[Proxy]:
    """Each emulator on its own port, as the host of its name, and the proxy in front of them
    all, once it has read every host."""
    async with AsyncExitStack() as stack:
        urls = {
            name: await stack.enter_async_context(serve(emulator.app))
            for name, emulator in emulators.items()
        }
        proxy = await stack.enter_async_context(pool_for(urls, **sections))
        await proxy.wait_for(lambda status: all(host["up"] for host in status["upstreams"]))
        yield proxy


@asynccontextmanager
async def running(emulator: Emulator, **sections: Any) -> AsyncIterator[Proxy]:
    """The emulator and the proxy in front of it, each on its own loopback port."""
    async with serve(emulator.app) as upstream_url, proxy_for(upstream_url, **sections) as proxy:
        yield proxy


# --- `lmswitch serve` in a child process ------------------------------------------------------

START_TIMEOUT_S = 15.0  # a cold interpreter importing the proxy, then its first look upstream


@dataclass
class ProxyProcess:
    """`python -m proxy serve` running in a child process, and what it wrote to stderr."""

    process: Process
    port: int
    output: bytearray = field(default_factory=bytearray)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.output.decode(errors="replace")

    async def exit_code(self, timeout_s: float) -> int:
        """Wait for the process to exit (`timeout_s` at most) and return its status."""
        with anyio.fail_after(timeout_s):
            return await self.process.wait()


async def _drain(stream: Any, into: bytearray) -> None:
    async for chunk in stream:
        into += chunk


async def _wait_ready(proxy: ProxyProcess) -> None:
    """Poll `/readyz` until the proxy has seen LM Studio; fail early if the process dies."""
    async with httpx2.AsyncClient(base_url=proxy.url, timeout=2) as http:
        with anyio.fail_after(START_TIMEOUT_S):
            while True:
                if proxy.process.returncode is not None:
                    pytest.fail(f"lmswitch serve exited early:\n{proxy.log()}")
                try:
                    if (await http.get("/readyz")).status_code == 200:
                        return
                except httpx2.TransportError:  # not listening yet
                    pass
                await anyio.sleep(0.05)


@asynccontextmanager
async def proxy_process(
    tmp_path: Path, upstream_url: str, **server: object
) -> AsyncIterator[ProxyProcess]:
    """`lmswitch serve` with `server.*` settings in front of `upstream_url`, once ready.

    Killed on the way out if a test left it running.
    """
    lines = ["server:", *(f"  {key}: {value}" for key, value in server.items())]
    lines += ["upstream:", f"  base_url: {upstream_url}", "  poll_interval: 60s"]
    config = tmp_path / "config.yaml"
    config.write_text("\n".join(lines) + "\n")
    port = free_port()
    command = [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--port", str(port)]
    process = await anyio.open_process(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, cwd=tmp_path
    )
    proxy = ProxyProcess(process, port)
    async with process, anyio.create_task_group() as tg:
        tg.start_soon(_drain, process.stderr, proxy.output)  # ends when the process does
        try:
            await _wait_ready(proxy)
            yield proxy
        finally:
            with anyio.move_on_after(5, shield=True):
                if process.returncode is None:
                    process.kill()
                await process.wait()


# --- README.md ---------------------------------------------------------------------------------


def readme() -> str:
    return README.read_text(encoding="utf-8")


def readme_block(name: str) -> str:
    """The code block after `<!-- example: name -->` in the README."""
    match = re.search(rf"<!-- example: {name} -->\n```\w*\n(.*?)```", readme(), re.DOTALL)
    assert match is not None, f"no example {name!r} in README.md"
    return match[1]


# --- logs and metrics as `lmswitch serve` writes them ----------------------------------------

_LOGFMT = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


class Captured:
    """What the `lmswitch` logger wrote (through `configure_logging`'s handler) and its records."""

    def __init__(self, stream: io.StringIO) -> None:
        self._stream = stream
        self.records: list[logging.LogRecord] = []

    @property
    def lines(self) -> list[str]:
        return self._stream.getvalue().splitlines()


class _Keep(logging.Handler):
    def __init__(self, into: list[logging.LogRecord]) -> None:
        super().__init__(logging.NOTSET)
        self._into = into

    def emit(self, record: logging.LogRecord) -> None:
        self._into.append(record)


@contextmanager
def logging_as_serve_does(**sections: Any) -> Iterator[Captured]:
    """`configure_logging` for these settings, its handler writing to a string; restored after."""
    root = logging.getLogger("lmswitch")
    saved = (root.handlers[:], root.level, root.propagate)
    configure_logging(settings_for("http://unused", **sections))
    (handler,) = root.handlers
    assert isinstance(handler, logging.StreamHandler)
    stream = io.StringIO()
    handler.setStream(stream)
    captured = Captured(stream)
    root.addHandler(_Keep(captured.records))
    try:
        yield captured
    finally:
        root.handlers[:], root.level, root.propagate = saved


def logfmt(line: str) -> list[tuple[str, str]]:
    """`key=value` pairs in order; a quoted value is a JSON string."""
    return [
        (key, json.loads(value) if value.startswith('"') else value)
        for key, value in _LOGFMT.findall(line)
    ]


def text_access_lines(captured: Captured) -> list[dict[str, str]]:
    lines = [line for line in captured.lines if " lmswitch.access: " in line]
    parsed = []
    for line in lines:
        pairs = logfmt(line.split(" lmswitch.access: ", 1)[1])
        keys = [key for key, _ in pairs]
        assert len(keys) == len(set(keys)), f"a field appears twice: {line}"
        parsed.append(dict(pairs))
    return parsed


def json_access_lines(captured: Captured) -> list[dict[str, Any]]:
    objects = []
    for line in captured.lines:
        obj = json.loads(line)  # every line the handler writes is one JSON object
        assert isinstance(obj, dict), line
        objects.append(obj)
    return [obj for obj in objects if obj["logger"] == "lmswitch.access"]


Labels = frozenset[tuple[str, str]]


class Exposition:
    """The `/metrics` text, parsed: sample name -> labels -> value, and family name -> type."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self.samples: dict[str, dict[Labels, float]] = {}
        for family in text_string_to_metric_families(text):
            # The parser strips a counter's `_total`; the exposed name is what users query.
            name = family.name + "_total" if family.type == "counter" else family.name
            self.types[name] = family.type
            for sample in family.samples:
                labels = frozenset(sample.labels.items())
                self.samples.setdefault(sample.name, {})[labels] = sample.value

    def series(self, name: str) -> dict[tuple[str, ...], float]:
        """The samples of `name`, keyed by their label values in sorted label-name order."""
        return {
            tuple(value for _, value in sorted(labels)): value
            for labels, value in self.samples.get(name, {}).items()
        }

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get(name, {}).get(frozenset(labels.items()))

    def model_labels(self) -> set[str]:
        return {
            value
            for by_labels in self.samples.values()
            for labels in by_labels
            for key, value in labels
            if key == "model"
        }


async def scrape(http: httpx2.AsyncClient) -> Exposition:
    response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return Exposition(response.text)
