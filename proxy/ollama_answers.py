"""Ollama's answers from LM Studio's: the OpenAI answers (streamed or not) as Ollama's NDJSON
lines (docs/design.md §4.8).

Pure: no I/O. `proxy.ollama_routes` streams LM Studio's answer through a translator made here;
`proxy.ollama` translates the requests and the listings.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from proxy.errors import ProxyError, UpstreamError
from proxy.ollama import CHAT, EMBED, EMBEDDINGS

NDJSON = b"application/x-ndjson"
JSON = b"application/json; charset=utf-8"


@dataclass(frozen=True, slots=True)
class Timing:
    """A request's times so far, in seconds: since it arrived, waiting for its model's load,
    and until LM Studio's first byte (the prompt's evaluation), as the last line reports them."""

    total_s: float
    load_s: float
    first_byte_s: float


def _ns(seconds: float) -> int:
    return max(0, round(seconds * 1e9))


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


_encoder = json.JSONEncoder(separators=(",", ":"))  # made once: a line is written per token
_decoder = json.JSONDecoder()


def _line(doc: Mapping[str, Any]) -> bytes:
    return _encoder.encode(doc).encode() + b"\n"


def error_line(error: ProxyError) -> bytes:
    """The last line of an NDJSON stream that broke off (the client raises on it)."""
    return _line({"error": error.message})


def upstream_error(body: bytes, status: int) -> str:
    """LM Studio's error message, out of OpenAI's envelope or its own."""
    try:
        doc = json.loads(body)
    except ValueError:
        return body.decode(errors="replace").strip() or f"LM Studio answered {status}"
    error = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    if isinstance(error, str):
        return error
    return f"LM Studio answered {status}"


def _done_reason(finish: object) -> str:
    return "length" if finish == "length" else "stop"  # tool calls end Ollama's turn with "stop"


def _arguments(text: str) -> Any:
    """A tool call's arguments as Ollama has them: an object (LM Studio's JSON text parsed)."""
    try:
        return json.loads(text) if text.strip() else {}
    except ValueError:
        return {"arguments": text}  # not JSON: kept, under a name


@dataclass(slots=True)
class _Call:
    name: str = ""
    arguments: str = ""


@dataclass(slots=True)
class _Answer:
    """What the answer has said so far."""

    finish: object = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    calls: dict[int, _Call] = field(default_factory=dict)
    done: bool = False  # the stream's [DONE], or the whole answer, was read

    def usage(self, usage: object) -> None:
        if isinstance(usage, dict):
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
            self.prompt_tokens = prompt if isinstance(prompt, int) else self.prompt_tokens
            if isinstance(completion, int):
                self.completion_tokens = completion

    def tool_calls(self) -> list[dict[str, Any]]:
        return [
            {"function": {"name": call.name, "arguments": _arguments(call.arguments)}}
            for _, call in sorted(self.calls.items())
        ]


class TextTranslator:
    """LM Studio's chat or completion answer (SSE when streamed, else one JSON document) as
    Ollama's chat or generate answer: NDJSON lines, the last with `done: true`, why it ended,
    the token counts and durations (in nanoseconds)."""

    def __init__(self, ollama_path: str, model: str, *, stream: bool, timing: Callable[[], Timing]):
        self.media_type = NDJSON if stream else JSON
        self._chat = ollama_path == CHAT
        self._model = model
        self._stream = stream
        self._timing = timing
        self._buffer = bytearray()
        self._answer = _Answer()
        self._created_at = _now()

    def feed(self, chunk: bytes) -> bytes:
        self._buffer += chunk
        if not self._stream:
            return b""  # the whole document is read at the end
        *lines, rest = self._buffer.split(b"\n")
        self._buffer = bytearray(rest)
        self._created_at = _now()  # once for the lines of a chunk: they came at once
        out = [self._event(line[5:].decode().strip()) for line in lines if line[:5] == b"data:"]
        return b"".join(out)

    def _event(self, data: str) -> bytes:
        if data == "[DONE]":
            self._answer.done = True
            return b""
        try:
            doc = _decoder.decode(data)
        except ValueError:
            return b""
        if not isinstance(doc, dict):
            return b""
        if "error" in doc:  # LM Studio's error mid-stream: the client raises on it
            return _line({"error": upstream_error(data.encode(), 200)})
        answer = self._answer
        answer.usage(doc.get("usage"))
        choices = doc.get("choices")
        choice = choices[0] if isinstance(choices, list) and choices else None
        if not isinstance(choice, dict):
            return b""
        if choice.get("finish_reason") is not None:
            answer.finish = choice["finish_reason"]
        delta = choice.get("delta")
        delta = delta if isinstance(delta, dict) else {"content": choice.get("text")}
        for call in delta.get("tool_calls") or []:
            self._call_delta(call)
        text, thinking = delta.get("content"), delta.get("reasoning_content")
        if not text and not thinking:
            return b""
        return _line(self._piece(text or "", thinking or None, done=False))

    def _call_delta(self, delta: object) -> None:
        """One piece of a streamed tool call: its name first, then its arguments in pieces."""
        if not isinstance(delta, dict):
            return
        index = delta.get("index", 0)
        call = self._answer.calls.setdefault(index if isinstance(index, int) else 0, _Call())
        function = delta.get("function")
        if isinstance(function, dict):
            if isinstance(function.get("name"), str):
                call.name = function["name"]
            if isinstance(function.get("arguments"), str):
                call.arguments += function["arguments"]

    def _piece(
        self,
        text: str,
        thinking: str | None,
        *,
        done: bool,
        tool_calls: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        doc: dict[str, Any] = {"model": self._model, "created_at": self._created_at}
        if self._chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            if tool_calls:
                message["tool_calls"] = tool_calls
            doc["message"] = message
        else:
            doc["response"] = text
            if thinking:
                doc["thinking"] = thinking
        doc["done"] = done
        return doc

    def _last(self, doc: dict[str, Any]) -> bytes:
        answer, timing = self._answer, self._timing()
        prompt_s = max(0.0, timing.first_byte_s - timing.load_s)
        doc |= {
            "done_reason": _done_reason(answer.finish),
            "total_duration": _ns(timing.total_s),
            "load_duration": _ns(timing.load_s),
            "prompt_eval_count": answer.prompt_tokens or 0,
            "prompt_eval_duration": _ns(prompt_s),
            "eval_count": answer.completion_tokens or 0,
            "eval_duration": _ns(timing.total_s - timing.first_byte_s),
        }
        return _line(doc)

    def end(self) -> bytes:
        self._created_at = _now()
        if not self._stream:
            return self._whole()
        answer = self._answer
        if not answer.done:
            raise UpstreamError(
                "LM Studio ended the stream without [DONE]: the answer may be incomplete",
                code="upstream_incomplete",
            )
        calls = b""
        if answer.calls:  # Ollama sends a turn's tool calls whole, in one line
            calls = _line(self._piece("", None, done=False, tool_calls=answer.tool_calls()))
        return calls + self._last(self._piece("", None, done=True))

    def _whole(self) -> bytes:
        try:
            doc = json.loads(self._buffer)
            choice = doc["choices"][0]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise UpstreamError("LM Studio's answer is not a completion") from exc
        answer = self._answer
        answer.usage(doc.get("usage"))
        answer.finish = choice.get("finish_reason")
        message = choice.get("message")
        message = message if isinstance(message, dict) else {"content": choice.get("text")}
        for index, call in enumerate(message.get("tool_calls") or []):
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                arguments = function.get("arguments")
                answer.calls[index] = _Call(
                    str(function.get("name", "")),
                    arguments if isinstance(arguments, str) else json.dumps(arguments),
                )
        text = message.get("content") or ""
        thinking = message.get("reasoning_content") or None
        piece = self._piece(text, thinking, done=True, tool_calls=answer.tool_calls())
        return self._last(piece)

    def error(self, error: ProxyError) -> bytes:
        return error_line(error)


class EmbedTranslator:
    """LM Studio's `/v1/embeddings` answer as `/api/embed`'s (`embeddings`, with counts) or the
    older `/api/embeddings`' (`embedding`: the one vector)."""

    media_type = JSON

    def __init__(self, ollama_path: str, model: str, *, timing: Callable[[], Timing]) -> None:
        self._older = ollama_path == EMBEDDINGS
        self._model = model
        self._timing = timing
        self._buffer = bytearray()

    def feed(self, chunk: bytes) -> bytes:
        self._buffer += chunk
        return b""

    def end(self) -> bytes:
        try:
            doc = json.loads(self._buffer)
            rows = sorted(doc["data"], key=lambda row: row.get("index", 0))
            vectors = [row["embedding"] for row in rows]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UpstreamError("LM Studio's answer is not a list of embeddings") from exc
        if self._older:
            return _line({"embedding": vectors[0] if vectors else []})
        usage = doc.get("usage")
        prompt = usage.get("prompt_tokens") if isinstance(usage, dict) else None
        timing = self._timing()
        return _line(
            {
                "model": self._model,
                "embeddings": vectors,
                "total_duration": _ns(timing.total_s),
                "load_duration": _ns(timing.load_s),
                "prompt_eval_count": prompt if isinstance(prompt, int) else 0,
            }
        )

    def error(self, error: ProxyError) -> bytes:
        return error_line(error)


def translator(
    ollama_path: str, model: str, stream: bool, timing: Callable[[], Timing]
) -> TextTranslator | EmbedTranslator:
    if ollama_path in (EMBED, EMBEDDINGS):
        return EmbedTranslator(ollama_path, model, timing=timing)
    return TextTranslator(ollama_path, model, stream=stream, timing=timing)


def nothing_to_do(ollama_path: str, model: str, *, unloaded: bool) -> dict[str, Any]:
    """The answer to a request with nothing to answer: the model was loaded (or unloaded)."""
    if ollama_path in (EMBED, EMBEDDINGS):
        return (
            {"embedding": []} if ollama_path == EMBEDDINGS else {"model": model, "embeddings": []}
        )
    doc: dict[str, Any] = {"model": model, "created_at": _now()}
    if ollama_path == CHAT:
        doc["message"] = {"role": "assistant", "content": ""}
    else:
        doc["response"] = ""
    return doc | {"done": True, "done_reason": "unload" if unloaded else "load"}
