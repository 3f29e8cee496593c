"""ModelManager: the async driver of `proxy.scheduler`.

It owns the scheduler's state, feeds it events (arrivals, releases, load results, timer ticks,
LM Studio's observed state) and carries out the actions it returns: waking or failing waiting
requests and making the load and unload calls. It holds no scheduling rule of its own.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import TaskGroup, TaskStatus

from proxy import scheduler as sch
from proxy.config import Settings
from proxy.errors import (
    BadRequestError,
    CapacityError,
    ModelNotFoundError,
    ProxyError,
    QueueFullError,
    QueueTimeoutError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from proxy.events import EventBus
from proxy.lmstudio import LMStudioClient, Loaded, ModelInfo
from proxy.metrics import Metrics

logger = logging.getLogger("lmswitch.manager")

# An unknown model name refreshes the catalogue at most this often (a model may have just been
# downloaded), so that a client cannot make every bad request cost an upstream call.
_CATALOG_REFRESH_S = 1.0


class ClientGone(Exception):  # noqa: N818 - not an error: the client left while waiting
    """The client disconnected while its request waited for a model."""


@dataclass(frozen=True, slots=True)
class Resolved:
    """A request's `model` resolved: the model key to lease and the name to send upstream."""

    key: str
    upstream_name: str


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
        self.scheduler = sch.Scheduler(
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
        self.catalog: dict[str, ModelInfo] = {}
        self.catalog_known = False
        self.reachable = False
        self.last_error: ProxyError | None = None  # why the last catalogue read failed
        self._pending: dict[int, _Pending] = {}
        self._tg: TaskGroup | None = None
        self._wakeup = anyio.Event()
        self._sleep_until = math.inf
        self._epoch = 0  # bumped by every load and unload, to discard stale observations
        self._last_refresh = -math.inf
        self._duplicates: dict[str, tuple[str, ...]] = {}  # as last reported
        self._context_overrides: dict[str, int] = {}  # from operators' load requests
        self.context_lengths: dict[str, int | None] = {}  # of loaded instances, as last seen
        self._change: anyio.Event | None = None
        self._refreshed: anyio.Event | None = None  # set when the running refresh ends

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
            if key in self.catalog:
                self.scheduler.arrive(key, self._clock(), takes_lease=False)
            else:
                logger.warning("preload: model %r is not in LM Studio's catalogue", key)
        self._kick()

    # -- routing ----------------------------------------------------------------------------

    async def resolve(self, name: object) -> Resolved:
        """Alias first, then a model key, then a loaded instance id (DESIGN §5.1)."""
        models = self._settings.models
        if name is None:
            if models.default is None:
                raise BadRequestError(
                    "you must provide a model parameter (no models.default is configured)",
                    param="model",
                    code="missing_model",
                )
            name = models.default
        if not isinstance(name, str) or not name:
            raise BadRequestError("model must be a non-empty string", param="model")
        target = models.aliases.get(name, name)
        found = self._lookup(target)
        if found is None and await self._refresh_for_unknown():
            found = self._lookup(target)
        if found is None:
            known = ", ".join(sorted(self.catalog)[:5])
            shown = name if len(name) <= 100 else name[:100] + "..."
            raise ModelNotFoundError(
                f"The model {shown!r} does not exist. Known models include: {known}.",
                param="model",
            )
        return Resolved(found, target)

    def _lookup(self, name: str) -> str | None:
        if name in self.catalog:
            return name
        for model in self.scheduler.models.values():
            if name == model.instance_id or name in model.duplicates:
                return model.key
        return None

    async def _refresh_for_unknown(self) -> bool:
        """Refresh the catalogue for an unknown name, at most once a second; True if it ran."""
        if self.catalog_known and self._clock() - self._last_refresh < _CATALOG_REFRESH_S:
            return False
        await self.refresh()
        self.require_catalog()
        return True

    def require_catalog(self) -> None:
        """Raise why LM Studio's models are unknown, if they are."""
        if self.catalog_known:
            return
        if self.last_error is None or isinstance(self.last_error, UpstreamUnavailableError):
            raise UpstreamUnavailableError(
                f"LM Studio is not reachable at {self._client.base_url}", retry_after_s=5
            )
        raise self.last_error

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
        if not self.reachable:
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
            self._context_overrides[key] = context_length
            loaded_with = self.context_lengths.get(key)
            if self._is_loaded(key) and loaded_with not in (None, context_length):
                await self.unload(key)
        was_loaded = self._is_loaded(key)
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

    def _is_loaded(self, key: str) -> bool:
        model = self.scheduler.models.get(key)
        return model is not None and model.phase in (sch.Phase.READY, sch.Phase.DRAINING)

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
            self._tg.start_soon(self._load, action.model)
        else:
            self._model_event(action.model, "unloading", reason=str(action.reason))
            self._tg.start_soon(self._unload, action)

    def _model_event(self, key: str, state: str, **extra: Any) -> None:
        self.events.publish("model", {"model": key, "state": state, **extra})

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

    async def _load(self, key: str) -> None:
        """Load `key` (the scheduler guarantees no other load or unload runs meanwhile)."""
        started = self._clock()
        logger.info("loading model %s", key)
        try:
            instance = await self._existing_instance(key)
            if instance is None:
                loaded = await self._load_outlasting_waiters(key)
                instance = loaded.instance_id
                self.context_lengths[key] = loaded.context_length
        except ProxyError as exc:
            self._upstream_result(exc)
            result = "timeout" if exc.status_code == 504 else "failed"
            self._metrics.loads.labels(key, result).inc()
            logger.warning("loading model %s failed: %s", key, exc.message)
            self._model_event(key, "failed", error=exc.message, code=exc.code)
            self.scheduler.load_failed(key, exc)
        else:
            self._upstream_result(None)
            elapsed = self._clock() - started
            self._metrics.loads.labels(key, "ok").inc()
            self._metrics.load_duration.labels(key).observe(elapsed)
            self._metrics.loaded.labels(key).set(1)
            logger.info("loaded model %s as %s in %.2f s", key, instance, elapsed)
            self._model_event(key, "loaded", instance_id=instance, load_s=round(elapsed, 3))
            self.scheduler.load_done(key, instance, self._clock())
        self._epoch += 1
        self._kick()

    async def _load_outlasting_waiters(self, key: str) -> Loaded:
        """LM Studio goes on with a load however long it takes, and another load meanwhile would
        make a second copy or overrun its memory. So the call stays open: the requests waiting
        get a 504 at `load_timeout`, while the model stays `loading` (no other load or unload
        starts, new requests for it wait) until LM Studio answers, for twice that at most."""
        limit = self._settings.upstream.load_timeout
        timer = anyio.CancelScope()
        assert self._tg is not None  # noqa: S101 - loads run in `run`'s task group
        self._tg.start_soon(self._fail_waiters_after, key, limit, timer)
        try:
            return await self._client.load(key, self._load_options(key), timeout_s=2 * limit)
        finally:
            timer.cancel()

    async def _fail_waiters_after(self, key: str, limit: float, scope: anyio.CancelScope) -> None:
        with scope:
            await anyio.sleep(limit)
            logger.warning("loading model %s takes longer than load_timeout (%g s)", key, limit)
            error = UpstreamTimeoutError(
                f"loading model {key!r} took longer than load_timeout ({limit:g} s); LM Studio "
                "goes on with it, and a later request for the model waits for that load",
                code="model_load_timeout",
            )
            self.scheduler.fail_waiters(key, error)
            self._kick()

    async def _existing_instance(self, key: str) -> str | None:
        """LM Studio's real state first: loading a loaded model would add a second instance."""
        catalog = await self._client.catalog()
        for info in catalog:
            if info.key == key and info.instances:
                self.context_lengths[key] = info.context_length
                return key if key in info.instances else info.instances[0]
        return None

    def _load_options(self, key: str) -> dict[str, Any]:
        options = self._settings.models.load_options.get(key)
        body: dict[str, Any] = dict(options.as_body()) if options is not None else {}
        if (context_length := self._context_overrides.get(key)) is not None:
            body["context_length"] = context_length
        return body

    async def _unload(self, action: sch.Unload) -> None:
        logger.info("unloading model %s (%s)", action.model, action.reason)
        try:
            await self._client.unload(action.instance_id)
        except ProxyError as exc:
            self._upstream_result(exc)
            logger.warning("unloading model %s failed: %s", action.model, exc.message)
            self._model_event(action.model, "failed", error=exc.message, code=exc.code)
            self.scheduler.unload_failed(action.model, self._clock())
        else:
            self._upstream_result(None)
            self._metrics.unloads.labels(action.model, action.reason).inc()
            self._metrics.loaded.labels(action.model).set(0)
            self._model_event(action.model, "unloaded", reason=str(action.reason))
            self.scheduler.unload_done(action.model)
        self._epoch += 1
        self._kick()

    # -- staying true to LM Studio ----------------------------------------------------------

    def _upstream_result(self, error: ProxyError | None) -> None:
        up = error is None or not isinstance(error, UpstreamUnavailableError)
        self.reachable = up
        self._metrics.upstream_up.set(1 if up else 0)

    async def refresh(self) -> None:
        """Reconcile with LM Studio's catalogue and loaded instances; never raises.

        Single-flight: a caller that arrives while a refresh runs waits for that one.
        """
        if self._refreshed is not None:
            await self._refreshed.wait()
            return
        self._refreshed = anyio.Event()
        epoch = self._epoch
        try:
            catalog = await self._client.catalog()
        except ProxyError as exc:
            self._upstream_result(exc)
            self.last_error = exc
            logger.warning("cannot read LM Studio's models: %s", exc.message)
            return
        finally:
            self._refreshed.set()
            self._refreshed = None
            self._last_refresh = self._clock()
        self._upstream_result(None)
        self.last_error = None
        self.catalog = {info.key: info for info in catalog}
        self.context_lengths.update(
            {info.key: info.context_length for info in catalog if info.instances}
        )
        self.catalog_known = True
        self.scheduler.set_catalog({info.key: info.size_bytes for info in catalog})
        if epoch == self._epoch:  # no load or unload finished meanwhile: the view is current
            instances = {info.key: info.instances for info in catalog if info.instances}
            self.scheduler.observed(instances, self._clock())
            self._report_duplicates()
        for key in self.catalog:  # every known model has its gauges, at 0 until used
            self._metrics.loaded.labels(key).set(1 if self._is_loaded(key) else 0)
            self._metrics.in_flight.labels(key)
            self._metrics.queued.labels(key)
        self._kick()

    def _report_duplicates(self) -> None:
        """Say once when LM Studio holds more than one instance of a model (they all count)."""
        for key, model in self.scheduler.models.items():
            extra = tuple(model.duplicates)
            if extra and self._duplicates.get(key) != extra:
                logger.warning(
                    "LM Studio holds %d instances of %s (%s); each counts toward capacity",
                    1 + len(extra),
                    key,
                    ", ".join((str(model.instance_id), *extra)),
                )
            self._duplicates[key] = extra

    def upstream_failed(self, error: ProxyError) -> None:
        """A request found LM Studio unreachable: note it and reconcile in the background."""
        self._upstream_result(error)
        if self._tg is not None and self._refreshed is None:
            self._tg.start_soon(self.refresh)
