"""FeedbackResponse: a streaming answer that begins while its request still waits for its model.

A streaming request still waiting after `scheduler.loading_feedback_after` gets its answer
started (200, `text/event-stream`) and a line of progress every `EVERY_S` until its model is
ready: an SSE comment, Anthropic's `event: ping` on `/v1/messages`, or chunks whose delta
carries `reasoning_content` on `/v1/chat/completions`. LM Studio's stream then follows in the
same response, byte for byte; a wait that ends in an error ends the stream with the error event,
and the request's record carries the error's status (docs/design.md §4.7).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

import anyio
from starlette.types import Receive, Scope, Send

from proxy.access import RequestRecord
from proxy.errors import ProxyError, UpstreamError, is_anthropic_path
from proxy.leases import Progress, Ticket
from proxy.lmstudio import UpstreamResponse
from proxy.streaming import UpstreamStreamResponse, sse_error_event

logger = logging.getLogger("lmswitch.streaming")

# A line of progress this often, the first one `loading_feedback_after` into the wait.
EVERY_S = 2.0

_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_PING = b'event: ping\ndata: {"type": "ping"}\n\n'
# LM Studio's error answer is read up to this much to be sent on as the stream's error event.
_ERROR_READ_LIMIT = 64 << 10


def describe(progress: Progress, *, pool: bool) -> str:
    """One line of progress, e.g. `lmswitch: loading model qwen: 5 s waited, about 31 s
    expected in all, 0 requests ahead`."""
    if progress.loading:
        doing = "loading model"
    elif progress.ahead:
        doing = "waiting for its turn to load model"
    else:
        doing = "waiting for model"
    where = f" on {progress.upstream}" if pool and progress.upstream else ""
    expected = (
        "no estimate yet"
        if progress.expected_s is None
        else f"about {math.ceil(progress.expected_s):d} s expected in all"
    )
    ahead = "1 request" if progress.ahead == 1 else f"{progress.ahead} requests"
    return (
        f"lmswitch: {doing} {progress.model}{where}: {int(progress.waited_s):d} s waited, "
        f"{expected}, {ahead} ahead"
    )


class FeedbackResponse:
    """An ASGI response that waits for LM Studio's answer (`opening`) and, if that takes longer
    than `after` seconds from the request's start, starts the stream with lines of progress.

    Invariant: what the answer holds (`held`: the model's lease, LM Studio's response, entered
    by `opening`) is released exactly once, in `__call__`, whatever happens.
    """

    def __init__(
        self,
        opening: Callable[[], Awaitable[UpstreamResponse]],
        held: AsyncExitStack,
        record: RequestRecord,
        *,
        ticket: Ticket,
        mode: str,
        after_s: float,
        model_name: str,
        pool: bool,
    ) -> None:
        self._opening = opening
        self._held = held
        self._record = record
        self._ticket = ticket
        self._mode = mode
        self._after_s = after_s
        self._model_name = model_name
        self._pool = pool

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"]
        upstream: UpstreamResponse | None = None
        failure: Exception | None = None
        started = False
        try:
            async with anyio.create_task_group() as tg:

                async def wait() -> None:
                    nonlocal upstream, failure
                    try:
                        upstream = await self._opening()
                    except Exception as exc:  # noqa: BLE001 - raised or sent on below
                        failure = exc
                    tg.cancel_scope.cancel()  # the lines of progress stop

                tg.start_soon(wait)
                await anyio.sleep(self._after_s - (time.perf_counter() - self._record.started))
                await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
                started = True
                line = self._line_maker(path)
                while True:
                    body = line(self._progress())
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                    self._record.feedback += 1
                    await anyio.sleep(EVERY_S)
            if not started:  # the wait ended in time: the answer as without feedback
                if failure is not None:
                    raise failure
                assert upstream is not None  # noqa: S101 - set when there is no failure
                await UpstreamStreamResponse(upstream, self._held, self._record)(
                    scope, receive, send
                )
            elif failure is not None:
                await self._fail(send, path, failure)
            else:
                assert upstream is not None  # noqa: S101 - set when there is no failure
                await self._continue(send, path, upstream)
        finally:
            with anyio.CancelScope(shield=True):
                await self._held.aclose()

    def _progress(self) -> Progress:
        if (read := self._ticket.progress) is not None:
            return read()
        # Not queued (placed, or waiting for LM Studio to confirm its model): no more known.
        return Progress(
            model=self._record.model,
            upstream=self._record.upstream,
            waited_s=time.perf_counter() - self._record.started,
            loading=False,
            expected_s=None,
            ahead=0,
        )

    def _line_maker(self, path: str) -> Callable[[Progress], bytes]:
        """How a line of progress is written on `path`, in the configured mode."""
        pool = self._pool
        if is_anthropic_path(path):
            return lambda p: f": {describe(p, pool=pool)}\n".encode() + _PING
        if self._mode == "reasoning" and path == "/v1/chat/completions":
            chunk = {
                "id": f"chatcmpl-lmswitch-{self._record.request_id}",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": self._model_name,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "reasoning_content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
            }
            delta = chunk["choices"][0]["delta"]  # type: ignore[index]

            def reasoning(p: Progress) -> bytes:
                delta["reasoning_content"] = describe(p, pool=pool) + "\n"
                return b"data: " + json.dumps(chunk).encode() + b"\n\n"

            return reasoning
        return lambda p: f": {describe(p, pool=pool)}\n\n".encode()

    async def _fail(self, send: Send, path: str, failure: Exception) -> None:
        """The wait failed after the stream began: its error as the stream's last event."""
        if not isinstance(failure, ProxyError):
            logger.error(
                "request %s failed after its feedback began",
                self._record.request_id,
                exc_info=failure,
            )
            failure = ProxyError("internal error while waiting for the model")
        self._record.status = failure.status_code
        await _end(send, sse_error_event(failure, path))

    async def _continue(self, send: Send, path: str, upstream: UpstreamResponse) -> None:
        """LM Studio's answer, in the stream already begun: its events byte for byte, or its
        error answer as the stream's error event."""
        response = UpstreamStreamResponse(upstream, self._held, self._record)
        if upstream.status_code < 400 and response.sse:
            await response.relay(send, path)
            return
        body = bytearray()
        async for chunk in upstream.aiter_raw():
            body += chunk
            if len(body) >= _ERROR_READ_LIMIT:
                break
        self._record.status = upstream.status_code if upstream.status_code >= 400 else 502
        await _end(send, _answer_as_event(upstream, bytes(body), path))


def _answer_as_event(upstream: UpstreamResponse, body: bytes, path: str) -> bytes:
    """LM Studio's answer that is not an event stream, as the error event of a stream: its own
    error object if it sent one, else one that says what came."""
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    anthropic = is_anthropic_path(path)
    if isinstance(doc, dict) and upstream.status_code >= 400:
        if anthropic and doc.get("type") == "error":
            return b"event: error\ndata: " + json.dumps(doc).encode() + b"\n\n"
        if not anthropic and "error" in doc:
            return b"data: " + json.dumps(doc).encode() + b"\n\n"
    if upstream.status_code >= 400:
        text = body.decode(errors="replace").strip()[:500] or "no details"
        message = f"LM Studio answered HTTP {upstream.status_code}: {text}"
    else:
        message = (
            f"LM Studio answered a streaming request with {upstream.content_type or 'no type'}, "
            "not an event stream"
        )
    return sse_error_event(UpstreamError(message, code="upstream_error"), path)


async def _end(send: Send, event: bytes) -> None:
    await send({"type": "http.response.body", "body": event, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})
