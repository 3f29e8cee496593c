"""The `lmswitch` command: serve, demo, emulator, check-config.

Each command builds its server (or coroutine) in a function that tests call directly:
`build_server`, `build_emulator_server`, `run_demo`; `main` only parses and dispatches.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import math
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from types import FrameType
from typing import Any

import anyio
import httpx2
import uvicorn
from anyio.abc import TaskStatus
from uvicorn.server import HANDLED_SIGNALS

from proxy import __version__
from proxy.app import create_app
from proxy.config import ConfigError, Settings, describe_settings, load_settings
from proxy.events import EventBus

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_CANNOT_LISTEN = 3  # what uvicorn exits with when `serve` cannot bind its port

DEMO_ALIASES = {
    "gpt-4o-mini": "qwen2.5-7b-instruct",
    "text-embedding-3-small": "text-embedding-nomic-embed-text-v1.5",
}
DEMO_READY_TIMEOUT_S = 10.0

SignalHandler = Callable[[int, FrameType | None], None]
logger = logging.getLogger("lmswitch.cli")


@contextlib.contextmanager
def handling_signals(handler: SignalHandler) -> Iterator[None]:
    """Send SIGINT and SIGTERM (and SIGBREAK on Windows) to `handler` inside the block.

    The previous handlers come back on exit, and, unlike uvicorn, a captured signal is not
    raised again afterwards. Only the main thread can handle signals; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in HANDLED_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class Server(uvicorn.Server):
    """uvicorn's server, minus re-raising the signal after a graceful shutdown, plus a hook
    called as the shutdown begins.

    uvicorn re-raises a captured SIGTERM once drained, which kills the process with status 143;
    a drained proxy exits 0 instead.
    """

    def __init__(
        self, config: uvicorn.Config, *, on_shutdown: Callable[[], object] = lambda: None
    ) -> None:
        super().__init__(config)
        self._on_shutdown = on_shutdown

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with handling_signals(self.handle_exit):
            yield

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._on_shutdown()  # before the drain, which waits for every open response
        await super().shutdown(sockets=sockets)


class QuietServer(uvicorn.Server):
    """A server that leaves signals to its owner and says when it has started (the demo's two)."""

    def __init__(self, config: uvicorn.Config, *, on_started: Callable[[], object]) -> None:
        super().__init__(config)
        self._on_started = on_started

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self._on_started()  # uvicorn's startup either finishes started or raises SystemExit


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        message = record.getMessage()
        try:
            decoded = json.loads(message) if message.startswith("{") else None
        except ValueError:
            decoded = None
        if isinstance(decoded, dict):
            fields.update(decoded)  # access lines are already JSON objects
        else:
            fields["message"] = message
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        return json.dumps(fields)


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.logging.format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("lmswitch")
    root.handlers[:] = [handler]
    root.setLevel(settings.logging.level.upper())
    root.propagate = False


def _uvicorn_config(app: Any, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.server.host,
        port=settings.server.port,
        lifespan="on",  # a failed start-up exits instead of serving without state
        workers=1,  # the load lock and leases live in this process
        access_log=False,  # lmswitch writes its own access lines
        log_level=settings.logging.level,
        # Whole seconds (uvicorn's type), never shorter than configured, and at least 1 s.
        timeout_graceful_shutdown=max(1, math.ceil(settings.server.drain_timeout)),
        server_header=False,
    )


def _port(text: str) -> int:
    port = int(text)  # argparse turns the ValueError into a usage error
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (0 to 65535)")
    return port


