"""Host: one LM Studio of the pool, and the one driver of its `proxy.scheduler`.

It owns the scheduler's state, feeds it events (arrivals, releases, timer ticks, and the outcomes
of the calls `proxy.reconciler` makes to LM Studio), carries out the actions it returns, and
publishes what changed as metrics and events. It holds no scheduling rule of its own. The pool
(`proxy.manager.ModelManager`) places each request on a host and reads the models through the
hosts (docs/design.md §3.1).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from functools import partial
from typing import Any, Protocol, TypeVar

import anyio
from anyio.abc import TaskGroup, TaskStatus

from proxy import scheduling as sch
from proxy.config import HostSettings, Settings
from proxy.errors import ModelGoneError, ProxyError, QueueTimeoutError, UpstreamTimeoutError
from proxy.events import EventBus
from proxy.leases import FRESH_S, Gate, Lease, Pending, Progress, Ticket, failure
from proxy.lmstudio import ModelInfo
from proxy.metrics import Metrics
from proxy.placement import HostView
from proxy.reconciler import LMStudioCalls, LoadFailed, Observation, Reconciler
from proxy.reporter import Reporter
from proxy.scheduler import Scheduler
from proxy.views import HostStatus, ModelView, host_status, model_view

logger = logging.getLogger("lmswitch.manager")

# An unknown model name refreshes the catalogue at most this often (a model may have just been
# downloaded), so that a client cannot make every bad request cost an upstream call.
_CATALOG_REFRESH_S = 1.0
# A listing asked for while another runs waits for that one if it began this recently; an older
# one may be stuck (LM Studio lists in milliseconds), and a new listing starts beside it
# (docs/design.md §3.3).
_JOIN_S = 0.25
# While LM Studio's listings fail, they are retried after this long, then twice as long each
# time, up to the poll interval (a host that is away is not hammered).
_RETRY_S = 1.0


class Answer(Protocol):
    """LM Studio's answer to a request, as far as the gate reads it."""

    status_code: int


_A = TypeVar("_A", bound=Answer)


class _Refresh:
    __slots__ = ("done", "started")

    def __init__(self, started: float) -> None:
        self.started = started
        self.done = anyio.Event()


