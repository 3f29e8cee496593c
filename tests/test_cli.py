"""The `lmswitch` command: every subcommand in-process, plus real processes for signals."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx2
import openai
import pytest
import uvicorn
import yaml
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from proxy import __version__
from proxy.access import AccessLine
from proxy.app import create_app
from proxy.cli import EXIT_USAGE, build_emulator_server, build_server, main
from proxy.config import MASK, ConfigError, load_settings
from proxy.demo import (
    DEMO_HOSTS,
    GIB,
    MAX_DEMO_HOSTS,
    Demo,
    DemoHost,
    fits_table,
    run_demo,
    wait_for_hosts,
)
from proxy.emulator import Emulator
from proxy.events import EventBus
from proxy.server import (
    CannotListenError,
    Server,
    _JsonFormatter,
    free_port,
    handling_signals,
    listen,
)
from tests.helpers import serve

QWEN = "qwen2.5-7b-instruct"
LLAMA = "llama-3.2-1b-instruct"
QWEN_14B = "qwen2.5-14b-instruct"  # on both hosts of `demo --hosts 2`, fits only the desk's memory
GEMMA = "google/gemma-3-4b"  # only on the laptop
GPT_OSS = "openai/gpt-oss-20b"  # only on the desk
MESSAGES: list[Any] = [{"role": "user", "content": "Hi"}]
CHAT = {"model": "gpt-4o-mini", "messages": MESSAGES}
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """The commands configure the `lmswitch` logger; give other tests back the one they had."""
    logger = logging.getLogger("lmswitch")
    handlers, level, propagate = logger.handlers[:], logger.level, logger.propagate
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


def closed_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def readyz_app(not_ready: int) -> Starlette:
    """/readyz answers 503 `not_ready` times, then 200."""
    answers: list[int] = []

    async def readyz(request: Request) -> JSONResponse:
        answers.append(200 if len(answers) >= not_ready else 503)
        return JSONResponse({}, answers[-1])

    return Starlette(routes=[Route("/readyz", readyz)])


@pytest.fixture
def interrupt_when_up() -> Iterator[Callable[[str], None]]:
    """Start a thread that sends this process SIGINT, as Ctrl+C would, once a URL answers.

    Tests run a blocking command after it, in the main thread, where the command handles the
    signal. If the URL never answers, the thread fails and sends nothing.
    """
    threads: list[threading.Thread] = []

    async def interrupt(url: str) -> None:
        await wait_until_up(url)
        signal.raise_signal(signal.SIGINT)

    def start(url: str) -> None:
        threads.append(threading.Thread(target=anyio.run, args=(interrupt, url), daemon=True))
        threads[-1].start()

    yield start
    for thread in threads:
        thread.join(5)


async def wait_until_up(url: str) -> None:
    """Poll `url` until it answers at all (15 s at most)."""
    async with httpx2.AsyncClient(timeout=1) as http:
        with anyio.fail_after(15):
            while True:
                try:
                    await http.get(url)
                except httpx2.TransportError:
                    await anyio.sleep(0.02)
                else:
                    return


@asynccontextmanager
async def child(args: list[str], stderr_path: Path) -> AsyncIterator[Process]:
    """`python -m proxy ARGS` as a child process, killed on the way out if still running."""
    command = [sys.executable, "-m", "proxy", *args]
    with stderr_path.open("wb") as stderr:
        async with await anyio.open_process(command, cwd=ROOT, stderr=stderr) as process:
            try:
                yield process
            finally:
                if process.returncode is None:  # pragma: no cover - only when the test failed
                    process.kill()


# --- --version and check-config ---------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main(["--version"])
    assert exc_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lmswitch {__version__}"


def test_check_config_masks_secrets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(
        tmp_path,
        "upstream:\n  api_token: lm-secret-token\n  read_timeout: 2m\n"
        "auth:\n  api_keys: [sk-client-secret]\n",
    )
    assert main(["check-config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "lm-secret-token" not in out
    assert "sk-client-secret" not in out
    assert f"api_token: '{MASK}'" in out
    assert f"- '{MASK}'" in out
    assert "read_timeout: 120" in out


def test_check_config_reads_lmswitch_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LMSWITCH_CONFIG", str(write_config(tmp_path, "server:\n  port: 9321\n")))
    assert main(["check-config"]) == 0
    assert "port: 9321" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        pytest.param("server:\n  prot: 8000\n", "server.prot", id="unknown-key"),
        pytest.param("server:\n  drain_timeout: soon\n", "server.drain_timeout", id="duration"),
        pytest.param("scheduler:\n  max_queue: -1\n", "scheduler.max_queue", id="negative"),
        pytest.param(
            "upstreams:\n  - {name: desk, base_url: 'http://a:1234'}\n"
            "  - {name: desk, base_url: 'http://b:1234'}\n",
            "upstreams.1.name: duplicate name 'desk'",
            id="duplicate-host",
        ),
        pytest.param(
            "auth:\n  keys:\n    - {name: alice, key_sha256: 0123abcd-not-hex}\n",
            "auth.keys.0.key_sha256: should be 64 hexadecimal digits\n",  # the value not echoed
            id="bad-key-sha256",
        ),
        pytest.param(
            "auth:\n  keys:\n    - {name: alice, key: sk-1}\n    - {name: alice, key: sk-2}\n",
            "auth.keys.1.name: duplicate name 'alice'",
            id="duplicate-key-name",
        ),
    ],
)
@pytest.mark.parametrize("command", ["check-config", "serve"])
def test_invalid_config_exits_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    yaml_text: str,
    key: str,
    command: str,
) -> None:
    path = str(write_config(tmp_path, yaml_text))
    argv = [command, path] if command == "check-config" else [command, "--config", path]
    assert main(argv) == EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "invalid configuration" in captured.err
    assert key in captured.err


def test_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(tmp_path / "nope.yaml")]) == EXIT_USAGE
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("port", ["70000", "-1", "eighty"])
@pytest.mark.parametrize("command", ["serve", "demo", "emulator"])
def test_bad_port_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], command: str, port: str
) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main([command, "--port", port])
    assert exc_info.value.code == EXIT_USAGE
    assert "--port" in capsys.readouterr().err


@pytest.mark.parametrize("hosts", ["0", "-1", str(MAX_DEMO_HOSTS + 1), "two"])
def test_bad_demo_hosts_is_a_usage_error(capsys: pytest.CaptureFixture[str], hosts: str) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main(["demo", "--hosts", hosts])
    assert exc_info.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "argument --hosts" in err
    if hosts != "two":
        assert f"{hosts} is out of range (1 to {MAX_DEMO_HOSTS})" in err


# --- --help -----------------------------------------------------------------------------------


def help_page(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc_info:
        main([*argv, "--help"])
    assert exc_info.value.code == 0
    return capsys.readouterr().out


def help_entries(page: str) -> dict[str, str]:
    """The options and positional arguments of a help page: each one's first words, then its
    help on one line (wrapped lines joined)."""
    entries: dict[str, str] = {}
    name = None
    for line in page.splitlines():
        if line and not line.startswith(" "):  # a section's heading, or the usage or text
            name = None
        elif line.startswith("  ") and not line.startswith("   "):  # an entry begins
            name, _, text = line.strip().partition("  ")
            entries[name] = text.strip()
        elif name is not None:
            entries[name] = f"{entries[name]} {line.strip()}".strip()
    return entries


@pytest.mark.parametrize("command", ["serve", "demo", "emulator", "bench", "check-config"])
def test_every_command_has_a_description_and_every_option_its_default(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """`lmswitch COMMAND --help`: a description under the usage, and every option's help
    ends with its default (a value, or what happens without it)."""
    page = help_page([command], capsys)
    usage, description, *_ = page.split("\n\n")
    assert usage.startswith(f"usage: lmswitch {command}")
    assert not description.splitlines()[0].endswith(":"), page  # not the options' heading
    assert len(description.split()) >= 10, page
    entries = help_entries(page)
    del entries["-h, --help"]
    assert entries, page
    for option, text in entries.items():
        assert re.search(r"\(default: [^)]+\)$", text), f"{option}: {text!r}"
    assert "--stamp-chunks" not in page  # the bench's, not the user's


@pytest.mark.parametrize(
    ("command", "option", "default"),
    [
        ("serve", "--port PORT", "server.port, 8000"),
        ("demo", "--load-delay S", "2"),
        ("emulator", "--memory GiB", "none, no limit"),
        ("emulator", "--token-delay S", "0.02"),
        ("emulator", "--reply-tokens N", "12"),
        ("emulator", "--load-speed GB/s", "none, the delay alone"),
        ("bench", "--concurrency N[,N...]", "1,32"),
        ("bench", "--tokens-per-s N", "20"),
    ],
)
def test_help_shows_the_defaults_the_options_have(
    capsys: pytest.CaptureFixture[str], command: str, option: str, default: str
) -> None:
    """The defaults shown are the values the commands use."""
    assert help_entries(help_page([command], capsys))[option].endswith(f"(default: {default})")


def test_the_main_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    page = help_page([], capsys)
    assert "loads the model each request names" in " ".join(page.split())
    for command in ("serve", "demo", "emulator", "bench", "check-config", "keys"):
        assert f"    {command}" in page
    assert "`lmswitch COMMAND --help`" in page


def test_keys_new_has_a_description_and_every_option_its_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    page = help_page(["keys", "new"], capsys)
    usage, description, *_ = page.split("\n\n")
    assert usage.startswith("usage: lmswitch keys new")
    assert len(description.split()) >= 10, page
    entries = help_entries(page)
    assert "the key's name" in entries.pop("NAME")
    del entries["-h, --help"]
    assert set(entries) == {"--models PATTERN[,PATTERN...]", "--priority N", "--admin"}
    for option, text in entries.items():
        assert re.search(r"\(default: [^)]+\)$", text), f"{option}: {text!r}"
    assert entries["--models PATTERN[,PATTERN...]"].endswith("(default: *)")
    assert entries["--priority N"].endswith("(default: 0)")
    assert "keys new NAME" in " ".join(help_page(["keys"], capsys).split())


# --- keys new ---------------------------------------------------------------------------------


def keys_new(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> tuple[str, dict[str, Any], str]:
    """`lmswitch keys new ARGV`: the key it printed, its output as YAML, and as text."""
    assert main(["keys", "new", *argv]) == 0
    out = capsys.readouterr().out
    (key,) = re.findall(r"^#\s+(sk-lmswitch-\S+)$", out, re.MULTILINE)
    assert out.count(key) == 1  # once, in its comment: the config holds only its digest
    config = yaml.safe_load(out)
    assert isinstance(config, dict)
    return key, config, out


def test_keys_new_prints_a_fresh_key_and_its_config_lines(
    capsys: pytest.CaptureFixture[str],
) -> None:
    key, config, _ = keys_new(["alice"], capsys)
    assert config == {
        "auth": {
            "keys": [
                {
                    "name": "alice",
                    "key_sha256": hashlib.sha256(key.encode()).hexdigest(),
                    "models": ["*"],
                    "priority": 0,
                    "admin": False,
                }
            ]
        }
    }
    other, _, _ = keys_new(["alice"], capsys)
    assert other != key
    _, batch, _ = keys_new(
        ["batch", "--models", "qwen*, small", "--priority", "-3", "--admin"], capsys
    )
    (entry,) = batch["auth"]["keys"]
    assert (entry["models"], entry["priority"], entry["admin"]) == (["qwen*", "small"], -3, True)


@pytest.mark.parametrize("name", ["Alice", "anonymous", "a" * 33, "a b", ""])
def test_keys_new_refuses_a_bad_name(capsys: pytest.CaptureFixture[str], name: str) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main(["keys", "new", name])
    assert exc_info.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "NAME" in err
    assert "sk-lmswitch-" not in err


async def test_keys_new_config_lines_work_in_a_real_proxy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The printed lines, as they are, make a proxy that takes the printed key and no other,
    and names it in its access lines."""
    key, _, printed = keys_new(["dave", "--models", "llama-*"], capsys)
    emulator = Emulator()
    async with serve(emulator.app) as upstream_url:
        path = write_config(tmp_path, f"{printed}upstream:\n  base_url: {upstream_url}\n")
        app = create_app(load_settings(path))
        async with serve(app) as url, httpx2.AsyncClient(base_url=url, timeout=10) as http:
            chat = {
                "model": "llama-3.2-1b-instruct",
                "messages": [{"role": "user", "content": "hi"}],
            }
            good = {"authorization": f"Bearer {key}"}
            assert (await http.post("/v1/chat/completions", json=chat, headers=good)).is_success
            other = await http.post(
                "/v1/chat/completions", json=chat | {"model": "qwen2.5-7b-instruct"}, headers=good
            )
            assert other.status_code == 403
            wrong = {"authorization": f"Bearer {key[:-1]}"}
            assert (
                await http.post("/v1/chat/completions", json=chat, headers=wrong)
            ).status_code == 401
            listed = (await http.get("/v1/models", headers=good)).json()["data"]
        assert emulator.load_count() == emulator.load_count("llama-3.2-1b-instruct") == 1
    assert [model["id"] for model in listed] == ["llama-3.2-1b-instruct"]