def _concurrencies(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("concurrency must be at least 1")
    return values


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmswitch", description="An OpenAI-compatible model-switching proxy for LM Studio."
    )
    parser.add_argument("--version", action="version", version=f"lmswitch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help="config file (default: $LMSWITCH_CONFIG or ./config.yaml)")
    serve.add_argument("--host", help="address to bind (default: server.host)")
    serve.add_argument("--port", type=_port, help="port to bind (default: server.port)")

    demo = commands.add_parser("demo", help="the proxy and the LM Studio emulator, together")
    demo.add_argument("--port", type=_port, default=8000, help="the proxy's port (default 8000)")
    demo.add_argument("--load-delay", type=float, default=2.0, metavar="S")

    emulator = commands.add_parser("emulator", help="the LM Studio emulator alone")
    emulator.add_argument("--host", default="127.0.0.1")
    emulator.add_argument("--port", type=_port, default=1234)
    emulator.add_argument("--load-delay", type=float, default=1.0, metavar="S")
    emulator.add_argument("--memory", type=float, default=None, metavar="GiB")
    emulator.add_argument("--token-delay", type=float, default=0.02, metavar="S")
    emulator.add_argument("--no-jit", action="store_true", help="turn JIT loading off")
    emulator.add_argument("--api-token", help="require this Bearer token")
    emulator.add_argument("--reply-tokens", type=int, default=12, metavar="N")
    emulator.add_argument("--quiet", action="store_true", help="log warnings only")
    emulator.add_argument("--stamp-chunks", action="store_true", help=argparse.SUPPRESS)

    bench = commands.add_parser("bench", help="measure the proxy against the emulator")
    bench.add_argument("--duration", type=float, default=5.0, metavar="S", help="per measurement")
    bench.add_argument("--concurrency", type=_concurrencies, default=(1, 32), metavar="N[,N...]")
    bench.add_argument("--json", action="store_true", help="machine-readable output")
    bench.add_argument("--generator", choices=("auto", "wrk", "built-in"), default="auto")
    bench.add_argument(
        "--streams",
        type=int,
        default=0,
        metavar="N",
        help="instead: N concurrent slow streams (memory, CPU, added delay)",
    )
    bench.add_argument("--tokens-per-s", type=float, default=20.0, metavar="N")

    check = commands.add_parser("check-config", help="validate a config file and print it")
    check.add_argument("path", nargs="?", help="config file (default as for serve)")
    return parser


# --- serve ------------------------------------------------------------------------------------


def build_server(argv: Sequence[str]) -> Server:
    """The `serve` command's server for `argv` (its options), not yet started.

    Raises ConfigError on a bad config, including a bad `--host`/`--port` override.
    """
    return _proxy_server(_parser().parse_args(["serve", *argv]))


def _proxy_server(args: argparse.Namespace) -> Server:
    server = {
        name: value for name in ("host", "port") if (value := getattr(args, name)) is not None
    }
    # Command-line options go in as overrides: validated, and above environment and file.
    settings = load_settings(args.config, server=server)
    refuse_open_proxy(settings)
    configure_logging(settings)
    events = EventBus()  # closed as the shutdown begins: live event streams end, not drain
    app = create_app(settings, events=events)
    return Server(_uvicorn_config(app, settings), on_shutdown=events.close)


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def refuse_open_proxy(settings: Settings) -> None:
    """Refuse to serve on a non-loopback address with no client keys, unless told to."""
    auth, host = settings.auth, settings.server.host
    if _is_loopback_host(host) or auth.api_keys or auth.allow_unauthenticated:
        return
    raise ConfigError(
        f"server.host: {host!r} is reachable from other machines, and auth.api_keys is empty, "
        "so anyone who can reach it could use your models. Set auth.api_keys, or set "
        "auth.allow_unauthenticated: true if that is really what you want."
    )


# --- emulator ---------------------------------------------------------------------------------


def build_emulator_server(argv: Sequence[str]) -> Server:
    """The `emulator` command's server for `argv` (its options), not yet started."""
    return _emulator_server(_parser().parse_args(["emulator", *argv]))


def _emulator_server(args: argparse.Namespace) -> Server:
    from proxy.emulator import Emulator  # only this command and the demo need it

    memory = None if args.memory is None else int(args.memory * 2**30)
    emulator = Emulator(
        load_delay_s=args.load_delay,
        memory_bytes=memory,
        token_delay_s=args.token_delay,
        reply_tokens=args.reply_tokens,
        jit=not args.no_jit,
        api_token=args.api_token,
    )
    emulator.stamp_chunks = args.stamp_chunks
    config = uvicorn.Config(
        emulator.app,
        host=args.host,
        port=args.port,
        lifespan="off",
        log_level="warning" if args.quiet else "info",
        access_log=not args.quiet,
    )
    return Server(config)


# --- demo -------------------------------------------------------------------------------------


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
            _uvicorn_config(create_app(settings), settings), on_started=proxy_started.set
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


# --- the command ------------------------------------------------------------------------------


def _error(message: str) -> None:
    print(f"lmswitch: {message}", file=sys.stderr)  # noqa: T201 - the command's own error output


def main(argv: Sequence[str] | None = None) -> int:
    """The `lmswitch` command; returns the exit status (argparse exits 2 on bad usage itself)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            _proxy_server(args).run()
        elif args.command == "check-config":
            print(describe_settings(load_settings(args.path)), end="")  # noqa: T201 - its output
        elif args.command == "demo":
            anyio.run(partial(run_demo, args.port, args.load_delay))
        elif args.command == "bench":
            from proxy import bench  # not imported by `serve`

            return bench.run(
                bench.BenchOptions(
                    seconds=args.duration,
                    concurrencies=args.concurrency,
                    json=args.json,
                    generator=args.generator,
                    streams=args.streams,
                    tokens_per_s=args.tokens_per_s,
                )
            )
        else:
            _emulator_server(args).run()
    except ConfigError as exc:
        _error(f"invalid configuration:\n{exc}")
        return EXIT_USAGE
    except CannotListenError as exc:
        _error(str(exc))
        return EXIT_CANNOT_LISTEN
    return EXIT_OK
