"""An LM Studio 0.4.x emulator: HTTP surface, test knobs, call record.

Follows the emulator checklist of docs/design.md §5. The model state (catalogue, instances,
loads, JIT) is in `proxy.emulator.state`, request checks in `proxy.emulator.checks`; bodies and SSE
frames are built by `proxy.emulator.replies` and `proxy.emulator.native`. This module owns the
HTTP surface and decides what to answer.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from functools import partial
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy.emulator import native, replies
from proxy.emulator.catalog import DEFAULT_CATALOG, Call, CatalogModel, v0_row, v1_row
from proxy.emulator.checks import (
    LLM_ONLY_FIELDS,
    EventStream,
    Malformed,
    RejectError,
    missing,
    object_body,
    unrecognized,
    validate_load,
)
from proxy.emulator.replies import Kind
from proxy.emulator.state import EmulatorState, LoadFailedError

EMBEDDING_DIMS = 768

_INFERENCE_ROUTES: tuple[tuple[str, Kind], ...] = (
    ("/v1/chat/completions", "chat"),
    ("/v1/completions", "completion"),
    ("/v1/embeddings", "embedding"),
    ("/v1/responses", "response"),
    ("/v1/messages", "message"),
    ("/api/v0/chat/completions", "chat"),
    ("/api/v0/completions", "completion"),
    ("/api/v0/embeddings", "embedding"),
)
_REQUIRED_FIELD: dict[Kind, str] = {
    "chat": "messages",
    "completion": "prompt",
    "embedding": "input",
    "response": "input",
    "message": "messages",
}
_BODIES: dict[Kind, Callable[[replies.Reply, replies.Body | None], replies.Body]] = {
    "chat": replies.chat_body,
    "completion": replies.completion_body,
    "response": native.response_body,
    "message": native.message_body,
}
_FRAMES: dict[Kind, Callable[[replies.Reply, bool], list[replies.Frame]]] = {
    "chat": replies.chat_frames,
    "completion": replies.completion_frames,
    "response": native.response_frames,
    "message": native.message_frames,
}


_LISTINGS = frozenset({"/v1/models", "/api/v0/models", "/api/v1/models"})


class SimulatedCrashError(Exception):
    """Raised inside a stream's body to make uvicorn drop the connection mid-response."""


_Handler = Callable[[Request, Any], Awaitable[Response]]