class Host:
    """One LM Studio: leases its models to requests and keeps its loaded set within its policy."""

    def __init__(
        self,
        host: HostSettings,
        client: LMStudioCalls,
        settings: Settings,
        metrics: Metrics,
        *,
        events: EventBus,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = host.name
        self.url = host.base_url
        self.events = events
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        models, sched = settings.models, settings.scheduler
        self._scheduler = Scheduler(
            sch.Policy(
                max_loaded=host.max_loaded,
                memory_budget=host.memory_budget,
                swap_grace_s=sched.swap_grace,
                idle_ttl_s=models.idle_ttl,
                max_queue=sched.max_queue,
                queue_timeout_s=sched.queue_timeout,
                priority_aging_s=sched.priority_aging,
                eviction=sch.Eviction(models.eviction),
                learn_capacity=host.learn_capacity,
            )
        )
        self._upstream = Reconciler(client, settings, clock=clock)
        self._report = Reporter(
            metrics,
            events,
            upstream=self.name,
            is_loaded=self._scheduler.is_loaded,
            url=self.url,
            in_pool=bool(settings.upstreams),
            clock=clock,
        )
        self._pending: dict[int, Pending] = {}
        self._tg: TaskGroup | None = None
        self._wakeup = anyio.Event()
        self._sleep_until = math.inf
        self._refreshing: _Refresh | None = None  # the latest listing still running
        self._next_poll = math.inf
        self._epoch = 0  # bumped by every load and unload, to discard stale observations
        self._gates: dict[str, Gate] = {}
        self._barrier: float | None = None  # since when a load is wanted or running
        self._listed_at = -math.inf  # when the latest listing began
        self._unloaded: dict[str, anyio.Event] = {}  # operators' unloads waiting to be done
        self._retry_s = _RETRY_S  # after the next failed listing
        self._loading_since: dict[str, float] = {}  # the load running, when it began
        self._queue_seen: tuple[tuple[str, int, str], ...] | None = None  # as last published
        # The learned capacity and the refusal it rests on, as last said (nothing learned yet).
        self._capacity_seen: tuple[int | None, object] = (None, None)
        self.started = anyio.Event()  # its first listing ended, read or not

    # -- lifetime ---------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Reconcile with LM Studio, then run the timer and poll loop until cancelled.

        Loads and unloads run as tasks of this task group, so cancelling `run` stops them all.
        """
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._start_up)  # LM Studio may be slow or away: serve meanwhile
            task_status.started()
            self._next_poll = self._clock() + self._settings.upstream.poll_interval
            while True:
                self._wakeup = anyio.Event()
                now = self._clock()
                if now >= self._next_poll:
                    if self._refreshing is None:  # the poll never starts beside a running listing
                        tg.start_soon(self.refresh)
                    self._next_poll = now + self._settings.upstream.poll_interval
                wake = self._scheduler.next_wakeup(now)
                self._sleep_until = min(wake if wake is not None else math.inf, self._next_poll)
                with anyio.move_on_after(self._sleep_until - now):
                    await self._wakeup.wait()
                    continue  # woken by an event: the deadline may have moved
                self._kick()  # a deadline passed

    async def _start_up(self) -> None:
        try:
            await self.refresh()
        finally:
            self.started.set()

    def warm(self, key: str) -> None:
        """Load `key` here as a preload does: by policy, with no request waiting on it."""
        self._scheduler.arrive(key, self._clock(), takes_lease=False)
        self._kick()

    # -- reading: what it has and holds -------------------------------------------------------

    @property
    def catalog(self) -> Mapping[str, ModelInfo]:
        """LM Studio's models here, as last read."""
        return self._upstream.catalog

    @property
    def models(self) -> Mapping[str, sch.Model]:
        """The scheduler's record of each model it has seen here."""
        return self._scheduler.models

    @property
    def catalog_known(self) -> bool:
        return self._upstream.catalog_known

    def worth_reading(self, *, alone: bool) -> bool:
        """An unknown name is worth a listing here: its models were read fine more than
        `_CATALOG_REFRESH_S` ago, or were never read (while its listings fail, only when no
        other host's models are known, `alone`: else its probes see to it)."""
        upstream = self._upstream
        if not upstream.catalog_known:
            return alone or upstream.last_error is None
        return upstream.current and self._clock() - upstream.last_refresh >= _CATALOG_REFRESH_S

    def ready(self, key: str) -> bool:
        """`key` is loaded here and taking new requests."""
        model = self._scheduler.models.get(key)
        return model is not None and model.phase is sch.Phase.READY

    def require_catalog(self) -> None:
        self._upstream.require_catalog()

    @property
    def up(self) -> bool:
        """Its last listing was read and its last call reached it: new work may go here."""
        return self._upstream.current and self._upstream.reachable

    def view(self, key: str) -> ModelView:
        since = self._loading_since.get(key)
        return model_view(
            self._scheduler,
            self._upstream.catalog,
            self._upstream.context_lengths,
            key,
            upstream=self.name,
            expected_load_s=self.expected_load_s(key),
            loading_s=None if since is None else self._clock() - since,
        )

    def status(self) -> HostStatus:
        return host_status(
            self._scheduler,
            self.name,
            self.url,
            up=self.up,
            reachable=self.reachable,
            waiting=self._queue_rows(),
            learned=self.capacity_row(),
        )

    def expected_load_s(self, key: str) -> float | None:
        """How long a load of `key` here should take (`proxy.loadtimes`), None if unknown."""
        info = self._upstream.catalog.get(key)
        model = self._scheduler.models.get(key)
        size = info.size_bytes if info is not None else model.size_bytes if model else 0
        return self._scheduler.load_times.expected(key, size)

    def _queue_rows(self) -> list[dict[str, Any]]:
        """The models requests wait for here, in the order they are to be served, with how
        many wait, how many wait ahead of them, and the load's expected and elapsed time."""
        now, ahead, rows = self._clock(), 0, []
        oldest: dict[str, float] = {}
        for waiter in self._scheduler.waiters.values():  # in arrival order
            oldest.setdefault(waiter.model, waiter.arrived)
        for position, (key, waiting) in enumerate(self._scheduler.queue(), start=1):
            since = self._loading_since.get(key)
            expected = self.expected_load_s(key)
            rows.append(
                {
                    "model": key,
                    "upstream": self.name,
                    "position": position,
                    "state": str(self._scheduler.models[key].phase),
                    "waiting": waiting,
                    "ahead": ahead,
                    "waited_s": round(now - oldest[key], 3) if key in oldest else None,
                    "loading_s": None if since is None else round(now - since, 3),
                    "expected_load_s": None if expected is None else round(expected, 3),
                }
            )
            ahead += waiting
        return rows

    def _progress(self, waiter: sch.Waiter) -> Progress:
        """Where `waiter` stands: how long it waited, how many wait ahead of it, and the wait
        expected in all (the loads ahead of its model's, and its model's; None if any of them
        has no expected time)."""
        now, key = self._clock(), waiter.model
        ahead = 0
        left: float | None = 0.0
        for model, waiting in self._scheduler.queue():
            if model == key:
                break
            ahead += waiting
            left = _plus(left, self._load_left(model, now))
        left = _plus(left, self._load_left(key, now))
        waited = now - waiter.arrived
        return Progress(
            model=key,
            upstream=self.name,
            waited_s=waited,
            loading=key in self._loading_since,
            expected_s=None if left is None else waited + left,
            ahead=ahead,
        )

    def _load_left(self, key: str, now: float) -> float | None:
        """What is left of a load of `key` (all of it if it has not begun); None if unknown."""
        if self.ready(key):
            return 0.0
        expected = self.expected_load_s(key)
        if expected is None:
            return None
        since = self._loading_since.get(key)
        return expected if since is None else max(0.0, expected - (now - since))

    def place_view(self, key: str) -> HostView:
        """This host as placement weighs it for `key` (`proxy.placement`)."""
        info = self._upstream.catalog.get(key)
        model = self._scheduler.models.get(key)
        has = info is not None or (model is not None and model.instances > 0)  # or holds it
        return self._scheduler.place_view(
            key, self.name, up=self.up, has=has, size=info.size_bytes if info else 0
        )

    def readiness(self) -> str | None:
        """None while LM Studio's models are known and its last call reached it; else why not
        (for `/readyz`)."""
        upstream = self._upstream
        if upstream.catalog_known and upstream.reachable:
            return None
        if upstream.last_error is not None:
            return upstream.last_error.message
        if not upstream.catalog_known:
            return "waiting for LM Studio"
        return "LM Studio did not answer the last call to it"

    # -- leases -----------------------------------------------------------------------------

    def try_acquire(
        self, key: str, arrived: float | None = None, client: str | None = None
    ) -> Lease | None:
        """The fast path of `acquire`: a lease at once if `key` is ready and nothing waits
        here, else None (and nothing changed)."""
        arrived = self._clock() if arrived is None else arrived
        if not self._scheduler.try_grant(key, arrived, client):
            return None
        self._metrics.queue_wait.labels(key).observe(0.0)
        self._metrics.in_flight.labels(key).inc()
        return Lease(key, 0.0, False, self._release, arrived, self.name, client)

    async def acquire(
        self,
        key: str,
        *,
        disconnected: Callable[[], Awaitable[None]] | None = None,
        since: float | None = None,
        ticket: Ticket | None = None,
        priority: int = 0,
        client: str | None = None,
    ) -> Lease:
        """Wait until `key` is loaded and return a lease on it.

        A request that acquires again (it is retried) passes `since`, its first lease's
        `arrived`: its queue budget counts from then, not anew. Its `ticket`, if any, reads its
        progress while it is queued; its `priority` (its key's) orders it among the waiters
        (docs/design.md §2.4), and its `client` (its connection) tells the fairness rule who
        may come back for a model. Raises the `ProxyError` the scheduler failed the request
        with, or `ClientGone` when `disconnected` returns first; in both cases the request has
        left the queue and holds no lease.
        """
        arrived = self._clock() if since is None else since
        if (lease := self.try_acquire(key, arrived, client)) is not None:
            return lease
        waited, loading = await self._enqueue(
            key,
            disconnected,
            takes_lease=True,
            arrived=arrived,
            ticket=ticket,
            priority=priority,
            client=client,
        )
        self._metrics.in_flight.labels(key).inc()
        return Lease(key, waited, loading, self._release, arrived, self.name, client)

    async def _enqueue(
        self,
        key: str,
        disconnected: Callable[[], Awaitable[None]] | None,
        *,
        takes_lease: bool,
        arrived: float | None = None,
        ticket: Ticket | None = None,
        priority: int = 0,
        client: str | None = None,
    ) -> tuple[float, bool]:
        """Queue for `key` until granted (with a lease when `takes_lease`) or failed.

        Returns how long it waited (since `arrived`, by default now) and whether it waited on
        a load.
        """
        arrived = self._clock() if arrived is None else arrived
        model = self._scheduler.models.get(key)
        if not self._upstream.current and (model is None or model.phase is not sch.Phase.READY):
            # The model must be loaded, and nothing is loaded on a state that was not read: try
            # a listing first (its own deadline is shorter than the request's budget).
            await self.refresh()
        waiter = self._scheduler.arrive(
            key, arrived, takes_lease=takes_lease, priority=priority, client=client
        )
        pending = self._pending[waiter.id] = Pending()
        loading = self._scheduler.models[key].phase is not sch.Phase.READY
        self._kick()
        if not pending.event.is_set():
            self._metrics.queued.labels(key).inc()
            if ticket is not None:
                ticket.progress = partial(self._progress, waiter)
            try:
                await pending.wait(disconnected)
            except BaseException:
                if pending.event.is_set() and pending.error is None and takes_lease:
                    # Granted as the wait was cancelled: nobody will hold it, so give it back.
                    self._scheduler.release(key, self._clock(), client)
                    self._kick()
                raise
            finally:
                if ticket is not None:
                    ticket.progress = None
                self._metrics.queued.labels(key).dec()
                if not pending.event.is_set():  # client gone or cancelled: leave the queue
                    self._pending.pop(waiter.id, None)
                    self._scheduler.cancel(waiter.id)
                    self._kick()
        if pending.error is not None:
            raise pending.error
        waited = self._clock() - arrived
        self._metrics.queue_wait.labels(key).observe(waited)
        return waited, loading

    async def send(self, lease: Lease, call: Callable[[], Awaitable[_A]]) -> _A:
        """Make `call` (a request to LM Studio for the leased model) once it is clear to go.

        LM Studio may load a model a request names that it does not hold (JIT). So (§4.1): a
        model not confirmed loaded since the request out to it was sent takes no other; while
        the proxy loads a model (or wants to), a request goes only to a model confirmed since;
        and the first request to a model waits while a request LM Studio may be loading another
        model for is out. Waits ask LM Studio's listing, and last at most what is left of the
        request's queue budget. An answer that begins below 400 confirms the model loaded.
        """
        key = lease.key
        if (gate := self._gates.get(key)) is None:
            gate = self._gates[key] = Gate(key)
        barrier = self._barrier
        # The common case, settled without a call: a run of requests goes on, confirmed.
        if (gate.out == 0 or gate.confirmed_at < gate.probe_sent or barrier is not None) and (
            self._must_wait(gate)
        ):
            budget = self._settings.scheduler.queue_timeout - lease.waited_s
            with anyio.move_on_after(budget):
                await self._confirm(gate)
            barrier = self._barrier
        if not self._scheduler.is_loaded(key):
            raise ModelGoneError(
                f"LM Studio unloaded model {key!r} behind the proxy's back before the request "
                "was sent",
                retry_after_s=1,
            )
        sent_at = self._clock()
        gate.sent(sent_at, checked=barrier is not None and gate.confirmed_at >= barrier)
        self._probed(key, gate)
        try:
            answer = await call()
        except BaseException:
            gate.answered(None)
            self._probed(key, gate)
            raise
        gate.answered(sent_at if answer.status_code < 400 else None)
        self._probed(key, gate)
        if gate.recheck and gate.out == 0:
            gate.recheck = False  # LM Studio may have loaded copies of it meanwhile (JIT)
            self._start_soon(self.refresh)
        return answer

    def _needs(self, gate: Gate) -> float | None:
        """The time since which LM Studio must have confirmed the model before a request goes
        to it, or None if it may go now."""
        if not gate.clear:
            return gate.probe_sent  # a probe is out, and the model not confirmed since
        if self._barrier is not None:  # a load is wanted or running: the model must be known
            return max(self._barrier, self._clock() - FRESH_S)
        if gate.out:
            return None
        # The first request to a model waits while LM Studio may be loading another model for
        # the first request of its run: not two loads at once.
        since = max(
            (g.probe_sent for g in self._gates.values() if not g.clear and g is not gate),
            default=-math.inf,
        )
        return since if gate.confirmed_at < since else None

    def _must_wait(self, gate: Gate) -> bool:
        if gate.model is not None and not self._scheduler.is_loaded(gate.model):
            return False  # gone meanwhile: nothing to wait for (`send` says so)
        needs = self._needs(gate)
        return needs is not None and gate.confirmed_at < needs

    def _probed(self, key: str, gate: Gate) -> None:
        """Tell the scheduler whether LM Studio may be loading `key` for a request now."""
        if gate.dark is not gate.probed:
            gate.probed = gate.dark
            self._scheduler.set_probed(key, gate.dark)
            if not gate.dark:
                if self._scheduler.load_held:
                    self._kick()  # the load held back for it may start
                for other in self._gates.values():
                    other.changed()  # requests that waited for it may go

    async def _confirm(self, gate: Gate) -> None:
        """Wait until a request may go to the gate's model, asking LM Studio's listing when
        none asked since the time the confirmation must be newer than."""
        while (needs := self._needs(gate)) is not None and gate.confirmed_at < needs:
            now = self._clock()
            # Ask again, less and less often, while LM Studio may still be loading the model.
            if gate.asked_at < needs or now - gate.asked_at >= min(2.0, (now - needs) / 4):
                gate.asked_at = now
                self._ask_listing(now)
            with anyio.move_on_after(0.1):  # and look again at least this often
                await gate.wait_change()

    def _ask_listing(self, since: float) -> None:
        """Read LM Studio's state in the background with a listing begun at `since` or later;
        every gate is told when it ends."""
        self._start_soon(self._listing_for_gates, since)

    async def _listing_for_gates(self, since: float) -> None:
        try:
            await self.refresh(begun_after=since)
        finally:
            for gate in self._gates.values():
                gate.changed()

    def _raise_barrier(self) -> None:
        """While a load is wanted or running, requests go only to models confirmed since."""
        wanted = self._scheduler.load_held or self._scheduler.loading
        if wanted and self._barrier is None:
            self._barrier = self._clock()
        elif not wanted and self._barrier is not None:
            self._barrier = None
            for gate in self._gates.values():
                gate.changed()
        if self._scheduler.load_held and any(
            gate.dark and gate.unchecked_at > self._listed_at for gate in self._gates.values()
        ):
            self._ask_listing(self._clock())  # did those requests make LM Studio load?

    def _release(self, key: str, client: str | None) -> None:
        self._metrics.in_flight.labels(key).dec()
        now = self._clock()
        self._scheduler.release(key, now, client)
        if self._scheduler.release_settles(key):
            self._wake_if_sooner(now)  # an idle TTL may now run out before the loop wakes
        else:
            self._kick()

    def set_idle_ttl(self, key: str, ttl_s: float) -> None:
        """A request's `ttl` (or Ollama's `keep_alive`) sets its model's idle TTL until it is
        unloaded, as LM Studio's JIT does (0: unloaded once idle; inf: never for being idle)."""
        self._scheduler.set_idle_ttl(key, ttl_s)

    # -- operators' requests ------------------------------------------------------------------

    async def load(
        self,
        key: str,
        *,
        context_length: int | None = None,
        disconnected: Callable[[], Awaitable[None]] | None = None,
    ) -> bool:
        """Load `key` by policy (evicting as a request would); False if it was loaded already.

        A `context_length` other than the loaded instance's reloads the model with it.
        """
        if context_length is not None:
            self._upstream.context_overrides[key] = context_length
            loaded_with = self._upstream.context_lengths.get(key)
            if self._scheduler.is_loaded(key) and loaded_with not in (None, context_length):
                await self.unload(key)
        was_loaded = self._scheduler.is_loaded(key)
        await self._enqueue(key, disconnected, takes_lease=False)
        return not was_loaded

    async def unload(self, key: str) -> bool:
        """Unload `key` once its running requests end; False if it was not loaded.

        Waits at most `scheduler.queue_timeout` for them (then `QueueTimeoutError`, and the
        unload still happens when they end). Requests that arrive meanwhile queue, and load
        it again afterwards.
        """
        model = self._scheduler.models.get(key)
        if model is None or model.phase not in sch.RESIDENT:
            return False
        if (unloaded := self._unloaded.get(key)) is None:
            unloaded = self._unloaded[key] = anyio.Event()
        self._scheduler.request_unload(key)
        self._kick()
        timeout_s = self._settings.scheduler.queue_timeout
        try:
            with anyio.fail_after(timeout_s):
                await unloaded.wait()
        except TimeoutError:
            raise QueueTimeoutError(
                f"model {key!r} still has {model.leases} request(s) running after "
                f"{timeout_s:g} s; it will be unloaded when they end",
                code="unload_pending",
                retry_after_s=5,
            ) from None
        return True

    def pin(self, key: str, pinned: bool, *, report: bool = True) -> None:
        """Pinned models are never evicted (runtime state, not written to the config)."""
        self._scheduler.pin(key, pinned)
        if report:
            self._report.model_event(key, "pinned" if pinned else "unpinned")
        if self._tg is not None:
            self._kick()

    # -- carrying out decisions -------------------------------------------------------------

    def _kick(self) -> None:
        """Ask the scheduler what to do now and do it. Synchronous: upstream calls are tasks."""
        now = self._clock()
        for action in self._scheduler.decide(now):
            if isinstance(action, sch.Grant):
                if (pending := self._pending.pop(action.waiter.id, None)) is not None:
                    pending.event.set()
            elif isinstance(action, sch.Fail):
                if (pending := self._pending.pop(action.waiter.id, None)) is not None:
                    pending.error = failure(action)
                    pending.event.set()
            elif isinstance(action, sch.Load):
                self._loading_since[action.model] = now
                size = self._scheduler.models[action.model].size_bytes
                self._report.loading(action.model, self.expected_load_s(action.model), size)
                self._start_soon(self._load, action.model)
            elif isinstance(action, sch.Unload):
                self._report.unloading(action.model, action.reason)
                self._start_soon(self._unload, action)
            elif isinstance(action, sch.Drain):
                self._report.draining(action.model)
            elif action.change == "adopted":
                self._report.adopted(action.model)
            else:
                self._report.vanished(action.model)
        self._raise_barrier()
        self._publish_queue()
        self._publish_capacity()
        self._wake_if_sooner(now)

    def _publish_queue(self) -> None:
        """A `queue` event when the models waited for here, or how many wait for each, changed
        since the last one; nothing at all while nobody listens (docs/design.md §4.3)."""
        if not self.events.subscribers:
            self._queue_seen = None  # a new subscriber's snapshot is newer than any of them
            return
        models = self._scheduler.models
        seen = tuple((key, n, str(models[key].phase)) for key, n in self._scheduler.queue())
        if seen != self._queue_seen:
            self._queue_seen = seen
            self._report.queue(self._queue_rows())

    def _publish_capacity(self) -> None:
        """A log line and a `capacity` event when the capacity learned here, or the refusal it
        rests on, changed (docs/design.md §2.8)."""
        capacity = self._scheduler.capacity
        seen = (capacity.learned_bytes, capacity.refused)  # not every larger set that fits
        if seen != self._capacity_seen:
            self._capacity_seen = seen
            self._report.capacity(self.capacity_row())

    def capacity_row(self) -> dict[str, Any]:
        """What is learned of this host's capacity (`/api/v1/status`, `capacity` events)."""
        return {"auto": self._scheduler.policy.learn_capacity, **self._scheduler.capacity.row()}

    def _wake_if_sooner(self, now: float) -> None:
        """Wake the timer loop if the scheduler's next deadline is before its alarm."""
        wake = self._scheduler.next_wakeup(now)
        if wake is not None and wake < self._sleep_until:
            self._wakeup.set()

    def _start_soon(self, call: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        assert self._tg is not None, "ModelManager.run is not running"  # noqa: S101
        self._tg.start_soon(call, *args)

    # -- loads and unloads: the reconciler calls, their outcomes fed to the scheduler ----------

    async def _load(self, key: str) -> None:
        """Load `key` (the scheduler starts no other load or unload meanwhile).

        LM Studio goes on with a load however long it takes, and another load meanwhile would
        make a second copy or overrun its memory. So the call stays open: the requests waiting
        get a 504 at `load_timeout`, while the model stays `loading` (no other load or unload
        starts, new requests for it wait) until LM Studio answers, for twice that at most.
        """
        limit = self._settings.upstream.load_timeout
        timer = anyio.CancelScope()
        self._start_soon(self._fail_waiters_after, key, limit, timer)
        try:
            result = await self._upstream.load(key, timeout_s=2 * limit)
        finally:
            timer.cancel()
            self._loading_since.pop(key, None)
        self._report.upstream(self.up)
        if isinstance(result, LoadFailed) and result.refused:
            # Not answered yet: the scheduler makes room and tries again (docs/design.md §2.8).
            self._scheduler.load_refused(key, result.error, self._clock())
            refusal = self._scheduler.refusals[key]
            room = self._scheduler.may_make_room(refusal)
            self._report.load_refused(key, result.error, refusal.beside, making_room=room)
        elif isinstance(result, LoadFailed):
            self._scheduler.load_failed(key, result.error)
            self._report.load_failed(key, result.error)
        else:
            self._scheduler.set_contexts({key: self._upstream.context_lengths.get(key)})
            self._scheduler.load_done(key, result.instance_id, self._clock(), result.elapsed_s)
            self._report.loaded(key, result.instance_id, result.elapsed_s)
        self._epoch += 1
        self._kick()

    async def _fail_waiters_after(self, key: str, limit: float, scope: anyio.CancelScope) -> None:
        with scope:
            await anyio.sleep(limit)
            self._report.load_slow(key, limit)
            error = UpstreamTimeoutError(
                f"loading model {key!r} took longer than load_timeout ({limit:g} s); LM Studio "
                "goes on with it, and a later request for the model waits for that load",
                code="model_load_timeout",
            )
            self._scheduler.fail_waiters(key, error)
            self._kick()

    async def _unload(self, action: sch.Unload) -> None:
        started = self._clock()
        error = await self._upstream.unload(action.instance_id)
        self._report.upstream(self.up)
        if error is not None:
            self._scheduler.unload_failed(action.model, self._clock())
            self._report.unload_failed(action.model, error)
        else:
            self._scheduler.unload_done(action.model)
            self._report.unloaded(action.model, action.reason, self._clock() - started)
            if action.reason is sch.UnloadReason.ADMIN:
                self._unload_answered(action.model)
        self._epoch += 1
        self._kick()

    def _unload_answered(self, key: str) -> None:
        """Answer the operators waiting for `key` to be unloaded (it is, or it vanished)."""
        if (unloaded := self._unloaded.pop(key, None)) is not None:
            unloaded.set()

    # -- staying true to LM Studio ------------------------------------------------------------

    def upstream_failed(self, error: ProxyError) -> None:
        """A request found LM Studio unreachable: note it and reconcile in the background."""
        self._upstream.note(error)
        self._report.upstream(self.up)
        for key, gate in self._gates.items():
            gate.forget()  # LM Studio may have restarted with nothing loaded
            self._probed(key, gate)
        if self._tg is not None and self._refreshing is None:
            self._tg.start_soon(self.refresh)

    async def refresh(self, *, begun_after: float = -math.inf) -> None:
        """Reconcile with LM Studio's catalogue and loaded instances; never raises.

        A caller that arrives while a listing that began less than `_JOIN_S` ago (and not
        before `begun_after`) runs waits for that one; an older one may be stuck, so a new
        listing starts beside it.
        """
        now = self._clock()
        running = self._refreshing
        if running is not None and begun_after <= running.started > now - _JOIN_S:
            await running.done.wait()
            return
        self._refreshing = this = _Refresh(now)
        self._listed_at = now
        epoch = self._epoch
        try:
            observation = await self._upstream.observe()
        finally:
            if self._refreshing is this:
                self._refreshing = None
            this.done.set()
        if observation is None:
            return  # a listing started later was read first
        self._report.upstream(self.up)
        if isinstance(observation, ProxyError):
            self._report.unreadable(observation)
            self._scheduler.set_unreadable(observation.message)
            self._next_poll = min(self._next_poll, self._clock() + self._retry_s)
            self._retry_s = min(
                2 * self._retry_s, max(_RETRY_S, self._settings.upstream.poll_interval)
            )
            self._wakeup.set()
            self._kick()
            return
        self._scheduler.set_unreadable(None)
        self._report.readable()
        self._retry_s = _RETRY_S
        self._scheduler.set_catalog(observation.sizes)
        self._confirm_gates(observation)
        if epoch == self._epoch:  # no load or unload finished meanwhile: the view is current
            contexts = self._upstream.context_lengths
            self._scheduler.set_contexts({k: contexts.get(k) for k in observation.instances})
            self._scheduler.observed(self._seen(observation), self._clock())
            self._report.duplicates(self._scheduler.models)
            for key, model in self._scheduler.models.items():
                if model.phase is sch.Phase.ABSENT and key in self._unloaded:
                    self._unload_answered(key)  # gone behind our back: unloaded all the same
        self._report.catalog(observation.sizes)
        self._kick()

    def _confirm_gates(self, observation: Observation) -> None:
        """Models the listing shows loaded are confirmed as of when it was asked for."""
        for key, gate in self._gates.items():
            if key in observation.instances:
                gate.confirm(observation.started)
                self._probed(key, gate)

    def _seen(self, observation: Observation) -> Mapping[str, Sequence[str]]:
        """The instances a listing shows, and those of models it misses while requests are out
        to them (LM Studio may be loading them by JIT: they are looked at again afterwards)."""
        seen: dict[str, Sequence[str]] = dict(observation.instances)
        for key, gate in self._gates.items():
            if key in seen:
                continue
            model = self._scheduler.models.get(key)
            if gate.out and model is not None and model.phase in sch.LOADED and model.instance_id:
                seen[key] = [model.instance_id, *model.duplicates]
                gate.recheck = True
                gate.doubt(observation.started)
        return seen

    @property
    def reachable(self) -> bool:
        """Whether LM Studio answered the proxy's last call."""
        return self._upstream.reachable


def _plus(a: float | None, b: float | None) -> float | None:
    """A sum of estimates, unknown if either is."""
    return None if a is None or b is None else a + b
