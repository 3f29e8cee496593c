"""The OpenAI-compatible routes (and LM Studio's Anthropic-compatible ones), routed by `model`."""

from __future__ import annotations

from contextlib import AsyncExitStack
from functools import partial
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.access import record_of
from proxy.bodies import check_fields, disconnect_watcher, parse_object, read_body, with_model
from proxy.errors import UpstreamUnavailableError
from proxy.lmstudio import ModelNotLoadedError
from proxy.manager import ClientGone, ModelView
from proxy.metrics import UNKNOWN_MODEL
from proxy.state import State
from proxy.streaming import UpstreamStreamResponse


async def proxy_request(request: Request[State]) -> Response:
    """Resolve the model, wait for it, and stream LM Studio's answer through.

    Everything the answer holds (the model's lease, LM Studio's response) is entered on one
    exit stack: released by it if anything fails, else handed to the response that streams.
    """
    state = request.state
    manager, settings, client = state["manager"], state["settings"], state["client"]
    path, headers = request.url.path, request.headers.raw
    record = record_of(request.scope)
    record.routed, record.model = True, UNKNOWN_MODEL
    disconnected = disconnect_watcher(request.receive)
    try:
        body = await read_body(request, settings.server.max_body_bytes)
        payload = parse_object(body)
        check_fields(payload)
        resolved = await manager.resolve(payload.get("model"))
        record.model = key = resolved.key
        if payload.get("model") != resolved.upstream_name:
            body = with_model(body, resolved.upstream_name)
        ttl = payload.get("ttl")
        if isinstance(ttl, int | float) and not isinstance(ttl, bool) and ttl > 0:
            manager.set_idle_ttl(key, float(ttl))
        async with AsyncExitStack() as held:
            lease = await manager.acquire(key, disconnected=disconnected)
            held.callback(lease.release)
            send = partial(client.open_completion, path, body, headers)
            try:
                upstream = await manager.send(lease, send)
            except ModelNotLoadedError:
                # Unloaded in LM Studio behind our back: see its real state, reload, ask again.
                await held.aclose()
                await manager.refresh()
                lease = await manager.acquire(key, disconnected=disconnected)
                held.callback(lease.release)
                try:
                    upstream = await manager.send(lease, send)
                except ModelNotLoadedError as again:
                    upstream = again.response  # LM Studio's own answer, relayed as it is
            held.push_async_callback(upstream.aclose)
            record.queue_wait_s, record.waited_on_load = lease.waited_s, lease.waited_on_load
            return UpstreamStreamResponse(  # type: ignore[return-value] # an ASGI app
                upstream, held.pop_all(), record
            )
    except ClientGone:
        record.disconnected = True
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it
    except UpstreamUnavailableError as exc:
        manager.upstream_failed(exc)
        raise


def _model_object(request: Request[State], name: str, model: ModelView) -> dict[str, Any]:
    """A model in OpenAI's shape, with the proxy's `loaded` and `state` (and `alias_of`)."""
    return {
        "id": name,
        "object": "model",
        "created": int(request.state["started_at"]),
        "owned_by": "lmstudio",
        "loaded": model.loaded,
        "state": model.state,
        "type": model.type,
        "alias_of": model.key if name != model.key else None,
    }


async def list_models(request: Request[State]) -> Response:
    manager = request.state["manager"]
    names = await manager.routable()
    data = [_model_object(request, name, manager.view(key)) for name, key in names]
    return JSONResponse({"object": "list", "data": data})


async def get_model(request: Request[State]) -> Response:
    manager = request.state["manager"]
    wanted = request.path_params["model_id"]
    for name, key in await manager.routable():
        if name == wanted:
            return JSONResponse(_model_object(request, name, manager.view(key)))
    resolved = await manager.resolve(wanted)
    return JSONResponse(_model_object(request, wanted, manager.view(resolved.key)))


PROXIED_PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
    "/v1/messages/count_tokens",
)

routes = [
    *(Route(path, proxy_request, methods=["POST"]) for path in PROXIED_PATHS),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
]
