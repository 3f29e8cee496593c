"""The `lmswitch` command: serve, demo, emulator, bench, simulate, check-config, keys.

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
from typing import TypeVar

import anyio
import uvicorn
import yaml
from pydantic import TypeAdapter, ValidationError

from proxy import __version__
from proxy.app import create_app
from proxy.config import (
    CONFIG_ENV_VAR,
    DEFAULT_CONFIG_FILE,
    ConfigError,
    ServerSettings,
    Settings,
    describe_settings,
    load_settings,
)
from proxy.demo import MAX_DEMO_HOSTS, run_demo
from proxy.events import EventBus
from proxy.keys import EVERY_MODEL, check_name, digest, new_key
from proxy.server import CannotListenError, Server, configure_logging, listen, uvicorn_config
from proxy.units import ByteSize, Seconds

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


def _parts(text: str) -> list[str]:
    parts = [part.strip() for part in text.split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"not a comma-separated list: {text!r}")
    return parts


_T = TypeVar("_T")
_SIZE: TypeAdapter[int] = TypeAdapter(ByteSize)
_DURATION: TypeAdapter[float] = TypeAdapter(Seconds)


def _validated(adapter: TypeAdapter[_T], part: str) -> _T:
    try:
        return adapter.validate_python(part)
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(exc.errors()[0]["msg"]) from None


def _budgets(text: str) -> tuple[int | None, ...]:
    parts = _parts(text)
    return tuple(None if p.lower() == "none" else _validated(_SIZE, p) for p in parts)


def _durations(text: str) -> tuple[float, ...]:
    return tuple(_validated(_DURATION, part) for part in _parts(text))


def _counts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in _parts(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of whole numbers: {text!r}") from None
    if min(values) < 0:
        raise argparse.ArgumentTypeError("max_loaded must be 0 (no limit) or more")
    return values


def _evictions(text: str) -> tuple[str, ...]:
    parts = tuple(part.lower() for part in _parts(text))
    if bad := [p for p in parts if p not in ("lru", "cost")]:
        raise argparse.ArgumentTypeError(f"unknown policy {bad[0]!r} (lru or cost)")
    return parts


class _Help(argparse.HelpFormatter):
    """Every option's help ends with its default: said in the help itself (`default: ...`),
    or added from the option's value (a list as `1,32`)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default in (None, False, argparse.SUPPRESS):
            return text  # flags and options with no value say theirs in their help
        return f"{text} (default: {_shown(default).replace('%', '%%')})"


