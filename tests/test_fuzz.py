"""Fuzzing: random bodies and headers on every route get a success or a well-formed error.

One emulator and one proxy serve every example of a test; Hypothesis runs in a worker thread and
talks to them over real sockets with a synchronous client, while the event loop serves them.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import httpx2
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from proxy.emulator import Emulator
from proxy.openai_routes import PROXIED_PATHS
from tests.helpers import LLAMA, NOMIC, QWEN, running

ALIAS = "gpt-4o-mini"
MODELS = (QWEN, LLAMA, NOMIC)
SECTIONS: dict[str, Any] = {"models": {"aliases": {ALIAS: QWEN}, "default": LLAMA, "max_loaded": 2}}
V1_PATHS = PROXIED_PATHS
OLLAMA_PATHS = ("/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/show")
ADMIN_PATHS = (
    "/api/v1/models/load",
    "/api/v1/models/unload",
    "/api/v1/models/pin",
    "/api/v1/models/unpin",
)
# Proxy errors for what a client may send, and LM Studio's refusals passed through; never 500.
SENSIBLE = frozenset({200, 400, 404, 413, 415})

# --- strategies ---------------------------------------------------------------------------------

# Any JSON value; no NaN, which is not equal to itself (the forwarded body is compared).
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)

# The fields each route reads (the proxy reads `model` and `stream` on every /v1 route).
ROUTES: dict[str, tuple[str, ...]] = {
    "/v1/chat/completions": ("model", "stream", "messages", "max_tokens", "stream_options", "ttl"),
    "/v1/completions": ("model", "stream", "prompt", "max_tokens", "stream_options", "ttl"),
    "/v1/embeddings": ("model", "input", "ttl"),
    "/v1/responses": ("model", "stream", "input", "ttl"),
    "/v1/messages": ("model", "stream", "messages", "max_tokens", "ttl"),
    "/v1/messages/count_tokens": ("model", "messages"),
    "/api/chat": ("model", "stream", "messages", "options", "format", "keep_alive", "tools"),
    "/api/generate": ("model", "stream", "prompt", "system", "raw", "options", "keep_alive"),
    "/api/embed": ("model", "input", "keep_alive", "dimensions"),
    "/api/embeddings": ("model", "prompt", "keep_alive"),
    "/api/show": ("model",),
    "/api/v1/models/load": ("model_id", "context_length"),
    "/api/v1/models/unload": ("model_id",),
    "/api/v1/models/pin": ("model_id",),
    "/api/v1/models/unpin": ("model_id",),
}
TEXT_MODELS = st.sampled_from((QWEN, LLAMA, ALIAS))
GOOD: dict[str, st.SearchStrategy[Any]] = {
    "model": TEXT_MODELS,
    "stream": st.booleans(),
    "messages": st.just([{"role": "user", "content": "Say hello"}]),
    "prompt": st.text(max_size=20),
    "input": st.text(max_size=20) | st.lists(st.text(max_size=10), max_size=3),
    "max_tokens": st.integers(0, 40),
    "stream_options": st.just({"include_usage": True}),
    "ttl": st.floats(1e-3, 1e6),
    "options": st.fixed_dictionaries(
        {},
        optional={
            "temperature": st.floats(0, 2),
            "num_predict": st.integers(-2, 40),
            "stop": st.lists(st.text(max_size=5), max_size=2),
            "num_ctx": st.integers(1, 9999),
        },
    ),
    "format": st.sampled_from(("", "json", {"type": "object"})),
    "keep_alive": st.sampled_from((0, -1, 30, "5m", "1h", "-1s")),
    "tools": st.just([{"type": "function", "function": {"name": "hello"}}]),
    "system": st.text(max_size=10),
    "raw": st.booleans(),
    "dimensions": st.integers(1, 768),
    "model_id": st.sampled_from((*MODELS, ALIAS)),
    "context_length": st.integers(1, 2**40),
}
JUNK: dict[str, st.SearchStrategy[Any]] = {
    key: good | st.sampled_from(MODELS) | json_values | st.text(max_size=30)
    for key, good in GOOD.items()
}


@st.composite
def json_objects(draw: st.DrawFn, path: str) -> bytes:
    """A JSON object's text: the fields `path` reads (or not), odd keys, duplicates, spacing.

    Two in three are fit to serve (each field valid or left out), so that examples get past
    validation to LM Studio; the others take any value, and keys of their own.
    """
    fields = draw(st.sampled_from((GOOD, GOOD, JUNK)))
    embedding = path in ("/v1/embeddings", "/api/embed", "/api/embeddings")
    good = {**fields, "model": st.just(NOMIC)} if embedding else fields
    pairs: list[tuple[str, Any]] = [
        (key, draw(good[key])) for key in ROUTES[path] if draw(st.integers(0, 7))
    ]
    if fields is JUNK:
        pairs += draw(st.lists(st.tuples(st.text(max_size=10), json_values), max_size=3))
        pairs = draw(st.permutations(pairs))
        twice = draw(st.booleans())
        if pairs and twice:  # the same key twice: the last one counts
            pairs.append((pairs[0][0], draw(JUNK.get(pairs[0][0], json_values))))
    ascii_only = draw(st.booleans())
    space = draw(st.sampled_from(("", " ", "\n  ", "\t")))
    items = [
        f"{json.dumps(k, ensure_ascii=ascii_only)}{space}:{space}"
        f"{json.dumps(v, ensure_ascii=ascii_only)}"
        for k, v in pairs
    ]
    return f"{space}{{{space}{f',{space}'.join(items)}{space}}}{space}".encode()


@st.composite
def nested(draw: st.DrawFn) -> bytes:
    """A JSON value nested `depth` deep, alone or as a field of an otherwise good request; some
    deeper than Python's recursion limit, where `json.loads` gives up."""
    depth = draw(st.integers(1, 200) | st.integers(1000, 5000))  # 1000: its default
    opening, closing = draw(st.sampled_from((("[", "]"), ('{"a":', "}"))))
    value = opening * depth + "1" + closing * depth
    if draw(st.booleans()):
        return value.encode()
    return f'{{"model": "{QWEN}", "messages": {value}, "input": {value}}}'.encode()


