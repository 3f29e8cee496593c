"""Request ids and access lines: every request's `RequestRecord`, built once by the outermost
middleware, filled in by the route, and written once as the access line, the request metrics
and a `request` event (docs/design.md §4.3)."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.errors import ProxyError, error_response
from proxy.events import EventBus
from proxy.metrics import Metrics
from proxy.usage import KeyUsage, Usage

access_logger = logging.getLogger("lmswitch.access")
logger = logging.getLogger("lmswitch.server")  # where the server's own failures are logged

RECORD_SCOPE_KEY = "lmswitch.record"

# A client's request id is echoed back only if it is short and plain.
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:/+=-]{1,128}")
_PLAIN = re.compile(r"[!#-~]*")  # printable ASCII but space and `"`


@dataclass(slots=True)
class RequestRecord:
    """What one request did, for its access line, the metrics and events.

    `routed` requests (those for a model, and refusals of them) count in the request metrics and
    events; the others (listings, management, metrics, health, the page) get an access line only.
    """

    request_id: str
    method: str
    endpoint: str
    model: str
    started: float  # time.perf_counter(): uvloop's own clock ticks in whole milliseconds
    upstream: str | None = None  # the host the request was placed on, once it is
    status: int = 0
    queue_wait_s: float = 0.0
    waited_on_load: bool = False
    bytes_out: int = 0
    first_byte_s: float | None = None
    duration_s: float = 0.0
    disconnected: bool = False
    upstream_failed: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    feedback: int = 0  # lines of progress sent while it waited (`proxy.feedback`)
    # Who asked (DESIGN §11.3): the name of the key presented (config names only: `anonymous`
    # for unnamed keys and for no key), and its priority. Set by the auth middleware.
    key: str = "anonymous"
    priority: int = 0
    busy_s: float = 0.0  # time its model was held for it, from its lease to its release
    granted: bool = False  # it was granted its model (its `queue_wait_s` is measured)
    client: str | None = None  # the client's address and port: its connection
    stream: bool = False  # it asked for a streamed answer
    routed: bool = True

    def fields(self) -> dict[str, Any]:
        """The access line's fields, in their order."""
        fields: dict[str, Any] = {
            "request_id": self.request_id,
            "model": self.model,
            "endpoint": self.endpoint,
            "key": self.key,  # the key's config name: never the key
            "status": self.status,
            "duration_ms": round(self.duration_s * 1000, 1),
            "queue_wait_ms": round(self.queue_wait_s * 1000, 1),
            "waited_on_load": self.waited_on_load,
            "bytes_out": self.bytes_out,
        }
        if not self.routed:
            return fields
        fields["upstream"] = self.upstream or "-"
        fields["stream"] = self.stream
        fields["client"] = self.client or "-"
        fields["busy_ms"] = round(self.busy_s * 1000, 1)
        fields["disconnected"] = self.disconnected
        if self.first_byte_s is not None:
            fields["first_byte_ms"] = round(self.first_byte_s * 1000, 1)
        if self.upstream_failed:
            fields["upstream_failed"] = True
        if self.feedback:
            fields["feedback"] = self.feedback
        return fields


def record_of(scope: Scope) -> RequestRecord:
    """The record `RequestIdMiddleware` made for this request."""
    record: RequestRecord = scope[RECORD_SCOPE_KEY]
    return record


class RequestIdMiddleware:
    """Gives every request an id (the client's `x-request-id`, or a new one) and its record,
    puts the id on every response (the proxy's own errors included), and, once the response has
    ended, completes the record (status, bytes, duration) and hands it to `log`."""

    def __init__(self, app: ASGIApp, log: Callable[[RequestRecord], None]) -> None:
        self.app = app
        self._log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                if _REQUEST_ID.fullmatch(value):  # else it is not echoed: make our own
                    request_id = value.decode("ascii")
                break
        if not request_id:
            request_id = uuid.uuid4().hex
        record = RequestRecord(
            request_id, scope["method"], scope["path"], "-", time.perf_counter(), routed=False
        )
        record.status = 500  # unless a response starts: an exception reached the server
        scope[RECORD_SCOPE_KEY] = record
        raw_id = request_id.encode("latin-1")

        counted = scope["method"] != "HEAD"  # the server sends no body for HEAD
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                record.status = message["status"]
                headers = message.setdefault("headers", [])
                if not any(name == b"x-request-id" for name, _ in headers):
                    headers = message["headers"] = [*headers, (b"x-request-id", raw_id)]
                if record.upstream is not None:  # the host that answered, or failed to
                    message["headers"] = [
                        *headers,
                        (b"x-lmswitch-upstream", record.upstream.encode()),
                    ]
            elif message["type"] == "http.response.body" and counted:
                record.bytes_out += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if started:  # the answer is broken off: the server closes the connection
                raise
            # Answered here, not by Starlette's ServerErrorMiddleware outside this one: in the
            # route's envelope, with the request's id, and counted in its access line.
            logger.exception("request %s failed", request_id)
            error = ProxyError(
                "lmswitch failed to handle this request: an internal error, logged with this "
                "request's id (x-request-id)",
                code="internal_error",
            )
            await error_response(error, path=scope["path"])(scope, receive, send_with_id)
        finally:
            record.duration_s = time.perf_counter() - record.started
            self._log(record)