def _shown(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(map(_shown, value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    summary: str,
    about: str,
) -> argparse.ArgumentParser:
    return commands.add_parser(name, help=summary, description=about, formatter_class=_Help)


_CONFIG_FILE = f"${CONFIG_ENV_VAR}, else ./{DEFAULT_CONFIG_FILE} if there is one, else none"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmswitch",
        description="An OpenAI-compatible proxy in front of LM Studio that loads the model each "
        "request names, one load at a time.",
        epilog="`lmswitch COMMAND --help` describes a command and its options.",
    )
    parser.add_argument("--version", action="version", version=f"lmswitch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = _command(
        commands,
        "serve",
        "run the proxy",
        "Run the proxy. Its settings come from the config file, then LMSWITCH_* environment "
        "variables, then these options (each overriding the one before); "
        "`lmswitch check-config` shows the result.",
    )
    server = ServerSettings()
    serve.add_argument("--config", metavar="PATH", help=f"config file (default: {_CONFIG_FILE})")
    serve.add_argument("--host", help=f"address to listen on (default: server.host, {server.host})")
    serve.add_argument(
        "--port", type=_port, help=f"port to listen on (default: server.port, {server.port})"
    )

    demo = _command(
        commands,
        "demo",
        "the proxy and the LM Studio emulator, together",
        "Run the proxy in front of the built-in LM Studio emulator, in one process on "
        "127.0.0.1, to watch it switch models with nothing else installed. It prints the "
        "URLs and curl lines to try; Ctrl+C stops it.",
    )
    demo.add_argument("--port", type=_port, default=8000, help="the proxy's port; 0: any free one")
    demo.add_argument(
        "--load-delay",
        type=float,
        default=2.0,
        metavar="S",
        help="seconds each emulated load takes, plus the model's size at 4 GB/s",
    )
    demo.add_argument(
        "--hosts",
        type=_demo_hosts,
        default=1,
        metavar="N",
        help=f"N emulated LM Studio hosts of different sizes, as a pool (1 to {MAX_DEMO_HOSTS})",
    )

    emulator = _command(
        commands,
        "emulator",
        "the LM Studio emulator alone",
        "Run the LM Studio emulator alone: LM Studio's /v1, /api/v0 and /api/v1 APIs with six "
        "models of realistic sizes, JIT loading, TTLs and the memory guardrail, for trying the "
        "proxy, tests and benchmarks.",
    )
    emulator.add_argument("--host", default="127.0.0.1", help="address to listen on")
    emulator.add_argument(
        "--port", type=_port, default=1234, help="port to listen on (LM Studio's own)"
    )
    emulator.add_argument(
        "--load-delay", type=float, default=1.0, metavar="S", help="seconds each load takes"
    )
    emulator.add_argument(
        "--load-speed",
        type=float,
        default=None,
        metavar="GB/s",
        help="loads also take the model's size over this, as reading it from disk "
        "(default: none, the delay alone)",
    )
    emulator.add_argument(
        "--memory",
        type=float,
        default=None,
        metavar="GiB",
        help="the guardrail: refuse a load that would not fit in this much memory "
        "(default: none, no limit)",
    )
    emulator.add_argument(
        "--token-delay",
        type=float,
        default=0.02,
        metavar="S",
        help="seconds between streamed tokens",
    )
    emulator.add_argument(
        "--no-jit",
        action="store_true",
        help="answer requests for models that are not loaded with LM Studio's error "
        "(default: JIT loading on)",
    )
    emulator.add_argument(
        "--api-token",
        metavar="T",
        help="require `Authorization: Bearer T`, as LM Studio's Require Authentication does "
        "(default: none)",
    )
    emulator.add_argument(
        "--reply-tokens",
        type=int,
        default=12,
        metavar="N",
        help="tokens per reply, fewer when the request's limit says so",
    )
    emulator.add_argument(
        "--quiet",
        action="store_true",
        help="log warnings only (default: off, a line per request too)",
    )
    emulator.add_argument("--stamp-chunks", action="store_true", help=argparse.SUPPRESS)

    bench = _command(
        commands,
        "bench",
        "measure the proxy against the emulator",
        "Measure what the proxy adds: start the emulator and the proxy in front of it, each in "
        "its own process, drive both with the same load, and print requests per second, "
        "latency, and the proxy's CPU time per request.",
    )
    bench.add_argument(
        "--duration", type=float, default=5.0, metavar="S", help="seconds per measurement"
    )
    bench.add_argument(
        "--concurrency",
        type=_concurrencies,
        default=(1, 32),
        metavar="N[,N...]",
        help="concurrent clients: one measurement for each",
    )
    bench.add_argument(
        "--json", action="store_true", help="print the results as JSON (default: off, a table)"
    )
    bench.add_argument(
        "--generator",
        choices=("auto", "wrk", "built-in"),
        default="auto",
        help="the load generator; auto: wrk if it is on the PATH, else the built-in one",
    )
    bench.add_argument(
        "--streams",
        type=int,
        default=0,
        metavar="N",
        help="measure N concurrent slow streams instead (memory, CPU, added delay) "
        "(default: 0, off)",
    )
    bench.add_argument(
        "--tokens-per-s",
        type=float,
        default=20.0,
        metavar="N",
        help="with --streams: each stream's pace, in tokens per second",
    )

    bench.add_argument(
        "--keys",
        type=int,
        default=0,
        metavar="N",
        help="give the proxy N named keys (auth.keys, by their SHA-256) and send the last "
        "of them with every request, to measure the check of a key (default: 0, no keys)",
    )

    bench.add_argument(
        "--endpoint",
        choices=("openai", "ollama"),
        default="openai",
        help="the API the proxied load speaks: openai (/v1/chat/completions) or ollama "
        "(/api/chat, the same chat translated; the direct load stays OpenAI's)",
    )
    _simulate_parser(commands)

    check = _command(
        commands,
        "check-config",
        "validate a config file and print it",
        "Validate a config file, with the LMSWITCH_* environment variables, and print the "
        "settings serve would use, secrets masked. An invalid one exits 2 naming each bad key.",
    )
    check.add_argument("path", nargs="?", help=f"config file (default: {_CONFIG_FILE})")

    keys = _command(
        commands,
        "keys",
        "make named keys for auth.keys",
        "Make named keys for auth.keys: `lmswitch keys new NAME` prints a fresh random key, "
        "for the client alone, and the config lines that accept it (its SHA-256, so that the "
        "config file holds no secret).",
    )
    keys_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="KEYS_COMMAND")
    new = _command(
        keys_commands,
        "new",
        "a fresh key and its config lines",
        "Print a fresh random key (256 bits, shown only this once: lmswitch keeps only its "
        "SHA-256) and, as YAML, the config lines for it to add to auth.keys in config.yaml.",
    )
    new.add_argument(
        "name",
        type=_key_name,
        metavar="NAME",
        help="the key's name in logs, metrics and usage: 1 to 32 of a-z, 0-9, _ and -, unique",
    )
    new.add_argument(
        "--models",
        type=_patterns,
        default=EVERY_MODEL,
        metavar="PATTERN[,PATTERN...]",
        help="glob patterns of the models the key may use, over model keys and aliases",
    )
    new.add_argument(
        "--priority",
        type=int,
        default=0,
        metavar="N",
        help="higher is served first when models are contended (default: 0)",
    )
    new.add_argument(
        "--admin",
        action="store_true",
        help="the key may also use /api/v1/* and the page (default: off, /v1/* only)",
    )
    return parser


