"""Real requests and answers for docs/endpoints.md and docs/troubleshooting.md, captured from
the emulator and the proxy.

`capture_endpoints` runs the demo's set-up (the emulator, aliases, one model at a time) over
loopback and records one example per endpoint; `capture_old_lmstudio` records what the proxy
says in front of an LM Studio older than 0.4. `mask` blanks what differs from run to run.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.demo import DEMO_ALIASES
from proxy.emulator import Emulator
from tests.helpers import Proxy, proxy_for, serve

SHOWN_URL = "http://127.0.0.1:8000"  # the proxy, as the README and docs show it
SHOWN_UPSTREAM = "http://127.0.0.1:1234"  # LM Studio, as the docs show it
QWEN = "qwen2.5-7b-instruct"
LLAMA = "llama-3.2-1b-instruct"
HELLO = [{"role": "user", "content": "Say hello"}]
SETTINGS: dict[str, Any] = {"models": {"max_loaded": 1, "aliases": DEMO_ALIASES, "default": QWEN}}
_SHOWN_METRICS = ("lmswitch_model_loads_total", "lmswitch_model_loaded", "lmswitch_upstream_up")

# Values that differ on every run: generated ids, clocks and timings.
_VOLATILE_KEYS = (
    "created|created_at|uptime_s|last_used_at|duration_ms|queue_wait_ms|first_byte_ms|load_s|"
    "expected_load_s|loading_s|waited_s|since|busy_s|queue_wait_s|total_duration|load_duration|"
    "prompt_eval_duration|eval_duration"
)
_MASKS = (
    (re.compile(r'("(?:' + _VOLATILE_KEYS + r')": ?)[-0-9.e]+'), r"\1…"),
    (re.compile(r'("(?:created_at|modified_at|expires_at)": ?")[^"]+'), r"\1…"),
    (re.compile(r"\b(chatcmpl-|cmpl-|resp_|msg_)[a-z0-9]+"), r"\1…"),
    (re.compile(r'("request_id": ?")[0-9a-f]+'), r"\1…"),
)


def mask(text: str) -> str:
    """`text` with ids, timestamps and timings replaced by `…`, for comparing two captures."""
    for pattern, replacement in _MASKS:
        text = pattern.sub(replacement, text)
    return text


@dataclass(frozen=True)
class Example:
    """One request as a curl line, and the answer it got."""

    method: str
    path: str
    note: str
    curl: str
    status: int
    answer: str
    lang: str  # the code block's language: json or text


def shorten(value: Any, keep: int = 2) -> Any:
    """Lists past `keep + 2` items cut to `keep`, plus a string saying how many were left out."""
    if isinstance(value, dict):
        return {k: shorten(v, keep) for k, v in value.items()}
    if isinstance(value, list):
        if len(value) > keep + 2:
            return [*(shorten(v, keep) for v in value[:keep]), f"… {len(value) - keep} more"]
        return [shorten(v, keep) for v in value]
    return value


def _curl(path: str, body: dict[str, Any] | None, *, stream: bool = False) -> str:
    flags = "-N " if stream else ""
    line = f"curl {flags}{SHOWN_URL}{path}"
    if body is not None:
        line += f" -H 'content-type: application/json' -d '{json.dumps(body)}'"
    return line


class _Recorder:
    """Sends requests to the proxy and keeps each as an `Example`."""

    def __init__(self, proxy: Proxy, upstream_url: str) -> None:
        self.proxy = proxy
        self.examples: list[Example] = []
        self._urls = ((proxy.url, SHOWN_URL), (upstream_url, SHOWN_UPSTREAM))

    def shown(self, text: str) -> str:
        for real, shown in self._urls:
            text = text.replace(real, shown)
        return text

    def add(self, method: str, path: str, note: str, curl: str, status: int, answer: str) -> None:
        lang = "json" if answer.startswith(("{", "[")) else "text"
        example = Example(method, path, note, curl, status, self.shown(answer), lang)
        self.examples.append(example)

    async def call(
        self, method: str, path: str, note: str, body: dict[str, Any] | None = None, keep: int = 2
    ) -> Any:
        response = await self.proxy.http.request(method, path, json=body)
        answer = response.json()
        shown = json.dumps(shorten(answer, keep), indent=2, ensure_ascii=False)
        self.add(method, path, note, _curl(path, body), response.status_code, shown)
        return answer

    async def stream(self, path: str, note: str, body: dict[str, Any]) -> None:
        async with self.proxy.http.stream("POST", path, json=body) as response:
            text = (await response.aread()).decode()
        self.add("POST", path, note, _curl(path, body, stream=True), response.status_code, text)


async def _events(lines: AsyncIterator[str]) -> AsyncGenerator[tuple[str, Any], None]:
    """The (event, data) pairs of a Server-Sent Events stream; comment lines are skipped."""
    kind = ""
    async for line in lines:  # pragma: no branch - the caller stops at the event it awaits
        if line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield kind, json.loads(line.removeprefix("data: "))


async def _record_events(rec: _Recorder) -> None:
    """The snapshot on connect, then the model events of a swap from llama to qwen."""
    shown: list[str] = []

    async def load_qwen() -> None:
        await rec.proxy.http.post("/api/v1/models/load", json=_LOAD_QWEN)

    async with (
        rec.proxy.http.stream("GET", "/api/v1/events") as response,
        anyio.create_task_group() as tg,  # exits first: the load call has finished
        aclosing(_events(response.aiter_lines())) as events,
    ):
        async for kind, data in events:
            data_text = json.dumps(shorten(data, 1), ensure_ascii=False)
            shown.append(f"event: {kind}\ndata: {data_text}\n")
            if kind == "snapshot":
                tg.start_soon(load_qwen)
            elif kind == "model" and data.get("model") == QWEN and data.get("state") == "loaded":
                break
    note = "A snapshot on connect, then one event per change (here: a swap from llama to qwen)."
    curl = _curl("/api/v1/events", None, stream=True)
    rec.add("GET", "/api/v1/events", note, curl, response.status_code, "\n".join(shown))


_LOAD_QWEN = {"model_id": QWEN}


async def _record_ollama(rec: _Recorder) -> None:
    """Ollama's API: its listings, chat (whole, then streamed as it is by default), generate,
    embed, the loaded models, one model's description and a model it does not have."""
    await rec.call("GET", "/api/version", "The Ollama API version this follows.")
    await rec.call("GET", "/api/tags", "Every model and alias, with Ollama's details.")
    chat = {"model": QWEN, "messages": HELLO, "stream": False, "options": {"num_predict": 4}}
    note = "Ollama's chat, answered by LM Studio's `/v1/chat/completions`."
    await rec.call("POST", "/api/chat", note, chat)
    streamed = {"model": QWEN, "messages": HELLO, "options": {"num_predict": 2}}
    note = "Streamed unless `stream: false`: NDJSON, the last line with counts and durations."
    await rec.stream("/api/chat", note, streamed)
    generate = {
        "model": QWEN,
        "prompt": "Say hello",
        "stream": False,
        "options": {"num_predict": 3},
    }
    await rec.call("POST", "/api/generate", "A prompt, in the model's chat template.", generate)
    embed = {"model": "text-embedding-3-small", "input": ["Say hello"]}
    await rec.call("POST", "/api/embed", "One vector per input (an alias here).", embed)
    note = "Loaded models, `expires_at` from the idle TTL (far off with none, as here)."
    await rec.call("GET", "/api/ps", note)
    await rec.call("POST", "/api/show", "What LM Studio says of the model.", {"model": QWEN})
    missing = {"model": "llama3.2", "messages": HELLO}
    note = "A model LM Studio lacks: Ollama's error, in its words."
    await rec.call("POST", "/api/chat", note, missing)