class AccessLine:
    """An access line's fields, formatted only when a handler writes the record: as `key=value`
    pairs by a text formatter, or merged into the JSON object by `proxy.server`'s JSON formatter."""

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def __str__(self) -> str:
        return " ".join(f"{key}={_plain(value)}" for key, value in self.fields.items())


def _plain(value: object) -> object:
    """A value as it is, or as a JSON string if it holds spaces, quotes or control characters
    (a client's path, decoded, could otherwise forge fields or lines)."""
    if isinstance(value, str) and not _PLAIN.fullmatch(value):
        return json.dumps(value)
    return value


class _KeyCounters:
    """One key's labelled children and usage, looked up once per key."""

    __slots__ = ("busy", "completion", "prompt", "queue_wait", "statuses", "usage")

    def __init__(self, metrics: Metrics, key: str, usage: KeyUsage) -> None:
        self.statuses: dict[int, Counter] = {}
        self.prompt = metrics.key_tokens.labels(key, "prompt")
        self.completion = metrics.key_tokens.labels(key, "completion")
        self.busy = metrics.key_busy.labels(key)
        self.queue_wait = metrics.key_queue_wait.labels(key)
        self.usage = usage


def access_log(metrics: Metrics, events: EventBus, usage: Usage) -> Callable[[RequestRecord], None]:
    """What becomes of a finished request: the request metrics, its key's usage and a `request`
    event if it is routed, and one access line (docs/design.md §4.3)."""
    # Labelled children, looked up once: `labels()` takes a lock and builds a key every call.
    # Label values are model keys, route paths and key names, so these dicts stay small.
    timers: dict[tuple[str, str], tuple[Histogram, Histogram]] = {}
    counts: dict[tuple[str, str, int], Counter] = {}
    by_key: dict[str, _KeyCounters] = {}

    def count_key(record: RequestRecord) -> None:
        key, status = record.key, record.status
        if (counters := by_key.get(key)) is None:
            counters = by_key[key] = _KeyCounters(metrics, key, usage.of(key))
        if (counter := counters.statuses.get(status)) is None:
            counter = counters.statuses[status] = metrics.key_requests.labels(key, str(status))
        counter.inc()
        used = counters.usage
        used.statuses[status] = used.statuses.get(status, 0) + 1
        if record.prompt_tokens:
            counters.prompt.inc(record.prompt_tokens)
            used.prompt_tokens += record.prompt_tokens
        if record.completion_tokens:
            counters.completion.inc(record.completion_tokens)
            used.completion_tokens += record.completion_tokens
        if record.busy_s:
            counters.busy.inc(record.busy_s)
            used.busy_s += record.busy_s
        if record.granted:
            counters.queue_wait.inc(record.queue_wait_s)
            used.queue_wait_s += record.queue_wait_s
            used.granted += 1

    def count(record: RequestRecord) -> None:
        model, endpoint = record.model, record.endpoint
        if (counter := counts.get((model, endpoint, record.status))) is None:
            counter = counts[model, endpoint, record.status] = metrics.requests.labels(
                model, endpoint, str(record.status)
            )
        counter.inc()
        if (timer := timers.get((model, endpoint))) is None:
            timer = timers[model, endpoint] = (
                metrics.request_duration.labels(model, endpoint),
                metrics.ttfb.labels(model, endpoint),
            )
        timer[0].observe(record.duration_s)
        if record.first_byte_s is not None:
            timer[1].observe(record.first_byte_s)
        if record.prompt_tokens:
            metrics.tokens.labels(model, "prompt").inc(record.prompt_tokens)
        if record.completion_tokens:
            metrics.tokens.labels(model, "completion").inc(record.completion_tokens)
        if record.disconnected:
            metrics.disconnects.labels(model).inc()
        count_key(record)

    def log(record: RequestRecord) -> None:
        if record.routed:
            count(record)
        level = logging.DEBUG if is_quiet_read(record) else logging.INFO
        logging_on = access_logger.isEnabledFor(level)
        publishing = record.routed and events.subscribers
        if not (logging_on or publishing):
            return
        fields = record.fields()
        if publishing:
            events.publish("request", fields)
        if logging_on:
            access_logger.log(level, AccessLine(fields))

    return log


# What the page and scrapers read over and over: status, model rows, events, health, metrics.
_QUIET_PATHS = frozenset(
    {
        "/api/v1/status",
        "/api/v1/models",
        "/api/v1/models/",
        "/api/v1/models/loaded",
        "/api/v1/events",
        "/api/v1/usage",
        "/healthz",
        "/readyz",
        "/metrics",
        "/ui",
    }
)


def is_quiet_read(record: RequestRecord) -> bool:
    """A management read (status, model rows, events, health, metrics, the page's files),
    whose access line is at DEBUG so that the page and scrapers do not fill the log; one that
    a key refused stays at INFO, as do requests for models, listings and management writes."""
    return (
        not record.routed
        and record.method in ("GET", "HEAD")
        and (record.endpoint in _QUIET_PATHS or record.endpoint.startswith("/ui/"))
        and record.status not in (401, 403)
    )
