"""The proxy's own errors and how they are rendered: OpenAI's envelope, Anthropic's, or Ollama's.

```
ProxyError
├── BadRequestError (400)
├── AuthenticationError (401)
├── PermissionDeniedError (403)
│   └── ModelNotAllowedError (403)
├── ModelNotFoundError (404)
├── RequestTimeoutError (408)
├── PayloadTooLargeError (413)
├── UnsupportedMediaTypeError (415)
├── QueueFullError (429)
├── CapacityError (503)
├── QueueTimeoutError (503)
└── UpstreamError (502)
    ├── UpstreamUnavailableError (503)
    ├── UpstreamTimeoutError (504)
    └── ModelLoadError (503)
        └── InsufficientMemoryError (503)
```
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar

from starlette.requests import Request
from starlette.responses import Response

# Anthropic's error `type` for each status, for the /v1/messages family (its API's own list,
# with the statuses it does not use mapped to the nearest); any other is `api_error`.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
}


class ProxyError(Exception):
    """An error the proxy answers itself, with an HTTP status and OpenAI's error fields."""

    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        retry_after_s: float | None = None,
        should_retry: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code if code is not None else self.default_code
        self.param = param
        self.retry_after_s = retry_after_s
        self.should_retry = should_retry

    def headers(self) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self.retry_after_s is not None:
            headers["retry-after"] = str(max(1, round(self.retry_after_s)))
        if self.should_retry is not None:
            headers["x-should-retry"] = "true" if self.should_retry else "false"
        return headers

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def anthropic_body(self) -> dict[str, Any]:
        kind = _ANTHROPIC_TYPES.get(self.status_code, "api_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}

    def ollama_body(self) -> dict[str, Any]:
        return {"error": self.message}


class BadRequestError(ProxyError):
    status_code = 400
    error_type = "invalid_request_error"


class AuthenticationError(ProxyError):
    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(ProxyError):
    status_code = 403
    error_type = "invalid_request_error"
    default_code = "forbidden"


class ModelNotAllowedError(PermissionDeniedError):
    """The request's key may not use the model it asked for (its `models` patterns)."""

    default_code = "model_not_allowed"


class ModelNotFoundError(ProxyError):
    status_code = 404
    error_type = "invalid_request_error"
    default_code = "model_not_found"


class RequestTimeoutError(ProxyError):
    status_code = 408
    error_type = "invalid_request_error"
    default_code = "request_timeout"


class UnsupportedMediaTypeError(ProxyError):
    status_code = 415
    error_type = "invalid_request_error"
    default_code = "unsupported_media_type"


class PayloadTooLargeError(ProxyError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class QueueFullError(ProxyError):
    status_code = 429
    error_type = "rate_limit_error"
    default_code = "queue_full"


class CapacityError(ProxyError):
    """The model can never fit beside the pinned models, or at all."""

    status_code = 503
    error_type = "server_error"
    default_code = "model_too_large"


class QueueTimeoutError(ProxyError):
    status_code = 503
    error_type = "server_error"
    default_code = "queue_timeout"


class UpstreamError(ProxyError):
    """LM Studio failed in a way the proxy cannot pass through as it is."""

    status_code = 502
    error_type = "server_error"
    default_code = "upstream_error"


class UpstreamUnavailableError(UpstreamError):
    status_code = 503
    default_code = "upstream_unavailable"


class ModelGoneError(UpstreamError):
    """LM Studio unloaded a leased model behind the proxy's back before its request was sent
    (a request sent now would make LM Studio load it by JIT, beside the proxy's own loads)."""

    status_code = 503
    default_code = "model_not_loaded"


class UpstreamTimeoutError(UpstreamError):
    status_code = 504
    default_code = "upstream_timeout"


class ModelLoadError(UpstreamError):
    status_code = 503
    default_code = "model_load_failed"


class InsufficientMemoryError(ModelLoadError):
    """LM Studio's memory guardrail refused a load (answered as `model_load_failed`): the proxy
    makes room and tries again before answering it (docs/design.md §2.8)."""


def is_anthropic_path(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


# Ollama's API (docs/design.md §4.8), whose errors are `{"error": "..."}`.
OLLAMA_PATHS = frozenset(
    {
        "/api/version",
        "/api/tags",
        "/api/ps",
        "/api/show",
        "/api/chat",
        "/api/generate",
        "/api/embed",
        "/api/embeddings",
    }
)


def error_body(exc: ProxyError, path: str) -> dict[str, Any]:
    """`exc` in the envelope the client of `path` expects."""
    if is_anthropic_path(path):
        return exc.anthropic_body()
    if path in OLLAMA_PATHS:
        return exc.ollama_body()
    return exc.body()


def error_response(
    exc: ProxyError,
    *,
    path: str = "",
    request_id: str | None = None,
    extra_headers: Mapping[str, str] | None = None,
) -> Response:
    """Render `exc` in the envelope the client of `path` expects."""
    body = error_body(exc, path)
    headers = exc.headers()
    if extra_headers:
        headers.update(extra_headers)
    if request_id is not None:
        headers["x-request-id"] = request_id
    return Response(
        json.dumps(body).encode(),
        status_code=exc.status_code,
        headers=headers,
        media_type="application/json",
    )


async def handle_proxy_error(request: Request, exc: Exception) -> Response:
    """The one exception handler, registered in `create_app`."""
    assert isinstance(exc, ProxyError)  # noqa: S101 - registered for ProxyError only
    return error_response(exc, path=request.url.path)
