"""Replies of the LM Studio emulator: what all API families share, error bodies, and the OpenAI
chat, completion and embedding bodies and SSE frames (docs/design.md §5.4, §5.5).

Pure functions: no state, no I/O. `proxy.emulator.app` decides what to answer; this module decides
how the answer looks on the wire. The Responses and Messages APIs are in `proxy.emulator.native`.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import string
import time
from dataclasses import dataclass
from typing import Any, Literal

from starlette.responses import JSONResponse

from proxy.emulator import tools
from proxy.emulator.catalog import CatalogModel
from proxy.emulator.tools import ToolCall

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
    """The generated answer to one inference request: text, or a call of one of its tools."""

    model: str
    prompt_tokens: int
    pieces: tuple[str, ...]
    truncated: bool
    call: ToolCall | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def completion_tokens(self) -> int:
        return len(self.pieces) + (self.call.tokens if self.call is not None else 0)

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
    """A call of one of the request's tools (as `tools.pick` decides), or `reply_tokens` words,
    cut short by the request's own token limit if it is lower."""
    if (call := tools.pick(kind, body)) is not None:
        return Reply(model, count_words(body), (), truncated=False, call=call)
    limit = reply_tokens
    for key in _LIMIT_KEYS[kind]:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            limit = min(limit, value)
            break
    words = [_VOCABULARY[i % len(_VOCABULARY)] for i in range(limit)]
    pieces = tuple(word if i == 0 else f" {word}" for i, word in enumerate(words))
    return Reply(model, count_words(body), pieces, truncated=limit < reply_tokens)


def sse(payload: Body, *, event: str | None = None, content: bool = False) -> Frame:
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
    """OpenAI's envelope, used by /v1 and /api/v0 (§5.4)."""
    error = {"message": message, "type": error_type, "param": param, "code": code}
    return JSONResponse({"error": error}, status_code=status)


def native_error(status: int, error_type: str, message: str, **extra: str) -> JSONResponse:
    """The native /api/v1 envelope (§5.4)."""
    return JSONResponse({"error": {"type": error_type, "message": message, **extra}}, status)


def guardrail_message(model: CatalogModel) -> str:
    """The memory guardrail's refusal, as the CLI and the load endpoint word it (§5.6)."""
    return (
        "Model loading was stopped due to insufficient system resources. Under the current "
        f"settings, this model requires approximately {model.size_bytes / 1e9:.2f} GB of memory, "
        "and continuing to load it would likely overload your system and cause it to freeze. If "
        "you think this is incorrect, you can adjust the model loading guardrails in settings."
    )


# --- OpenAI chat completions -------------------------------------------------------------------


def chat_body(reply: Reply, v0_extras: Body | None) -> Body:
    """A non-streamed `chat.completion`, as LM Studio 0.4 sends it (§5.5, with the v0 extras)."""
    message: Body = {
        "role": "assistant",
        "content": reply.text,
        "reasoning_content": "",
        "tool_calls": [],
    }
    if reply.call is not None:
        message |= {"content": None, "tool_calls": [_chat_call(reply.call)]}
    usage = reply.usage() | {"completion_tokens_details": {"reasoning_tokens": 0}}
    body: Body = {
        "id": random_id("chatcmpl-"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": reply.model,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": _finish(reply)}
        ],
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

    if reply.call is not None:
        deltas = _call_deltas(reply.call)
    else:
        deltas = [
            {"role": "assistant", "content": piece} if i == 0 else {"content": piece}
            for i, piece in enumerate(reply.pieces)
        ]
    frames = [sse(chunk(delta, None), content=True) for delta in deltas]
    if not frames:
        frames.append(sse(chunk({"role": "assistant", "content": ""}, None)))
    frames.append(sse(chunk({}, _finish(reply))))
    if include_usage:
        frames.append(sse(head | {"choices": [], "usage": reply.usage()}))
    frames.append(DONE)
    return frames


def _chat_call(call: ToolCall) -> Body:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def _call_deltas(call: ToolCall) -> list[Body]:
    """A call streamed as LM Studio's docs show it: index, id, type and name with empty
    arguments first, then the arguments piece by piece."""
    opening = {
        "index": 0,
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": ""},
    }
    pieces = [{"index": 0, "function": {"arguments": piece}} for piece in call.fragments]
    return [
        {"role": "assistant", "tool_calls": [opening]},
        *({"tool_calls": [piece]} for piece in pieces),
    ]


def _finish(reply: Reply) -> str:
    if reply.call is not None:
        return "tool_calls"
    return "length" if reply.truncated else "stop"


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

    frames = [sse(chunk(piece, None), content=True) for piece in reply.pieces]
    frames.append(sse(chunk("", "length" if reply.truncated else "stop")))
    if include_usage:
        frames.append(sse(head | {"choices": [], "usage": reply.usage()}))
    frames.append(DONE)
    return frames


def v0_extras(reply: Reply, model: CatalogModel, context_length: int) -> Body:
    """The `stats`, `model_info` and `runtime` fields that /api/v0 adds (§5.5)."""
    stop_reason = "maxPredictedTokensReached" if reply.truncated else "eosFound"
    if reply.call is not None:
        stop_reason = "toolCalls"  # [INFERRED] one of the stop reasons of LM Studio's SDK
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
