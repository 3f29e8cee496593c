"""The `lmswitch` command: serve, demo, emulator, check-config.

Each command builds its server (or coroutine) in a function that tests call directly:
`build_server`, `build_emulator_server`, `proxy.demo.run_demo`; `main` only parses and
dispatches. The servers themselves and the logging set-up are in `proxy.server`.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from collections.abc import Sequence
from functools import partial

import anyio
import uvicorn

from proxy import __version__
from proxy.app import create_app
from proxy.config import ConfigError, Settings, describe_settings, load_settings
from proxy.demo import MAX_DEMO_HOSTS, run_demo
from proxy.events import EventBus
from proxy.server import CannotListenError, Server, configure_logging, listen, uvicorn_config

EXIT_OK = 0
EXIT_USAGE = 2  # also a port in use, or an address not this machine's


def _port(text: str) -> int:
    port = int(text)  # argparse turns the ValueError into a usage error
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (0 to 65535)")
    return port


def _demo_hosts(text: str) -> int:
    hosts = int(text)  # argparse turns the ValueError into a usage error
    if not 1 <= hosts <= MAX_DEMO_HOSTS:
        raise argparse.ArgumentTypeError(f"{hosts} is out of range (1 to {MAX_DEMO_HOSTS})")
    return hosts


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
    demo.add_argument(
        "--hosts",
        type=_demo_hosts,
        default=1,
        metavar="N",
        help=f"N emulated LM Studio hosts of different sizes (1 to {MAX_DEMO_HOSTS}; default 1)",
    )

    emulator = commands.add_parser("emulator", help="the LM Studio emulator alone")
    emulator.add_argument("--host", default="127.0.0.1")
    emulator.add_argument("--port", type=_port, default=1234)
    emulator.add_argument("--load-delay", type=float, default=1.0, metavar="S")
    emulator.add_argument(
        "--load-speed", type=float, default=None, metavar="GB/s", help="loads also take size / this"
    )
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
    return Server(uvicorn_config(app, settings), on_shutdown=events.close)


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
        load_bytes_per_s=None if args.load_speed is None else args.load_speed * 1e9,
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


# --- the command ------------------------------------------------------------------------------


def _run(server: Server) -> None:
    """Bind the server's address first (a port in use is one line, before anything starts),
    then serve until stopped."""
    server.run_on(listen(server.config.host, server.config.port))


def _error(message: str) -> None:
    print(f"lmswitch: {message}", file=sys.stderr)  # noqa: T201 - the command's own error output


def main(argv: Sequence[str] | None = None) -> int:
    """The `lmswitch` command; returns the exit status (argparse exits 2 on bad usage itself)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            _run(_proxy_server(args))
        elif args.command == "check-config":
            print(describe_settings(load_settings(args.path)), end="")  # noqa: T201 - its output
        elif args.command == "demo":
            anyio.run(partial(run_demo, args.port, args.load_delay, hosts=args.hosts))
        elif args.command == "bench":
            from proxy.bench import runner  # not imported by `serve`

            return runner.run(
                runner.BenchOptions(
                    seconds=args.duration,
                    concurrencies=args.concurrency,
                    json=args.json,
                    generator=args.generator,
                    streams=args.streams,
                    tokens_per_s=args.tokens_per_s,
                )
            )
        else:
            _run(_emulator_server(args))
    except ConfigError as exc:
        _error(f"invalid configuration:\n{exc}")
        return EXIT_USAGE
    except CannotListenError as exc:
        _error(str(exc))
        return EXIT_USAGE
    return EXIT_OK
