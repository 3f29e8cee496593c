"""The OpenAI-compatible routes (and LM Studio's Anthropic-compatible ones), routed by `model`."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from functools import partial
from typing import Any

from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy.access import RequestRecord, record_of
from proxy.bodies import (
    WATCH_SCOPE_KEY,
    ClientWatch,
    check_fields,
    parse_object,
    read_body,
    watch_of,
    with_model,
)
from proxy.errors import (
    BadRequestError,
    ModelGoneError,
    ModelNotAllowedError,
    ModelNotFoundError,
    UpstreamUnavailableError,
)
from proxy.feedback import FeedbackResponse
from proxy.keys import EVERY_MODEL, Caller, caller_of
from proxy.leases import Lease, Ticket
from proxy.lmstudio import LMStudioClient, ModelNotLoadedError, UpstreamResponse
from proxy.manager import ModelManager, ModelView
from proxy.metrics import UNKNOWN_MODEL
from proxy.names import Resolved, not_found
from proxy.state import State
from proxy.streaming import UpstreamStreamResponse


async def proxy_request(request: Request[State]) -> Response:
    """Resolve the model, wait for it, and stream LM Studio's answer through.

    Everything the answer holds (the model's lease, LM Studio's response) is entered on one
    exit stack: released by it if anything fails, else handed to the response that streams.
    Once the body is read, a client that disconnects cancels the request (`WatchForDisconnect`).
    A streaming request whose model is not ready at once may get lines of progress while it
    waits (`FeedbackResponse`).
    """
    state = request.state
    manager, settings, clients = state["manager"], state["settings"], state["clients"]
    path, headers = request.url.path, request.headers.raw
    record = record_of(request.scope)
    body, payload = await read_request(request)
    resolved = await model_for(request, payload.get("model"), path)
    key = resolved.key
    record.stream = payload.get("stream") is True
    if payload.get("model") != resolved.upstream_name:
        body = with_model(body, resolved.upstream_name)
    ttl = payload.get("ttl")
    if isinstance(ttl, int | float) and not isinstance(ttl, bool) and ttl > 0:
        manager.set_idle_ttl(key, float(ttl))
    call = Call(manager, clients, key, (path, body, headers), record)

    async with AsyncExitStack() as held:
        mode = settings.scheduler.loading_feedback
        if mode != "off" and payload.get("stream") is True:
            lease = manager.try_acquire(key, record.client)
            if lease is None:  # it must wait: with feedback if that takes long
                ticket, owned = Ticket(), AsyncExitStack()
                return FeedbackResponse(  # type: ignore[return-value] # an ASGI app
                    partial(call.answer, owned, ticket=ticket),
                    owned,
                    record,
                    ticket=ticket,
                    mode=mode,
                    after_s=settings.scheduler.loading_feedback_after,
                    model_name=str(payload.get("model")),
                    pool=len(clients) > 1,
                )
            upstream = await call.answer(held, lease=lease)
        else:
            upstream = await call.answer(held)
        return UpstreamStreamResponse(  # type: ignore[return-value] # an ASGI app
            upstream, held.pop_all(), record
        )


async def read_request(request: Request[State]) -> tuple[bytes, dict[str, Any]]:
    """A request for a model: its body (within `max_body_bytes`) and that body as a JSON
    object. It counts as routed from now on, and a client that leaves from now on cancels it
    (`WatchForDisconnect`)."""
    record = record_of(request.scope)
    record.routed, record.model = True, UNKNOWN_MODEL
    if (peer := request.scope.get("client")) is not None:
        record.client = f"{peer[0]}:{peer[1]}"  # one connection: one request at a time
    body = await read_body(request, request.state["settings"].server.max_body_bytes)
    watch_of(request.scope).start()
    payload = parse_object(body)
    check_fields(payload)
    return body, payload


async def model_for(request: Request[State], model: object, path: str | None) -> Resolved:
    """The model a request for `path` asks for (`model`, or the default), resolved, that its
    key may use and that serves `path` (any path: None); the record names it from now on."""
    manager, caller = request.state["manager"], caller_of(request.scope)
    resolved = await _resolve(manager, caller, model)
    record_of(request.scope).model = key = resolved.key
    default = request.state["settings"].models.default
    check_allowed(caller, model if isinstance(model, str) else default or key, key)
    if path is not None:
        check_type(manager.model_type(key), key, path)
    return resolved


class Call:
    """One request's way to its answer: the lease on its model (waited for), the call to LM
    Studio through the gate, and its retries."""

    __slots__ = ("_clients", "_granted", "_key", "_manager", "_record", "_request")

    def __init__(
        self,
        manager: ModelManager,
        clients: Mapping[str, LMStudioClient],
        key: str,
        request: tuple[str, bytes, Sequence[tuple[bytes, bytes]]],
        record: RequestRecord,
    ) -> None:
        self._manager = manager
        self._clients = clients
        self._key = key
        self._request = request  # the path, body and headers to send LM Studio
        self._record = record
        self._granted: float | None = None  # when the lease it holds now was granted

    def _hold(self, held: AsyncExitStack, lease: Lease) -> None:
        """The lease is the request's until released, on `held`'s exit at the latest."""
        record = self._record
        record.queue_wait_s, record.waited_on_load = lease.waited_s, lease.waited_on_load
        record.granted, self._granted = True, time.perf_counter()
        held.callback(self._release, lease)

    def _release(self, lease: Lease) -> None:
        """Release the lease; the time it was held counts in the record's `busy_s`."""
        if self._granted is not None:
            self._record.busy_s += time.perf_counter() - self._granted
            self._granted = None
        lease.release()

    def _placed(self, upstream: str) -> None:
        self._record.upstream = upstream  # the answer names its host, even an error from its queue

    async def answer(
        self, held: AsyncExitStack, *, lease: Lease | None = None, ticket: Ticket | None = None
    ) -> UpstreamResponse:
        """LM Studio's answer, once the model is leased (`lease`, or waited for) and the call
        clear to go; the lease and the answer are entered on `held`."""
        manager, key, record = self._manager, self._key, self._record
        if lease is None:
            lease = await manager.acquire(
                key,
                placed=self._placed,
                ticket=ticket,
                priority=record.priority,
                client=record.client,
            )
        else:
            record.upstream = lease.upstream
        self._hold(held, lease)
        gone = down = False
        while True:
            send = partial(self._clients[lease.upstream].open_completion, *self._request)
            try:
                upstream = await manager.send(lease, send)
                break
            except (ModelNotLoadedError, ModelGoneError) as exc:
                if gone:  # again: LM Studio's own answer is relayed as it is
                    if isinstance(exc, ModelGoneError):
                        raise
                    upstream = exc.response
                    break
                # Unloaded in LM Studio behind our back: read its state, reload, ask again.
                gone = True
                await manager.refresh(lease.upstream)
            except UpstreamUnavailableError as exc:
                # Nothing was sent: the host is down, and another that has the model may
                # answer (once).
                manager.upstream_failed(lease.upstream, exc)
                if down or not manager.elsewhere(key, [lease.upstream]):
                    raise
                down = True
            self._release(lease)
            lease = await manager.acquire(  # the same budget
                key,
                since=lease.arrived,
                placed=self._placed,
                ticket=ticket,
                priority=record.priority,
                client=record.client,
            )
            self._hold(held, lease)
        held.push_async_callback(upstream.aclose)
        return upstream


