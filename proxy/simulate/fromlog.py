"""A trace from the proxy's own JSON log (`logging.format: json`): its access lines and its
model lines (`lmswitch.manager`'s loading, loaded and unloaded lines, with their fields).

Each request that was granted its model becomes one request of the trace: sent at its line's
`time` less its `duration_ms`, holding its model for `busy_ms`, with its `model`, `stream` and
`client`. A client's (a connection's) request sent after its previous one was answered is
closed-loop (`after`: the gap between them); its first, and any sent before the previous
answer, keep their time. Requests never granted their model (refused, timed out in the queue,
gone while waiting) are left out: a replay decides for itself which time out. Every host of a
pool counts as one. docs/design.md §7.3.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from proxy.simulate.trace import ModelSpec, Request, Trace, TraceError

_DEFAULT_UNLOAD_S = 0.5


@dataclass(slots=True)
class _Line:
    sent: float
    answered: float
    model: str
    service_s: float
    stream: bool
    client: str | None
    granted: float  # when it was granted its model


def from_log(lines: Iterable[str]) -> Trace:
    """The trace of the requests and model loads these log lines record; lines that are not
    JSON objects (uvicorn's own, say) are skipped. `TraceError` if none is an access line."""
    requests: list[_Line] = []
    sizes: dict[str, int] = {}
    loads: dict[str, list[float]] = {}
    unloads: dict[str, list[float]] = {}
    first_load: dict[str, float] = {}
    for line in lines:
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("time"), int | float):
            continue
        if obj.get("logger") == "lmswitch.access" and "client" in obj:
            if (request := _request(obj)) is not None:
                requests.append(request)
        elif obj.get("logger") == "lmswitch.manager" and isinstance(obj.get("model"), str):
            _model_line(obj, sizes, loads, unloads, first_load)
    if not requests:
        raise TraceError(
            "no request granted its model in the log (access lines of `logging.format: json`)"
        )
    start = min(r.sent for r in requests)
    requests.sort(key=lambda r: r.sent)
    keys = sorted({r.model for r in requests} | loads.keys())
    known = [t for times in loads.values() for t in times]
    fallback_s = statistics.median(known) if known else 0.0
    models = {
        key: ModelSpec(
            sizes.get(key, 0),
            round(statistics.median(loads[key]), 3) if key in loads else fallback_s,
            round(statistics.median(unloads[key]), 3) if key in unloads else _DEFAULT_UNLOAD_S,
        )
        for key in keys
    }
    # Models granted to a request before any load of theirs were loaded when the log began.
    first_use: dict[str, float] = {}
    for r in requests:
        first_use[r.model] = min(first_use.get(r.model, r.granted), r.granted)
    loaded = [key for key, t in first_use.items() if t < first_load.get(key, float("inf"))]
    return Trace(models, _closed_loop(requests, start), sorted(loaded), "from a log")


def _request(obj: dict[str, Any]) -> _Line | None:
    busy_ms, status = obj.get("busy_ms", 0), obj.get("status", 0)
    if not isinstance(busy_ms, int | float) or not isinstance(status, int):
        return None
    if busy_ms <= 0 and status >= 400:
        return None  # never granted its model
    model, duration_ms = obj.get("model"), obj.get("duration_ms", 0)
    if not isinstance(model, str) or not isinstance(duration_ms, int | float):
        return None
    client, waited_ms = obj.get("client"), obj.get("queue_wait_ms", 0)
    answered = float(obj["time"])
    sent = answered - duration_ms / 1000
    return _Line(
        sent,
        answered,
        model,
        busy_ms / 1000,
        obj.get("stream") is True,
        client if isinstance(client, str) and client != "-" else None,
        sent + (waited_ms / 1000 if isinstance(waited_ms, int | float) else 0.0),
    )


def _model_line(
    obj: dict[str, Any],
    sizes: dict[str, int],
    loads: dict[str, list[float]],
    unloads: dict[str, list[float]],
    first_load: dict[str, float],
) -> None:
    key, event = obj["model"], obj.get("event")
    size, elapsed = obj.get("size_bytes"), obj.get("elapsed_s")
    if isinstance(size, int) and size > 0:
        sizes[key] = size
    if event == "loading":
        first_load.setdefault(key, float(obj["time"]))
    elif event == "loaded" and isinstance(elapsed, int | float):
        loads.setdefault(key, []).append(float(elapsed))
    elif event == "unloaded" and isinstance(elapsed, int | float):
        unloads.setdefault(key, []).append(float(elapsed))


def _closed_loop(lines: list[_Line], start: float) -> list[Request]:
    """The requests, each client's sent after its previous answer made closed-loop."""
    answered: dict[str, float] = {}
    out = []
    for r in lines:
        after = None
        if r.client is not None:
            previous = answered.get(r.client)
            if previous is not None and r.sent >= previous:
                after = round(r.sent - previous, 3)
            answered[r.client] = r.answered
        out.append(
            Request(round(r.sent - start, 3), r.model, r.service_s, r.stream, r.client, after)
        )
    return out
