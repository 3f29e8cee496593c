"""Reading and checking request bodies, splicing `model` into them, and noticing a client leave."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import anyio
from starlette.requests import Request
from starlette.types import Receive, Scope

from proxy.errors import (
    BadRequestError,
    PayloadTooLargeError,
    RequestTimeoutError,
    UnsupportedMediaTypeError,
)

_decoder = json.JSONDecoder()


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


def check_fields(payload: dict[str, Any]) -> None:
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


WATCH_SCOPE_KEY = "lmswitch.watch"


class ClientWatch:
    """Whether the client of a request for a model is still there.

    Entered around the whole request, route and response (`WatchForDisconnect`). Once
    `start()`ed, which is when the body has been read (`receive` then brings nothing but the
    disconnect), a client that disconnects cancels everything inside at once: its wait in the
    queue, its call to LM Studio, the relay of LM Studio's answer; `gone` says so afterwards.
    One task watches; leaving the block stops it. An exception from inside the block leaves it
    as it is (a task group would wrap it in an `ExceptionGroup`).
    """

    __slots__ = ("_receive", "_tg", "complete", "gone", "started")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._tg = anyio.create_task_group()
        self.started = False  # the response has started
        self.complete = False  # its last byte is on its way: a client that leaves now has not
        self.gone = False

    def start(self) -> None:
        """Watch from now on (once the body has been read)."""
        self._tg.start_soon(self._watch)

    async def __aenter__(self) -> ClientWatch:
        await self._tg.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        tg = self._tg
        if exc is None and self.complete:
            # uvicorn wakes a pending `receive` with `http.disconnect` once the response is
            # sent (as ASGI has `receive` answer after it): the watcher ends by itself, which
            # costs half of cancelling it, on every request.
            return await tg.__aexit__(None, None, None)
        tg.cancel_scope.cancel()  # the watcher's work is done
        if exc is None or isinstance(exc, anyio.get_cancelled_exc_class()):
            # Our own cancellation (the client left) ends here; any other goes on.
            return await tg.__aexit__(exc_type, exc, tb)
        await tg.__aexit__(None, None, None)  # wait for the watcher to stop...
        return False  # ...and let the block's exception go on as it is

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        if not self.complete:
            self.gone = True
            self._tg.cancel_scope.cancel()


def watch_of(scope: Scope) -> ClientWatch:
    """The watch `openai_routes.WatchForDisconnect` made for this request."""
    watch: ClientWatch = scope[WATCH_SCOPE_KEY]
    return watch


def disconnect_watcher(receive: Receive) -> Callable[[], Awaitable[None]]:
    """A function that returns once the client has disconnected (it reads the rest of the
    request's messages, so call it only once the body has been read)."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    return disconnected
