"""LMStudioClient: LM Studio's catalogue, loads, unloads and streamed completions.

The only module that touches httpx2's exceptions: every transport failure is translated here into
the proxy's own errors (`proxy.errors`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio
import httpx2

from proxy.errors import (
    InsufficientMemoryError,
    ModelLoadError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from proxy.transport import PoolTransport

# Hop-by-hop headers (RFC 9110 §7.6.1) are never forwarded, in either direction. `host` and
# `content-length` are set anew by the client; `date` and `server` by our own server.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Unloading frees memory and takes a moment; one that takes longer than this (or than
# load_timeout, if shorter) has failed.
UNLOAD_TIMEOUT_S = 30.0
# What LM Studio answers when the model asked for is not loaded and it does not load it itself
# (JIT loading off): the model was unloaded behind the proxy's back.
_NOT_LOADED_MARKERS = (b"No models loaded", b"Invalid model identifier", b"model_not_found")
_NOT_FORWARDED_UP = HOP_BY_HOP | {b"host", b"content-length", b"authorization", b"x-api-key"}
_NOT_FORWARDED_DOWN = HOP_BY_HOP | {b"date", b"server"}


def _named_by_connection(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    names: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            names.update(part.strip().lower() for part in value.split(b","))
    return names


def request_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The client's headers fit to send upstream: no hop-by-hop, no client credentials."""
    headers = list(headers)
    drop = _NOT_FORWARDED_UP | _named_by_connection(headers)
    return [(n, v) for n, v in headers if n.lower() not in drop]


def response_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """LM Studio's response headers fit to relay to the client."""
    headers = list(headers)
    drop = _NOT_FORWARDED_DOWN | _named_by_connection(headers)
    return [(n.lower(), v) for n, v in headers if n.lower() not in drop]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One downloaded model, and its loaded instances, as LM Studio reports it."""

    key: str
    type: str  # "llm" | "embedding"
    size_bytes: int
    max_context_length: int | None
    display_name: str
    instances: tuple[str, ...]  # loaded instance ids ("key", "key:2", ...)
    context_length: int | None  # of the first loaded instance
    # What the listing says of the model itself, where it says it (for Ollama's listings).
    architecture: str | None = None  # "llama", "qwen2", ...
    quantization: str | None = None  # "Q4_K_M", ...
    params: str | None = None  # "7B", ...
    format: str | None = None  # "gguf", "mlx", ...
    vision: bool = False
    tool_use: bool = False


@dataclass(frozen=True, slots=True)
class Loaded:
    """A new instance, as LM Studio's load call reports it."""

    instance_id: str  # "key", or "key:2" when another instance existed
    context_length: int | None


# How LM Studio's memory guardrail words its refusal of a load (docs/design.md §5.6): "Model
# loading was stopped due to insufficient system resources. Under the current settings, this
# model requires approximately 22.92 GB of memory, ...". The one place it is recognised.
_MEMORY_REFUSAL = "insufficient system resources"


def refused_for_memory(message: str) -> bool:
    """Whether LM Studio's error `message` is its memory guardrail refusing a load."""
    return _MEMORY_REFUSAL in message.lower()


