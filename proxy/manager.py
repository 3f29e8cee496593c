"""ModelManager: the async driver of `proxy.scheduler`.

It owns the scheduler's state, feeds it events (arrivals, releases, load results, timer ticks,
LM Studio's observed state) and carries out the actions it returns: waking or failing waiting
requests here, load and unload calls through `proxy.reconciler`, which also keeps the scheduler's
view true to LM Studio's. It holds no scheduling rule of its own.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus

from proxy import scheduling as sch
from proxy.config import Settings
from proxy.errors import (
    CapacityError,
    ProxyError,
    QueueFullError,
    QueueTimeoutError,
)
from proxy.events import EventBus
from proxy.lmstudio import LMStudioClient
from proxy.metrics import Metrics
from proxy.reconciler import Reconciler
from proxy.scheduler import Scheduler

logger = logging.getLogger("lmswitch.manager")


class ClientGone(Exception):  # noqa: N818 - not an error: the client left while waiting
    """The client disconnected while its request waited for a model."""


class _Pending:
    __slots__ = ("error", "event")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.error: ProxyError | None = None


class Lease:
    """A request's hold on a loaded model: while it is held the model is never unloaded."""

    __slots__ = ("_manager", "_released", "key", "waited_on_load", "waited_s")

    def __init__(self, manager: ModelManager, key: str, waited_s: float, on_load: bool) -> None:
        self._manager = manager
        self._released = False
        self.key = key
        self.waited_s = waited_s
        self.waited_on_load = on_load

    def release(self) -> None:
        """Give the model back. Synchronous and idempotent, so it is safe in any `finally`."""
        if not self._released:
            self._released = True
            self._manager._release(self.key)