# --- serve ------------------------------------------------------------------------------------


def test_build_server_honours_options(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        "server:\n  host: 127.0.0.2\n  port: 9000\n  drain_timeout: 7s\nauth:\n  api_keys: [k]\n",
    )
    server = build_server(["--config", str(path), "--host", "0.0.0.0", "--port", "9123"])
    assert isinstance(server, Server)
    assert (server.config.host, server.config.port) == ("0.0.0.0", 9123)
    assert server.config.timeout_graceful_shutdown == 7
    assert server.config.lifespan == "on"
    assert server.config.workers == 1


@pytest.mark.parametrize(
    ("host", "auth", "refused"),
    [
        ("0.0.0.0", "", True),
        ("::", "", True),
        ("192.168.1.20", "", True),
        ("lmswitch.lan", "", True),
        ("0.0.0.0", "auth:\n  api_keys: [sk-1]\n", False),
        ("0.0.0.0", "auth:\n  allow_unauthenticated: true\n", False),
        ("localhost", "", False),
        ("::1", "", False),
        ("127.0.0.5", "", False),
    ],
)
def test_serve_refuses_an_open_proxy_without_keys(
    tmp_path: Path, host: str, auth: str, refused: bool
) -> None:
    """Like LiteLLM's proxy: a non-loopback bind with no client keys needs an explicit yes."""
    path = write_config(tmp_path, auth)
    if refused:
        with pytest.raises(ConfigError, match=r"auth\.allow_unauthenticated"):
            build_server(["--config", str(path), "--host", host])
    else:
        assert build_server(["--config", str(path), "--host", host]).config.host == host


