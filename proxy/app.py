"""create_app: brings routes, middleware, error handlers and the lifespan together."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx2
from prometheus_client import Counter, Histogram
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy import admin_routes, openai_routes
from proxy.auth import AuthMiddleware
from proxy.config import Settings
from proxy.errors import ProxyError, error_response, handle_proxy_error
from proxy.events import EventBus
from proxy.lmstudio import LMStudioClient, create_http_client
from proxy.manager import ModelManager
from proxy.metrics import UNKNOWN_MODEL, Metrics
from proxy.state import State
from proxy.streaming import RequestRecord

access_logger = logging.getLogger("lmswitch.access")

# A client's request id is echoed back only if it is short and plain.
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:/+=-]{1,128}")
_PLAIN = re.compile(r"[!#-~]*")  # printable ASCII but space and `"`

UI_DIR = Path(__file__).parent / "ui"  # the web page: static files, no build step


# (scope, status, started (perf_counter), bytes sent): the access line of any other request.
LogOther = Callable[[Scope, int, float, int], None]


class RequestIdMiddleware:
    """Gives every request an id (the client's `x-request-id`, or a new one) and puts it on
    every response, including the errors the proxy makes itself; writes the access line of
    requests that do not write their own."""

    def __init__(self, app: ASGIApp, log_other: LogOther | None = None) -> None:
        self.app = app
        self._log_other = log_other

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
        scope[openai_routes.REQUEST_ID_SCOPE_KEY] = request_id
        raw_id = request_id.encode("latin-1")
        started = time.perf_counter()
        status = 500  # unless a response starts: an exception reached the server
        sent = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.setdefault("headers", [])
                if not any(name == b"x-request-id" for name, _ in headers):
                    message["headers"] = [*headers, (b"x-request-id", raw_id)]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self._log_other is not None and not scope.get(openai_routes.ACCESS_LOGGED_SCOPE_KEY):
                self._log_other(scope, status, started, sent)


def access_log(
    settings: Settings, metrics: Metrics, events: EventBus
) -> Callable[[RequestRecord], None]:
    """One line per request (DESIGN §7), the request metrics and a `request` event."""
    write = access_writer(settings)
    # Labelled children, looked up once: `labels()` takes a lock and builds a key every call.
    # Label values are model keys and route paths, so these dicts stay small.
    timers: dict[tuple[str, str], tuple[Histogram, Histogram]] = {}
    counts: dict[tuple[str, str, int], Counter] = {}

    def log(record: RequestRecord) -> None:
        model, endpoint = record.model, record.endpoint
        if (count := counts.get((model, endpoint, record.status))) is None:
            count = counts[model, endpoint, record.status] = metrics.requests.labels(
                model, endpoint, str(record.status)
            )
        count.inc()
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
        logging_on = access_logger.isEnabledFor(logging.INFO)
        if not (logging_on or events.subscribers):
            return
        fields = {
            "request_id": record.request_id,
            "model": record.model,
            "endpoint": record.endpoint,
            "status": record.status,
            "duration_ms": round(record.duration_s * 1000, 1),
            "queue_wait_ms": round(record.queue_wait_s * 1000, 1),
            "waited_on_load": record.waited_on_load,
            "bytes_out": record.bytes_out,
            "disconnected": record.disconnected,
        }
        if record.first_byte_s is not None:
            fields["first_byte_ms"] = round(record.first_byte_s * 1000, 1)
        if record.upstream_failed:
            fields["upstream_failed"] = True
        events.publish("request", fields)
        if logging_on:
            write(fields)

    return log


def access_writer(settings: Settings) -> Callable[[dict[str, object]], None]:
    """Writes one access line: a JSON object, or `key=value` pairs (quoted where needed)."""
    if settings.logging.format == "json":
        return lambda fields: access_logger.info(json.dumps(fields))

    def text(fields: dict[str, object]) -> None:
        access_logger.info(" ".join(f"{k}={_plain(v)}" for k, v in fields.items()))

    return text


def _plain(value: object) -> object:
    """A value as it is, or as a JSON string if it holds spaces, quotes or control characters
    (a client's path, decoded, could otherwise forge fields or lines)."""
    if isinstance(value, str) and not _PLAIN.fullmatch(value):
        return json.dumps(value)
    return value


def other_access_log(settings: Settings) -> LogOther:
    """The access line of a request that is not routed to a model (management, metrics, health,
    the web page, unknown paths): DESIGN §7's fields, with no model and no queue."""
    write = access_writer(settings)

    def log(scope: Scope, status: int, started: float, sent: int) -> None:
        if not access_logger.isEnabledFor(logging.INFO):
            return
        write(
            {
                "request_id": scope.get(openai_routes.REQUEST_ID_SCOPE_KEY, ""),
                "model": "-",
                "endpoint": scope["path"],
                "status": status,
                "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                "queue_wait_ms": 0.0,
                "waited_on_load": False,
                "bytes_out": sent,
            }
        )

    return log


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)  # noqa: S101 - registered for HTTPException only
    error = ProxyError(f"{exc.detail}: {request.method} {request.url.path}", code="unknown_url")
    error.status_code = exc.status_code  # type: ignore[misc] # this one instance only
    error.error_type = "invalid_request_error"  # type: ignore[misc]
    return error_response(error, path=request.url.path, extra_headers=exc.headers)


def release_startup_garbage() -> None:
    """Hand back to the OS the memory that imports and start-up used and freed.

    Validating settings and building routes leave megabytes of freed heap behind; glibc keeps
    it unless asked (`malloc_trim`). Elsewhere (macOS, Windows, musl) this is a no-op.
    """
    gc.collect()
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def create_app(
    settings: Settings | None = None,
    *,
    transport: httpx2.AsyncBaseTransport | None = None,
    events: EventBus | None = None,
) -> Starlette:
    """The proxy as an ASGI app. `transport` replaces the network to LM Studio (tests);
    `events` is its event bus, for a server that closes it when shutting down."""
    settings = settings if settings is not None else Settings()
    metrics = Metrics()
    events = events if events is not None else EventBus()
    log_request = access_log(settings, metrics, events)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[State]:
        upstream = settings.upstream
        token = upstream.api_token.get_secret_value() if upstream.api_token else None
        async with (
            create_http_client(
                upstream.base_url,
                connect_timeout_s=upstream.connect_timeout,
                read_timeout_s=upstream.read_timeout,
                transport=transport,
            ) as http,
            anyio.create_task_group() as tg,  # exits first: tasks stop before the pool closes
        ):
            client = LMStudioClient(http, api_token=token, load_timeout_s=upstream.load_timeout)
            manager = ModelManager(client, settings, metrics, events=events)
            await tg.start(manager.run)
            release_startup_garbage()
            try:
                yield {
                    "settings": settings,
                    "manager": manager,
                    "client": client,
                    "metrics": metrics,
                    "events": events,
                    "started_at": time.time(),
                    "log_request": log_request,
                }
            finally:
                tg.cancel_scope.cancel()

    ui = Mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui")
    app = Starlette(
        routes=[*openai_routes.routes, *admin_routes.routes, ui],
        lifespan=lifespan,
        exception_handlers={ProxyError: handle_proxy_error, HTTPException: _http_error},
    )

    def refused(scope: Scope, status: int) -> None:
        """An access line for a request the auth middleware answered before any route ran."""
        scope[openai_routes.ACCESS_LOGGED_SCOPE_KEY] = True
        path = scope["path"]
        endpoint = path if path in openai_routes.PROXIED_PATHS else "other"  # bounded label
        request_id = str(scope.get(openai_routes.REQUEST_ID_SCOPE_KEY, ""))
        now = time.perf_counter()  # the clock of every request record (see openai_routes)
        log_request(
            RequestRecord(request_id, scope["method"], endpoint, UNKNOWN_MODEL, now, status=status)
        )

    auth = settings.auth
    app.add_middleware(
        AuthMiddleware,
        api_keys=[key.get_secret_value() for key in auth.api_keys],
        admin_keys=[key.get_secret_value() for key in auth.admin_keys],
        on_refused=refused,
    )
    # Outermost: errors from auth carry the id too, and every request gets its access line.
    app.add_middleware(RequestIdMiddleware, log_other=other_access_log(settings))
    return app
