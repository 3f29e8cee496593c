"""Response bodies, error bodies and SSE frames for the LM Studio emulator (lmstudio-api.md §3, §6).

Pure functions: no state, no I/O. `proxy.emulator` decides what to answer; this module decides
how the answer looks on the wire.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import string
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from starlette.responses import JSONResponse

if TYPE_CHECKING:
    from proxy.emulator import CatalogModel, Instance

Kind = Literal["chat", "completion", "embedding", "response", "message"]
Body = dict[str, Any]

_VOCABULARY = (
    "Hello", "from", "the", "LM", "Studio", "emulator,", "a", "deterministic", "reply", "made",
    "of", "plain", "words", "that", "streams", "one", "token", "at", "a", "time.",
)  # fmt: skip
_ID_ALPHABET = string.ascii_lowercase + string.digits
# Which request field caps the reply length, per endpoint family.
_LIMIT_KEYS: dict[Kind, tuple[str, ...]] = {
    "chat": ("max_completion_tokens", "max_tokens"),
    "completion": ("max_tokens",),
    "embedding": (),
    "response": ("max_output_tokens",),
    "message": ("max_tokens",),
}
_TEXT_KEYS = ("messages", "content", "text", "input", "prompt", "system", "instructions")
_RUNTIME = {
    "name": "llama.cpp-linux-x86_64-avx2",
    "version": "1.52.0",
    "supported_formats": ["gguf"],
}


@dataclass(frozen=True)
class Frame:
    """One SSE event as sent on the wire; `content` marks events that carry generated text."""

    data: bytes
    content: bool = False


@dataclass(frozen=True)
class Reply:
    """The generated answer to one inference request."""

    model: str
    prompt_tokens: int
    pieces: tuple[str, ...]
    truncated: bool

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def completion_tokens(self) -> int:
        return len(self.pieces)

    def usage(self) -> Body:
        total = self.prompt_tokens + self.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": total,
        }


def random_id(prefix: str, length: int = 22) -> str:
    """An id shaped like LM Studio's: a prefix plus lowercase alphanumerics."""
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def count_words(value: object) -> int:
    """Prompt "tokens": whitespace-separated words in every text field of a request body.

    Iterative, so that a body nested deeper than Python's recursion limit (which `json.loads`
    still reads when the proxy's stack is shallow) is counted, not a crash.
    """
    words = 0
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            words += len(item.split())
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item[key] for key in _TEXT_KEYS if key in item)
    return words


def make_reply(kind: Kind, model: str, body: Body, reply_tokens: int) -> Reply:
    """`reply_tokens` words, cut short by the request's own token limit if it is lower."""
    limit = reply_tokens
    for key in _LIMIT_KEYS[kind]:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            limit = min(limit, value)
            break
    words = [_VOCABULARY[i % len(_VOCABULARY)] for i in range(limit)]
    pieces = tuple(word if i == 0 else f" {word}" for i, word in enumerate(words))
    return Reply(model, count_words(body), pieces, truncated=limit < reply_tokens)


def _sse(payload: Body, *, event: str | None = None, content: bool = False) -> Frame:
    data = json.dumps(payload, separators=(",", ":"))
    prefix = f"event: {event}\n" if event is not None else ""
    return Frame(f"{prefix}data: {data}\n\n".encode(), content)


DONE = Frame(b"data: [DONE]\n\n")


# --- Errors ------------------------------------------------------------------------------------

NO_MODELS = (
    "No models loaded. Please load a model in the developer page or use the 'lms load' command."
)
AUTH_MISSING = (
    "An LM Studio API token is required to make requests to this server, but none was provided "
    "using the Authorization header using the 'Bearer' scheme (i.e., 'Authorization: Bearer "
    "$LM_API_TOKEN'). Learn more at: https://lmstudio.ai/docs/developer/core/authentication."
)
AUTH_INVALID = (  # [INFERRED]: only the "none was provided" text has been captured
    "The provided LM Studio API token is invalid. "
    "Learn more at: https://lmstudio.ai/docs/developer/core/authentication."
)


