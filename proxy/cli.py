"""The `lmswitch` command: serve, demo, emulator, check-config."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import socket
import sys
from collections.abc import Generator, Sequence
from typing import Any

import anyio
import uvicorn
from uvicorn.server import HANDLED_SIGNALS

from proxy import __version__
from proxy.app import create_app
from proxy.config import ConfigError, Settings, describe_settings, load_settings
from proxy.emulator import Emulator

EXIT_USAGE = 2

DEMO_ALIASES = {
    "gpt-4o-mini": "qwen2.5-7b-instruct",
    "text-embedding-3-small": "text-embedding-nomic-embed-text-v1.5",
}


class Server(uvicorn.Server):
    """uvicorn's server, minus re-raising the signal after a graceful shutdown.

    uvicorn re-raises a captured SIGTERM once drained, which kills the process with status 143;
    a drained proxy exits 0 instead.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        with contextlib.ExitStack() as stack:
            with contextlib.suppress(ValueError):  # not the main thread: no signals here
                for sig in HANDLED_SIGNALS:
                    previous = signal.signal(sig, self.handle_exit)
                    stack.callback(signal.signal, sig, previous)
            yield


class QuietServer(uvicorn.Server):
    """A server that leaves signals to another (the demo's emulator beside the proxy)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


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


def _uvicorn_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.server.host,
        port=settings.server.port,
        lifespan="on",  # a failed start-up exits instead of serving without state
        workers=1,  # the load lock and leases live in this process
        access_log=False,  # lmswitch writes its own access lines
        log_level=settings.logging.level,
        timeout_graceful_shutdown=max(1, round(settings.server.drain_timeout)),
        server_header=False,
        **overrides,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmswitch", description="An OpenAI-compatible model-switching proxy for LM Studio."
    )
    parser.add_argument("--version", action="version", version=f"lmswitch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help="config file (default: $LMSWITCH_CONFIG or ./config.yaml)")
    serve.add_argument("--host", help="address to bind (default: server.host)")
    serve.add_argument("--port", type=int, help="port to bind (default: server.port)")

    demo = commands.add_parser("demo", help="the proxy and the LM Studio emulator, together")
    demo.add_argument("--port", type=int, default=8000, help="the proxy's port (default 8000)")
    demo.add_argument("--load-delay", type=float, default=2.0, metavar="S")

    emulator = commands.add_parser("emulator", help="the LM Studio emulator alone")
    emulator.add_argument("--host", default="127.0.0.1")
    emulator.add_argument("--port", type=int, default=1234)
    emulator.add_argument("--load-delay", type=float, default=1.0, metavar="S")
    emulator.add_argument("--memory", type=float, default=None, metavar="GiB")
    emulator.add_argument("--token-delay", type=float, default=0.02, metavar="S")
    emulator.add_argument("--no-jit", action="store_true", help="turn JIT loading off")
    emulator.add_argument("--api-token", help="require this Bearer token")

    check = commands.add_parser("check-config", help="validate a config file and print it")
    check.add_argument("path", nargs="?", help="config file (default as for serve)")
    return parser


def build_server(argv: Sequence[str]) -> Server:
    """The `serve` command's server, not yet started (raises ConfigError on a bad config)."""
    args = _parser().parse_args(["serve", *argv])
    server: dict[str, Any] = {}
    if args.host is not None:
        server["host"] = args.host
    if args.port is not None:
        server["port"] = args.port
    settings = load_settings(args.config)
    if server:
        settings = settings.model_copy(update={"server": settings.server.model_copy(update=server)})
    configure_logging(settings)
    return Server(_uvicorn_config(create_app(settings), settings))


def _demo(port: int, load_delay_s: float) -> int:
    emulator = Emulator(load_delay_s=load_delay_s, token_delay_s=0.05, reply_tokens=24)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    upstream_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    settings = Settings(
        upstream={"base_url": upstream_url, "poll_interval": 5},
        models={"max_loaded": 1, "aliases": DEMO_ALIASES, "default": "qwen2.5-7b-instruct"},
        scheduler={"swap_grace": 5},
        server={"port": port, "drain_timeout": 3},
    )
    configure_logging(settings)
    upstream_server = QuietServer(
        uvicorn.Config(emulator.app, log_level="warning", lifespan="off", access_log=False)
    )
    proxy_server = Server(_uvicorn_config(create_app(settings), settings))
    base = f"http://127.0.0.1:{port}"
    models = ", ".join(m.key for m in emulator.catalog.values())
    print(  # noqa: T201 - the demo's greeting is its output
        f"""
lmswitch demo: the proxy at {base}/v1, in front of an LM Studio emulator at {upstream_url}
  models:   {models}
  aliases:  {", ".join(f"{a} -> {t}" for a, t in DEMO_ALIASES.items())}
  status:   {base}/api/v1/status    metrics: {base}/metrics

Ask two models in turn and watch the proxy swap them (one model fits at a time):
  curl {base}/v1/chat/completions -H 'content-type: application/json' \\
    -d '{{"model": "qwen2.5-7b-instruct", "messages": [{{"role": "user", "content": "Hi"}}]}}'
  curl {base}/v1/chat/completions -H 'content-type: application/json' \\
    -d '{{"model": "llama-3.2-1b-instruct", "messages": [{{"role": "user", "content": "Hi"}}]}}'
Press Ctrl+C to stop.
""",
        flush=True,
    )

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(upstream_server.serve, [sock])
            await proxy_server.serve()
            upstream_server.should_exit = True

    anyio.run(main)
    return 0


def _emulator(args: argparse.Namespace) -> int:
    memory = None if args.memory is None else int(args.memory * 2**30)
    emulator = Emulator(
        load_delay_s=args.load_delay,
        memory_bytes=memory,
        token_delay_s=args.token_delay,
        jit=not args.no_jit,
        api_token=args.api_token,
    )
    server = Server(
        uvicorn.Config(
            emulator.app, host=args.host, port=args.port, lifespan="off", log_level="info"
        )
    )
    server.run()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            argv = list(sys.argv[2:] if argv is None else argv[1:])
            build_server(argv).run()
            return 0
        if args.command == "check-config":
            print(describe_settings(load_settings(args.path)), end="")  # noqa: T201 - its output
            return 0
    except ConfigError as exc:
        print(f"lmswitch: invalid configuration:\n{exc}", file=sys.stderr)  # noqa: T201
        return EXIT_USAGE
    if args.command == "demo":
        return _demo(args.port, args.load_delay)
    return _emulator(args)