class WatchForDisconnect:
    """Route middleware: the route and its response inside a `ClientWatch`. Once the route has
    read the body, a client that disconnects cancels the rest at once, whatever it awaits (the
    queue, LM Studio's answer, the relay), which closes the upstream request and releases the
    lease. Its record says so, and a request gone before its response started, or while only
    lines of progress were sent (`FeedbackResponse`), is a 499."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def watching_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                watch.started = True
            elif not message.get("more_body", False):
                watch.complete = True
            await send(message)

        async with ClientWatch(receive) as watch:
            scope[WATCH_SCOPE_KEY] = watch
            await self.app(scope, receive, watching_send)
        if watch.gone:
            record = record_of(scope)
            record.disconnected = True
            if not watch.started:  # nginx's "client closed request": nobody reads it
                await Response(status_code=499)(scope, receive, send)
            elif record.feedback and record.first_byte_s is None:
                record.status = 499  # gone while it waited: only lines of progress were sent


# What each route needs of its model, by the catalogue's `type`; the others need an "llm".
_ROUTE_NEEDS = {"/v1/embeddings": "embedding"}
_TYPE_NAMES = {"llm": "a chat model (type 'llm')", "embedding": "an embedding model"}


def check_type(model_type: str | None, key: str, path: str) -> None:
    """Refuse a model of the wrong kind for `path` (400, before any load); one whose type is
    unknown (not in LM Studio's catalogue) goes through."""
    needed = _ROUTE_NEEDS.get(path, "llm")
    if model_type is None or model_type == needed:
        return
    raise BadRequestError(
        f"model {key!r} is {_TYPE_NAMES.get(model_type, repr(model_type))}: {path} needs "
        f"{_TYPE_NAMES[needed]}",
        param="model",
        code="model_wrong_type",
    )


def _model_object(request: Request[State], name: str, model: ModelView) -> dict[str, Any]:
    """A model in OpenAI's shape, with the proxy's `loaded` and `state` (and `alias_of`), and
    the hosts that have it."""
    return {
        "id": name,
        "object": "model",
        "created": int(request.state["started_at"]),
        "owned_by": "lmstudio",
        "loaded": model.loaded,
        "state": model.state,
        "type": model.type,
        "alias_of": model.key if name != model.key else None,
        "upstreams": list(model.available_on),  # the hosts that have it
    }


async def visible_names(manager: ModelManager, caller: Caller) -> list[tuple[str, str]]:
    """The names (with their model keys) `caller` may use."""
    return [(name, key) for name, key in await manager.routable() if caller.may_use(name, key)]


async def _resolve(manager: ModelManager, caller: Caller, model: object) -> Resolved:
    """A request's `model` resolved (`ModelManager.resolve`); for a key limited to some models,
    the 404 of an unknown one suggests only those."""
    try:
        return await manager.resolve(model)
    except ModelNotFoundError as exc:
        if caller.models == EVERY_MODEL or not isinstance(model, str):
            raise
        known = [name for name, _ in await visible_names(manager, caller)]
        raise not_found(model, known) from exc


def check_allowed(caller: Caller, name: str, key: str) -> None:
    """403 `model_not_allowed` if `caller`'s key may not use the model `key`, asked for as
    `name` (docs/design.md §4.4); checked before the request waits or anything loads."""
    if not caller.may_use(name, key):
        model_is = repr(name) if name == key else f"{name!r} ({key!r})"
        raise ModelNotAllowedError(
            f"The key {caller.name!r} may not use the model {model_is}; GET /v1/models lists "
            "the models it may use.",
            param="model",
        )


async def list_models(request: Request[State]) -> Response:
    manager = request.state["manager"]
    visible = await visible_names(manager, caller_of(request.scope))
    data = [_model_object(request, name, manager.view(key)) for name, key in visible]
    return JSONResponse({"object": "list", "data": data})


async def get_model(request: Request[State]) -> Response:
    manager, caller = request.state["manager"], caller_of(request.scope)
    wanted = request.path_params["model_id"]
    visible = await visible_names(manager, caller)
    for name, key in visible:
        if name == wanted:
            return JSONResponse(_model_object(request, name, manager.view(key)))
    resolved = await _resolve(manager, caller, wanted)
    if not caller.may_use(wanted, resolved.key):  # as if it did not exist
        raise not_found(wanted, [name for name, _ in visible])
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
    *(
        Route(path, proxy_request, methods=["POST"], middleware=[Middleware(WatchForDisconnect)])
        for path in PROXIED_PATHS
    ),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
]