def openai_error(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    error_type: str = "invalid_request_error",
) -> JSONResponse:
    """OpenAI's envelope, used by /v1 and /api/v0 (§5.2)."""
    error = {"message": message, "type": error_type, "param": param, "code": code}
    return JSONResponse({"error": error}, status_code=status)


def native_error(status: int, error_type: str, message: str, **extra: str) -> JSONResponse:
    """The native /api/v1 envelope (§5.3)."""
    return JSONResponse({"error": {"type": error_type, "message": message, **extra}}, status)


def guardrail_message(model: CatalogModel) -> str:
    """The memory guardrail's refusal, as the CLI and the load endpoint word it (§2.1)."""
    return (
        "Model loading was stopped due to insufficient system resources. Under the current "
        f"settings, this model requires approximately {model.size_bytes / 1e9:.2f} GB of memory, "
        "and continuing to load it would likely overload your system and cause it to freeze. If "
        "you think this is incorrect, you can adjust the model loading guardrails in settings."
    )


# --- OpenAI chat completions -------------------------------------------------------------------


def chat_body(reply: Reply, v0_extras: Body | None) -> Body:
    """A non-streamed `chat.completion`, as LM Studio 0.4 sends it (§6.1, §6.2 with v0 extras)."""
    finish = "length" if reply.truncated else "stop"
    message = {
        "role": "assistant",
        "content": reply.text,
        "reasoning_content": "",
        "tool_calls": [],
    }
    usage = reply.usage() | {"completion_tokens_details": {"reasoning_tokens": 0}}
    body: Body = {
        "id": random_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": reply.model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": usage,
        "stats": {},
        "system_fingerprint": reply.model,
    }
    return body | (v0_extras or {})


def chat_frames(reply: Reply, include_usage: bool) -> list[Frame]:
    """`chat.completion.chunk` events: role on the first delta, then finish, usage and [DONE]."""
    head = {
        "id": random_id("chatcmpl-"),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": reply.model,
        "system_fingerprint": reply.model,
    }

    def chunk(delta: Body, finish: str | None) -> Body:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return head | {"choices": [choice]}

    frames = [
        _sse(chunk({"role": "assistant", "content": piece} if i == 0 else {"content": piece}, None),
             content=True)
        for i, piece in enumerate(reply.pieces)
    ]  # fmt: skip
    if not frames:
        frames.append(_sse(chunk({"role": "assistant", "content": ""}, None)))
    frames.append(_sse(chunk({}, "length" if reply.truncated else "stop")))
    if include_usage:
        frames.append(_sse(head | {"choices": [], "usage": reply.usage()}))
    frames.append(DONE)
    return frames


# --- OpenAI legacy completions -----------------------------------------------------------------


