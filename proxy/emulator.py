"""An LM Studio 0.4.x emulator: catalogue, loaded instances, HTTP surface, test knobs, call record.

Follows the emulator checklist of lmstudio-api.md §10. Bodies and SSE frames are built by
`proxy.emulator_replies`; this module owns the state and decides what to answer.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from proxy import emulator_replies as replies
from proxy.emulator_replies import Kind

DEFAULT_CONTEXT_LENGTH = 4096  # what LM Studio loads LLMs with unless told otherwise (§4)
JIT_DEFAULT_TTL_S = 3600.0  # "By default, JIT-loaded models have a TTL of 60 minutes." (§4)
EMBEDDING_DIMS = 768

_LOAD_FIELDS: dict[str, tuple[type, str]] = {
    "model": (str, "string"),
    "context_length": (int, "number"),
    "eval_batch_size": (int, "number"),
    "flash_attention": (bool, "boolean"),
    "num_experts": (int, "number"),
    "offload_kv_cache_to_gpu": (bool, "boolean"),
    "echo_load_config": (bool, "boolean"),
}
_LLM_ONLY_FIELDS = ("eval_batch_size", "flash_attention", "num_experts", "offload_kv_cache_to_gpu")
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


@dataclass(frozen=True)
class CatalogModel:
    """A downloaded model, as `GET /api/v1/models` describes it."""

    key: str
    type: Literal["llm", "embedding"]
    publisher: str
    display_name: str
    architecture: str | None
    quantization: str
    bits_per_weight: int
    size_bytes: int
    params_string: str | None
    max_context_length: int
    vision: bool = False
    trained_for_tool_use: bool = False


DEFAULT_CATALOG: tuple[CatalogModel, ...] = (
    CatalogModel("llama-3.2-1b-instruct", "llm", "hugging-quants", "Llama 3.2 1B Instruct",
                 "llama", "Q4_K_M", 4, 807_694_464, "1B", 131072, trained_for_tool_use=True),
    CatalogModel("qwen2.5-7b-instruct", "llm", "lmstudio-community", "Qwen2.5 7B Instruct",
                 "qwen2", "Q4_K_M", 4, 4_683_073_184, "7B", 32768, trained_for_tool_use=True),
    CatalogModel("google/gemma-3-4b", "llm", "google", "Gemma 3 4B", "gemma3", "Q4_K_M", 4,
                 3_341_081_600, "4B", 131072, vision=True),
    CatalogModel("qwen2.5-14b-instruct", "llm", "lmstudio-community", "Qwen2.5 14B Instruct",
                 "qwen2", "Q4_K_M", 4, 8_988_110_976, "14B", 32768, trained_for_tool_use=True),
    CatalogModel("openai/gpt-oss-20b", "llm", "openai", "gpt-oss 20B", "gpt-oss", "MXFP4", 4,
                 12_109_566_560, "20B", 131072, trained_for_tool_use=True),
    CatalogModel("text-embedding-nomic-embed-text-v1.5", "embedding", "nomic-ai",
                 "Nomic Embed Text v1.5", "nomic-bert", "Q4_K_M", 4, 84_106_624, None, 2048),
)  # fmt: skip


@dataclass
class Instance:
    """A loaded copy of a model; `last_used` is a `time.monotonic()` reading."""

    id: str
    key: str
    context_length: int
    jit: bool
    ttl_s: float | None
    last_used: float
    config: dict[str, Any] = field(default_factory=dict)  # `loaded_instances[].config` (§3.3)


@dataclass(frozen=True)
class Call:
    """One request the emulator received; `body` is the parsed JSON, or None."""

    method: str
    path: str
    body: Any | None


class SimulatedCrashError(Exception):
    """Raised inside a stream's body to make uvicorn drop the connection mid-response."""


class _LoadFailedError(Exception):
    """A load the guardrail refused or the engine could not finish."""


class _RejectError(Exception):
    """Carries a finished error response out of a handler."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


@dataclass(frozen=True)
class _Malformed:
    reason: str


_Handler = Callable[[Request, Any], Awaitable[Response]]


def _object_body(body: object, *, native: bool) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 in the endpoint family's error shape."""
    if isinstance(body, dict):
        return body
    if isinstance(body, _Malformed):
        message = f"Invalid JSON in request body: {body.reason}"
    elif body is None:
        message = "Request body is required."
    else:
        message = "Request body must be a JSON object."
    if native:
        raise _RejectError(replies.native_error(400, "invalid_request", message))
    raise _RejectError(replies.openai_error(400, message))


def _unrecognized(keys: list[str]) -> _RejectError:
    listed = ", ".join(f"'{key}'" for key in keys)
    message = f"Unrecognized key(s) in object: {listed}"
    return _RejectError(
        replies.native_error(400, "invalid_request", message, code="unrecognized_keys")
    )