def test_main_serve_open_proxy_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, "")
    assert main(["serve", "--config", str(path), "--host", "0.0.0.0"]) == EXIT_USAGE
    assert "auth.api_keys" in capsys.readouterr().err


def test_build_server_reads_lmswitch_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_config(tmp_path, "server:\n  host: 127.0.0.3\n  port: 9200\n")
    monkeypatch.setenv("LMSWITCH_CONFIG", str(path))
    server = build_server([])
    assert (server.config.host, server.config.port) == ("127.0.0.3", 9200)
    assert server.config.timeout_graceful_shutdown == 30  # server.drain_timeout's default


def test_build_server_port_option_beats_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LMSWITCH_SERVER__PORT", "9300")
    path = write_config(tmp_path, "server:\n  port: 9200\n  drain_timeout: 0.2\n")
    assert build_server(["--config", str(path)]).config.port == 9300
    server = build_server(["--config", str(path), "--port", "9400"])
    assert server.config.port == 9400
    assert server.config.timeout_graceful_shutdown == 1  # whole seconds, at least one


def test_build_server_rejects_bad_config(tmp_path: Path) -> None:
    path = write_config(tmp_path, "upstream:\n  base_url: ftp://nowhere\n")
    with pytest.raises(ConfigError, match=r"upstream\.base_url"):
        build_server(["--config", str(path)])