@st.composite
def bodies(draw: st.DrawFn, path: str) -> bytes:
    """Mostly JSON objects; sometimes other JSON, deep nesting, or bytes that are not JSON."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=40))
    if kind == 1:
        return json.dumps(draw(json_values)).encode()
    if kind == 2:
        return draw(nested())
    return draw(json_objects(path))


# Header names: RFC 9110 tokens. Left out: those that frame or route the request itself.
FRAMING = frozenset(
    {"content-length", "transfer-encoding", "host", "connection", "upgrade", "expect", "te"}
)
header_names = st.text(
    string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~", min_size=1, max_size=20
).filter(lambda name: name.lower() not in FRAMING)
# Header values: visible ASCII, spaces and tabs inside, and obs-text bytes.
header_values = st.binary(max_size=40).map(
    lambda raw: bytes(b for b in raw if (b >= 0x20 and b != 0x7F) or b == 0x09).strip(b" \t")
)
content_types = st.sampled_from(
    (b"application/json", b"application/json; charset=utf-8", b"a/x+json", b"text/plain")
) | header_values.filter(bool)


@st.composite
def headers(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    pairs = draw(st.lists(st.tuples(header_names.map(str.encode), header_values), max_size=4))
    if not draw(st.integers(0, 3)):
        pairs.append((b"content-type", draw(content_types)))
    return pairs


@dataclass(frozen=True)
class Sent:
    """One request as sent."""

    path: str
    body: bytes
    headers: list[tuple[bytes, bytes]]

    @property
    def anthropic(self) -> bool:
        return self.path.startswith("/v1/messages")

    @property
    def ollama(self) -> bool:
        return self.path in OLLAMA_PATHS


@st.composite
def requests(draw: st.DrawFn, paths: tuple[str, ...]) -> Sent:
    path = draw(st.sampled_from(paths))
    return Sent(path, draw(bodies(path)), draw(headers()))


# --- checks -------------------------------------------------------------------------------------


def openai_error(doc: Any) -> bool:
    error = doc.get("error") if isinstance(doc, dict) else None
    return (
        isinstance(error, dict)
        and isinstance(error.get("message"), str)
        and isinstance(error.get("type"), str)
        and {"param", "code"} <= error.keys()
    )


def anthropic_error(doc: Any) -> bool:
    error = doc.get("error") if isinstance(doc, dict) else None
    return (
        isinstance(doc, dict)
        and doc.get("type") == "error"
        and isinstance(error, dict)
        and isinstance(error.get("type"), str)
        and isinstance(error.get("message"), str)
    )


def check_sse(sent: Sent, text: str) -> None:
    events = [
        line[5:].strip() for line in text.splitlines() if line.startswith("data:") and line[5:]
    ]
    assert events, f"an empty stream: {text[:300]!r}"
    for data in events[:-1]:
        assert data != "[DONE]", "[DONE] before the end"
        assert isinstance(json.loads(data), dict)
    if sent.path in ("/v1/chat/completions", "/v1/completions"):
        assert events[-1] == "[DONE]", f"no [DONE]: {events[-2:]}"
    else:
        assert isinstance(json.loads(events[-1]), dict)


def check_ollama(response: httpx2.Response) -> None:
    """Ollama's answer: JSON lines (one, unless streamed), the last one done, an embedding or
    a model's description; or its error, `{"error": "..."}`."""
    if response.status_code != 200:
        doc = response.json()
        assert isinstance(doc, dict), doc
        assert set(doc) == {"error"}, f"not Ollama's error: {doc}"
        assert isinstance(doc["error"], str)
        return
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert lines, "an empty answer"
    assert all(isinstance(line, dict) for line in lines)
    last = lines[-1]
    ends = ("embedding", "embeddings", "modelfile", "error")
    assert last.get("done") is True or any(key in last for key in ends), last


