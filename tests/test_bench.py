"""`lmswitch bench`, run briefly for real, and its wrk report parser."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from proxy.bench import loadgen, runner as bench, stack
from proxy.cli import main
from proxy.config import load_settings
from proxy.keys import digest

WRK_OUTPUT = """Running 3s test @ http://127.0.0.1:40000/v1/chat/completions
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.35ms  210.00us   4.02ms   91.00%
  Latency Distribution
     50%    1.31ms
     75%    1.40ms
     90%    1.52ms
     99%    2.10ms
  2183 requests in 3.00s, 1.20MB read
  Non-2xx or 3xx responses: 2
Requests/sec:    727.80
Transfer/sec:    410.00KB
"""


def test_wrk_report_is_parsed() -> None:
    result = loadgen.parse_wrk(WRK_OUTPUT, stream=False, concurrency=1, seconds=3)
    assert (result.requests, result.errors, result.rps) == (2183, 2, 727.8)
    assert (result.p50_ms, result.p99_ms) == (1.31, 2.1)
    assert (
        loadgen.parse_wrk(
            WRK_OUTPUT.replace("2.10ms", "1s"), stream=False, concurrency=1, seconds=3
        ).p99_ms
        == 1000.0
    )


@pytest.mark.parametrize("keys", ["0", "50"])
def test_bench_runs_direct_and_proxied(capsys: pytest.CaptureFixture[str], keys: str) -> None:
    """A short real run: the emulator and the proxy as processes, the built-in generator;
    with `--keys`, every request sends one of the proxy's named keys (none is refused)."""
    argv = ["bench", "--duration", "0.3", "--concurrency", "2", "--generator", "built-in"]
    argv += ["--keys", keys]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["generator"].startswith("built-in")
    results = report["results"]
    assert [(r["target"], r["stream"]) for r in results] == [
        ("direct", False), ("proxied", False), ("direct", True), ("proxied", True),
    ]  # fmt: skip
    assert all(r["requests"] > 0 and r["errors"] == 0 for r in results)
    table = bench.format_table([loadgen.Result(**r) for r in results])
    assert "non-streaming" in table
    assert "streaming" in table


def test_bench_measures_the_ollama_route(capsys: pytest.CaptureFixture[str]) -> None:
    """`--endpoint ollama`: the proxied load is the same chat on `/api/chat`, answered."""
    argv = ["bench", "--duration", "0.3", "--concurrency", "2", "--generator", "built-in"]
    assert main([*argv, "--endpoint", "ollama"]) == 0
    out = capsys.readouterr().out
    assert "proxied: /api/chat; direct: /v1/chat/completions" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("non-", "streaming"))]
    assert len(rows) == 2
    assert all(row[-2] == "0" and float(row[3]) > 0 for row in rows)  # no errors, answered


def test_bench_streams_mode(capsys: pytest.CaptureFixture[str]) -> None:
    options = bench.BenchOptions(streams=20, tokens_per_s=40, stream_seconds=0.5, json=True)
    assert bench.run(options) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["streams"], result["completed"], result["errors"]) == (20, 20, 0)
    assert result["proxied_delay_p50_ms"] >= 0


def test_bench_refuses_wrk_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _: None)
    assert main(["bench", "--generator", "wrk"]) == 2


def test_bench_keys_are_named_keys_by_their_digest(tmp_path: Path) -> None:
    client_keys = ["sk-bench-a", "sk-bench-b"]
    config = tmp_path / "bench.yaml"
    config.write_text(stack._keys_config(client_keys))
    auth = load_settings(config).auth
    assert [key.name for key in auth.keys] == ["bench-0", "bench-1"]
    assert [key.sha256() for key in auth.keys] == [digest(key) for key in client_keys]
    assert all(key.key is None for key in auth.keys)  # the file holds no key
    assert stack._keys_config([]) == ""