def _missing(name: str) -> _RejectError:
    response = replies.native_error(
        400,
        "invalid_request",
        f'"{name}" is required',
        code="missing_required_parameter",
        param=name,
    )
    return _RejectError(response)


def _validate_load(payload: dict[str, Any]) -> None:
    """Strict body schema of `POST /api/v1/models/load` (§2.1)."""
    unknown = [key for key in payload if key not in _LOAD_FIELDS]
    if unknown:
        raise _unrecognized(unknown)
    if "model" not in payload:
        raise _missing("model")
    for key, value in payload.items():
        expected, name = _LOAD_FIELDS[key]
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            message = f"Invalid type for '{key}': expected {name}"
            raise _RejectError(replies.native_error(400, "invalid_request", message))


def _default_context(model: CatalogModel) -> int:
    if model.type == "embedding":
        return model.max_context_length
    return min(DEFAULT_CONTEXT_LENGTH, model.max_context_length)


def _instance_config(model: CatalogModel, options: dict[str, Any]) -> dict[str, Any]:
    context_length = options.get("context_length", _default_context(model))
    if model.type == "embedding":
        return {"context_length": context_length}
    config = {
        "context_length": context_length,
        "eval_batch_size": options.get("eval_batch_size", 512),
        "parallel": 4,
        "flash_attention": options.get("flash_attention", True),
        "offload_kv_cache_to_gpu": options.get("offload_kv_cache_to_gpu", True),
    }
    if "num_experts" in options:
        config["num_experts"] = options["num_experts"]
    return config


def _check_kind(model: CatalogModel, kind: Kind, requested: str) -> None:
    if kind == "embedding" and model.type != "embedding":
        message = f'Model "{requested}" is not an embedding model and cannot create embeddings.'
    elif kind != "embedding" and model.type == "embedding":
        message = f'Model "{requested}" is an embedding model and cannot generate text.'
    else:
        return
    raise _RejectError(replies.openai_error(400, message, param="model"))


class _EventStream(StreamingResponse):
    """An SSE response that closes its generator however the response ends.

    On a client disconnect Starlette cancels the send loop, which can leave the generator suspended
    at a `yield`; closing it here runs its `finally` (the stream bookkeeping) now, not at GC.
    """

    def __init__(self, chunks: AsyncGenerator[bytes, None]) -> None:
        headers = {"Cache-Control": "no-cache"}
        super().__init__(chunks, media_type="text/event-stream", headers=headers)
        self._chunks = chunks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._chunks.aclose()


