"""ModelManager: the pool of LM Studio hosts behind one URL, and the one view of the models.

Each `proxy.host.Host` drives its own scheduler; the pool places every request (and operator's
load) on a host by `proxy.placement.place`, places it again if that host goes down while it
waits, and merges what the hosts know into one catalogue and one view. Everyone else reads models
through it: `resolve()` for names, `ModelView` rows and `StatusView` for state (docs/design.md
§3.1, §3.5).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import (
    Awaitable,
    Callable,
    Collection,
    Coroutine,
    Iterator,
    Mapping,
    Sequence,
)
from typing import Any, TypeVar

import anyio
from anyio.abc import TaskStatus

from proxy import names
from proxy.config import Settings
from proxy.errors import (
    BadRequestError,
    ModelNotFoundError,
    ProxyError,
    UpstreamUnavailableError,
)
from proxy.events import EventBus
from proxy.host import Answer, Host
from proxy.leases import ClientGone, Lease, Ticket
from proxy.lmstudio import ModelInfo
from proxy.metrics import Metrics
from proxy.names import Resolved
from proxy.placement import Placement, place
from proxy.reconciler import LMStudioCalls
from proxy.scheduling import Model
from proxy.views import ModelView, StatusView, merge_views, status_view

__all__ = ["ClientGone", "Lease", "ModelManager", "ModelView", "Resolved", "StatusView"]

logger = logging.getLogger("lmswitch.manager")

_A = TypeVar("_A", bound=Answer)


class ModelManager:
    """Routes requests to models on the pool's hosts, each kept within its own policy."""

    def __init__(
        self,
        clients: Mapping[str, LMStudioCalls],
        settings: Settings,
        metrics: Metrics,
        *,
        events: EventBus | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.events = events if events is not None else EventBus()
        self._settings = settings
        self._clock = clock
        self.hosts = {
            host.name: Host(
                host, clients[host.name], settings, metrics, events=self.events, clock=clock
            )
            for host in settings.hosts()
        }
        for host in self.hosts.values():
            for key in settings.models.pinned:
                host.pin(key, True, report=False)
        # A pool of one host places everything there, and reads its catalogue as it is.
        self._only = next(iter(self.hosts.values())) if len(self.hosts) == 1 else None
        # The hosts' catalogues merged, and the catalogues they were merged from (held, so
        # that a new one is never taken for one of them): all empty until listings are read.
        self._merged: Mapping[str, ModelInfo] = {}
        self._merged_from = tuple(host.catalog for host in self.hosts.values())

    # -- lifetime ---------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run every host until cancelled; preload once they have all read their models."""
        async with anyio.create_task_group() as tg:
            for host in self.hosts.values():
                await tg.start(host.run)
            task_status.started()
            for host in self.hosts.values():
                await host.started.wait()
            self._preload()

    def _preload(self) -> None:
        for key in self._settings.models.preload:
            placement = self._place(key)
            if placement is None:
                logger.warning("preload: model %r is in no LM Studio's catalogue", key)
            else:
                self.hosts[placement.host].warm(key)

    # -- reading: names and views -----------------------------------------------------------

    @property
    def catalog(self) -> Mapping[str, ModelInfo]:
        """Every host's catalogue in one (a model's entry from the first host that has it)."""
        if self._only is not None:
            return self._only.catalog
        # Each listing that is read makes a new catalogue: merge again only then.
        read = tuple(host.catalog for host in self.hosts.values())
        if any(new is not old for new, old in zip(read, self._merged_from, strict=True)):
            merged: dict[str, ModelInfo] = {}
            for catalog in reversed(read):
                merged.update(catalog)
            self._merged, self._merged_from = merged, read
        return self._merged

    def _loaded(self) -> Iterator[Model]:
        """Every host's model records, looked at only for a name no catalogue has."""
        return itertools.chain.from_iterable(host.models.values() for host in self.hosts.values())

    def _known(self) -> bool:
        """Some host's models have been read."""
        return any(host.catalog_known for host in self.hosts.values())

    async def resolve(self, name: object) -> Resolved:
        """A client's `model` as a model key and the name to send upstream (docs/design.md
        §3.4); `ModelNotFoundError`, or why LM Studio's models are unknown, if it names none."""
        models = self._settings.models
        name, target = names.requested(name, models)
        found = names.find(target, self.catalog, self._loaded(), models.aliases)
        if found is None and await self._refresh_for_unknown():
            found = names.find(target, self.catalog, self._loaded(), models.aliases)
        if found is None:
            known = names.routable(self.catalog, models.aliases)
            raise names.not_found(name, [known_name for known_name, _ in known])
        return found

    async def _refresh_for_unknown(self) -> bool:
        """Read the hosts' models again for an unknown name, each at most once a second and
        not while its listings fail (unless no host's models are known); True if any was read.
        With no host's models known, the first host's reason is raised."""
        alone = not self._known()
        stale = [host for host in self.hosts.values() if host.worth_reading(alone=alone)]
        if not stale:
            return False
        await self._each(stale, Host.refresh)
        self._require_catalog()
        return True

    def _require_catalog(self) -> None:
        if not self._known():
            next(iter(self.hosts.values())).require_catalog()

    async def routable(self) -> list[tuple[str, str]]:
        """Every name a client may use, with its model key: the catalogue, then aliases."""
        if not self._known():
            await self._each(list(self.hosts.values()), Host.refresh)
            self._require_catalog()
        return names.routable(self.catalog, self._settings.models.aliases)

    def view(self, key: str) -> ModelView:
        return merge_views([host.view(key) for host in self.hosts.values()])

    def views(self) -> list[ModelView]:
        """Every model a host has, and any other one holds loaded, by key."""
        keys = set(self.catalog)
        for host in self.hosts.values():
            keys.update(key for key, model in host.models.items() if model.instances)
        return [self.view(key) for key in sorted(keys)]

    def status(self) -> StatusView:
        return status_view([host.status() for host in self.hosts.values()])

    def readiness(self) -> str | None:
        """None while some host's models are known and its last call reached it; else why the
        first host is not ready (for `/readyz`)."""
        reasons = [host.readiness() for host in self.hosts.values()]
        if any(reason is None for reason in reasons):
            return None
        return next(reason for reason in reasons if reason is not None)

    @property
    def reachable(self) -> bool:
        """Whether some host answered the proxy's last call to it."""
        return any(host.reachable for host in self.hosts.values())

    def model_type(self, key: str) -> str | None:
        """`key`'s type in LM Studio's catalogue ("llm" or "embedding"), None if not in it."""
        info = self.catalog.get(key)
        return info.type if info is not None else None

    # -- placing requests ---------------------------------------------------------------------

    def _place(self, key: str, avoid: Sequence[str] = ()) -> Placement | None:
        """Where a request for `key` goes now (`proxy.placement`), not counting `avoid`."""
        views = [host.place_view(key) for name, host in self.hosts.items() if name not in avoid]
        return place(views, self._settings.models.replicas_of(key))

    def _ready_host(self, key: str) -> Host | None:
        """The common case, as `place` would decide it: the pool's one host, or the one host
        that is up where `key` is ready (and only one may hold it); else None."""
        if self._only is not None:
            return self._only
        if self._settings.models.replicas_of(key) == 1:
            ready = [host for host in self.hosts.values() if host.up and host.ready(key)]
            if len(ready) == 1:
                return ready[0]
        return None

    def _placement(self, key: str, avoid: Sequence[str] = ()) -> Host:
        if not avoid and (host := self._ready_host(key)) is not None:
            return host
        placement = self._place(key, avoid)
        if placement is None:  # no host has it: the first one's queue answers, as one host's
            return next(h for h in self.hosts.values() if h.name not in avoid)
        if placement.replica is not None:
            self.hosts[placement.replica].warm(key)
        return self.hosts[placement.host]

    def elsewhere(self, key: str, avoid: Collection[str]) -> bool:
        """Whether a host not in `avoid` that is up has `key`."""
        return any(
            host.up and key in host.catalog
            for name, host in self.hosts.items()
            if name not in avoid
        )

    # -- leases -----------------------------------------------------------------------------

    def try_acquire(self, key: str, client: str | None = None) -> Lease | None:
        """The fast path of `acquire`: a lease at once where `key` is ready and nothing waits,
        else None (nothing changed, and `acquire` places the request)."""
        host = self._ready_host(key)
        return host.try_acquire(key, client=client) if host is not None else None

    async def acquire(
        self,
        key: str,
        *,
        disconnected: Callable[[], Awaitable[None]] | None = None,
        since: float | None = None,
        placed: Callable[[str], None] | None = None,
        ticket: Ticket | None = None,
        priority: int = 0,
        client: str | None = None,
    ) -> Lease:
        """Wait until `key` is loaded on a host and return a lease on it there; `placed` hears
        the name of each host the request is placed on.

        A request that acquires again (it is retried) passes `since`, its first lease's
        `arrived`: its queue budget counts from then, not anew. A request whose host went down
        while it waited is placed again, with what is left of its budget. Its `ticket`, if
        any, reads its progress while it is queued (`Host.acquire`); its `priority` (its key's)
        orders it among the waiters of its host (docs/design.md §2.4), and its `client` (its
        connection) tells the fairness rule who may come back for a model. Raises the `ProxyError`
        it failed with, or `ClientGone` when `disconnected` returns first; in both
        cases the request has left every queue and holds no lease.
        """
        arrived = self._clock() if since is None else since
        avoid: list[str] = []
        while True:
            host = self._placement(key, avoid)
            if placed is not None:
                placed(host.name)
            try:
                return await host.acquire(
                    key,
                    disconnected=disconnected,
                    since=arrived,
                    ticket=ticket,
                    priority=priority,
                    client=client,
                )
            except UpstreamUnavailableError as exc:
                host.upstream_failed(exc)
                avoid.append(host.name)  # it is down now: another host may serve
                if not self.elsewhere(key, avoid):
                    raise

    async def send(self, lease: Lease, call: Callable[[], Awaitable[_A]]) -> _A:
        """Make `call` (a request to the leased model's host) once it is clear to go (§4.1)."""
        return await self.hosts[lease.upstream].send(lease, call)

    def set_idle_ttl(self, key: str, ttl_s: float) -> None:
        """A request's `ttl` (or Ollama's `keep_alive`) sets its model's idle TTL until it is
        unloaded, as LM Studio's JIT does (0: unloaded once idle; inf: never for being idle)."""
        for host in self.hosts.values():
            host.set_idle_ttl(key, ttl_s)

    # -- operators' requests ------------------------------------------------------------------

    def host(self, upstream: str) -> Host:
        """The host named `upstream`; `BadRequestError` naming the known ones if none is."""
        if (host := self.hosts.get(upstream)) is None:
            raise BadRequestError(
                f"no upstream named {upstream!r}; the pool has {', '.join(self.hosts)}",
                param="upstream",
            )
        return host

    async def load(
        self,
        key: str,
        *,
        upstream: str | None = None,
        context_length: int | None = None,
        disconnected: Callable[[], Awaitable[None]] | None = None,
    ) -> bool:
        """Load `key` by policy on `upstream`, or where placement puts it (evicting as a
        request would); False if it was loaded there already."""
        if upstream is None:
            host = self._placement(key)
        elif key not in (host := self.host(upstream)).catalog:
            raise ModelNotFoundError(
                f"upstream {upstream!r} does not have model {key!r}", param="upstream"
            )
        return await host.load(key, context_length=context_length, disconnected=disconnected)

    async def unload(self, key: str, *, upstream: str | None = None) -> bool:
        """Unload `key` on `upstream`, or on every host holding it, once their running
        requests end; False if it was loaded on none of them."""
        hosts = [self.host(upstream)] if upstream is not None else list(self.hosts.values())
        done = [False] * len(hosts)

        async def unload(n: int) -> None:
            done[n] = await hosts[n].unload(key)

        async with anyio.create_task_group() as tg:
            for n in range(len(hosts)):
                tg.start_soon(unload, n)
        return any(done)

    def pin(self, key: str, pinned: bool) -> None:
        """Pinned models are never evicted, on any host (runtime state, not written to the
        config)."""
        for n, host in enumerate(self.hosts.values()):
            host.pin(key, pinned, report=n == 0)

    # -- staying true to LM Studio ------------------------------------------------------------

    def upstream_failed(self, upstream: str, error: ProxyError) -> None:
        """A request found the host `upstream` unreachable: it is down until a listing reads
        it again."""
        self.hosts[upstream].upstream_failed(error)

    async def refresh(self, upstream: str | None = None) -> None:
        """Read the models of the host `upstream`, or of every host; never raises."""
        hosts = [self.hosts[upstream]] if upstream is not None else list(self.hosts.values())
        await self._each(hosts, Host.refresh)

    @staticmethod
    async def _each(
        hosts: Sequence[Host], call: Callable[[Host], Coroutine[Any, Any, None]]
    ) -> None:
        async with anyio.create_task_group() as tg:
            for host in hosts:
                tg.start_soon(call, host)