def _error_message(response: httpx2.Response) -> str:
    """LM Studio's error text, whichever of its envelopes it used."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or f"HTTP {response.status_code}"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    if isinstance(error, str):
        return error
    return response.text.strip()


def _described(row: Mapping[str, Any]) -> dict[str, Any]:
    """What an `/api/v1/models` row says of the model itself (each field where it is there)."""
    quantization = row.get("quantization")
    if isinstance(quantization, dict):
        quantization = quantization.get("name")
    capabilities = row.get("capabilities")
    capabilities = capabilities if isinstance(capabilities, dict) else {}

    def text(value: object) -> str | None:
        return value if isinstance(value, str) and value else None

    return {
        "architecture": text(row.get("architecture")),
        "quantization": text(quantization),
        "params": text(row.get("params_string")),
        "format": text(row.get("format")),
        "vision": capabilities.get("vision") is True,
        "tool_use": capabilities.get("trained_for_tool_use") is True,
    }


def _unexpected_endpoint(response: httpx2.Response) -> bool:
    # LM Studio answers unknown routes with 200 {"error": "Unexpected endpoint or method. (...)"}
    return response.content.startswith(b'{"error":"Unexpected endpoint')


class UpstreamResponse:
    """An open streamed response from LM Studio. Its owner must call `aclose()`."""

    def __init__(self, response: httpx2.Response) -> None:
        self._response = response
        self.status_code = response.status_code
        self.headers = response_headers(response.headers.raw)
        self.content_type = response.headers.get("content-type", "")
        self._body: bytes | None = None

    async def read(self) -> bytes:
        """Read the whole body now (small error answers only); `aiter_raw` still yields it."""
        self._body = b"".join([chunk async for chunk in self.aiter_raw()])
        return self._body

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """The body as it arrives; a broken upstream raises `UpstreamError`."""
        if self._body is not None:
            yield self._body
            return
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        except httpx2.TimeoutException as exc:
            raise UpstreamTimeoutError("LM Studio stopped sending data (read timeout)") from exc
        except httpx2.TransportError as exc:
            raise UpstreamUnavailableError(f"LM Studio's response broke off: {exc!r}") from exc

    async def aclose(self) -> None:
        await self._response.aclose()


class ModelNotLoadedError(UpstreamError):
    """LM Studio answered that the model is not loaded (it was unloaded behind the proxy's back,
    and JIT loading is off). `response` is that answer, read and closed, and still relayable."""

    def __init__(self, response: UpstreamResponse) -> None:
        super().__init__(
            f"LM Studio has the model no longer loaded (HTTP {response.status_code})",
            code="model_not_loaded",
        )
        self.response = response


class LMStudioClient:
    """Talks to LM Studio's REST API through one pooled `httpx2.AsyncClient` (not owned)."""

    def __init__(
        self,
        http: httpx2.AsyncClient,
        *,
        transport: httpx2.AsyncBaseTransport | None = None,
        api_token: str | None = None,
        load_timeout_s: float = 300.0,
        list_timeout_s: float = 5.0,
    ) -> None:
        self._http = http
        self._transport = transport if transport is not None else _transport_of(http)
        self._timeout = http.timeout.as_dict()
        self._urls: dict[str, httpx2.URL] = {}
        self._auth = [(b"authorization", f"Bearer {api_token}".encode())] if api_token else []
        self.load_timeout_s = load_timeout_s
        self.list_timeout_s = list_timeout_s
        self.base_url = str(http.base_url).rstrip("/")

    async def _call(self, method: str, path: str, body: Any, timeout_s: float) -> Any:
        """One JSON call within `timeout_s`; LM Studio's errors as `UpstreamError`."""
        headers = [*self._auth, (b"content-type", b"application/json")]
        content = None if body is None else json.dumps(body).encode()
        # The whole call has one deadline; only connecting keeps the client's own timeout.
        timeout = httpx2.Timeout(None, connect=self._http.timeout.connect)
        attempts = 2 if method == "GET" else 1  # a GET may be retried on a connection gone stale
        try:
            with anyio.fail_after(timeout_s):
                for attempt in range(attempts):  # pragma: no branch - returns or raises
                    try:
                        response = await self._http.request(
                            method, path, content=content, headers=headers, timeout=timeout
                        )
                        break
                    except (httpx2.ReadError, httpx2.RemoteProtocolError):
                        if attempt + 1 == attempts:
                            raise
        except TimeoutError as exc:
            raise UpstreamTimeoutError(
                f"LM Studio did not answer {path} in {timeout_s:g} s"
            ) from exc
        except httpx2.TimeoutException as exc:
            raise UpstreamUnavailableError(
                f"LM Studio at {self.base_url} timed out: {exc!r}", retry_after_s=5
            ) from exc
        except httpx2.TransportError as exc:
            raise UpstreamUnavailableError(
                f"LM Studio is not reachable at {self.base_url}: {exc!r}", retry_after_s=5
            ) from exc
        if _unexpected_endpoint(response):
            raise UpstreamError(
                f"LM Studio at {self.base_url} does not serve {path}: lmswitch needs LM Studio "
                "0.4 or later (its /api/v1 REST API)",
                code="upstream_unsupported",
                should_retry=False,
            )
        if response.status_code >= 400:
            raise _status_error(path, response)
        try:
            return response.json()
        except ValueError as exc:
            raise UpstreamError(f"LM Studio sent invalid JSON from {path}") from exc

    async def catalog(self) -> list[ModelInfo]:
        """Downloaded models with sizes and loaded instances.

        `/api/v1/models` carries sizes but some builds report `loaded_instances` empty, so the
        loaded state is cross-checked with `/api/v0/models`. LM Studio answers both in
        milliseconds: the two together get `list_timeout_s`, and a listing that takes longer means
        LM Studio is not answering (docs/design.md §3.3).
        """
        started = anyio.current_time()
        try:
            v1 = await self._call("GET", "/api/v1/models", None, self.list_timeout_s)
            left = self.list_timeout_s - (anyio.current_time() - started)
            v0 = await self._call("GET", "/api/v0/models", None, max(left, 0.001))
        except UpstreamTimeoutError as exc:
            raise UpstreamUnavailableError(
                f"LM Studio did not list its models in {self.list_timeout_s:g} s", retry_after_s=5
            ) from exc
        loaded_v0: dict[str, list[tuple[str, int | None]]] = {}
        for row in v0.get("data", []) if isinstance(v0, dict) else []:
            if isinstance(row, dict) and row.get("state") == "loaded":
                instance = str(row.get("id", ""))
                key = instance.rsplit(":", 1)[0] if ":" in instance else instance
                loaded_v0.setdefault(key, []).append((instance, row.get("loaded_context_length")))
        models: list[ModelInfo] = []
        for row in v1.get("models", []) if isinstance(v1, dict) else []:
            key = str(row["key"])
            instances = [
                (str(i["id"]), (i.get("config") or {}).get("context_length"))
                for i in row.get("loaded_instances") or []
            ]
            for instance, ctx in loaded_v0.get(key, []):
                if instance not in {i for i, _ in instances}:
                    instances.append((instance, ctx))
            models.append(
                ModelInfo(
                    key=key,
                    type="embedding" if row.get("type") == "embedding" else "llm",
                    size_bytes=int(row.get("size_bytes") or 0),
                    max_context_length=row.get("max_context_length"),
                    display_name=str(row.get("display_name") or key),
                    instances=tuple(i for i, _ in instances),
                    context_length=instances[0][1] if instances else None,
                    **_described(row),
                )
            )
        return models

    async def load(
        self, key: str, options: Mapping[str, Any], *, timeout_s: float | None = None
    ) -> Loaded:
        """Load a new instance of `key`. Blocks until LM Studio is done, or `timeout_s` (by
        default `load_timeout`) has passed."""
        limit = self.load_timeout_s if timeout_s is None else timeout_s
        try:
            answer = await self._call(
                "POST",
                "/api/v1/models/load",
                {"model": key, **options, "echo_load_config": True},
                timeout_s=limit,
            )
        except UpstreamTimeoutError as exc:
            setting = "load_timeout" if timeout_s is None else "the proxy's wait"
            raise UpstreamTimeoutError(
                f"loading model {key!r} took longer than {setting} ({limit:g} s)",
                code="model_load_timeout",
            ) from exc
        except UpstreamUnavailableError:
            raise
        except UpstreamError as exc:
            error = InsufficientMemoryError if refused_for_memory(exc.message) else ModelLoadError
            raise error(
                f"LM Studio failed to load model {key!r}: {exc.message}",
                should_retry=exc.should_retry,
            ) from exc
        instance = answer.get("instance_id") or answer.get("model_instance_id") or key
        config = answer.get("load_config")
        context = config.get("context_length") if isinstance(config, dict) else None
        return Loaded(str(instance), context if isinstance(context, int) else None)

    async def unload(self, instance_id: str) -> None:
        """Unload one instance; one that is already gone counts as unloaded."""
        try:
            await self._call(
                "POST",
                "/api/v1/models/unload",
                {"instance_id": instance_id},
                timeout_s=min(UNLOAD_TIMEOUT_S, self.load_timeout_s),
            )
        except UpstreamError as exc:
            if exc.code != "upstream_404":
                raise

    async def open_completion(
        self, path: str, body: bytes, headers: Iterable[tuple[bytes, bytes]]
    ) -> UpstreamResponse:
        """Send a request and return the response with its body not yet read.

        LM Studio's answer that the model is not loaded raises `ModelNotLoadedError`, and an
        error without a JSON body (a crash page, which the client's SDK could not read) raises
        `UpstreamError` quoting it. A connection LM Studio drops without answering is LM Studio
        gone: `UpstreamUnavailableError`, as when it cannot be reached. The request path goes to
        the pool's transport directly: the client's URL merging, cookies, auth and redirect
        handling cost more than the rest of the proxy, and none of it applies to a POST relayed
        to LM Studio.
        """
        if (url := self._urls.get(path)) is None:
            url = self._urls[path] = self._http.base_url.join(path)
        request = httpx2.Request(
            "POST",
            url,
            content=body,
            headers=[*request_headers(headers), *self._auth],
            extensions={"timeout": self._timeout},
        )
        try:
            response = await self._transport.handle_async_request(request)
        except httpx2.TimeoutException as exc:
            raise UpstreamTimeoutError(f"LM Studio did not answer {path} in time") from exc
        except httpx2.ProtocolError as exc:
            if not _hung_up(exc):
                raise UpstreamError(
                    f"LM Studio sent no valid HTTP answer to {path}: {exc}",
                    code="upstream_protocol_error",
                ) from exc
            raise UpstreamUnavailableError(
                f"LM Studio at {self.base_url} closed the connection without answering {path} "
                "(stopped or restarted?)",
                retry_after_s=5,
            ) from exc
        except httpx2.TransportError as exc:
            raise UpstreamUnavailableError(
                f"LM Studio is not reachable at {self.base_url}: {exc!r}", retry_after_s=5
            ) from exc
        upstream = UpstreamResponse(response)
        if upstream.status_code >= 400:
            await _raise_for_quirks(upstream)
        return upstream