def test_build_server_json_logging(tmp_path: Path) -> None:
    path = write_config(tmp_path, "logging:\n  format: json\n  level: debug\n")
    build_server(["--config", str(path)])
    logger = logging.getLogger("lmswitch")
    assert logger.level == logging.DEBUG
    assert not logger.propagate
    assert isinstance(logger.handlers[0].formatter, _JsonFormatter)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (AccessLine({"status": 200, "model": "m"}), {"status": 200, "model": "m"}),
        # Only an access record's fields become fields: text that looks like JSON stays text.
        ('{"status": 200, "model": "m"}', {"message": '{"status": 200, "model": "m"}'}),
        ("{not json", {"message": "{not json"}),
        ("plain words", {"message": "plain words"}),
    ],
    ids=["access-line", "json-text", "broken-json", "plain"],
)
def test_json_formatter(message: object, expected: dict[str, Any]) -> None:
    record = logging.LogRecord("lmswitch.access", logging.INFO, __file__, 1, message, None, None)
    line = json.loads(_JsonFormatter().format(record))
    assert line.items() >= {"level": "info", "logger": "lmswitch.access", **expected}.items()
    assert "exception" not in line


def fail() -> None:
    raise RuntimeError("boom")


def test_json_formatter_includes_exceptions() -> None:
    try:
        fail()
    except RuntimeError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("lmswitch", logging.ERROR, __file__, 1, "failed", None, exc_info)
    line = json.loads(_JsonFormatter().format(record))
    assert line["message"] == "failed"
    assert "RuntimeError: boom" in line["exception"]


def test_capture_signals_does_not_reraise() -> None:
    """A signal caught while serving stops the server and is not raised again afterwards."""
    server = Server(uvicorn.Config(readyz_app(not_ready=0)))
    before = signal.getsignal(signal.SIGINT)
    with server.capture_signals():
        assert signal.getsignal(signal.SIGINT) == server.handle_exit
        signal.raise_signal(signal.SIGINT)
    assert server.should_exit
    assert signal.getsignal(signal.SIGINT) is before  # and no KeyboardInterrupt here


def test_signals_are_left_alone_outside_the_main_thread() -> None:
    seen: list[object] = []

    def run() -> None:
        with handling_signals(lambda sig, frame: None):
            seen.append(signal.getsignal(signal.SIGINT))

    before = signal.getsignal(signal.SIGINT)
    thread = threading.Thread(target=run)
    thread.start()
    thread.join(5)
    assert seen == [before]


def test_main_serve_drains_on_sigint(
    tmp_path: Path, interrupt_when_up: Callable[[str], None]
) -> None:
    """`lmswitch serve` runs until Ctrl+C, then drains and returns 0."""
    port = free_port()
    path = write_config(
        tmp_path, f"upstream:\n  base_url: {closed_url()}\nserver:\n  drain_timeout: 1\n"
    )
    interrupt_when_up(f"http://127.0.0.1:{port}/healthz")
    # Last statement: on Python 3.11 the tracer loses this frame after the server's shutdown
    # cancels tasks, so coverage would miss any line after it.
    assert main(["serve", "--config", str(path), "--port", str(port)]) == 0


# --- emulator ---------------------------------------------------------------------------------