class Emulator:
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
        memory_bytes: int | None = None,
        jit: bool = True,
        auto_evict: bool = True,
        api_token: str | None = None,
        token_delay_s: float = 0.0,
        reply_tokens: int = 12,
    ) -> None:
        self.catalog: dict[str, CatalogModel] = {model.key: model for model in catalog}
        self.load_delay_s = load_delay_s
        self.memory_bytes = memory_bytes
        self.jit = jit
        self.auto_evict = auto_evict
        self.api_token = api_token
        self.token_delay_s = token_delay_s
        self.stamp_chunks = False  # prefix each streamed chunk with `: sent=<unix time>`
        self.reply_tokens = reply_tokens
        self.fail_next_loads = 0
        self.cut_streams_after: int | None = None
        self.v1_loaded_instances_empty = False
        self.calls: list[Call] = []
        self.instances: dict[str, Instance] = {}
        self.streams_open = 0
        self.streams_closed_early = 0
        self._loads: list[str] = []
        self._unloads: list[str] = []
        self._loading: dict[str, CatalogModel] = {}
        self._jit_pending: dict[str, anyio.Event] = {}
        self._changed: anyio.Event | None = None  # created lazily, inside the event loop
        self.app = self._build_app()

    # --- records and notification ---------------------------------------------------------------

    def load_count(self, key: str | None = None) -> int:
        """Loads started over REST or by JIT, optionally for one key.

        Engine failures (`fail_next_loads`) count; guardrail refusals never start, so do not.
        """
        return sum(1 for k in self._loads if key is None or k == key)

    def unload_count(self, key: str | None = None) -> int:
        """REST unloads, auto-evictions and TTL expiries, optionally for one key."""
        return sum(1 for k in self._unloads if key is None or k == key)

    async def wait_until(
        self,
        predicate: Callable[[], bool],
        timeout: float = 5.0,  # noqa: ASYNC109 - public interface; applied with fail_after below
    ) -> None:
        """Wait until `predicate()` holds, re-checking on every state change; TimeoutError after
        `timeout` seconds."""
        with anyio.fail_after(timeout):
            while not predicate():
                if self._changed is None:
                    self._changed = anyio.Event()
                await self._changed.wait()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    # --- state ---------------------------------------------------------------------------------

    def load_instance(self, key: str, *, jit: bool = False) -> Instance:
        """Load `key` instantly, as from LM Studio's UI (no delay, no guardrail, not counted)."""
        model = self.catalog[key]
        ttl_s = JIT_DEFAULT_TTL_S if jit else None
        return self._add(model, self._next_id(key), jit=jit, ttl_s=ttl_s, options={})

    def unload_instance(self, instance_id: str) -> None:
        """Unload instantly, as from LM Studio's UI; KeyError if not loaded."""
        self._unload(instance_id, counted=False)

    def _instances_of(self, key: str) -> list[Instance]:
        return [instance for instance in self.instances.values() if instance.key == key]

    def _next_id(self, key: str) -> str:
        taken = self.instances.keys() | self._loading.keys()
        if key not in taken:
            return key
        number = 2
        while f"{key}:{number}" in taken:
            number += 1
        return f"{key}:{number}"

    def _add(
        self,
        model: CatalogModel,
        instance_id: str,
        *,
        jit: bool,
        ttl_s: float | None,
        options: dict[str, Any],
    ) -> Instance:
        config = _instance_config(model, options)
        instance = Instance(
            instance_id, model.key, config["context_length"], jit, ttl_s, time.monotonic(), config
        )
        self.instances[instance_id] = instance
        self._notify()
        return instance

    def _unload(self, instance_id: str, *, counted: bool) -> None:
        instance = self.instances.pop(instance_id)
        if counted:
            self._unloads.append(instance.key)
        self._notify()

    def _reap_expired(self) -> None:
        now = time.monotonic()
        for instance in list(self.instances.values()):
            if instance.ttl_s is not None and now - instance.last_used > instance.ttl_s:
                self._unload(instance.id, counted=True)

    def _check_memory(self, model: CatalogModel) -> None:
        if self.memory_bytes is None:
            return
        loaded = sum(self.catalog[i.key].size_bytes for i in self.instances.values())
        loading = sum(m.size_bytes for m in self._loading.values())
        if loaded + loading + model.size_bytes > self.memory_bytes:
            raise _LoadFailedError(replies.guardrail_message(model))

    async def _load(
        self, model: CatalogModel, *, jit: bool, ttl_s: float | None, options: dict[str, Any]
    ) -> Instance:
        """Reserve an id, take `load_delay_s`, then list the instance.

        The delay is shielded: a client that goes away does not stop a load LM Studio would
        finish. The instance counts toward memory from the start but is listed only at the end.
        """
        self._check_memory(model)
        instance_id = self._next_id(model.key)
        fail = self.fail_next_loads > 0
        if fail:
            self.fail_next_loads -= 1
        self._loading[instance_id] = model
        self._loads.append(model.key)
        self._notify()
        try:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(self.load_delay_s)
        finally:
            # A load dies with its server: uvicorn's shutdown cancels handlers with asyncio's
            # own `Task.cancel`, which the shield does not hold off.
            del self._loading[instance_id]
            self._notify()
        if fail:
            raise _LoadFailedError(
                f'Failed to load model "{model.key}". Error: model_load_failed '
                "(the engine process exited unexpectedly)"
            )
        return self._add(model, instance_id, jit=jit, ttl_s=ttl_s, options=options)

    # --- model resolution for inference ----------------------------------------------------------

    def _invalid_model(self, requested: str) -> _RejectError:
        valid = list(self.catalog) if self.jit else list(self.instances)
        message = (
            f'Invalid model identifier "{requested}". Please specify a valid downloaded model '
            f"(e.g., {', '.join(valid[:3])})."
        )
        return _RejectError(
            replies.openai_error(400, message, param="model", code="model_not_found")
        )

    async def _resolve(self, payload: dict[str, Any], kind: Kind) -> Instance:
        """The instance that answers: named by instance id or model key, JIT-loaded if needed."""
        requested = payload.get("model")
        if requested is None and self.instances:
            requested = next(iter(self.instances))  # LM Studio answers with what is loaded (§4)
        if requested is None or (not self.jit and not self.instances):
            raise _RejectError(replies.openai_error(400, replies.NO_MODELS, param="model"))
        name = str(requested)
        instance = self.instances.get(name)
        model = self.catalog.get(instance.key if instance is not None else name)
        if model is None:
            raise self._invalid_model(name)
        _check_kind(model, kind, name)
        if instance is not None:
            return instance
        return await self._loaded_or_jit(model, payload.get("ttl"))

    async def _loaded_or_jit(self, model: CatalogModel, ttl: object) -> Instance:
        """A loaded instance of `model`, loading one by JIT if there is none.

        Concurrent requests for the same model share one JIT load: latecomers wait on its event.
        """
        while not (loaded := self._instances_of(model.key)):
            if not self.jit:
                raise self._invalid_model(model.key)
            pending = self._jit_pending.get(model.key)
            if pending is None:
                return await self._jit_load(model, ttl)
            await pending.wait()
        return loaded[0]

    async def _jit_load(self, model: CatalogModel, ttl: object) -> Instance:
        done = self._jit_pending[model.key] = anyio.Event()
        try:
            if self.auto_evict:
                for instance in [i for i in self.instances.values() if i.jit]:
                    self._unload(instance.id, counted=True)
            ttl_s = JIT_DEFAULT_TTL_S
            if isinstance(ttl, int | float) and not isinstance(ttl, bool) and ttl > 0:
                ttl_s = float(ttl)  # `ttl` in the body applies to the load it triggers (§4)
            return await self._load(model, jit=True, ttl_s=ttl_s, options={})
        except _LoadFailedError as exc:
            response = replies.openai_error(
                500, str(exc), param="model", code="model_load_failed", error_type="server_error"
            )
            raise _RejectError(response) from exc
        finally:
            del self._jit_pending[model.key]
            done.set()

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
            if auth and (denied := self._deny(request)) is not None:
                return denied
            self._reap_expired()
            try:
                return await handler(request, body)
            except _RejectError as exc:
                return exc.response

        return Route(path, endpoint, methods=[method])

    async def _receive(self, request: Request) -> object:
        """Read and record the request; the body is parsed JSON, None, or `_Malformed`."""
        raw = await request.body()
        body: object = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError as exc:
                body = _Malformed(str(exc))
            except RecursionError:  # LM Studio's JSON.parse goes deeper; seen as malformed
                body = _Malformed("nested too deeply")
        recorded = None if isinstance(body, _Malformed) else body
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
        """Express's fallback: HTTP 200 with an error string (§5.1)."""
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
                rows.append(replies.v0_row(model, None))
            rows += [replies.v0_row(model, instance) for instance in loaded]
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
            replies.v1_row(
                model, [] if self.v1_loaded_instances_empty else self._instances_of(model.key)
            )
            for model in self.catalog.values()
        ]
        return JSONResponse({"models": models})

    async def _load_endpoint(self, request: Request, body: object) -> Response:
        payload = _object_body(body, native=True)
        _validate_load(payload)
        model = self.catalog.get(payload["model"])
        if model is None:
            message = f"Model {payload['model']} not found in downloaded models"
            return replies.native_error(404, "model_not_found", message)
        unsupported = [key for key in _LLM_ONLY_FIELDS if key in payload]
        if model.type == "embedding" and unsupported:
            message = (
                "The following configuration values are not supported for embedding models: "
                + ", ".join(unsupported)
            )
            return replies.native_error(400, "invalid_request", message)
        started = time.monotonic()
        try:
            instance = await self._load(model, jit=False, ttl_s=None, options=payload)
        except _LoadFailedError as exc:
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
        payload = _object_body(body, native=True)
        unknown = [key for key in payload if key != "instance_id"]
        if unknown:
            raise _unrecognized(unknown)
        instance_id = payload.get("instance_id")
        if not isinstance(instance_id, str):
            raise _missing("instance_id")
        if instance_id not in self.instances:
            message = f"No model instance found with instance_id {instance_id}"
            return replies.native_error(404, "model_not_found", message)
        self._unload(instance_id, counted=True)
        return JSONResponse({"instance_id": instance_id})

    # --- inference -------------------------------------------------------------------------------

    async def _count_tokens(self, request: Request, body: object) -> Response:
        payload = _object_body(body, native=False)
        requested = payload.get("model")
        if requested is not None and str(requested) not in self.instances | self.catalog:
            raise self._invalid_model(str(requested))
        return JSONResponse({"input_tokens": replies.count_words(payload)})

    async def _infer(self, request: Request, body: object, *, kind: Kind, v0: bool) -> Response:
        payload = _object_body(body, native=False)
        required = _REQUIRED_FIELD[kind]
        if required not in payload:
            raise _RejectError(
                replies.openai_error(400, f"'{required}' is required", param=required)
            )
        instance = await self._resolve(payload, kind)
        instance.last_used = time.monotonic()
        if kind == "embedding":
            return JSONResponse(
                replies.embeddings_body(instance.id, payload["input"], EMBEDDING_DIMS)
            )
        reply = replies.make_reply(kind, instance.id, payload, self.reply_tokens)
        if payload.get("stream") is True:
            options = payload.get("stream_options")
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            return _EventStream(self._stream(replies.FRAMES[kind](reply, include_usage)))
        model = self.catalog[instance.key]
        extras = replies.v0_extras(reply, model, instance.context_length) if v0 else None
        return JSONResponse(replies.BODIES[kind](reply, extras))

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
