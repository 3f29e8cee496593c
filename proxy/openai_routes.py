"""The OpenAI-compatible routes (and LM Studio's Anthropic-compatible ones), routed by `model`."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive

from proxy.errors import (
    BadRequestError,
    PayloadTooLargeError,
    ProxyError,
    RequestTimeoutError,
    UnsupportedMediaTypeError,
    UpstreamError,
    UpstreamUnavailableError,
)
from proxy.lmstudio import UpstreamResponse
from proxy.manager import ClientGone, Lease
from proxy.metrics import UNKNOWN_MODEL
from proxy.scheduling import Phase
from proxy.state import State
from proxy.streaming import RequestRecord, UpstreamStreamResponse

REQUEST_ID_SCOPE_KEY = "lmswitch.request_id"
# Set by a request that writes its own access line (see `proxy.app.RequestIdMiddleware`).
ACCESS_LOGGED_SCOPE_KEY = "lmswitch.access_logged"

_decoder = json.JSONDecoder()


def request_id_of(request: Request[Any]) -> str:
    request_id = request.scope.get(REQUEST_ID_SCOPE_KEY)
    return request_id if isinstance(request_id, str) else uuid.uuid4().hex


# A client that sends nothing of its body for this long is given up on (408), like nginx's
# client_body_timeout. No model lease is held while a body uploads.
BODY_READ_TIMEOUT_S = 30.0


def _check_content_type(request: Request[Any]) -> None:
    content_type = request.headers.get("content-type")
    if content_type is None:
        return  # many clients send JSON without saying so
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaTypeError(
            f"Content-Type must be application/json, not {media[:100]!r} "
            "(with curl, add -H 'content-type: application/json')"
        )


async def read_body(request: Request[Any], limit: int) -> bytes:
    """The JSON request body, refused with 413 as soon as it is known to pass `limit` bytes,
    and with 408 when the client stalls for `BODY_READ_TIMEOUT_S`."""
    _check_content_type(request)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"request body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    # One cancel scope for the whole body, its deadline pushed back at each chunk.
    with anyio.CancelScope(deadline=anyio.current_time() + BODY_READ_TIMEOUT_S) as scope:
        async for chunk in request.stream():
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise PayloadTooLargeError(f"request body is larger than {limit} bytes")
            scope.deadline = anyio.current_time() + BODY_READ_TIMEOUT_S
    if scope.cancelled_caught:
        raise RequestTimeoutError(
            f"the request body stalled for {BODY_READ_TIMEOUT_S:g} s; send it at once"
        )
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse_object(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise BadRequestError(f"the request body is not valid JSON: {exc}") from exc
    except RecursionError:  # json's C decoder stops at Python's recursion limit
        raise BadRequestError("the request body is nested too deeply") from None
    if not isinstance(payload, dict):
        raise BadRequestError(
            f"the request body must be a JSON object, not {type(payload).__name__}"
        )
    return payload


def _check_fields(payload: dict[str, Any]) -> None:
    """The fields the proxy itself acts on must have the right type (the rest is LM Studio's)."""
    if "stream" in payload and not isinstance(payload["stream"], bool):
        raise BadRequestError("stream must be true or false", param="stream")


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\n\r":
        i += 1
    return i


def _model_span(text: str) -> tuple[int, int] | None:
    """Where the top-level `"model"` value lies in the JSON object `text`, or None.

    The last one wins, as with `json.loads`; `text` is known to be a valid JSON object.
    """
    i = _skip_ws(text, 0) + 1  # past the '{'
    span = None
    while (i := _skip_ws(text, i)) < len(text) and text[i] == '"':
        key, i = _decoder.raw_decode(text, i)
        i = _skip_ws(text, _skip_ws(text, i) + 1)  # past the ':'
        _, end = _decoder.raw_decode(text, i)
        if key == "model":
            span = (i, end)
        i = _skip_ws(text, end) + 1  # past the ',' (or the closing '}')
    return span


def with_model(body: bytes, name: str) -> bytes:
    """The client's bytes with only the top-level `model` set to `name` (a valid JSON object)."""
    text = body.decode()
    value = json.dumps(name)
    span = _model_span(text)
    if span is not None:
        return (text[: span[0]] + value + text[span[1] :]).encode()
    brace = text.index("{")
    rest = text[brace + 1 :]
    comma = "" if rest.lstrip().startswith("}") else ","
    return (text[: brace + 1] + f'"model":{value}{comma}' + rest).encode()


def disconnect_watcher(receive: Receive) -> Any:
    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    return disconnected


def _finish(state: State, record: RequestRecord, status: int) -> None:
    record.status = status
    record.duration_s = time.perf_counter() - record.started
    state["log_request"](record)


# What LM Studio answers when the model asked for is not loaded and it does not load it itself
# (JIT loading off): the model was unloaded behind the proxy's back.
_NOT_LOADED_MARKERS = (b"No models loaded", b"Invalid model identifier", b"model_not_found")


async def _model_was_gone(upstream: UpstreamResponse) -> bool:
    if upstream.status_code not in (400, 404):
        return False
    try:
        body = await upstream.read()
    except ProxyError:
        await upstream.aclose()
        raise
    return any(marker in body for marker in _NOT_LOADED_MARKERS)


async def _refuse_unreadable_error(upstream: UpstreamResponse) -> None:
    """LM Studio's error without a JSON body (a crash page): the client's SDK could not read
    it, so the client gets the proxy's own error, in its API's envelope, quoting it."""
    if upstream.status_code < 400 or "json" in upstream.content_type:
        return
    try:
        text = (await upstream.read())[:300].decode("utf-8", "replace").strip()
    finally:
        await upstream.aclose()
    raise UpstreamError(f"LM Studio answered {upstream.status_code} without a JSON error: {text!r}")


async def proxy_request(request: Request[State]) -> Response:
    """Resolve the model, wait for it, and stream LM Studio's answer through."""
    request.scope[ACCESS_LOGGED_SCOPE_KEY] = True  # its line comes from `_finish` or the relay
    state = request.state
    manager, settings, client = state["manager"], state["settings"], state["client"]
    path = request.url.path
    # perf_counter, not the event loop's clock: uvloop's ticks in whole milliseconds.
    clock = time.perf_counter
    request_id = request_id_of(request)
    record = RequestRecord(request_id, request.method, path, UNKNOWN_MODEL, clock())
    disconnected = disconnect_watcher(request.receive)
    lease: Lease | None = None
    try:
        body = await read_body(request, settings.server.max_body_bytes)
        payload = parse_object(body)
        _check_fields(payload)
        resolved = await manager.reconciler.resolve(payload.get("model"))
        record.model = key = resolved.key
        if payload.get("model") != resolved.upstream_name:
            body = with_model(body, resolved.upstream_name)
        ttl = payload.get("ttl")
        if isinstance(ttl, int | float) and not isinstance(ttl, bool) and ttl > 0:
            manager.set_idle_ttl(key, float(ttl))
        lease = await manager.acquire(key, disconnected=disconnected)
        upstream = await client.open_completion(path, body, request.headers.raw)
        if await _model_was_gone(upstream):
            # Unloaded in LM Studio behind our back: see its real state, reload, ask once more.
            await upstream.aclose()
            lease.release()
            await manager.refresh()
            lease = await manager.acquire(key, disconnected=disconnected)
            upstream = await client.open_completion(path, body, request.headers.raw)
        await _refuse_unreadable_error(upstream)
    except ClientGone:
        record.disconnected = True
        _finish(state, record, 499)  # nginx's "client closed request": nobody reads this answer
        return Response(status_code=499)
    except ProxyError as exc:
        if lease is not None:
            lease.release()
        if isinstance(exc, UpstreamUnavailableError):
            manager.upstream_failed(exc)
        _finish(state, record, exc.status_code)
        raise
    except BaseException:
        if lease is not None:  # cancelled (shutdown) between the lease and the response
            lease.release()
        raise
    record.queue_wait_s, record.waited_on_load = lease.waited_s, lease.waited_on_load
    return UpstreamStreamResponse(  # type: ignore[return-value] # an ASGI app, as Response is
        upstream,
        lease,
        record,
        clock=clock,
        on_done=state["log_request"],
        request_id=request_id,
    )


def _model_object(request: Request[State], name: str, key: str) -> dict[str, Any]:
    manager = request.state["manager"]
    model = manager.scheduler.models.get(key)
    phase = model.phase if model is not None else Phase.ABSENT
    info = manager.reconciler.catalog.get(key)
    return {
        "id": name,
        "object": "model",
        "created": int(request.state["started_at"]),
        "owned_by": "lmstudio",
        "loaded": phase is Phase.READY or phase is Phase.DRAINING,
        "state": str(phase),
        "type": info.type if info is not None else "llm",
        "alias_of": key if name != key else None,
    }


async def _routable(request: Request[State]) -> AsyncIterator[tuple[str, str]]:
    manager = request.state["manager"]
    if not manager.reconciler.catalog_known:
        await manager.refresh()
        manager.reconciler.require_catalog()
    for key in sorted(manager.reconciler.catalog):
        yield key, key
    for alias, target in sorted(request.state["settings"].models.aliases.items()):
        if alias not in manager.reconciler.catalog and target in manager.reconciler.catalog:
            yield alias, target


async def list_models(request: Request[State]) -> Response:
    data = [_model_object(request, name, key) async for name, key in _routable(request)]
    return JSONResponse({"object": "list", "data": data})


async def get_model(request: Request[State]) -> Response:
    wanted = request.path_params["model_id"]
    async for name, key in _routable(request):
        if name == wanted:
            return JSONResponse(_model_object(request, name, key))
    resolved = await request.state["manager"].reconciler.resolve(wanted)
    return JSONResponse(_model_object(request, wanted, resolved.key))


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