async def test_emulator_server_honours_options() -> None:
    """The emulator's options reach it: token, memory, JIT."""
    server = build_emulator_server(
        ["--port", "4321", "--memory", "1", "--load-delay", "0", "--no-jit", "--api-token", "t"]
    )
    assert (server.config.host, server.config.port) == ("127.0.0.1", 4321)
    app = server.config.app
    assert isinstance(app, Starlette)
    auth = {"authorization": "Bearer t"}
    async with serve(app) as url, httpx2.AsyncClient(base_url=url, timeout=5) as http:
        assert (await http.get("/api/v1/models")).status_code == 401
        assert (await http.get("/api/v1/models", headers=auth)).status_code == 200
        chat = await http.post("/v1/chat/completions", json=CHAT | {"model": LLAMA}, headers=auth)
        assert chat.status_code == 400  # no JIT loading, nothing loaded
        load = await http.post("/api/v1/models/load", json={"model": QWEN}, headers=auth)
        assert load.status_code >= 400  # 4.7 GB does not fit in 1 GiB
        load = await http.post("/api/v1/models/load", json={"model": LLAMA}, headers=auth)
        assert load.status_code == 200


def test_main_emulator_runs_until_sigint(interrupt_when_up: Callable[[str], None]) -> None:
    port = free_port()
    interrupt_when_up(f"http://127.0.0.1:{port}/v1/models")
    assert main(["emulator", "--port", str(port), "--load-delay", "0"]) == 0


# --- demo -------------------------------------------------------------------------------------


async def status(http: httpx2.AsyncClient) -> dict[str, Any]:
    response = await http.get("/api/v1/status")
    assert response.status_code == 200
    result: dict[str, Any] = response.json()
    return result


async def test_demo_swaps_models(capsys: pytest.CaptureFixture[str]) -> None:
    """Asking two models in turn through the demo makes the proxy swap them."""
    async with anyio.create_task_group() as tg:
        demo: Demo = await tg.start(run_demo, 0, 0.05)
        try:
            async with (
                httpx2.AsyncClient(base_url=demo.proxy_url, timeout=10) as http,
                openai.AsyncOpenAI(
                    base_url=f"{demo.proxy_url}/v1", api_key="sk-demo", timeout=10, max_retries=0
                ) as sdk,
            ):
                with anyio.fail_after(10):
                    first = await sdk.chat.completions.create(model=QWEN, messages=MESSAGES)
                    assert first.model == QWEN
                    assert (await status(http))["loaded"] == [QWEN]
                    second = await sdk.chat.completions.create(model=LLAMA, messages=MESSAGES)
                    assert second.model == LLAMA
                    assert (await status(http))["loaded"] == [LLAMA]
        finally:
            demo.stop()
    out = capsys.readouterr().out
    assert f"{demo.proxy_url}/v1" in out
    assert demo.emulator_url in out
    assert f"curl {demo.proxy_url}/v1/chat/completions" in out
    assert all(model in out for model in demo.models)
    assert QWEN in demo.models
    assert LLAMA in demo.models


