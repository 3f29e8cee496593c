"""Ollama's API (docs/design.md §4.8): `/api/chat`, `/api/generate`, `/api/embed` and
`/api/embeddings` routed by `model` the way `/v1/*` is (the same queue, keys, limits, metrics and
disconnect watch), and the listings `/api/tags`, `/api/ps`, `/api/show` and `/api/version`."""

from __future__ import annotations

import json
import time
from contextlib import AsyncExitStack
from functools import partial
from typing import Any

from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy import ollama, ollama_answers
from proxy.access import RequestRecord, record_of
from proxy.bodies import parse_object, read_body
from proxy.errors import ModelNotFoundError
from proxy.keys import caller_of
from proxy.names import Resolved
from proxy.openai_routes import Call, WatchForDisconnect, model_for, read_request, visible_names
from proxy.state import State
from proxy.streaming import UpstreamStreamResponse

# What LM Studio is sent beside the body: the client's own headers could ask for a compressed
# answer, which the translation could not read.
_HEADERS = ((b"content-type", b"application/json"),)


def _timing(record: RequestRecord) -> ollama_answers.Timing:
    total = time.perf_counter() - record.started
    load = record.queue_wait_s if record.waited_on_load else 0.0
    first = record.first_byte_s if record.first_byte_s is not None else total
    return ollama_answers.Timing(total, load, first)


async def _resolve(request: Request[State], name: object, path: str | None) -> Resolved:
    """`model_for`, with Ollama's 404 for a model nobody has."""
    try:
        return await model_for(request, name, path)
    except ModelNotFoundError as exc:
        raise ollama.not_found(name) from exc


async def ollama_request(request: Request[State]) -> Response:
    """An Ollama request sent LM Studio as an OpenAI one, its answer translated back as it
    streams; everything it holds is on one exit stack, as `proxy_request`'s is."""
    state, path = request.state, request.url.path
    manager, clients = state["manager"], state["clients"]
    record = record_of(request.scope)
    record.endpoint = ollama.ENDPOINTS[path]
    _, payload = await read_request(request)
    translated = ollama.REQUESTS[path](payload)
    name = ollama.model_name(payload)
    resolved = await _resolve(request, name, translated.path)
    key = resolved.key
    record.stream = translated.stream
    shown = name if isinstance(name, str) else key  # the name the answer carries
    if translated.keep_alive_s is not None:
        manager.set_idle_ttl(key, translated.keep_alive_s)
    if translated.empty:
        return await _load_or_unload(request, path, key, shown, translated.keep_alive_s == 0)
    body = json.dumps({"model": resolved.upstream_name, **translated.body}).encode()
    call = Call(manager, clients, key, (translated.path, body, _HEADERS), record)
    async with AsyncExitStack() as held:
        upstream = await call.answer(held)
        if upstream.status_code >= 400:
            message = ollama_answers.upstream_error(await upstream.read(), upstream.status_code)
            return JSONResponse({"error": message}, status_code=upstream.status_code)
        translator = ollama_answers.translator(
            path, shown, translated.stream, partial(_timing, record)
        )
        return UpstreamStreamResponse(  # type: ignore[return-value] # an ASGI app
            upstream, held.pop_all(), record, translator=translator
        )


async def _load_or_unload(
    request: Request[State], path: str, key: str, shown: str, unload: bool
) -> Response:
    """Ollama's way to load a model (a request with nothing to answer) or, with
    `keep_alive: 0`, to unload it (once the requests on it have ended)."""
    manager, record = request.state["manager"], record_of(request.scope)
    if unload:
        await manager.unload(key)
    else:
        lease = await manager.acquire(key, priority=record.priority, client=record.client)
        record.queue_wait_s, record.waited_on_load = lease.waited_s, lease.waited_on_load
        lease.release()
    return JSONResponse(ollama_answers.nothing_to_do(path, shown, unloaded=unload))


async def version(request: Request[State]) -> Response:
    return JSONResponse({"version": ollama.OLLAMA_VERSION})


async def tags(request: Request[State]) -> Response:
    """Every name the caller may use (the models LM Studio has, then the aliases)."""
    manager, started = request.state["manager"], request.state["started_at"]
    names = await visible_names(manager, caller_of(request.scope))  # reads the catalogue
    catalog = manager.catalog
    models = [ollama.tag(name, manager.view(key), catalog.get(key), started) for name, key in names]
    return JSONResponse({"models": models})


async def ps(request: Request[State]) -> Response:
    """The loaded models the caller may use, with when each will be unloaded if left idle."""
    manager, started = request.state["manager"], request.state["started_at"]
    caller, catalog = caller_of(request.scope), manager.catalog
    models = [
        ollama.running(view.key, view, catalog.get(view.key), started)
        for view in manager.views()
        if view.loaded and caller.may_use(view.key, view.key)
    ]
    return JSONResponse({"models": models})


async def show(request: Request[State]) -> Response:
    manager = request.state["manager"]
    body = await read_body(request, request.state["settings"].server.max_body_bytes)
    payload: dict[str, Any] = parse_object(body)
    name = ollama.model_name(payload)
    resolved = await _resolve(request, name, None)
    info = manager.catalog.get(resolved.key)
    view = manager.view(resolved.key)
    return JSONResponse(ollama.show(view, info, request.state["started_at"]))


routes = [
    *(
        Route(path, ollama_request, methods=["POST"], middleware=[Middleware(WatchForDisconnect)])
        for path in ollama.REQUESTS
    ),
    Route("/api/version", version, methods=["GET"]),
    Route("/api/tags", tags, methods=["GET"]),
    Route("/api/ps", ps, methods=["GET"]),
    Route("/api/show", show, methods=["POST"]),
]
