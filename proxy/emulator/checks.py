"""The emulator's HTTP edges: request bodies and their checks, rejections, the SSE response.

Errors are shaped by `proxy.emulator.replies`; a check that fails raises `RejectError`.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import anyio
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from proxy.emulator import replies
from proxy.emulator.catalog import CatalogModel
from proxy.emulator.replies import Kind

_LOAD_FIELDS: dict[str, tuple[type, str]] = {
    "model": (str, "string"),
    "context_length": (int, "number"),
    "eval_batch_size": (int, "number"),
    "flash_attention": (bool, "boolean"),
    "num_experts": (int, "number"),
    "offload_kv_cache_to_gpu": (bool, "boolean"),
    "echo_load_config": (bool, "boolean"),
}
LLM_ONLY_FIELDS = ("eval_batch_size", "flash_attention", "num_experts", "offload_kv_cache_to_gpu")


class RejectError(Exception):
    """Carries a finished error response out of a handler."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


@dataclass(frozen=True)
class Malformed:
    """A request body that is not valid JSON; `reason` says why."""

    reason: str


def object_body(body: object, *, native: bool) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 in the endpoint family's error shape."""
    if isinstance(body, dict):
        return body
    if isinstance(body, Malformed):
        message = f"Invalid JSON in request body: {body.reason}"
    elif body is None:
        message = "Request body is required."
    else:
        message = "Request body must be a JSON object."
    if native:
        raise RejectError(replies.native_error(400, "invalid_request", message))
    raise RejectError(replies.openai_error(400, message))


def unrecognized(keys: list[str]) -> RejectError:
    listed = ", ".join(f"'{key}'" for key in keys)
    message = f"Unrecognized key(s) in object: {listed}"
    return RejectError(
        replies.native_error(400, "invalid_request", message, code="unrecognized_keys")
    )


def missing(name: str) -> RejectError:
    response = replies.native_error(
        400,
        "invalid_request",
        f'"{name}" is required',
        code="missing_required_parameter",
        param=name,
    )
    return RejectError(response)


def validate_load(payload: dict[str, Any]) -> None:
    """Strict body schema of `POST /api/v1/models/load` (docs/design.md §5.1)."""
    unknown = [key for key in payload if key not in _LOAD_FIELDS]
    if unknown:
        raise unrecognized(unknown)
    if "model" not in payload:
        raise missing("model")
    for key, value in payload.items():
        expected, name = _LOAD_FIELDS[key]
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            message = f"Invalid type for '{key}': expected {name}"
            raise RejectError(replies.native_error(400, "invalid_request", message))


def check_kind(model: CatalogModel, kind: Kind, requested: str) -> None:
    if kind == "embedding" and model.type != "embedding":
        message = f'Model "{requested}" is not an embedding model and cannot create embeddings.'
    elif kind != "embedding" and model.type == "embedding":
        message = f'Model "{requested}" is an embedding model and cannot generate text.'
    else:
        return
    raise RejectError(replies.openai_error(400, message, param="model"))


class EventStream(StreamingResponse):
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