def fits_rows(out: str) -> dict[str, dict[str, str]]:
    """The "which model fits where" table of a demo's greeting: per model, per host, its cell."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["model", "size"])
    hosts = lines[start].split()[2:]
    rows: dict[str, dict[str, str]] = {}
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        model, _size, _unit, *cells = line.split()
        rows[model] = dict(zip(hosts, cells, strict=True))
    return rows


async def test_demo_with_hosts_places_models(capsys: pytest.CaptureFixture[str]) -> None:
    """`--hosts 2`: two emulators of different sizes and catalogues, one proxy placing on them."""
    async with anyio.create_task_group() as tg:
        demo: Demo = await tg.start(partial(run_demo, 0, 0.05, hosts=2))
        try:
            async with httpx2.AsyncClient(base_url=demo.proxy_url, timeout=10) as http:
                answered: dict[str, str] = {}

                async def ask(model: str) -> None:
                    body = {"model": model, "messages": MESSAGES}
                    response = await http.post("/v1/chat/completions", json=body)
                    assert response.status_code == 200
                    answered[model] = response.headers["x-lmswitch-upstream"]

                with anyio.fail_after(10):
                    async with anyio.create_task_group() as asking:  # at once: replies are slow
                        for model in (GPT_OSS, GEMMA, QWEN_14B):
                            asking.start_soon(ask, model)
                    rows = {row["name"]: row for row in (await status(http))["upstreams"]}
        finally:
            demo.stop()
    assert [(h.name, h.memory_bytes) for h in demo.hosts] == [
        ("desk", 24 * GIB),
        ("laptop", 8 * GIB),
    ]
    # Each to the one host that has it; qwen2.5-14b to the one of its two it fits.
    assert answered == {GPT_OSS: "desk", GEMMA: "laptop", QWEN_14B: "desk"}
    assert rows["desk"]["url"] == demo.hosts[0].url
    assert rows["desk"]["memory_budget"] == 24 * GIB
    assert rows["laptop"]["memory_budget"] == 8 * GIB
    assert set(rows["desk"]["loaded"]) == {GPT_OSS, QWEN_14B}
    assert rows["laptop"]["loaded"] == [GEMMA]
    out = capsys.readouterr().out
    assert "in front of 2 LM Studio emulators" in out
    assert all(f"  {h.name:<6}  {h.url}" in out for h in demo.hosts)
    assert fits_rows(out) == {
        model: {
            "desk": "-" if model == GEMMA else "yes",
            "laptop": "-" if model == GPT_OSS else "no" if model == QWEN_14B else "yes",
        }
        for model in demo.models
    }
    assert f'"model": "{GPT_OSS}"' in out  # asked of the one host that has it
    assert f'"model": "{GEMMA}"' in out
    assert "Press Ctrl+C to stop." in out


def test_fits_table_fits_80_columns() -> None:
    """Every host the demo can run, every model on each: the table stays within 80 columns."""
    sizes = {"text-embedding-nomic-embed-text-v1.5": 84_106_624, GPT_OSS: 12_109_566_560}
    url = "http://127.0.0.1:65535"
    hosts = [
        DemoHost(spec.name, url, spec.memory_gib and spec.memory_gib * GIB, tuple(sizes))
        for spec in DEMO_HOSTS
    ]
    table = fits_table(hosts, sizes)
    assert max(len(line) for line in table.splitlines()) <= 80
    assert fits_rows(table)[GPT_OSS] == {
        "desk": "yes",
        "laptop": "no",
        "tower": "yes",
        "mini": "yes",
    }


async def test_demo_refuses_a_bad_number_of_hosts() -> None:
    with pytest.raises(ValueError, match="hosts must be 1 to"):
        await run_demo(0, hosts=MAX_DEMO_HOSTS + 1)


async def test_demo_greets_even_if_not_ready(capsys: pytest.CaptureFixture[str]) -> None:
    async with anyio.create_task_group() as tg:
        demo: Demo = await tg.start(partial(run_demo, 0, 0, ready_timeout_s=0))
        demo.stop()
    captured = capsys.readouterr()
    assert "Press Ctrl+C to stop." in captured.out
    assert "the proxy has not reached the emulator yet" in captured.err


async def test_wait_for_hosts_waits_for_every_host() -> None:
    """The demo greets once every host has said it is up, and a host down again is waited for."""
    bus = EventBus()
    news: list[tuple[str, dict[str, Any]]] = [
        ("upstream", {"upstream": "desk", "up": True}),
        ("model", {"model": QWEN, "upstream": "desk"}),
        ("upstream", {"upstream": "laptop", "up": False}),
        ("upstream", {"upstream": "desk", "up": False}),
        ("upstream", {"upstream": "laptop", "up": True}),
    ]
    with bus.subscribe() as events:
        for kind, data in news:
            bus.publish(kind, data)
        assert not await wait_for_hosts(events, ["desk", "laptop"], 0.1)  # desk is down
        bus.publish("upstream", {"upstream": "desk", "up": True})
        assert await wait_for_hosts(events, ["desk"], 5)


async def test_wait_for_hosts_gives_up() -> None:
    bus = EventBus()
    with bus.subscribe() as events:
        bus.publish("upstream", {"upstream": "desk", "up": False})
        assert not await wait_for_hosts(events, ["desk"], 0.1)  # in time
        bus.close()
        with anyio.fail_after(5):
            assert not await wait_for_hosts(events, ["desk"], 10)  # the stream ended


async def test_demo_reports_a_taken_port(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert await anyio.to_thread.run_sync(main, ["demo", "--port", str(port)]) == EXIT_USAGE
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in capsys.readouterr().err


def test_main_demo_runs_until_sigint(interrupt_when_up: Callable[[str], None]) -> None:
    port = free_port()
    interrupt_when_up(f"http://127.0.0.1:{port}/healthz")
    assert main(["demo", "--port", str(port), "--load-delay", "0"]) == 0  # last: see serve's


# --- real processes ---------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform == "win32", reason="no SIGTERM on Windows")
async def test_serve_process_exits_0_on_sigterm(tmp_path: Path) -> None:
    """A drained proxy exits 0 on SIGTERM (uvicorn alone would die of the signal: 143)."""
    port = free_port()
    path = write_config(
        tmp_path, f"upstream:\n  base_url: {closed_url()}\nserver:\n  drain_timeout: 1\n"
    )
    args = ["serve", "--port", str(port), "--config", str(path)]
    async with child(args, tmp_path / "stderr.txt") as process:
        await wait_until_up(f"http://127.0.0.1:{port}/healthz")
        process.send_signal(signal.SIGTERM)
        with anyio.fail_after(5):
            code = await process.wait()
    assert code == 0, (tmp_path / "stderr.txt").read_text()


@pytest.mark.parametrize("command", ["serve", "demo", "emulator"])
async def test_a_port_in_use_is_one_line_and_exit_2(tmp_path: Path, command: str) -> None:
    """A port already taken: one line naming the address and suggesting --port, status 2,
    and nothing started (no uvicorn errno message, no start-up lines)."""
    config = write_config(tmp_path, f"upstream:\n  base_url: {closed_url()}\n")
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        args = [command, "--port", str(port)]
        if command == "serve":
            args += ["--config", str(config)]
        async with child(args, tmp_path / "stderr.txt") as process:
            with anyio.fail_after(15):
                code = await process.wait()
    err = (tmp_path / "stderr.txt").read_text()
    assert code == EXIT_USAGE, err
    assert err.splitlines() == [
        f"lmswitch: cannot listen on 127.0.0.1:{port}: address already in use (another "
        "lmswitch, or LM Studio?); choose another port with --port"
    ]


@pytest.mark.parametrize("host", ["localhost", ""])
def test_listen_binds_as_uvicorn_would(host: str) -> None:
    """A socket on each of the host's addresses (IPv4 at least; "": every interface), all on
    the same port, listening."""
    sockets = listen(host, 0)
    try:
        assert {"127.0.0.1", "0.0.0.0"} & {sock.getsockname()[0] for sock in sockets}
        port = sockets[0].getsockname()[1]
        assert {sock.getsockname()[1] for sock in sockets} == {port}
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # listening: the connection is queued until a server accepts it
    finally:
        for sock in sockets:
            sock.close()


def test_listen_names_an_address_not_this_machines() -> None:
    with pytest.raises(CannotListenError) as exc_info:
        listen("192.0.2.1", 0)  # TEST-NET-1: never a local address
    assert str(exc_info.value) == (
        "cannot listen on 192.0.2.1:0: cannot assign requested address; check the address "
        "(--host, or server.host)"
    )


def test_listen_skips_an_address_family_not_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    """As asyncio does: an address that cannot be assigned (its family not enabled here) is
    skipped when the host has others."""
    resolve = socket.getaddrinfo

    def both(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        away = resolve("192.0.2.1", port, *args, **kwargs)  # TEST-NET-1: never local
        return [*away, *resolve("127.0.0.1", port, *args, **kwargs)]

    monkeypatch.setattr(socket, "getaddrinfo", both)
    (sock,) = listen("dual", 0)
    with sock:
        assert sock.getsockname()[0] == "127.0.0.1"


@pytest.mark.parametrize(
    ("code", "advice"),
    [
        (errno.EADDRINUSE, "choose another port with --port"),
        (errno.EACCES, "(ports below 1024 need privileges); choose another with --port"),
        (errno.EADDRNOTAVAIL, "check the address (--host, or server.host)"),
    ],
)
def test_cannot_listen_says_what_to_change(
    monkeypatch: pytest.MonkeyPatch, code: int, advice: str
) -> None:
    def refuse(sock: socket.socket, address: Any) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(socket.socket, "bind", refuse)
    with pytest.raises(CannotListenError) as exc_info:
        listen("127.0.0.1", 8000)
    message = str(exc_info.value)
    assert message.startswith(f"cannot listen on 127.0.0.1:8000: {os.strerror(code).lower()}")
    assert message.endswith(advice)


async def greeting_of(process: Process) -> str:
    """What the demo prints before it waits for Ctrl+C (within a deadline)."""
    assert process.stdout is not None
    with anyio.fail_after(15):
        greeting = await BufferedByteReceiveStream(process.stdout).receive_until(
            b"Press Ctrl+C to stop.", max_bytes=2**16
        )
    return greeting.decode()


@pytest.mark.skipif(sys.platform == "win32", reason="Ctrl+C cannot target one child on Windows")
async def test_demo_process(tmp_path: Path) -> None:
    """`lmswitch demo` greets, answers through the proxy, and exits 0 on Ctrl+C."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = ["demo", "--port", str(port), "--load-delay", "0"]
    async with child(args, tmp_path / "stderr.txt") as process:
        out = await greeting_of(process)
        assert f"the proxy at {base}/v1" in out
        assert "LM Studio emulator at http://127.0.0.1:" in out
        assert f"curl {base}/v1/chat/completions" in out
        async with httpx2.AsyncClient(base_url=base, timeout=10) as http:
            response = await http.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 200
        assert response.json()["model"] == QWEN  # gpt-4o-mini is an alias
        process.send_signal(signal.SIGINT)
        with anyio.fail_after(10):
            code = await process.wait()
    assert code == 0, (tmp_path / "stderr.txt").read_text()