def check_answer(sent: Sent, response: httpx2.Response, upstream_saw: bool) -> None:
    """A success with a body of the right kind, or a well-formed error in the right envelope."""
    status = response.status_code
    assert status != 500, f"500: {response.text[:500]}"
    assert status in SENSIBLE, f"status {status}: {response.text[:500]}"
    assert response.headers.get("x-request-id"), "no x-request-id"
    if sent.ollama:
        check_ollama(response)
        return
    if status == 200 and response.headers.get("content-type", "").startswith("text/event-stream"):
        check_sse(sent, response.text)
        return
    doc = response.json()
    if status == 200:
        assert isinstance(doc, dict)
        if sent.path.startswith("/api/"):
            assert doc["success"] is True
            assert isinstance(doc["message"], str)
            assert doc["model_id"] in MODELS
        return
    if sent.anthropic and not upstream_saw:
        assert anthropic_error(doc), f"not Anthropic's envelope: {doc}"
    else:  # the proxy's own errors, or LM Studio's passed through
        assert openai_error(doc) or anthropic_error(doc), f"not an error envelope: {doc}"


def check_forwarded(sent: Sent, forwarded: Any) -> None:
    """LM Studio got the client's body, with only `model` resolved (alias, default)."""
    if forwarded is None:  # nested deeper than the emulator's parser reads: nothing to compare
        assert b"[" * 900 in sent.body or b'{"a":' * 900 in sent.body
        return
    payload = json.loads(sent.body)  # it reached LM Studio: a JSON object
    assert isinstance(payload, dict)
    name = payload.get("model")
    expected = dict(payload)
    if name is None:
        expected["model"] = LLAMA
    elif name == ALIAS:
        expected["model"] = QWEN
    assert forwarded == expected


# --- running examples against the servers -------------------------------------------------------


def post(http: httpx2.Client, emulator: Emulator, sent: Sent) -> None:
    """Send one request and check what came back and what LM Studio got."""
    seen = len(emulator.calls)
    response = http.post(sent.path, content=sent.body, headers=sent.headers)
    new_calls = [c for c in emulator.calls[seen:] if c.path == sent.path]
    event(f"{sent.path}: {response.status_code}{' via LM Studio' if new_calls else ''}")
    check_answer(sent, response, upstream_saw=bool(new_calls))
    if new_calls and sent.path.startswith("/v1/"):
        check_forwarded(sent, new_calls[-1].body)


def run_examples(
    url: str, emulator: Emulator, paths: tuple[str, ...], examples: int
) -> Callable[[], None]:
    """A function that runs `examples` requests to `paths` (in a worker thread)."""

    def run() -> None:
        with httpx2.Client(base_url=url, timeout=10) as http:

            @settings(
                max_examples=examples,
                deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            )
            @given(sent=requests(paths))
            def example(sent: Sent) -> None:
                post(http, emulator, sent)
                if sent.path.startswith("/api/v1/"):  # no pins left: later examples load any
                    for model in MODELS:
                        http.post("/api/v1/models/unpin", json={"model_id": model})

            example()

    return run


@pytest.mark.parametrize("paths", [V1_PATHS, OLLAMA_PATHS], ids=["v1", "ollama"])
async def test_fuzz_routes_for_models_answer_well_formed(paths: tuple[str, ...]) -> None:
    """Random bodies and headers on /v1 and on Ollama's routes: a success or an error in the
    right envelope, never a 500."""
    emulator = Emulator(reply_tokens=3)
    async with running(emulator, **SECTIONS) as proxy:
        run = run_examples(proxy.url, emulator, paths, examples=300)
        with anyio.fail_after(25):
            await anyio.to_thread.run_sync(run, abandon_on_cancel=True)


async def test_fuzz_management_api_answers_well_formed() -> None:
    """Random bodies and headers on /api/v1/models/*: the success envelope or an error, no 500."""
    emulator = Emulator()
    async with running(emulator, **SECTIONS) as proxy:
        run = run_examples(proxy.url, emulator, ADMIN_PATHS, examples=200)
        with anyio.fail_after(25):
            await anyio.to_thread.run_sync(run, abandon_on_cancel=True)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/api/v1/models/load"])
async def test_deeply_nested_json_is_a_400_not_a_500(path: str) -> None:
    """JSON nested past Python's recursion limit is refused like any body that cannot be read."""
    deep = b"[" * 5000 + b"]" * 5000  # valid JSON, and well under max_body_bytes
    body = b'{"model": "%s", "messages": %s}' % (QWEN.encode(), deep)
    async with running(Emulator()) as proxy:
        response = await proxy.http.post(path, content=body)
    check_answer(Sent(path, body, []), response, upstream_saw=False)
    assert response.status_code == 400
