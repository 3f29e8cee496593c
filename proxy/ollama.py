"""Ollama's API in LM Studio's terms (docs/design.md §4.8): its requests as OpenAI requests, and
its model listings; `proxy.ollama_answers` turns LM Studio's answers into Ollama's.

Pure: no I/O. `proxy.ollama_routes` reads the bodies and routes them like `/v1/*`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from proxy.errors import BadRequestError, ModelNotFoundError
from proxy.lmstudio import ModelInfo
from proxy.views import ModelView

# The Ollama release whose API this follows: some clients turn features on by version.
OLLAMA_VERSION = "0.12.0"
CHAT, GENERATE, EMBED, EMBEDDINGS = "/api/chat", "/api/generate", "/api/embed", "/api/embeddings"
# The `endpoint` label of each routed path (DESIGN §11.5): both embedding routes count as one.
ENDPOINTS = {
    CHAT: "ollama_chat",
    GENERATE: "ollama_generate",
    EMBED: "ollama_embed",
    EMBEDDINGS: "ollama_embed",
}
# What Go's `time.ParseDuration` reads, which Ollama uses for a `keep_alive` string.
_DURATION = re.compile(r"([+-]?)((?:\d+\.?\d*|\.\d+)(?:ns|us|µs|ms|s|m|h))+")
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# Ollama's "until evicted": a negative keep_alive is its longest duration, ~292 years.
_FOREVER = timedelta(seconds=(2**63 - 1) / 1e9)


def not_found(name: object) -> ModelNotFoundError:
    """Ollama's 404 for a model it does not have, in its words (clients look for them)."""
    return ModelNotFoundError(f"model {json.dumps(str(name))} not found, try pulling it first")