DEMO_CHATTER = (
    "Started server process",
    "Waiting for application startup",
    "Application startup complete",
    "Uvicorn running",
    "Shutting down",
    "Finished server process",
    "/readyz",
    "has not reached the emulator",
)


@dataclass
class DemoOutput:
    """A `lmswitch demo` child process and what it writes, standard error and output in the
    order written."""

    process: Process
    stream: BufferedByteReceiveStream
    text: bytearray = field(default_factory=bytearray)

    async def greeting(self) -> str:
        """All it wrote up to the end of its greeting (15 s at most)."""
        with anyio.fail_after(15):
            self.text += await self.stream.receive_until(END_OF_GREETING, max_bytes=2**16)
        self.text += END_OF_GREETING
        return self.text.decode()

    async def stop(self, timeout_s: float) -> int:
        """Ctrl+C; its status once it has exited, having read the rest of what it wrote."""
        self.process.send_signal(signal.SIGINT)
        with anyio.fail_after(timeout_s):
            with contextlib.suppress(anyio.EndOfStream):
                while True:
                    self.text += await self.stream.receive()
            return await self.process.wait()


END_OF_GREETING = b"Press Ctrl+C to stop."


@asynccontextmanager
async def demo_process(*args: str) -> AsyncIterator[DemoOutput]:
    """`python -m proxy demo ARGS --load-delay 0`, killed on the way out if still running."""
    command = [sys.executable, "-m", "proxy", "demo", *args, "--load-delay", "0"]
    async with await anyio.open_process(command, cwd=ROOT, stderr=subprocess.STDOUT) as process:
        assert process.stdout is not None
        try:
            yield DemoOutput(process, BufferedByteReceiveStream(process.stdout))
        finally:
            if process.returncode is None:  # pragma: no cover - only when the test failed
                process.kill()