class Emulator(EmulatorState):
    """A fake LM Studio server with state, test knobs and a record of every call.

    Knobs and records are plain attributes that tests read and set at any time. Test helpers
    (`load_instance`, `unload_instance`) act like LM Studio's own UI: instant, and not counted
    by `load_count`/`unload_count`, which count REST and JIT loads, REST unloads, auto-evictions
    and TTL expiries. TTLs are checked lazily, whenever a request arrives.
    """

    def __init__(
        self,
        catalog: Iterable[CatalogModel] = DEFAULT_CATALOG,
        *,
        load_delay_s: float = 0.0,
        load_bytes_per_s: float | None = None,
        memory_bytes: int | None = None,
        jit: bool = True,
        auto_evict: bool = True,
        api_token: str | None = None,
        token_delay_s: float = 0.0,
        reply_tokens: int = 12,
    ) -> None:
        super().__init__(
            catalog,
            load_delay_s=load_delay_s,
            load_bytes_per_s=load_bytes_per_s,
            memory_bytes=memory_bytes,
            jit=jit,
            auto_evict=auto_evict,
        )
        self.api_token = api_token
        self.token_delay_s = token_delay_s
        self.prompt_delay_s = 0.0  # reading the prompt, before the first token (and any byte)
        self.stamp_chunks = False  # prefix each streamed chunk with `: sent=<unix time>`
        self.reply_tokens = reply_tokens
        self.cut_streams_after: int | None = None
        self.v1_loaded_instances_empty = False
        self._hang_listings = False
        self._silent = False
        self.calls: list[Call] = []
        self.streams_open = 0
        self.streams_closed_early = 0
        self.predictions_aborted = 0  # stopped when their client left before the first byte
        self.app = self._build_app()

    @property
    def hang_listings(self) -> bool:
        """While set, model listings are read and never answered (each waits until its client
        leaves, even after the knob is cleared); inference still works."""
        return self._hang_listings

    @hang_listings.setter
    def hang_listings(self, value: bool) -> None:
        self._hang_listings = value
        self._notify()

    @property
    def silent(self) -> bool:
        """While set, every call is accepted and read, then never answered (it waits until its
        client leaves, even after the knob is cleared)."""
        return self._silent

    @silent.setter
    def silent(self, value: bool) -> None:
        self._silent = value
        self._notify()

    # --- HTTP plumbing ---------------------------------------------------------------------------

    def _build_app(self) -> Starlette:
        routes = [
            self._route("GET", "/lmstudio-greeting", self._greeting, auth=False),
            self._route("GET", "/v1/models", self._openai_models),
            self._route("GET", "/api/v0/models", self._v0_models),
            self._route("GET", "/api/v0/models/{model:path}", self._v0_model),
            self._route("GET", "/api/v1/models", self._v1_models),
            self._route("POST", "/api/v1/models/load", self._load_endpoint),
            self._route("POST", "/api/v1/models/unload", self._unload_endpoint),
            self._route("POST", "/v1/messages/count_tokens", self._count_tokens),
        ]
        for path, kind in _INFERENCE_ROUTES:
            handler = partial(self._infer, kind=kind, v0=path.startswith("/api/v0/"))
            routes.append(self._route("POST", path, handler))
        handlers = {404: self._unknown_endpoint, 405: self._unknown_endpoint}
        app = Starlette(routes=routes, exception_handlers=handlers)
        app.router.redirect_slashes = False  # LM Studio answers `/v1/models/` as unknown
        return app

    def _route(self, method: str, path: str, handler: _Handler, *, auth: bool = True) -> Route:
        async def endpoint(request: Request) -> Response:
            body = await self._receive(request)
            if self._silent or (self._hang_listings and path in _LISTINGS):
                # Stuck: never answered, even once the knob is cleared; over when the client goes.
                while (await request.receive())["type"] != "http.disconnect":
                    pass
                return Response(status_code=499)
            if auth and (denied := self._deny(request)) is not None:
                return denied
            self._reap_expired()
            try:
                return await handler(request, body)
            except RejectError as exc:
                return exc.response

        return Route(path, endpoint, methods=[method])

    async def _receive(self, request: Request) -> object:
        """Read and record the request; the body is parsed JSON, None, or `Malformed`."""
        raw = await request.body()
        body: object = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError as exc:
                body = Malformed(str(exc))
            except RecursionError:  # LM Studio's JSON.parse goes deeper; seen as malformed
                body = Malformed("nested too deeply")
        recorded = None if isinstance(body, Malformed) else body
        self.calls.append(Call(request.method, request.url.path, recorded))
        self._notify()
        return body

    def _deny(self, request: Request) -> Response | None:
        if self.api_token is None:
            return None
        bearer = request.headers.get("authorization")
        if bearer == f"Bearer {self.api_token}":
            return None
        api_key = None
        if request.url.path.startswith("/v1/messages"):  # Anthropic clients send x-api-key
            api_key = request.headers.get("x-api-key")
            if api_key == self.api_token:
                return None
        message = (
            replies.AUTH_MISSING if bearer is None and api_key is None else replies.AUTH_INVALID
        )
        return replies.native_error(401, "invalid_request", message, code="invalid_api_key")

    async def _unknown_endpoint(self, request: Request, exc: Exception) -> Response:
        """Express's fallback: HTTP 200 with an error string (§5.4)."""
        await self._receive(request)
        if (denied := self._deny(request)) is not None:
            return denied
        message = f"Unexpected endpoint or method. ({request.method} {request.url.path})"
        return JSONResponse({"error": message})

    # --- listing and management ----------------------------------------------------------------

    async def _greeting(self, request: Request, body: object) -> Response:
        return JSONResponse({"lmstudio": True})

    async def _openai_models(self, request: Request, body: object) -> Response:
        if self.jit:
            ids = []
            for model in self.catalog.values():
                ids.append(model.key)
                ids += [i.id for i in self._instances_of(model.key) if i.id != model.key]
        else:
            ids = list(self.instances)
        data = [{"id": i, "object": "model", "owned_by": "organization_owner"} for i in ids]
        return JSONResponse({"data": data, "object": "list"})

    def _v0_rows(self) -> list[dict[str, Any]]:
        rows = []
        for model in self.catalog.values():
            loaded = self._instances_of(model.key)
            if all(instance.id != model.key for instance in loaded):
                rows.append(v0_row(model, None))
            rows += [v0_row(model, instance) for instance in loaded]
        return rows

    async def _v0_models(self, request: Request, body: object) -> Response:
        return JSONResponse({"object": "list", "data": self._v0_rows()})

    async def _v0_model(self, request: Request, body: object) -> Response:
        wanted = request.path_params["model"]
        for row in self._v0_rows():
            if row["id"] == wanted:
                return JSONResponse(row)
        message = f'Model "{wanted}" not found. Please specify a valid model.'
        return replies.openai_error(404, message, param="model", code="model_not_found")

    async def _v1_models(self, request: Request, body: object) -> Response:
        models = [
            v1_row(model, [] if self.v1_loaded_instances_empty else self._instances_of(model.key))
            for model in self.catalog.values()
        ]
        return JSONResponse({"models": models})

    async def _load_endpoint(self, request: Request, body: object) -> Response:
        payload = object_body(body, native=True)
        validate_load(payload)
        model = self.catalog.get(payload["model"])
        if model is None:
            message = f"Model {payload['model']} not found in downloaded models"
            return replies.native_error(404, "model_not_found", message)
        unsupported = [key for key in LLM_ONLY_FIELDS if key in payload]
        if model.type == "embedding" and unsupported:
            message = (
                "The following configuration values are not supported for embedding models: "
                + ", ".join(unsupported)
            )
            return replies.native_error(400, "invalid_request", message)
        started = time.monotonic()
        try:
            instance = await self._load(model, jit=False, ttl_s=None, options=payload)
        except LoadFailedError as exc:
            return replies.native_error(500, "internal_error", str(exc))
        result: dict[str, Any] = {
            "type": model.type,
            "instance_id": instance.id,
            "load_time_seconds": round(time.monotonic() - started, 3),
            "status": "loaded",
        }
        if payload.get("echo_load_config"):
            result["load_config"] = {k: v for k, v in instance.config.items() if k != "parallel"}
        return JSONResponse(result)

    async def _unload_endpoint(self, request: Request, body: object) -> Response:
        payload = object_body(body, native=True)
        unknown = [key for key in payload if key != "instance_id"]
        if unknown:
            raise unrecognized(unknown)
        instance_id = payload.get("instance_id")
        if not isinstance(instance_id, str):
            raise missing("instance_id")
        if instance_id not in self.instances:
            message = f"No model instance found with instance_id {instance_id}"
            return replies.native_error(404, "model_not_found", message)
        self._unload(instance_id, counted=True)
        return JSONResponse({"instance_id": instance_id})

    # --- inference -------------------------------------------------------------------------------

    async def _count_tokens(self, request: Request, body: object) -> Response:
        payload = object_body(body, native=False)
        requested = payload.get("model")
        if requested is not None and str(requested) not in self.instances | self.catalog:
            raise self._invalid_model(str(requested))
        return JSONResponse({"input_tokens": replies.count_words(payload)})

    async def _infer(self, request: Request, body: object, *, kind: Kind, v0: bool) -> Response:
        payload = object_body(body, native=False)
        required = _REQUIRED_FIELD[kind]
        if required not in payload:
            raise RejectError(
                replies.openai_error(400, f"'{required}' is required", param=required)
            )
        instance = await self._resolve(payload, kind)
        instance.last_used = time.monotonic()
        if kind == "embedding":
            return JSONResponse(
                replies.embeddings_body(instance.id, payload["input"], EMBEDDING_DIMS)
            )
        reply = replies.make_reply(kind, instance.id, payload, self.reply_tokens)
        streamed = payload.get("stream") is True
        # A stream sends its tokens as they come; an answer that is not streamed is sent whole.
        generating_s = 0.0 if streamed else self.token_delay_s * reply.completion_tokens
        if (self.prompt_delay_s > 0 or generating_s > 0) and not await self._predict(
            request, generating_s
        ):
            return Response(status_code=499)  # the client is gone: nobody reads it
        if streamed:
            options = payload.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            return EventStream(self._stream(_FRAMES[kind](reply, include_usage)))
        model = self.catalog[instance.key]
        extras = replies.v0_extras(reply, model, instance.context_length) if v0 else None
        return JSONResponse(_BODIES[kind](reply, extras))

    async def _predict(self, request: Request, generating_s: float) -> bool:
        """Read the prompt (`prompt_delay_s`), then generate for `generating_s`, before anything
        is sent; False if the client went away meanwhile, which stops the prediction (counted
        in `predictions_aborted`).

        As LM Studio logs it: "Client disconnected. Stopping generation... (if the model is busy
        processing the prompt, it will finish first)". The body has been read, so `receive`
        brings nothing but the disconnect.
        """
        generation = anyio.CancelScope()
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await request.receive())["type"] != "http.disconnect":
                pass
            gone = True
            generation.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await anyio.sleep(self.prompt_delay_s)  # a prompt is read to its end regardless
            with generation:
                await anyio.sleep(generating_s)
            tg.cancel_scope.cancel()
        if gone:
            self.predictions_aborted += 1
            self._notify()
        return not gone

    async def _stream(self, frames: list[replies.Frame]) -> AsyncGenerator[bytes, None]:
        """Yield `frames` with `token_delay_s` between them, dying as `cut_streams_after` says.

        The bookkeeping in `finally` is synchronous, so it also runs when the generator is
        cancelled or closed from outside because the client went away.
        """
        self.streams_open += 1
        self._notify()
        outcome: str = "early"  # or "cut" or "finished"
        sent = 0
        try:
            for index, frame in enumerate(frames):
                if index and self.token_delay_s > 0:
                    await anyio.sleep(self.token_delay_s)
                if frame.content:
                    if self.cut_streams_after is not None and sent >= self.cut_streams_after:
                        outcome = "cut"
                        raise SimulatedCrashError(f"stream cut after {sent} content chunks")
                    sent += 1
                if self.stamp_chunks:  # an SSE comment: when this chunk left (for the bench)
                    yield b": sent=%.6f\n" % time.time() + frame.data
                else:
                    yield frame.data
            outcome = "finished"
        finally:
            self.streams_open -= 1
            if outcome == "early":
                self.streams_closed_early += 1
            self._notify()