_TRACE_FORMAT = """\
A trace is JSON lines. The first is the header:
  {"models": {"KEY": {"size_bytes": N, "load_s": S, "unload_s": S}, ...},
   "loaded": ["KEY", ...], "source": "..."}        (loaded, source: optional)
then one line per request, in the order they are sent:
  {"t": S, "model": "KEY", "service_s": S, "stream": BOOL, "client": "ip:port"}
t: seconds from the start; service_s: how long it holds its model once granted.
A request with "after": S instead is closed-loop: it is sent S seconds after the
previous request of the same client is answered (so waiting delays it, as it
would a real client). See docs/design.md section 7."""


def _simulate_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    simulate = commands.add_parser(
        "simulate",
        help="replay a trace of requests through the scheduler",
        description="Replay a trace of requests through lmswitch's own scheduler in virtual "
        "time (seconds for hours of traffic), once per combination of the settings given, and "
        "print per run: loads, seconds spent loading, the share of requests that waited on a "
        "load, wait p50/p95/max, swaps per hour and total time. The trace is a file, the "
        "proxy's own JSON log (--from-log), or generated (--generate).",
        epilog=_TRACE_FORMAT,
        formatter_class=lambda prog: _Help(prog, max_help_position=32),
    )
    simulate.add_argument("trace", nargs="?", metavar="TRACE", help="a trace file (JSON lines)")
    source = simulate.add_mutually_exclusive_group()
    source.add_argument(
        "--from-log",
        metavar="FILE",
        help="make the trace from the proxy's JSON log (logging.format: json): its access "
        "lines and model loads (default: none)",
    )
    source.add_argument(
        "--generate",
        choices=("alternating", "zipf", "sessions", "agentic"),
        metavar="KIND",
        help="a synthetic trace: alternating, zipf, sessions or agentic (default: none)",
    )
    simulate.add_argument(
        "--seed", type=int, default=1, metavar="N", help="with --generate: the random seed"
    )
    simulate.add_argument(
        "--duration",
        type=lambda text: _durations(text)[0],
        default=4 * 3600.0,
        metavar="DUR",
        help="with --generate: how much traffic, e.g. 4h (default: 4h)",
    )
    simulate.add_argument(
        "--requests",
        type=int,
        default=None,
        metavar="N",
        help="with --generate: N requests instead of --duration (default: none)",
    )
    simulate.add_argument(
        "--policy",
        type=_evictions,
        default=("lru", "cost"),
        metavar="P[,P...]",
        help="eviction policies (models.eviction): lru, cost",
    )
    simulate.add_argument(
        "--memory-budget",
        type=_budgets,
        default=(None,),
        metavar="SIZE[,SIZE...]",
        help="memory budgets, e.g. 24GiB,48GiB; none: no limit (default: none)",
    )
    simulate.add_argument(
        "--max-loaded",
        type=_counts,
        default=(1,),
        metavar="N[,N...]",
        help="models loaded at once; 0: no count limit",
    )
    simulate.add_argument(
        "--swap-grace",
        type=_durations,
        default=(10.0,),
        metavar="DUR[,DUR...]",
        help="scheduler.swap_grace values, e.g. 5s,10s (default: 10s)",
    )
    simulate.add_argument(
        "--json", action="store_true", help="print the runs as JSON (default: off, a table)"
    )
    simulate.add_argument(
        "--html",
        metavar="OUT",
        help="also write a self-contained page: the table and each run's timeline of loaded "
        "models and queue length (default: none)",
    )
    simulate.add_argument(
        "--write-trace",
        metavar="OUT",
        help="also write the trace read, converted or generated, as JSON lines (default: none)",
    )