@pytest.mark.skipif(sys.platform == "win32", reason="Ctrl+C cannot target one child on Windows")
@pytest.mark.parametrize("hosts", ["1", "2"])
async def test_demo_says_its_greeting_once_and_no_chatter(hosts: str) -> None:
    """`lmswitch demo` prints its greeting first and once: no uvicorn start-up or shutdown
    lines, no access lines for its own readiness checks; the user's requests get theirs."""
    port = free_port()
    async with demo_process("--port", str(port), "--hosts", hosts) as demo:
        greeting = await demo.greeting()
        async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            assert (await http.get("/v1/models")).status_code == 200
        code = await demo.stop(timeout_s=10)
    text = demo.text.decode()
    assert code == 0, text
    assert greeting.lstrip().startswith("lmswitch demo: the proxy at"), text
    assert text.count("lmswitch demo:") == 1
    assert [chatter for chatter in DEMO_CHATTER if chatter in text] == []
    (access,) = [line for line in text.splitlines() if " lmswitch.access: " in line]
    assert "endpoint=/v1/models key=anonymous status=200" in access  # the user's request


@pytest.mark.skipif(sys.platform == "win32", reason="Ctrl+C cannot target one child on Windows")
async def test_demo_stops_at_once_with_the_page_open() -> None:
    """Ctrl+C with the page's event stream open: the stream ends and the demo exits 0 at once,
    rather than after its 3 s drain with a traceback."""
    port = free_port()
    async with (
        demo_process("--port", str(port)) as demo,
        httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http,
    ):
        await demo.greeting()
        async with http.stream("GET", "/api/v1/events") as events:
            assert events.status_code == 200
            started = anyio.current_time()
            code = await demo.stop(timeout_s=10)
            stopped_s = anyio.current_time() - started
    text = demo.text.decode()
    assert code == 0, text
    assert stopped_s < 2, text  # the drain is 3 s
    assert "Traceback" not in text
    assert "timeout graceful shutdown exceeded" not in text


@pytest.mark.skipif(sys.platform == "win32", reason="no SIGINT/SIGTERM to one child on Windows")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_demo_hosts_process(tmp_path: Path, signum: signal.Signals) -> None:
    """`lmswitch demo --hosts 2` prints which model fits where, places a model on the one host
    that has it, and exits 0 on Ctrl+C or SIGTERM."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = ["demo", "--hosts", "2", "--port", str(port), "--load-delay", "0"]
    async with child(args, tmp_path / "stderr.txt") as process:
        out = await greeting_of(process)
        assert f"the proxy at {base}/v1, in front of 2 LM Studio emulators" in out
        hosts = [line.split() for line in out.splitlines() if "GiB" in line and "://" in line]
        assert [(h[0], h[2:]) for h in hosts] == [("desk", ["24", "GiB"]), ("laptop", ["8", "GiB"])]
        rows = fits_rows(out)
        assert rows[QWEN_14B] == {"desk": "yes", "laptop": "no"}  # fits only the bigger host
        assert rows[GEMMA] == {"desk": "-", "laptop": "yes"}
        async with httpx2.AsyncClient(base_url=base, timeout=10) as http:
            with anyio.fail_after(10):
                chat = {"model": GEMMA, "messages": MESSAGES}
                response = await http.post("/v1/chat/completions", json=chat)
                upstreams = (await status(http))["upstreams"]
        assert response.status_code == 200
        assert response.json()["model"] == GEMMA
        assert response.headers["x-lmswitch-upstream"] == "laptop"
        assert [row["name"] for row in upstreams] == ["desk", "laptop"]
        assert all(row["up"] for row in upstreams)
        process.send_signal(signum)
        with anyio.fail_after(10):
            code = await process.wait()
    assert code == 0, (tmp_path / "stderr.txt").read_text()