async def _record_metrics(rec: _Recorder) -> None:
    response = await rec.proxy.http.get("/metrics")
    lines = [
        line
        for line in response.text.splitlines()
        if any(re.match(rf"(# (HELP|TYPE) )?{name}\b", line) for name in _SHOWN_METRICS)
    ]
    note = "Prometheus text format (a few of its lines here; see the metrics reference)."
    rec.add(
        "GET", "/metrics", note, _curl("/metrics", None), response.status_code, "\n".join(lines)
    )


async def capture_endpoints() -> list[Example]:
    """One example per endpoint, in an order that tells a story: ask, swap, manage, watch."""
    emulator = Emulator()
    async with serve(emulator.app) as upstream_url, proxy_for(upstream_url, **SETTINGS) as proxy:
        rec = _Recorder(proxy, upstream_url)
        await proxy.wait_ready()  # as a user would find it: LM Studio's models read
        await rec.call("GET", "/healthz", "The process is alive (no auth).")
        await rec.call(
            "GET", "/readyz", "Ready while LM Studio answers (503 with the reason otherwise)."
        )
        await rec.call("GET", "/v1/models", "Every downloaded model, then the aliases.")
        await rec.call("GET", "/v1/models/gpt-4o-mini", "One model or alias.")
        chat = {"model": QWEN, "messages": HELLO, "max_tokens": 8}
        await rec.call("POST", "/v1/chat/completions", "Loads the model first if needed.", chat)
        stream = {
            **chat,
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        await rec.stream("/v1/chat/completions", "Streamed: relayed chunk by chunk.", stream)
        completion = {"model": QWEN, "prompt": "Once upon a time", "max_tokens": 5}
        await rec.call("POST", "/v1/completions", "Legacy text completion.", completion)
        response = {"model": QWEN, "input": "Say hello", "max_output_tokens": 5}
        await rec.call("POST", "/v1/responses", "OpenAI's Responses API.", response)
        message = {"model": QWEN, "max_tokens": 5, "messages": HELLO}
        await rec.call("POST", "/v1/messages", "Anthropic's Messages API.", message)
        count = {"model": QWEN, "messages": HELLO}
        await rec.call("POST", "/v1/messages/count_tokens", "Anthropic's token count.", count)
        embed = {"model": "text-embedding-3-small", "input": "Say hello"}
        note = "An alias of the embedding model; with `max_loaded: 1` this swaps models."
        await rec.call("POST", "/v1/embeddings", note, embed, keep=3)
        unknown = {"model": "qwen2.5-7b", "messages": HELLO}
        note = "An unknown model: the names it may mean, and the known ones."
        await rec.call("POST", "/v1/chat/completions", note, unknown)
        await _record_ollama(rec)
        await rec.call("GET", "/api/v1/models/", "Every model with the proxy's view of it.")
        load = {"model_id": LLAMA}
        note = "Loads by policy (evicting as a request would); answers when loaded."
        await rec.call("POST", "/api/v1/models/load", note, load)
        await rec.call("GET", "/api/v1/models/loaded", "Loaded models only.")
        await rec.call("POST", "/api/v1/models/pin", "Never evicted from now on.", load)
        await rec.call("POST", "/api/v1/models/unpin", "Evictable again.", load)
        await rec.call("GET", "/api/v1/status", "The proxy at a glance.")
        note = "Per key since start: requests, tokens, time holding a model, queue wait."
        await rec.call("GET", "/api/v1/usage", note)
        await _record_events(rec)
        note = "Waits for running requests on the model, then unloads it."
        await rec.call("POST", "/api/v1/models/unload", note, _LOAD_QWEN)
        await _record_metrics(rec)
        return rec.examples


def render_endpoints(examples: list[Example]) -> str:
    """The endpoint reference's Markdown: one folded block per example."""
    parts = []
    for ex in examples:
        note = re.sub(r"`([^`]*)`", r"<code>\1</code>", ex.note)  # no Markdown in <summary>
        parts.append(
            f"<details><summary><code>{ex.method} {ex.path}</code> answers {ex.status}. "
            f"{note}</summary>\n\n"
            f"```sh\n{ex.curl}\n```\n\n```{ex.lang}\n{ex.answer}\n```\n\n</details>\n"
        )
    return "\n".join(parts)


# --- LM Studio older than 0.4 -----------------------------------------------------------------


def without_rest_v1(app: ASGIApp) -> ASGIApp:
    """`app` as LM Studio before 0.4 answers: no `/api/v1/*`, Express's 200 fallback instead."""

    async def older(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/api/v1/"):
            message = f"Unexpected endpoint or method. ({scope['method']} {scope['path']})"
            await JSONResponse({"error": message})(scope, receive, send)
        else:
            await app(scope, receive, send)

    return older


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")


@contextmanager
def _warnings_logged() -> Iterator[list[str]]:
    handler = _Records()
    logger = logging.getLogger("lmswitch")
    logger.addHandler(handler)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)


async def capture_old_lmstudio() -> str:
    """What a chat request gets, and what the log says, in front of LM Studio 0.3."""
    emulator = Emulator()
    with _warnings_logged() as logged:
        async with (
            serve(without_rest_v1(emulator.app)) as upstream_url,
            proxy_for(upstream_url) as proxy,
        ):
            body = {"model": QWEN, "messages": HELLO}
            response = await proxy.http.post("/v1/chat/completions", json=body)
            rec = _Recorder(proxy, upstream_url)
            first_log = logged[0]
    lines = [
        f"$ {_curl('/v1/chat/completions', body)}",
        f"HTTP {response.status_code}, retry-after: {response.headers.get('retry-after')}",
        response.text,
        "",
        "the log:",
        first_log,
    ]
    return rec.shown("\n".join(lines))


async def _main() -> None:  # pragma: no cover - a developer's look at the captures
    for example in await capture_endpoints():
        print(example.curl, example.status, example.answer, sep="\n")  # noqa: T201
    print(await capture_old_lmstudio())  # noqa: T201


if __name__ == "__main__":  # pragma: no cover - run by hand
    anyio.run(_main)