def completion_body(reply: Reply, v0_extras: Body | None) -> Body:
    """A non-streamed `text_completion`."""
    finish = "length" if reply.truncated else "stop"
    body: Body = {
        "id": random_id("cmpl-"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": reply.model,
        "choices": [{"index": 0, "text": reply.text, "logprobs": None, "finish_reason": finish}],
        "usage": reply.usage(),
        "stats": {},
        "system_fingerprint": reply.model,
    }
    return body | (v0_extras or {})


def completion_frames(reply: Reply, include_usage: bool) -> list[Frame]:
    """`text_completion` chunks, ending like chat: finish, optional usage, [DONE]."""
    head = {
        "id": random_id("cmpl-"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": reply.model,
    }

    def chunk(text: str, finish: str | None) -> Body:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return head | {"choices": [choice]}

    frames = [_sse(chunk(piece, None), content=True) for piece in reply.pieces]
    frames.append(_sse(chunk("", "length" if reply.truncated else "stop")))
    if include_usage:
        frames.append(_sse(head | {"choices": [], "usage": reply.usage()}))
    frames.append(DONE)
    return frames


def v0_extras(reply: Reply, model: CatalogModel, context_length: int) -> Body:
    """The `stats`, `model_info` and `runtime` fields that /api/v0 adds (§6.2)."""
    stop_reason = "maxPredictedTokensReached" if reply.truncated else "eosFound"
    stats = {
        "tokens_per_second": 50.0,
        "time_to_first_token": 0.05,
        "generation_time": round(reply.completion_tokens / 50.0, 3),
        "stop_reason": stop_reason,
    }
    model_info = {
        "arch": model.architecture,
        "quant": model.quantization,
        "format": "gguf",
        "context_length": context_length,
    }
    return {"stats": stats, "model_info": model_info, "runtime": _RUNTIME}


# --- Embeddings --------------------------------------------------------------------------------


def embedding_vector(text: str, dims: int) -> list[float]:
    """A unit vector derived from a hash of `text`: equal inputs give equal vectors."""
    digest = hashlib.shake_256(text.encode()).digest(dims * 2)
    raw = [int.from_bytes(digest[i : i + 2], "big") / 32767.5 - 1.0 for i in range(0, dims * 2, 2)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


def embeddings_body(model: str, value: object, dims: int) -> Body:
    """The `/v1/embeddings` list for a string or a list of inputs."""
    inputs = value if isinstance(value, list) else [value]
    texts = [item if isinstance(item, str) else json.dumps(item) for item in inputs]
    data = [
        {"object": "embedding", "embedding": embedding_vector(text, dims), "index": index}
        for index, text in enumerate(texts)
    ]
    tokens = count_words(texts)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


# --- OpenAI Responses --------------------------------------------------------------------------


def _response(reply: Reply, ids: tuple[str, str, int], *, done: bool) -> Body:
    response_id, item_id, created = ids
    status = ("incomplete" if reply.truncated else "completed") if done else "in_progress"
    usage = {
        "input_tokens": reply.prompt_tokens,
        "output_tokens": reply.completion_tokens,
        "total_tokens": reply.prompt_tokens + reply.completion_tokens,
    }
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if done and reply.truncated else None,
        "model": reply.model,
        "output": [_output_item(reply, item_id)] if done else [],
        "previous_response_id": None,
        "usage": usage if done else None,
    }


def _output_text(text: str) -> Body:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _output_item(reply: Reply, item_id: str, *, done: bool = True) -> Body:
    return {
        "id": item_id,
        "type": "message",
        "status": "completed" if done else "in_progress",
        "role": "assistant",
        "content": [_output_text(reply.text)] if done else [],
    }


def response_body(reply: Reply, _extras: Body | None) -> Body:
    """A non-streamed Responses API object."""
    return _response(reply, _response_ids(), done=True)


def _response_ids() -> tuple[str, str, int]:
    return random_id("resp_"), random_id("msg_"), int(time.time())


def response_frames(reply: Reply, _include_usage: bool) -> list[Frame]:
    """Responses API events, `event:` + `data:` framed, `response.created` to `.completed`."""
    ids = _response_ids()
    item_id = ids[1]
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    events: list[tuple[str, Body, bool]] = [
        ("response.created", {"response": _response(reply, ids, done=False)}, False),
        ("response.in_progress", {"response": _response(reply, ids, done=False)}, False),
        (
            "response.output_item.added",
            {"output_index": 0, "item": _output_item(reply, item_id, done=False)},
            False,
        ),
        ("response.content_part.added", where | {"part": _output_text("")}, False),
        *(
            ("response.output_text.delta", where | {"delta": piece, "logprobs": []}, True)
            for piece in reply.pieces
        ),
        ("response.output_text.done", where | {"text": reply.text, "logprobs": []}, False),
        ("response.content_part.done", where | {"part": _output_text(reply.text)}, False),
        (
            "response.output_item.done",
            {"output_index": 0, "item": _output_item(reply, item_id)},
            False,
        ),
        ("response.completed", {"response": _response(reply, ids, done=True)}, False),
    ]
    return [
        _sse({"type": name, "sequence_number": seq} | payload, event=name, content=content)
        for seq, (name, payload, content) in enumerate(events)
    ]


# --- Anthropic Messages ------------------------------------------------------------------------


def _message(reply: Reply, message_id: str, *, done: bool) -> Body:
    stop_reason = ("max_tokens" if reply.truncated else "end_turn") if done else None
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": reply.text}] if done else [],
        "model": reply.model,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {
            "input_tokens": reply.prompt_tokens,
            "output_tokens": reply.completion_tokens if done else 0,
        },
    }


def message_body(reply: Reply, _extras: Body | None) -> Body:
    """A non-streamed Anthropic `message`."""
    return _message(reply, random_id("msg_", 21), done=True)


def message_frames(reply: Reply, _include_usage: bool) -> list[Frame]:
    """Anthropic events, from `message_start` to `message_stop`."""
    start = _message(reply, random_id("msg_", 21), done=False)
    block = {"type": "text", "text": ""}
    events: list[tuple[str, Body, bool]] = [
        ("message_start", {"message": start}, False),
        ("content_block_start", {"index": 0, "content_block": block}, False),
        *(
            ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": p}}, True)
            for p in reply.pieces
        ),
        ("content_block_stop", {"index": 0}, False),
        (
            "message_delta",
            {
                "delta": {
                    "stop_reason": "max_tokens" if reply.truncated else "end_turn",
                    "stop_sequence": None,
                },
                "usage": {"output_tokens": reply.completion_tokens},
            },
            False,
        ),
        ("message_stop", {}, False),
    ]
    return [
        _sse({"type": name} | payload, event=name, content=content)
        for name, payload, content in events
    ]


BODIES: dict[Kind, Callable[[Reply, Body | None], Body]] = {
    "chat": chat_body,
    "completion": completion_body,
    "response": response_body,
    "message": message_body,
}
FRAMES: dict[Kind, Callable[[Reply, bool], list[Frame]]] = {
    "chat": chat_frames,
    "completion": completion_frames,
    "response": response_frames,
    "message": message_frames,
}


# --- Model listings ----------------------------------------------------------------------------


def v0_row(model: CatalogModel, instance: Instance | None) -> Body:
    """One `/api/v0/models` entry: a loaded instance, or the model when not loaded (§3.2)."""
    kind = "embeddings" if model.type == "embedding" else "vlm" if model.vision else "llm"
    row: Body = {
        "id": instance.id if instance is not None else model.key,
        "object": "model",
        "type": kind,
        "publisher": model.publisher,
        "arch": model.architecture,
        "compatibility_type": "gguf",
        "quantization": model.quantization,
        "state": "loaded" if instance is not None else "not-loaded",
        "max_context_length": model.max_context_length,
    }
    if instance is not None:
        row["loaded_context_length"] = instance.context_length
    row["capabilities"] = ["tool_use"] if model.trained_for_tool_use else []
    return row


def v1_row(model: CatalogModel, instances: list[Instance]) -> Body:
    """One `/api/v1/models` entry with its `loaded_instances` (§3.3)."""
    row: Body = {
        "type": model.type,
        "publisher": model.publisher,
        "key": model.key,
        "display_name": model.display_name,
    }
    if model.type == "llm":
        row["architecture"] = model.architecture
    row |= {
        "quantization": {"name": model.quantization, "bits_per_weight": model.bits_per_weight},
        "size_bytes": model.size_bytes,
        "params_string": model.params_string,
        "loaded_instances": [{"id": i.id, "config": dict(i.config)} for i in instances],
        "max_context_length": model.max_context_length,
        "format": "gguf",
    }
    if model.type == "llm":
        variant = f"{model.key}@{model.quantization.lower()}"
        row |= {
            "capabilities": {
                "vision": model.vision,
                "trained_for_tool_use": model.trained_for_tool_use,
            },
            "description": None,
            "variants": [variant],
            "selected_variant": variant,
        }
    return row
