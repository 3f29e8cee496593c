"""Management (`/api/v1/*`) and operations (`/healthz`, `/readyz`, `/metrics`) routes."""

from __future__ import annotations

import time
from typing import Any

import anyio
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from proxy import __version__
from proxy.scheduler import RESIDENT, Phase
from proxy.state import State


def model_rows(request: Request[State]) -> list[dict[str, Any]]:
    """Every model LM Studio has, with the proxy's view of it (DESIGN §4)."""
    manager = request.state["manager"]
    sched = manager.scheduler
    rows = []
    for key in sorted(set(manager.catalog) | {k for k, m in sched.models.items() if m.instances}):
        info = manager.catalog.get(key)
        model = sched.model(key)
        rows.append(
            {
                "id": key,
                "name": info.display_name if info is not None else key,
                "loaded": model.phase in (Phase.READY, Phase.DRAINING),
                "state": str(model.phase),
                "type": info.type if info is not None else "llm",
                "size_bytes": model.size_bytes,
                "pinned": model.pinned,
                "adopted": model.adopted,
                "in_flight": model.leases,
                "queued": sched.queued(key),
                "last_used_at": _wall(model.last_used) if model.last_used else None,
                "instance_id": model.instance_id,
                "duplicates": list(model.duplicates),
                "context_length": info.context_length if info is not None else None,
                "max_context_length": info.max_context_length if info is not None else None,
            }
        )
    return rows


def _wall(monotonic_s: float) -> float:
    """A time of the (monotonic) scheduler clock as seconds since the epoch."""
    return round(time.time() - (anyio.current_time() - monotonic_s), 3)


async def list_models(request: Request[State]) -> Response:
    return JSONResponse(model_rows(request))


async def loaded_models(request: Request[State]) -> Response:
    return JSONResponse([row for row in model_rows(request) if row["loaded"]])


async def status(request: Request[State]) -> Response:
    state = request.state
    manager, settings = state["manager"], state["settings"]
    sched = manager.scheduler
    count, used = sched.usage()
    return JSONResponse(
        {
            "version": __version__,
            "uptime_s": round(time.time() - state["started_at"], 3),
            "upstream": {"url": settings.upstream.base_url, "reachable": manager.reachable},
            "loaded": [k for k, m in sched.models.items() if m.phase in RESIDENT],
            "in_flight": sum(m.leases for m in sched.models.values()),
            "queue": {k: n for k in sched.models if (n := sched.queued(k))},
            "duplicates": {k: m.duplicates for k, m in sched.models.items() if m.duplicates},
            "capacity": {
                "max_loaded": settings.models.max_loaded,
                "memory_budget": settings.models.memory_budget,
                "instances": count,
                "bytes_used": used,
            },
        }
    )


async def healthz(request: Request[State]) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request[State]) -> Response:
    manager = request.state["manager"]
    if manager.ever_reachable:
        return JSONResponse({"status": "ready", "upstream_reachable": manager.reachable})
    return JSONResponse({"status": "waiting for LM Studio", "upstream_reachable": False}, 503)


async def metrics(request: Request[State]) -> Response:
    return Response(request.state["metrics"].render(), media_type=CONTENT_TYPE_LATEST)


routes = [
    Route("/api/v1/models", list_models, methods=["GET"]),
    Route("/api/v1/models/", list_models, methods=["GET"]),
    Route("/api/v1/models/loaded", loaded_models, methods=["GET"]),
    Route("/api/v1/status", status, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/metrics", metrics, methods=["GET"]),
]