def _hung_up(exc: httpx2.ProtocolError) -> bool:
    """Whether the server closed the connection before its answer's status line and headers
    were complete: LM Studio gone (killed, restarting), not a server speaking bad HTTP.

    httpcore says so only in its message; anything else it raises is an answer it could not
    parse. A reset connection is a `ReadError`, not a `ProtocolError`.
    """
    return isinstance(exc, httpx2.RemoteProtocolError) and "disconnected without" in str(exc)


async def _raise_for_quirks(upstream: UpstreamResponse) -> None:
    """Turn the error answers the proxy handles itself into exceptions, the response closed;
    leave LM Studio's other errors open, to be relayed as they are."""
    not_loaded = upstream.status_code in (400, 404)
    unreadable = "json" not in upstream.content_type
    if not (not_loaded or unreadable):
        return
    try:
        body = await upstream.read()
    except BaseException:
        await _close(upstream)
        raise
    if not_loaded and any(marker in body for marker in _NOT_LOADED_MARKERS):
        await _close(upstream)
        raise ModelNotLoadedError(upstream)
    if unreadable:
        await _close(upstream)
        text = body[:300].decode("utf-8", "replace").strip()
        raise UpstreamError(
            f"LM Studio answered {upstream.status_code} without a JSON error: {text!r}"
        )