def _bad(message: str, param: str | None = None) -> BadRequestError:
    return BadRequestError(message, param=param)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def keep_alive_s(value: object) -> float | None:
    """A `keep_alive` as the model's idle TTL in seconds: None if absent; 0: unload once idle;
    `math.inf` (a negative value): never unloaded for being idle. Numbers are seconds, strings
    Go durations ("5m", "1h30m", "-1s") or numbers."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            if not _DURATION.fullmatch(text):
                raise _bad(f"time: invalid duration {json.dumps(value)}", "keep_alive") from None
            parts = _DURATION_PART.findall(text)
            seconds = sum(float(n) * _UNIT_S[unit] for n, unit in parts)
            seconds = -seconds if text.startswith("-") else seconds
    elif _number(value):
        seconds = float(value)  # type: ignore[arg-type] # a finite number, checked above
    else:
        raise _bad('keep_alive must be a duration ("5m") or a number of seconds', "keep_alive")
    if math.isnan(seconds):
        raise _bad(f"time: invalid duration {json.dumps(value)}", "keep_alive")
    return math.inf if seconds < 0 else seconds


def model_name(payload: Mapping[str, Any]) -> object:
    """The model a request names (`model`, or the older `name`), without Ollama's default tag
    `:latest`, which no LM Studio key has."""
    name = payload.get("model", payload.get("name"))
    if isinstance(name, str) and name.endswith(":latest"):
        return name.removesuffix(":latest")
    return name


# --- requests -----------------------------------------------------------------------------------

# Ollama's `options` that have an OpenAI (or LM Studio) field; the rest are ignored, as Ollama
# ignores options that do not apply.
_OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "repeat_penalty": "repeat_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}


@dataclass(frozen=True, slots=True)
class Translated:
    """An Ollama request as the OpenAI request to send LM Studio."""

    path: str  # LM Studio's: /v1/chat/completions, /v1/completions or /v1/embeddings
    body: dict[str, Any]  # `model` is set when the name is resolved
    stream: bool
    keep_alive_s: float | None
    empty: bool = False  # nothing to answer: Ollama's way to load (or, keep_alive 0, unload)


def _options(payload: Mapping[str, Any]) -> dict[str, Any]:
    options = payload.get("options")
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise _bad("options must be an object", "options")
    body: dict[str, Any] = {}
    for name, value in options.items():
        if value is None:
            continue
        if (field_name := _OPTIONS.get(name)) is not None:
            if not _number(value):
                raise _bad(f"option {name!r} must be a number", "options")
            body[field_name] = value
        elif name == "num_predict":
            if not isinstance(value, int) or isinstance(value, bool):
                raise _bad("option 'num_predict' must be an integer", "options")
            if value >= 0:  # -1: no limit, -2: fill the context; LM Studio's default is either
                body["max_tokens"] = value
        elif name == "stop":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise _bad("option 'stop' must be a list of strings", "options")
            body["stop"] = value
    return body


def _format(payload: Mapping[str, Any]) -> dict[str, Any]:
    """`format` as `response_format`: "json" any JSON object, or one that fits a schema."""
    value = payload.get("format")
    if value is None or value == "":
        return {}
    if value == "json":
        schema: dict[str, Any] = {"type": "object"}
        return {"response_format": {"type": "json_schema", "json_schema": {"schema": schema}}}
    if isinstance(value, dict):
        schema_format = {"name": "schema", "strict": True, "schema": value}
        return {"response_format": {"type": "json_schema", "json_schema": schema_format}}
    raise _bad('format must be "json" or a JSON schema (an object)', "format")


def _image_url(image: object) -> dict[str, Any]:
    if not isinstance(image, str) or not image:
        raise _bad("images must be base64-encoded strings", "images")
    try:
        head = base64.b64decode(image[:16] + "=" * (-len(image[:16]) % 4), validate=True)
    except ValueError:
        raise _bad("images must be base64-encoded strings", "images") from None
    kind = "jpeg" if head.startswith(b"\xff\xd8") else "webp" if head[8:12] == b"WEBP" else "png"
    return {"type": "image_url", "image_url": {"url": f"data:image/{kind};base64,{image}"}}


def _content(text: object, images: object) -> str | list[dict[str, Any]]:
    """A message's text, with its images as OpenAI's content parts."""
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise _bad("a message's content must be a string", "messages")
    if images is None or images == []:
        return text
    if not isinstance(images, list):
        raise _bad("images must be a list of base64-encoded strings", "images")
    return [{"type": "text", "text": text}, *(_image_url(image) for image in images)]


def _tool_calls(calls: object, ids: list[str]) -> list[dict[str, Any]]:
    """An assistant message's `tool_calls` in OpenAI's shape (arguments as a JSON string);
    their ids are added to `ids`, for the tool messages that answer them."""
    if not isinstance(calls, list):
        raise _bad("tool_calls must be a list", "messages")
    out = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise _bad("each tool call needs a function with a name", "messages")
        arguments = function.get("arguments", {})
        call_id = call.get("id") if isinstance(call.get("id"), str) else f"call_{len(ids)}"
        ids.append(call_id)
        text = arguments if isinstance(arguments, str) else json.dumps(arguments)
        out.append({"id": call_id, "type": "function", "function": {**function, "arguments": text}})
    return out


def _messages(messages: object) -> list[dict[str, Any]]:
    if not isinstance(messages, list):
        raise _bad("messages must be a list", "messages")
    out: list[dict[str, Any]] = []
    ids: list[str] = []  # the tool calls asked for, in order, for the tool messages that answer
    answered = 0
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _bad("each message must be an object with a role", "messages")
        role = message["role"]
        converted: dict[str, Any] = {
            "role": role,
            "content": _content(message.get("content"), message.get("images")),
        }
        if message.get("tool_calls"):
            converted["tool_calls"] = _tool_calls(message["tool_calls"], ids)
        if role == "tool":
            converted["tool_call_id"] = ids[answered] if answered < len(ids) else "call_0"
            answered += 1
            if isinstance(message.get("tool_name"), str):
                converted["name"] = message["tool_name"]
        out.append(converted)
    return out


def _stream(payload: Mapping[str, Any]) -> bool:
    return payload.get("stream") is not False  # Ollama streams unless told not to


def _generation(payload: Mapping[str, Any], stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"stream": stream, **_options(payload), **_format(payload)}
    if stream:
        body["stream_options"] = {"include_usage": True}  # the counts of the last line
    return body


def chat_request(payload: Mapping[str, Any]) -> Translated:
    messages = _messages(payload.get("messages") or [])
    stream = _stream(payload)
    body = {"messages": messages, **_generation(payload, stream)}
    tools = payload.get("tools")
    if tools:
        if not isinstance(tools, list):
            raise _bad("tools must be a list", "tools")
        body["tools"] = tools  # Ollama's tools are OpenAI's
    keep = keep_alive_s(payload.get("keep_alive"))
    return Translated("/v1/chat/completions", body, stream, keep, empty=not messages)


def generate_request(payload: Mapping[str, Any]) -> Translated:
    """A prompt goes to the chat endpoint, where the model's template applies it (as Ollama
    does), or as it is to the completions endpoint with `raw`."""
    prompt, system = payload.get("prompt") or "", payload.get("system")
    if not isinstance(prompt, str):
        raise _bad("prompt must be a string", "prompt")
    if system is not None and not isinstance(system, str):
        raise _bad("system must be a string", "system")
    stream = _stream(payload)
    keep = keep_alive_s(payload.get("keep_alive"))
    body = _generation(payload, stream)
    if payload.get("raw") is True:
        return Translated("/v1/completions", {"prompt": prompt, **body}, stream, keep, not prompt)
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": _content(prompt, payload.get("images"))})
    body = {"messages": messages, **body}
    return Translated("/v1/chat/completions", body, stream, keep, empty=not prompt)


def embed_request(payload: Mapping[str, Any]) -> Translated:
    value = payload.get("input")
    strings = isinstance(value, list) and all(isinstance(item, str) for item in value)
    if not isinstance(value, str) and not strings:
        raise _bad("input must be a string or a list of strings", "input")
    body: dict[str, Any] = {"input": value}
    dimensions = payload.get("dimensions")
    if dimensions is not None:
        if not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1:
            raise _bad("dimensions must be a positive integer", "dimensions")
        body["dimensions"] = dimensions
    keep = keep_alive_s(payload.get("keep_alive"))
    return Translated("/v1/embeddings", body, False, keep, empty=value in ("", []))


def embeddings_request(payload: Mapping[str, Any]) -> Translated:
    prompt = payload.get("prompt")
    if not isinstance(prompt, str):
        raise _bad("prompt must be a string", "prompt")
    keep = keep_alive_s(payload.get("keep_alive"))
    return Translated("/v1/embeddings", {"input": prompt}, False, keep, empty=not prompt)


REQUESTS: dict[str, Callable[[Mapping[str, Any]], Translated]] = {
    CHAT: chat_request,
    GENERATE: generate_request,
    EMBED: embed_request,
    EMBEDDINGS: embeddings_request,
}


# --- listings -----------------------------------------------------------------------------------


def _stamp(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).isoformat()


def details(info: ModelInfo | None) -> dict[str, Any]:
    """A model's `details`, from what LM Studio's listing says of it."""
    family = info.architecture if info is not None and info.architecture else ""
    return {
        "parent_model": "",
        "format": (info.format if info is not None else None) or "gguf",
        "family": family,
        "families": [family] if family else None,
        "parameter_size": (info.params if info is not None else None) or "",
        "quantization_level": (info.quantization if info is not None else None) or "",
    }


def tag(name: str, view: ModelView, info: ModelInfo | None, modified_s: float) -> dict[str, Any]:
    """A row of `/api/tags`: a name a client may use (a model key, or an alias)."""
    return {
        "name": name,
        "model": name,
        "modified_at": _stamp(modified_s),
        "size": view.size_bytes,
        "digest": hashlib.sha256(view.key.encode()).hexdigest(),
        "details": details(info),
    }


def expires_at(view: ModelView, now_s: float | None = None) -> str:
    """When the model will be unloaded for being idle, if it stays idle from now (or from its
    last use, when it is idle now); Ollama's far future when it never will be."""
    now_s = time.time() if now_s is None else now_s
    if view.idle_ttl_s is None:
        return (datetime.fromtimestamp(now_s, UTC) + _FOREVER).isoformat()
    idle_since = now_s if view.in_flight or view.last_used_at is None else view.last_used_at
    return _stamp(idle_since + view.idle_ttl_s)


def running(
    name: str, view: ModelView, info: ModelInfo | None, modified_s: float
) -> dict[str, Any]:
    """A row of `/api/ps`: a loaded model."""
    return tag(name, view, info, modified_s) | {
        "expires_at": expires_at(view),
        "size_vram": view.size_bytes,
        "context_length": view.context_length,
    }


def show(view: ModelView, info: ModelInfo | None, modified_s: float) -> dict[str, Any]:
    """`/api/show`'s answer: what LM Studio's listing says of the model."""
    arch = (info.architecture if info is not None else None) or "unknown"
    model_info: dict[str, Any] = {"general.architecture": arch, "general.basename": view.key}
    if view.max_context_length is not None:
        model_info[f"{arch}.context_length"] = view.max_context_length
    if view.type == "embedding":
        capabilities = ["embedding"]
    else:
        capabilities = ["completion"]
        capabilities += ["tools"] if info is not None and info.tool_use else []
        capabilities += ["vision"] if info is not None and info.vision else []
    return {
        "modelfile": f"# served by LM Studio through lmswitch\nFROM {view.key}\n",
        "parameters": "",
        "template": "",
        "details": details(info),
        "model_info": model_info,
        "capabilities": capabilities,
        "modified_at": _stamp(modified_s),
    }
