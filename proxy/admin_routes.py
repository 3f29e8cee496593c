"""Management (`/api/v1/*`) and operations (`/healthz`, `/readyz`, `/metrics`) routes."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from proxy import __version__
from proxy.bodies import disconnect_watcher, parse_object, read_body
from proxy.errors import BadRequestError
from proxy.state import State

# A comment line this often keeps idle event streams open through proxies, and finds dead clients.
_HEARTBEAT_S = 15.0


def model_rows(request: Request[State]) -> list[dict[str, Any]]:
    """Every model LM Studio has, with the proxy's view of it."""
    return [view.row() for view in request.state["manager"].views()]


async def list_models(request: Request[State]) -> Response:
    return JSONResponse(model_rows(request))


async def loaded_models(request: Request[State]) -> Response:
    rows = [view.row() for view in request.state["manager"].views() if view.loaded]
    return JSONResponse(rows)


async def status(request: Request[State]) -> Response:
    return JSONResponse(_status(request))


def _status(request: Request[State]) -> dict[str, Any]:
    state = request.state
    manager, settings = state["manager"], state["settings"]
    view = manager.status()
    return {
        "version": __version__,
        "uptime_s": round(time.time() - state["started_at"], 3),
        # The first host, as before the pool (`upstreams` has them all).
        "upstream": {"url": view.hosts[0].url, "reachable": view.hosts[0].reachable},
        "upstreams": [host.row() for host in view.hosts],
        "loaded": view.resident,
        "in_flight": view.in_flight,
        "queue": view.queue,
        "waiting": view.waiting,
        "duplicates": view.duplicates,
        "capacity": {
            "max_loaded": settings.models.max_loaded,
            "memory_budget": settings.models.memory_budget,
            "eviction": settings.models.eviction,
            "instances": view.instances,
            "bytes_used": view.bytes_used,
            # Learned from LM Studio (`memory_budget: auto`, docs/design.md §2.8): the hosts'
            # capacities added up (null unless each has one), and how the first host's was
            # learned (`upstreams` has each host's).
            "learned_bytes": view.learned_bytes,
            "learned": view.hosts[0].learned,
        },
        # Other names clients may use for a model (`models.aliases`): alias -> model.
        "aliases": dict(sorted(settings.models.aliases.items())),
        "event_subscribers": state["events"].subscribers,
    }


async def usage(request: Request[State]) -> Response:
    """Per key since start: requests by status, tokens, time holding a model, queue wait."""
    state = request.state
    return JSONResponse({"since": round(state["started_at"], 3), "keys": state["usage"].rows()})


def _envelope(message: str, key: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"success": True, "message": message, "model_id": key, **extra})


async def _model_request(request: Request[State], allowed: frozenset[str]) -> dict[str, Any]:
    """The JSON object of a management call, with `model_id` resolved to a model key."""
    body = await read_body(request, request.state["settings"].server.max_body_bytes)
    payload = parse_object(body)
    if unknown := sorted(set(payload) - allowed):
        raise BadRequestError(
            f"unknown field(s) {', '.join(unknown)}; expected {', '.join(sorted(allowed))}",
            param=unknown[0],
        )
    model_id = payload.get("model_id")
    if not isinstance(model_id, str) or not model_id:
        raise BadRequestError("model_id (a model key) is required", param="model_id")
    upstream = payload.get("upstream")
    if upstream is not None:
        if not isinstance(upstream, str):
            raise BadRequestError("upstream must be a host's name", param="upstream")
        request.state["manager"].host(upstream)  # a BadRequestError naming the hosts if none
    payload["key"] = (await request.state["manager"].resolve(model_id)).key
    return payload


async def load_model(request: Request[State]) -> Response:
    payload = await _model_request(request, frozenset({"model_id", "context_length", "upstream"}))
    context_length = payload.get("context_length")
    if context_length is not None and (
        not isinstance(context_length, int)
        or isinstance(context_length, bool)
        or context_length < 1
    ):
        raise BadRequestError("context_length must be a positive integer", param="context_length")
    key = payload["key"]
    loaded = await request.state["manager"].load(
        key,
        upstream=payload.get("upstream"),
        context_length=context_length,
        disconnected=disconnect_watcher(request.receive),
    )
    message = f"Model {key} loaded successfully" if loaded else f"Model {key} is already loaded"
    return _envelope(message, key)


async def unload_model(request: Request[State]) -> Response:
    payload = await _model_request(request, frozenset({"model_id", "upstream"}))
    key = payload["key"]
    unloaded = await request.state["manager"].unload(key, upstream=payload.get("upstream"))
    message = f"Model {key} unloaded successfully" if unloaded else f"Model {key} is not loaded"
    return _envelope(message, key)


async def pin_model(request: Request[State]) -> Response:
    key = (await _model_request(request, frozenset({"model_id"})))["key"]
    pinned = request.url.path.endswith("/pin")
    request.state["manager"].pin(key, pinned)
    message = f"Model {key} {'pinned' if pinned else 'unpinned'} successfully"
    return _envelope(message, key, pinned=pinned)


def _sse(kind: str, data: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()


async def events(request: Request[State]) -> Response:
    """`snapshot` on connect, then `model` and `request` events as they happen."""
    state = request.state
    bus = state["events"]

    async def stream() -> AsyncIterator[bytes]:
        with bus.subscribe() as receive:
            yield _sse("snapshot", {"models": model_rows(request), "status": _status(request)})
            while True:
                event = None
                with anyio.move_on_after(_HEARTBEAT_S):  # no `yield` inside this scope
                    try:
                        event = await receive.receive()
                    except anyio.EndOfStream:  # dropped for falling behind
                        return
                yield b": keep-alive\n\n" if event is None else _sse(*event)

    headers = {"cache-control": "no-cache", "x-accel-buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


async def healthz(request: Request[State]) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request[State]) -> Response:
    """Ready while LM Studio's models are known (it answered, and speaks the 0.4+ API) and its
    last call reached it; 503 with the reason otherwise."""
    manager = request.state["manager"]
    reachable = manager.reachable
    if (reason := manager.readiness()) is None:
        return JSONResponse({"status": "ready", "upstream_reachable": reachable})
    return JSONResponse({"status": reason, "upstream_reachable": reachable}, 503)


async def metrics(request: Request[State]) -> Response:
    return Response(request.state["metrics"].render(), media_type=CONTENT_TYPE_LATEST)


routes = [
    Route("/api/v1/models", list_models, methods=["GET"]),
    Route("/api/v1/models/", list_models, methods=["GET"]),
    Route("/api/v1/models/loaded", loaded_models, methods=["GET"]),
    Route("/api/v1/models/load", load_model, methods=["POST"]),
    Route("/api/v1/models/unload", unload_model, methods=["POST"]),
    Route("/api/v1/models/pin", pin_model, methods=["POST"]),
    Route("/api/v1/models/unpin", pin_model, methods=["POST"]),
    Route("/api/v1/status", status, methods=["GET"]),
    Route("/api/v1/events", events, methods=["GET"]),
    Route("/api/v1/usage", usage, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