async def _close(upstream: UpstreamResponse) -> None:
    with anyio.CancelScope(shield=True):
        await upstream.aclose()


def _status_error(path: str, response: httpx2.Response) -> UpstreamError:
    message = _error_message(response)
    status = response.status_code
    if status == 401 or status == 403:
        return UpstreamError(
            f"LM Studio refused the proxy's credentials on {path} (check upstream.api_token): "
            f"{message}",
            code="upstream_auth_failed",
        )
    # Retrying cannot help a refusal (4xx) or an out-of-memory guardrail; other 5xx may pass.
    hopeless = status < 500 or refused_for_memory(message)
    return UpstreamError(
        f"{message} (HTTP {status} from {path})",
        code=f"upstream_{status}",
        should_retry=not hopeless,
    )


def _transport_of(http: httpx2.AsyncClient) -> httpx2.AsyncBaseTransport:
    """The transport `http` sends through (for a base URL without per-host mounts)."""
    return http._transport_for_url(http.base_url)


def create_transport() -> httpx2.AsyncHTTPTransport:
    """The connection pool to LM Studio (never through $HTTP_PROXY: LM Studio is local)."""
    return PoolTransport(
        # LM Studio's server (Express) and uvicorn drop idle connections after 5 s; expiring ours
        # first avoids sending a request on a connection the server is closing.
        httpx2.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=4.0)
    )


def create_http_client(
    base_url: str,
    *,
    connect_timeout_s: float,
    read_timeout_s: float,
    transport: httpx2.AsyncBaseTransport | None = None,
) -> httpx2.AsyncClient:
    """The pooled client for LM Studio, owned by the app's lifespan."""
    return httpx2.AsyncClient(
        base_url=base_url,
        timeout=httpx2.Timeout(read_timeout_s, connect=connect_timeout_s, pool=None),
        transport=transport if transport is not None else create_transport(),
        trust_env=False,  # LM Studio is local: never route it through $HTTP_PROXY
    )
