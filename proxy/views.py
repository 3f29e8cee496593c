"""ModelView and StatusView: the one read view of the models and the capacity, built by
`ModelManager` for `/v1/models`, `/api/v1/models*`, `/api/v1/status`, the events and the page."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.lmstudio import ModelInfo
from proxy.scheduler import Scheduler
from proxy.scheduling import LOADED, RESIDENT, Model


@dataclass(frozen=True, slots=True)
class ModelView:
    """One model as the proxy sees it now (a snapshot: it never changes after it is built)."""

    key: str
    name: str  # LM Studio's display name
    type: str  # "llm" | "embedding"
    state: str  # the scheduler's phase: absent, loading, ready, draining, unloading
    loaded: bool  # loaded and answering: ready, or draining its last requests
    resident: bool  # holding LM Studio's memory: loading, loaded or unloading
    size_bytes: int
    pinned: bool
    adopted: bool  # loaded behind the proxy's back
    in_flight: int
    queued: int
    last_used_at: float | None  # seconds since the epoch
    instance_id: str | None
    duplicates: tuple[str, ...]
    context_length: int | None  # of the loaded instance
    max_context_length: int | None

    def row(self) -> dict[str, Any]:
        """The JSON row of `/api/v1/models`, its `snapshot` event and the page."""
        return {
            "id": self.key,
            "name": self.name,
            "loaded": self.loaded,
            "state": self.state,
            "type": self.type,
            "size_bytes": self.size_bytes,
            "pinned": self.pinned,
            "adopted": self.adopted,
            "in_flight": self.in_flight,
            "queued": self.queued,
            "last_used_at": self.last_used_at,
            "instance_id": self.instance_id,
            "duplicates": list(self.duplicates),
            "context_length": self.context_length,
            "max_context_length": self.max_context_length,
        }


@dataclass(frozen=True, slots=True)
class StatusView:
    """The proxy's state as a whole: what `/api/v1/status` reports beside its settings."""

    reachable: bool
    resident: list[str]  # models holding LM Studio's memory, in the scheduler's order
    in_flight: int
    queue: dict[str, int]  # waiting requests per model, for models with any
    duplicates: dict[str, list[str]]  # extra instances per model, for models with any
    instances: int
    bytes_used: int


def _wall(monotonic_s: float) -> float:
    """A time of the (monotonic) scheduler clock as seconds since the epoch."""
    return round(time.time() - (time.monotonic() - monotonic_s), 3)


def model_view(
    scheduler: Scheduler,
    catalog: Mapping[str, ModelInfo],
    context_lengths: Mapping[str, int | None],
    key: str,
) -> ModelView:
    """The view of `key`, from the scheduler's record and LM Studio's catalogue entry."""
    model = scheduler.models.get(key) or Model(key)
    info = catalog.get(key)
    return ModelView(
        key=key,
        name=info.display_name if info is not None else key,
        type=info.type if info is not None else "llm",
        state=str(model.phase),
        loaded=model.phase in LOADED,
        resident=model.phase in RESIDENT,
        size_bytes=model.size_bytes,
        pinned=model.pinned,
        adopted=model.adopted,
        in_flight=model.leases,
        queued=scheduler.queued(key),
        last_used_at=_wall(model.last_used) if model.last_used else None,
        instance_id=model.instance_id,
        duplicates=tuple(model.duplicates),
        context_length=context_lengths.get(key) if model.instances else None,
        max_context_length=info.max_context_length if info is not None else None,
    )


def status_view(scheduler: Scheduler, *, reachable: bool) -> StatusView:
    models = scheduler.models
    count, used = scheduler.usage()
    return StatusView(
        reachable=reachable,
        resident=[key for key, model in models.items() if model.phase in RESIDENT],
        in_flight=sum(model.leases for model in models.values()),
        queue={key: n for key in models if (n := scheduler.queued(key))},
        duplicates={key: list(m.duplicates) for key, m in models.items() if m.duplicates},
        instances=count,
        bytes_used=used,
    )