class ModelManager:
    """Routes requests to models and keeps LM Studio's loaded set within the policy."""

    def __init__(
        self,
        client: LMStudioClient,
        settings: Settings,
        metrics: Metrics,
        *,
        events: EventBus | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = client
        self.events = events if events is not None else EventBus()
        self._settings = settings
        self._metrics = metrics
        self._clock = clock
        models, sched = settings.models, settings.scheduler
        self.scheduler = Scheduler(
            sch.Policy(
                max_loaded=models.max_loaded,
                memory_budget=models.memory_budget,
                swap_grace_s=sched.swap_grace,
                idle_ttl_s=models.idle_ttl,
                max_queue=sched.max_queue,
                queue_timeout_s=sched.queue_timeout,
            )
        )
        for key in models.pinned:
            self.scheduler.pin(key, True)
        self.reconciler = Reconciler(
            client, settings, metrics, self.events, self.scheduler, clock=clock, kick=self._kick
        )
        self._pending: dict[int, _Pending] = {}
        self._tg: TaskGroup | None = None
        self._wakeup = anyio.Event()
        self._sleep_until = math.inf
        self._change: anyio.Event | None = None

    async def refresh(self) -> None:
        """Reconcile with LM Studio now (single-flight; never raises)."""
        await self.reconciler.refresh()

    # -- lifetime ---------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Reconcile with LM Studio, preload, then run the timer and poll loop until cancelled.

        Loads and unloads run as tasks of this task group, so cancelling `run` stops them all.
        """
        async with anyio.create_task_group() as tg:
            self._tg = tg
            tg.start_soon(self._start_up)  # LM Studio may be slow or away: serve meanwhile
            task_status.started()
            next_poll = self._clock() + self._settings.upstream.poll_interval
            while True:
                self._wakeup = anyio.Event()
                now = self._clock()
                if now >= next_poll:
                    tg.start_soon(self.refresh)
                    next_poll = now + self._settings.upstream.poll_interval
                wake = self.scheduler.next_wakeup(now)
                self._sleep_until = min(wake if wake is not None else math.inf, next_poll)
                with anyio.move_on_after(self._sleep_until - now):
                    await self._wakeup.wait()
                    continue  # woken by an event: the deadline may have moved
                self._kick()  # a deadline passed

    async def _start_up(self) -> None:
        await self.refresh()
        for key in self._settings.models.preload:
            if key in self.reconciler.catalog:
                self.scheduler.arrive(key, self._clock(), takes_lease=False)
            else:
                logger.warning("preload: model %r is not in LM Studio's catalogue", key)
        self._kick()

    # -- leases -----------------------------------------------------------------------------

    async def acquire(
        self, key: str, *, disconnected: Callable[[], Awaitable[None]] | None = None
    ) -> Lease:
        """Wait until `key` is loaded and return a lease on it.

        Raises the `ProxyError` the scheduler failed the request with, or `ClientGone` when
        `disconnected` returns first; in both cases the request has left the queue and holds
        no lease.
        """
        waited, loading = await self._enqueue(key, disconnected, takes_lease=True)
        self._metrics.in_flight.labels(key).inc()
        return Lease(self, key, waited, loading)

    async def _enqueue(
        self,
        key: str,
        disconnected: Callable[[], Awaitable[None]] | None,
        *,
        takes_lease: bool,
    ) -> tuple[float, bool]:
        """Queue for `key` until granted (with a lease when `takes_lease`) or failed.

        Returns how long it waited and whether it waited on a load.
        """
        if not self.reconciler.reachable:
            # LM Studio was away: it may have restarted with nothing loaded. See first.
            await self.refresh()
        arrived = self._clock()
        if takes_lease and self.scheduler.try_grant(key, arrived):
            self._metrics.queue_wait.labels(key).observe(0.0)
            return 0.0, False
        waiter = self.scheduler.arrive(key, arrived, takes_lease=takes_lease)
        pending = self._pending[waiter.id] = _Pending()
        loading = self.scheduler.models[key].phase is not sch.Phase.READY
        self._kick()
        if not pending.event.is_set():
            self._metrics.queued.labels(key).inc()
            try:
                await self._wait(pending, disconnected)
            finally:
                self._metrics.queued.labels(key).dec()
                if not pending.event.is_set():  # client gone or cancelled: leave the queue
                    self._pending.pop(waiter.id, None)
                    self.scheduler.cancel(waiter.id)
                    self._kick()
        if pending.error is not None:
            raise pending.error
        waited = self._clock() - arrived
        self._metrics.queue_wait.labels(key).observe(waited)
        return waited, loading

    async def _wait(
        self, pending: _Pending, disconnected: Callable[[], Awaitable[None]] | None
    ) -> None:
        if disconnected is None:
            await pending.event.wait()
            return
        gone = False
        async with anyio.create_task_group() as tg:

            async def watch() -> None:
                nonlocal gone
                await disconnected()
                gone = True
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            await pending.event.wait()
            tg.cancel_scope.cancel()
        if gone and not pending.event.is_set():
            raise ClientGone

    def _release(self, key: str) -> None:
        self._metrics.in_flight.labels(key).dec()
        now = self._clock()
        self.scheduler.release(key, now)
        if self.scheduler.release_settles(key):
            self._wake_if_sooner(now)  # an idle TTL may now run out before the loop wakes
        else:
            self._kick()

    def set_idle_ttl(self, key: str, ttl_s: float) -> None:
        """A request's `ttl` sets its model's idle TTL from now on, as LM Studio's JIT does."""
        self.scheduler.set_idle_ttl(key, ttl_s)

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
            self.reconciler.context_overrides[key] = context_length
            loaded_with = self.reconciler.context_lengths.get(key)
            if self.scheduler.is_loaded(key) and loaded_with not in (None, context_length):
                await self.unload(key)
        was_loaded = self.scheduler.is_loaded(key)
        await self._enqueue(key, disconnected, takes_lease=False)
        return not was_loaded

    async def unload(self, key: str) -> bool:
        """Unload `key` once its running requests end; False if it was not loaded.

        Waits at most `scheduler.queue_timeout` for them (then `QueueTimeoutError`, and the
        unload still happens when they end). Requests that arrive meanwhile queue, and load
        it again afterwards.
        """
        model = self.scheduler.models.get(key)
        if model is None or model.phase not in sch.RESIDENT:
            return False
        self.scheduler.request_unload(key)
        self._kick()
        timeout_s = self._settings.scheduler.queue_timeout
        try:
            with anyio.fail_after(timeout_s):
                while model.phase is not sch.Phase.ABSENT:
                    await self._changed().wait()
        except TimeoutError:
            raise QueueTimeoutError(
                f"model {key!r} still has {model.leases} request(s) running after "
                f"{timeout_s:g} s; it will be unloaded when they end",
                code="unload_pending",
                retry_after_s=5,
            ) from None
        return True

    def pin(self, key: str, pinned: bool) -> None:
        """Pinned models are never evicted (runtime state, not written to the config)."""
        self.scheduler.pin(key, pinned)
        self._model_event(key, "pinned" if pinned else "unpinned")
        self._kick()

    def _changed(self) -> anyio.Event:
        """An event set the next time the scheduler acts (for waiters on a model's state)."""
        if self._change is None:
            self._change = anyio.Event()
        return self._change

    # -- carrying out decisions -------------------------------------------------------------

    def _kick(self) -> None:
        """Ask the scheduler what to do now and do it. Synchronous: upstream calls are tasks."""
        now = self._clock()
        for action in self.scheduler.decide(now):
            if isinstance(action, sch.Grant):
                if (pending := self._pending.pop(action.waiter.id, None)) is not None:
                    pending.event.set()
            elif isinstance(action, sch.Fail):
                if (pending := self._pending.pop(action.waiter.id, None)) is not None:
                    pending.error = self._failure(action)
                    pending.event.set()
            elif isinstance(action, sch.Load | sch.Unload):
                self._start_task(action)
            elif isinstance(action, sch.Drain):
                logger.info(
                    "draining model %s (no new requests until it is unloaded)", action.model
                )
                self._model_event(action.model, "draining")
            else:
                self._observed(action)
        if self._change is not None:
            self._change.set()
            self._change = None
        self._wake_if_sooner(now)

    def _wake_if_sooner(self, now: float) -> None:
        """Wake the timer loop if the scheduler's next deadline is before its alarm."""
        wake = self.scheduler.next_wakeup(now)
        if wake is not None and wake < self._sleep_until:
            self._wakeup.set()

    def _start_task(self, action: sch.Load | sch.Unload) -> None:
        assert self._tg is not None, "ModelManager.run is not running"  # noqa: S101
        if isinstance(action, sch.Load):
            self._model_event(action.model, "loading")
            self._tg.start_soon(self.reconciler.load, action.model, self._tg)
        else:
            self._model_event(action.model, "unloading", reason=str(action.reason))
            self._tg.start_soon(self.reconciler.unload, action)

    def _model_event(self, key: str, state: str, **extra: Any) -> None:
        self.reconciler.model_event(key, state, **extra)

    def _failure(self, action: sch.Fail) -> ProxyError:
        if isinstance(action.error, ProxyError):
            return action.error
        if action.reason is sch.FailReason.EXPIRED:
            return QueueTimeoutError(action.message, retry_after_s=5)
        if action.reason is sch.FailReason.QUEUE_FULL:
            return QueueFullError(action.message, retry_after_s=1)
        if action.reason is sch.FailReason.NO_FIT:
            return CapacityError(action.message, should_retry=False)
        return ProxyError(action.message)

    def _observed(self, action: sch.Observed) -> None:
        if action.change == "adopted":
            logger.info("model %s was loaded outside the proxy; adopted", action.model)
            self._metrics.loaded.labels(action.model).set(1)
            self._model_event(action.model, "loaded", adopted=True)
        else:
            logger.info("model %s was unloaded outside the proxy", action.model)
            self._metrics.loaded.labels(action.model).set(0)
            self._metrics.unloads.labels(action.model, sch.UnloadReason.EXTERNAL).inc()
            self._model_event(action.model, "unloaded", reason=str(sch.UnloadReason.EXTERNAL))

    def upstream_failed(self, error: ProxyError) -> None:
        """A request found LM Studio unreachable: note it and reconcile in the background."""
        self.reconciler.upstream_failed(error, self._tg)
