"""The bench's stage: the emulator and the proxy as their own processes, started the way
`lmswitch emulator` and `lmswitch serve` start, what /proc says about them, and the progress line.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from proxy.server import free_port

# --- processes ----------------------------------------------------------------------------------


@dataclass
class Stack:
    """The emulator and the proxy, each in its own process."""

    emulator_url: str
    proxy_url: str
    proxy_pid: int
    _processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    key: str | None = None  # the client key the load sends, when the proxy has keys


def _wait_http(port: int, path: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    request = f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n".encode()
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
            s.sendall(request)
            if s.recv(64).startswith(b"HTTP/1.1 200"):
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing answered 200 on 127.0.0.1:{port}{path} in {timeout_s:g} s")


@contextlib.contextmanager
def start_stack(
    *, token_delay_s: float = 0.0, stamp: bool = False, reply_tokens: int = 12, keys: int = 0
) -> Iterator[Stack]:
    """Start the emulator (no load delay) and the proxy in front of it; stop both after.
    With `keys`, the proxy has that many named keys (`auth.keys`, by their SHA-256) and the
    stack's `key` is the last of them."""
    emulator_port, proxy_port = free_port(), free_port()
    python = [sys.executable, "-m", "proxy"]
    emulator_args = ["--port", str(emulator_port), "--load-delay", "0", "--quiet"]
    emulator_args += ["--token-delay", str(token_delay_s), "--reply-tokens", str(reply_tokens)]
    emulator_args += ["--stamp-chunks"] if stamp else []
    processes: list[subprocess.Popen[bytes]] = []
    client_keys = [f"sk-bench-{secrets.token_urlsafe(32)}" for _ in range(keys)]
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp, "bench.yaml")
        config.write_text(
            f"upstream:\n  base_url: http://127.0.0.1:{emulator_port}\n"
            "models:\n  max_loaded: 1\n"
            "scheduler:\n  max_queue: 4096\n"
            "logging:\n  level: warning\n" + _keys_config(client_keys)
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("LMSWITCH_")}
        try:
            processes.append(subprocess.Popen([*python, "emulator", *emulator_args], env=env))  # noqa: S603
            _wait_http(emulator_port, "/lmstudio-greeting")
            serve = [*python, "serve", "--config", str(config), "--port", str(proxy_port)]
            processes.append(subprocess.Popen(serve, env=env))  # noqa: S603
            _wait_http(proxy_port, "/readyz")
            yield Stack(
                f"http://127.0.0.1:{emulator_port}",
                f"http://127.0.0.1:{proxy_port}",
                processes[-1].pid,
                processes,
                client_keys[-1] if client_keys else None,
            )
        finally:
            for process in reversed(processes):
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _keys_config(secrets: list[str]) -> str:
    """`auth.keys` holding each of `secrets` by its SHA-256, named `bench-N`."""
    if not secrets:
        return ""
    entries = (
        f"    - {{name: bench-{index}, key_sha256: {hashlib.sha256(key.encode()).hexdigest()}}}\n"
        for index, key in enumerate(secrets)
    )
    return "auth:\n  keys:\n" + "".join(entries)


# --- what /proc says ----------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")  # not Linux: the figure is not available


def cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def progress(message: str) -> None:
    print(f"\r\x1b[K{message}", end="", file=sys.stderr, flush=True)  # noqa: T201
