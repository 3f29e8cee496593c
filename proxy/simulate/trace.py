"""Traces: the requests of a workload and the models they name, as JSON lines.

The first line is the header, `{"models": {KEY: {"size_bytes", "load_s", "unload_s"}, ...}}`
(optionally `"loaded": [KEY, ...]`, the models loaded when it starts, and `"source"`, free
text); each line after it is one request, `{"t", "model", "service_s", "stream", "client"}`.
A request with `"after": S` is closed-loop: it is sent S seconds after the previous request of
the same `client` (in file order) was answered, so that waiting shifts it later as it would a
real client; its `t`, if any, is only what was recorded (docs/design.md §7.1).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import IO, Any


class TraceError(ValueError):
    """A trace that cannot be read: the message names the line and what is wrong with it."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model of the trace: its size, and how long LM Studio takes to load and unload it."""

    size_bytes: int
    load_s: float
    unload_s: float = 0.5


@dataclass(frozen=True, slots=True)
class Request:
    """One request: sent at `t` (or `after` its client's previous answer), holding its model
    for `service_s` once granted."""

    t: float
    model: str
    service_s: float
    stream: bool = False
    client: str | None = None
    after: float | None = None  # closed-loop: seconds after the client's previous answer


@dataclass(slots=True)
class Trace:
    """A workload: its models and its requests, in the order they are sent (open-loop ones by
    `t`; closed-loop ones follow their client's previous request)."""

    models: dict[str, ModelSpec]
    requests: list[Request]
    loaded: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def closed_loop(self) -> bool:
        return any(r.after is not None for r in self.requests)


def header(trace: Trace) -> dict[str, Any]:
    models = {
        key: {"size_bytes": m.size_bytes, "load_s": m.load_s, "unload_s": m.unload_s}
        for key, m in trace.models.items()
    }
    head: dict[str, Any] = {"models": models}
    if trace.loaded:
        head["loaded"] = trace.loaded
    if trace.source:
        head["source"] = trace.source
    return head


def request_line(request: Request) -> dict[str, Any]:
    line: dict[str, Any] = {"t": round(request.t, 3), "model": request.model}
    line["service_s"] = round(request.service_s, 3)
    line["stream"] = request.stream
    line["client"] = request.client
    if request.after is not None:
        line["after"] = round(request.after, 3)
    return line


def write_trace(trace: Trace, out: IO[str]) -> None:
    out.write(json.dumps(header(trace)) + "\n")
    for request in trace.requests:
        out.write(json.dumps(request_line(request)) + "\n")


def read_trace(lines: Iterable[str]) -> Trace:
    """The trace these JSON lines hold (blank lines are skipped); `TraceError` if they do not
    hold one."""
    numbered = ((n, line) for n, line in enumerate(lines, start=1) if line.strip())
    first = next(numbered, None)
    if first is None:
        raise TraceError("the trace is empty: its first line must be the header")
    models, loaded, source = _header(*first)
    requests = [_request(n, line, models) for n, line in numbered]
    return Trace(models, requests, loaded, source)


def _object(n: int, line: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise TraceError(f"line {n}: not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise TraceError(f"line {n}: not a JSON object")
    return obj


def _number(n: int, obj: dict[str, Any], name: str, *, default: float | None = None) -> float:
    value = obj.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TraceError(f"line {n}: {name!r} must be a number, not {value!r}")
    if not math.isfinite(value) or value < 0:
        raise TraceError(f"line {n}: {name!r} must be a finite number >= 0, not {value!r}")
    return float(value)


def _header(n: int, line: str) -> tuple[dict[str, ModelSpec], list[str], str]:
    obj = _object(n, line)
    raw = obj.get("models")
    if not isinstance(raw, dict) or not raw:
        raise TraceError(
            f"line {n}: the header must hold 'models', an object of model keys to "
            '{"size_bytes", "load_s", "unload_s"}'
        )
    models: dict[str, ModelSpec] = {}
    for key, spec in raw.items():
        if not isinstance(spec, dict):
            raise TraceError(f"line {n}: model {key!r} must be an object")
        size = _number(n, spec, "size_bytes")
        models[key] = ModelSpec(
            int(size), _number(n, spec, "load_s"), _number(n, spec, "unload_s", default=0.5)
        )
    loaded = obj.get("loaded", [])
    if not isinstance(loaded, list) or any(key not in models for key in loaded):
        raise TraceError(f"line {n}: 'loaded' must be a list of the header's model keys")
    source = obj.get("source", "")
    return models, loaded, str(source)


def _request(n: int, line: str, models: dict[str, ModelSpec]) -> Request:
    obj = _object(n, line)
    model = obj.get("model")
    if model not in models:
        raise TraceError(f"line {n}: model {model!r} is not in the header's models")
    client = obj.get("client")
    if client is not None and not isinstance(client, str):
        raise TraceError(f"line {n}: 'client' must be a string or null")
    after = None if obj.get("after") is None else _number(n, obj, "after")
    if after is not None and client is None:
        raise TraceError(
            f"line {n}: a request sent 'after' its client's previous one needs a client"
        )
    t = _number(n, obj, "t", default=0.0 if after is not None else None)
    stream = obj.get("stream", False)
    if not isinstance(stream, bool):
        raise TraceError(f"line {n}: 'stream' must be true or false")
    return Request(t, str(model), _number(n, obj, "service_s"), stream, client, after)