def _simulate(args: argparse.Namespace) -> int:
    from proxy.simulate import run  # not imported by `serve`

    if args.trace is not None and (args.from_log or args.generate):
        _error("simulate: give a TRACE file, --from-log or --generate, not two of them")
        return EXIT_USAGE
    return run.run(
        run.SimulateOptions(
            trace=args.trace,
            from_log=args.from_log,
            generate=args.generate,
            seed=args.seed,
            duration_s=args.duration,
            requests=args.requests,
            policies=args.policy,
            memory_budgets=args.memory_budget,
            max_loaded=args.max_loaded,
            swap_graces=args.swap_grace,
            json=args.json,
            html=args.html,
            write_trace=args.write_trace,
        )
    )


def _key_name(text: str) -> str:
    if (problem := check_name(text)) is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def _patterns(text: str) -> tuple[str, ...]:
    patterns = tuple(part.strip() for part in text.split(","))
    if not all(patterns):
        raise argparse.ArgumentTypeError(f"an empty pattern in {text!r}")
    return patterns


# --- keys -------------------------------------------------------------------------------------


def new_key_lines(
    name: str, key: str, *, models: Sequence[str] = EVERY_MODEL, priority: int = 0, admin: bool
) -> str:
    """What `lmswitch keys new` prints for `key`: the key in a comment, then the config lines
    that accept it, as YAML (a file of them alone is a valid config)."""
    entry = {
        "name": name,
        "key_sha256": digest(key).hex(),
        "models": list(models),
        "priority": priority,
        "admin": admin,
    }
    lines = yaml.safe_dump({"auth": {"keys": [entry]}}, sort_keys=False, default_flow_style=None)
    return (
        f"# The key for {name}: give it to its client. It is shown only this once; the config\n"
        "# below holds only its SHA-256.\n"
        "#\n"
        f"#     {key}\n"
        "#\n"
        "# For config.yaml: add the entry to the list auth.keys.\n"
        f"{lines}"
    )


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
    if _is_loopback_host(host) or auth.requires_client_key() or auth.allow_unauthenticated:
        return
    raise ConfigError(
        f"server.host: {host!r} is reachable from other machines, and auth.api_keys and "
        "auth.keys are empty, so anyone who can reach it could use your models. Set "
        "auth.api_keys or auth.keys, or set "
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
        elif args.command == "keys":
            key = new_key()
            lines = new_key_lines(
                args.name, key, models=args.models, priority=args.priority, admin=args.admin
            )
            print(lines, end="")  # noqa: T201 - the command's output
        elif args.command == "simulate":
            return _simulate(args)
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
                    keys=args.keys,
                    endpoint=args.endpoint,
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
