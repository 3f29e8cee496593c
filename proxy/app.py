"""create_app: brings routes, middleware, error handlers and the lifespan together."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx2
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from proxy import admin_routes, ollama, ollama_routes, openai_routes
from proxy.access import RequestIdMiddleware, access_log, record_of
from proxy.auth import AuthMiddleware, credentials
from proxy.config import Settings
from proxy.errors import ProxyError, error_response, handle_proxy_error
from proxy.events import EventBus
from proxy.lmstudio import LMStudioClient, create_http_client
from proxy.manager import ModelManager
from proxy.metrics import UNKNOWN_MODEL, Metrics
from proxy.state import State
from proxy.usage import Usage

UI_DIR = Path(__file__).parent / "ui"  # the web page: static files, no build step


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)  # noqa: S101 - registered for HTTPException only
    error = ProxyError(f"{exc.detail}: {request.method} {request.url.path}", code="unknown_url")
    error.status_code = exc.status_code  # type: ignore[misc] # this one instance only
    error.error_type = "invalid_request_error"  # type: ignore[misc]
    return error_response(error, path=request.url.path, extra_headers=exc.headers)


async def _home(request: Request) -> Response:
    """`/` sends a browser to the page (307: the address may serve something else later)."""
    return RedirectResponse("/ui/", status_code=307)


async def _api_index(request: Request) -> Response:
    """`/v1`: where things are, for a person who opened the API's base URL."""
    return JSONResponse(
        {
            "message": "lmswitch: the OpenAI-compatible API is under /v1 (POST "
            "/v1/chat/completions, GET /v1/models ...); the page is at /ui/",
            "endpoints": [
                *(f"POST {path}" for path in openai_routes.PROXIED_PATHS),
                "GET /v1/models",
                "GET /v1/models/{model}",
            ],
            "page": "/ui/",
            "management": "/api/v1/status",
        }
    )


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
    usage = Usage()
    events = events if events is not None else EventBus()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[State]:
        upstream = settings.upstream
        async with contextlib.AsyncExitStack() as stack:
            clients: dict[str, LMStudioClient] = {}
            for host in settings.hosts():  # each host its own connection pool
                http = await stack.enter_async_context(
                    create_http_client(
                        host.base_url,
                        connect_timeout_s=upstream.connect_timeout,
                        read_timeout_s=upstream.read_timeout,
                        transport=transport,
                    )
                )
                clients[host.name] = LMStudioClient(
                    http,
                    api_token=host.api_token,
                    load_timeout_s=upstream.load_timeout,
                    list_timeout_s=upstream.connect_timeout,  # a listing is as quick as a connect
                )
            # Exits first: tasks stop before the connection pools close.
            tg = await stack.enter_async_context(anyio.create_task_group())
            manager = ModelManager(clients, settings, metrics, events=events)
            await tg.start(manager.run)
            release_startup_garbage()
            try:
                yield {
                    "settings": settings,
                    "manager": manager,
                    "clients": clients,
                    "metrics": metrics,
                    "events": events,
                    "usage": usage,
                    "started_at": time.time(),
                }
            finally:
                tg.cancel_scope.cancel()

    ui = Mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui")
    signposts = [
        Route("/", _home, methods=["GET"]),
        Route("/v1", _api_index, methods=["GET"]),
        Route("/v1/", _api_index, methods=["GET"]),
    ]
    app = Starlette(
        routes=[
            *openai_routes.routes,
            *ollama_routes.routes,
            *admin_routes.routes,
            ui,
            *signposts,
        ],
        lifespan=lifespan,
        exception_handlers={ProxyError: handle_proxy_error, HTTPException: _http_error},
    )

    def refused(scope: Scope) -> None:
        """A request the auth middleware refused counts in the request metrics and events."""
        record = record_of(scope)
        path = scope["path"]
        if path in openai_routes.PROXIED_PATHS:
            record.endpoint = path
        else:  # bounded: a label value each
            record.endpoint = ollama.ENDPOINTS.get(path, "other")
        record.model, record.routed = UNKNOWN_MODEL, True

    app.add_middleware(AuthMiddleware, keys=credentials(settings.auth), on_refused=refused)
    # Outermost: errors from auth carry the id too, and every request gets its access line.
    app.add_middleware(RequestIdMiddleware, log=access_log(metrics, events, usage))
    return app
