"""UpstreamStreamResponse: relays LM Studio's bytes as they come and releases what it holds.

The handler returns before the first byte is sent, so the upstream response and the model lease
belong to this response object and are released in `__call__`'s `finally` (docs/design.md §4.1).
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import AsyncExitStack
from typing import Protocol

import anyio
from starlette.types import Receive, Scope, Send

from proxy.access import RequestRecord
from proxy.errors import ProxyError, UpstreamError, is_anthropic_path
from proxy.lmstudio import UpstreamResponse

logger = logging.getLogger("lmswitch.streaming")

_decoder = json.JSONDecoder()

# The OpenAI streams that end with `data: [DONE]` (the Responses and Anthropic streams do not).
_DONE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})

# Non-streamed answers are copied aside up to this size to read their usage figures.
_USAGE_COPY_LIMIT = 1 << 20


class UsageScanner:
    """Reads token usage from a response body on the side, never holding a byte back."""

    def __init__(self, sse: bool) -> None:
        self._sse = sse
        self._buffer = bytearray()
        self.prompt: int | None = None
        self.completion: int | None = None

    def feed(self, chunk: bytes) -> None:
        if not self._sse:
            if len(self._buffer) + len(chunk) <= _USAGE_COPY_LIMIT:
                self._buffer += chunk
            return
        self._buffer += chunk
        *lines, rest = self._buffer.split(b"\n")
        self._buffer = bytearray(rest)
        for line in lines:
            if line.startswith(b"data:") and b'"usage"' in line:
                self._read(bytes(line[5:]))

    def finish(self) -> None:
        """Read a whole (non-streamed) answer's usage without parsing the rest of it."""
        if self._sse:
            return
        at = self._buffer.rfind(b'"usage"')
        colon = self._buffer.find(b":", at)
        if at < 0 or colon < 0:
            return
        try:
            usage, _ = _decoder.raw_decode(self._buffer[colon + 1 :].decode().lstrip())
        except ValueError:
            return
        self._take(usage)

    def _read(self, data: bytes) -> None:
        try:
            doc = json.loads(data)
        except ValueError:
            return
        if not isinstance(doc, dict):
            return
        for holder in (doc, doc.get("response"), doc.get("message")):
            if isinstance(holder, dict):
                self._take(holder.get("usage"))

    def _take(self, usage: object) -> None:
        """OpenAI's names or Anthropic's; the last figures seen win (they are cumulative)."""
        if not isinstance(usage, dict):
            return
        prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
        completion = usage.get("completion_tokens", usage.get("output_tokens"))
        if isinstance(prompt, int) and prompt:
            self.prompt = prompt
        if isinstance(completion, int):
            self.completion = completion


def sse_error_event(error: ProxyError, path: str) -> bytes:
    """The last event of a stream that broke off, in the client's API's shape."""
    if is_anthropic_path(path):
        return b"event: error\ndata: " + json.dumps(error.anthropic_body()).encode() + b"\n\n"
    return b"data: " + json.dumps(error.body()).encode() + b"\n\n"


class Translator(Protocol):
    """Turns LM Studio's answer into another API's as it streams (`proxy.ollama_answers`)."""

    media_type: bytes

    def feed(self, chunk: bytes) -> bytes:
        """What to send for this chunk of LM Studio's body (perhaps nothing yet)."""

    def end(self) -> bytes:
        """What to send once LM Studio's body has ended; `UpstreamError` if it was cut short."""

    def error(self, error: ProxyError) -> bytes:
        """The last line of a stream that broke off."""


class UpstreamStreamResponse:
    """An ASGI response that streams an upstream response through, chunk for chunk (or, with a
    `translator`, what it makes of them).

    Invariant: whatever happens (normal end, client disconnect, upstream failure, cancellation)
    what it holds (the upstream response and the model lease, in `held`) is released exactly
    once, in `__call__`. A client that disconnects cancels it from outside (the route's
    `ClientWatch`, which also marks the record).
    """

    def __init__(
        self,
        upstream: UpstreamResponse,
        held: AsyncExitStack,
        record: RequestRecord,
        *,
        translator: Translator | None = None,
    ) -> None:
        self._upstream = upstream
        self._held = held
        self._record = record
        self._translator = translator
        self.sse = upstream.content_type.startswith("text/event-stream")
        if translator is not None:  # LM Studio's headers describe a body the client never sees
            headers = [(b"content-type", translator.media_type)]
        else:  # the request's own id replaces LM Studio's (`RequestIdMiddleware` adds it)
            headers = [(n, v) for n, v in upstream.headers if n != b"x-request-id"]
        if self.sse:
            headers.append((b"x-accel-buffering", b"no"))
        self._headers = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self._upstream.status_code,
                    "headers": self._headers,
                }
            )
            await self.relay(send, scope["path"])
        finally:
            with anyio.CancelScope(shield=True):
                await self._held.aclose()  # the upstream response, then the lease

    async def relay(self, send: Send, path: str) -> None:
        """LM Studio's body, chunk for chunk, then the end of the response (its start is sent)."""
        record, translator = self._record, self._translator
        usage = UsageScanner(self.sse)
        tail = b""  # the stream's last bytes, to see that an OpenAI stream ended with [DONE]
        try:
            async for chunk in self._upstream.aiter_raw():
                if record.first_byte_s is None:
                    record.first_byte_s = time.perf_counter() - record.started
                usage.feed(chunk)
                if translator is not None:
                    chunk = translator.feed(chunk)
                    if not chunk:
                        continue
                else:
                    tail = (tail + chunk)[-32:]
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if translator is not None:
                last = translator.end()
                await send({"type": "http.response.body", "body": last, "more_body": True})
            elif self.sse and path in _DONE_PATHS and b"[DONE]" not in tail:
                raise UpstreamError(  # noqa: TRY301 - the same handling as a broken stream
                    "LM Studio ended the stream without [DONE]: the answer may be incomplete",
                    code="upstream_incomplete",
                )
        except UpstreamError as exc:
            record.upstream_failed = True
            logger.warning("request %s: upstream broke off: %s", record.request_id, exc.message)
            if not self.sse:
                raise  # a truncated JSON body must not look complete: abort the connection
            last = sse_error_event(exc, path) if translator is None else translator.error(exc)
            await send({"type": "http.response.body", "body": last, "more_body": True})
        usage.finish()
        record.prompt_tokens, record.completion_tokens = usage.prompt, usage.completion
        await send({"type": "http.response.body", "body": b"", "more_body": False})
