"""ModelView, HostStatus and StatusView: the one read view of the models and the capacity,
built by each `Host` and merged over the pool by `ModelManager`, for `/v1/models`,
`/api/v1/models*`, `/api/v1/status`, the events and the page."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from proxy.lmstudio import ModelInfo
from proxy.scheduler import Scheduler
from proxy.scheduling import LOADED, RESIDENT, Model, Phase


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
    upstreams: tuple[str, ...]  # the hosts holding it (loading, loaded or unloading)
    available_on: tuple[str, ...]  # the hosts that have it downloaded
    expected_load_s: float | None  # how long a load of it should take (`proxy.loadtimes`)
    loading_s: float | None  # how long its load has been running, while it loads
    idle_ttl_s: float | None = None  # how long it may sit idle before it is unloaded; None: ever

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
            "upstreams": list(self.upstreams),
            "available_on": list(self.available_on),
            "expected_load_s": _rounded(self.expected_load_s),
            "loading_s": _rounded(self.loading_s),
        }


@dataclass(frozen=True, slots=True)
class HostStatus:
    """One host of the pool: a row of `/api/v1/status`'s `upstreams`."""

    name: str
    url: str
    up: bool
    reachable: bool
    loaded: list[str]  # models holding its memory, in its scheduler's order
    instances: int
    bytes_used: int
    max_loaded: int
    memory_budget: int | str | None  # bytes, "auto" (learned) or None (no limit)
    in_flight: int
    queued: int
    queue: dict[str, int]  # waiting requests per model, for models with any
    duplicates: dict[str, list[str]]
    waiting: list[dict[str, Any]]  # the models waited for, in the order they are to be served
    # Its capacity as learned from LM Studio (`proxy.capacity`): `auto`, `learned_bytes`, `fit`,
    # `refused`, `how` (docs/design.md §2.8).
    learned: dict[str, Any]

    def row(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "url": self.url,
            "up": self.up,
            "loaded": self.loaded,
            "instances": self.instances,
            "bytes_used": self.bytes_used,
            "max_loaded": self.max_loaded,
            "memory_budget": self.memory_budget,
            "learned_bytes": self.learned["learned_bytes"],
            "learned": self.learned,
            "in_flight": self.in_flight,
            "queued": self.queued,
        }


@dataclass(frozen=True, slots=True)
class StatusView:
    """The proxy's state as a whole: what `/api/v1/status` reports beside its settings."""

    hosts: list[HostStatus]
    reachable: bool
    resident: list[str]  # models holding LM Studio's memory, in the scheduler's order
    in_flight: int
    queue: dict[str, int]  # waiting requests per model, for models with any
    duplicates: dict[str, list[str]]  # extra instances per model, for models with any
    instances: int
    bytes_used: int
    waiting: list[dict[str, Any]]  # each host's `waiting`, one after the other

    @property
    def learned_bytes(self) -> int | None:
        """The capacities learned from LM Studio, added up over the hosts; None unless every
        host has one."""
        learned = [host.learned["learned_bytes"] for host in self.hosts]
        return None if None in learned else sum(learned)


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def _wall(monotonic_s: float) -> float:
    """A time of the (monotonic) scheduler clock as seconds since the epoch."""
    return round(time.time() - (time.monotonic() - monotonic_s), 3)


def model_view(
    scheduler: Scheduler,
    catalog: Mapping[str, ModelInfo],
    context_lengths: Mapping[str, int | None],
    key: str,
    *,
    upstream: str,
    expected_load_s: float | None = None,
    loading_s: float | None = None,
) -> ModelView:
    """The view of `key` on the host `upstream`, from its scheduler's record and its LM
    Studio's catalogue entry."""
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
        upstreams=(upstream,) if model.phase in RESIDENT else (),
        available_on=(upstream,) if info is not None else (),
        expected_load_s=expected_load_s,
        loading_s=loading_s if model.phase is Phase.LOADING else None,
        idle_ttl_s=scheduler.idle_ttl(key),
    )


# A model's phases from the most to the least telling: the host whose view a merged view
# takes its state, instance and context length from.
_SHOWN_FIRST = ("ready", "draining", "loading", "unloading", "absent")


def merge_views(views: Sequence[ModelView]) -> ModelView:
    """One model's views on every host (in configuration order) as one: the state of the
    host where it is most nearly ready, the counts of all of them."""
    first = min(views, key=lambda v: (_SHOWN_FIRST.index(v.state), not v.available_on))
    if len(views) == 1:
        return first
    named = next((v for v in views if v.available_on), first)
    estimates = [v.expected_load_s for v in views if v.expected_load_s is not None]
    used = [v.last_used_at for v in views if v.last_used_at is not None]
    return replace(
        first,
        name=named.name,
        type=named.type,
        size_bytes=named.size_bytes or first.size_bytes,
        max_context_length=named.max_context_length,
        loaded=any(v.loaded for v in views),
        resident=any(v.resident for v in views),
        pinned=any(v.pinned for v in views),
        in_flight=sum(v.in_flight for v in views),
        queued=sum(v.queued for v in views),
        last_used_at=max(used) if used else None,
        upstreams=tuple(name for v in views for name in v.upstreams),
        available_on=tuple(name for v in views for name in v.available_on),
        # The host it is shown from, else the quickest host that has an estimate.
        expected_load_s=first.expected_load_s
        if first.expected_load_s is not None
        else min(estimates, default=None),
    )


def host_status(
    scheduler: Scheduler,
    name: str,
    url: str,
    *,
    up: bool,
    reachable: bool,
    waiting: list[dict[str, Any]],
    learned: dict[str, Any],
) -> HostStatus:
    models = scheduler.models
    count, used = scheduler.usage()
    policy = scheduler.policy
    return HostStatus(
        name=name,
        url=url,
        up=up,
        reachable=reachable,
        loaded=[key for key, model in models.items() if model.phase in RESIDENT],
        instances=count,
        bytes_used=used,
        max_loaded=policy.max_loaded,
        memory_budget="auto" if policy.learn_capacity else policy.memory_budget,
        learned=learned,
        in_flight=sum(model.leases for model in models.values()),
        queued=len(scheduler.waiters),
        queue={key: n for key in models if (n := scheduler.queued(key))},
        duplicates={key: list(m.duplicates) for key, m in models.items() if m.duplicates},
        waiting=waiting,
    )


def status_view(hosts: Sequence[HostStatus]) -> StatusView:
    """The pool's status: its hosts', added up."""
    resident: list[str] = []
    queue: dict[str, int] = {}
    duplicates: dict[str, list[str]] = {}
    for host in hosts:
        resident.extend(key for key in host.loaded if key not in resident)
        for key, n in host.queue.items():
            queue[key] = queue.get(key, 0) + n
        for key, extra in host.duplicates.items():
            duplicates.setdefault(key, []).extend(extra)
    return StatusView(
        hosts=list(hosts),
        reachable=any(host.reachable for host in hosts),
        resident=resident,
        in_flight=sum(host.in_flight for host in hosts),
        queue=queue,
        duplicates=duplicates,
        instances=sum(host.instances for host in hosts),
        bytes_used=sum(host.bytes_used for host in hosts),
        waiting=[row for host in hosts for row in host.waiting],
    )
