"""Reconciler: the scheduler's hands and eyes upstream.

It makes the load and unload calls the scheduler decides and reports their outcome back, and it
reads LM Studio's catalogue and loaded instances so that the scheduler's view stays true to what
LM Studio really holds (models loaded or unloaded behind the proxy's back, duplicates, restarts).
Holding the catalogue, it also resolves the model names clients send. `ModelManager` starts its
calls as tasks and asks the scheduler what to do after each.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import TaskGroup

from proxy import scheduling as sch
from proxy.config import Settings
from proxy.errors import (
    BadRequestError,
    ModelNotFoundError,
    ProxyError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from proxy.events import EventBus
from proxy.lmstudio import LMStudioClient, Loaded, ModelInfo
from proxy.metrics import Metrics
from proxy.scheduler import Scheduler

logger = logging.getLogger("lmswitch.manager")  # the manager's lines, as operators know them

# An unknown model name refreshes the catalogue at most this often (a model may have just been
# downloaded), so that a client cannot make every bad request cost an upstream call.
_CATALOG_REFRESH_S = 1.0


@dataclass(frozen=True, slots=True)
class Resolved:
    """A request's `model` resolved: the model key to lease and the name to send upstream."""

    key: str
    upstream_name: str


class Reconciler:
    """Carries out loads and unloads, keeps the catalogue and loaded set in step with LM Studio,
    and resolves model names against them."""

    def __init__(
        self,
        client: LMStudioClient,
        settings: Settings,
        metrics: Metrics,
        events: EventBus,
        scheduler: Scheduler,
        *,
        clock: Callable[[], float],
        kick: Callable[[], None],
    ) -> None:
        self._client = client
        self._settings = settings
        self._metrics = metrics
        self._events = events
        self._scheduler = scheduler
        self._clock = clock
        self._kick = kick  # the manager's: ask the scheduler what to do now
        self.catalog: dict[str, ModelInfo] = {}
        self.catalog_known = False
        self.reachable = False
        self.last_error: ProxyError | None = None  # why the last catalogue read failed
        self.last_refresh = -math.inf
        self.context_overrides: dict[str, int] = {}  # from operators' load requests
        self.context_lengths: dict[str, int | None] = {}  # of loaded instances, as last seen
        self._epoch = 0  # bumped by every load and unload, to discard stale observations
        self._duplicates: dict[str, tuple[str, ...]] = {}  # as last reported
        self._refreshed: anyio.Event | None = None  # set when the running refresh ends

    # -- names ----------------------------------------------------------------------------

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
        for model in self._scheduler.models.values():
            if name == model.instance_id or name in model.duplicates:
                return model.key
        return None

    async def _refresh_for_unknown(self) -> bool:
        """Refresh the catalogue for an unknown name, at most once a second; True if it ran."""
        if self.catalog_known and self._clock() - self.last_refresh < _CATALOG_REFRESH_S:
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

    def model_event(self, key: str, state: str, **extra: Any) -> None:
        self._events.publish("model", {"model": key, "state": state, **extra})

    # -- loads and unloads --------------------------------------------------------------------

    async def load(self, key: str, task_group: TaskGroup) -> None:
        """Load `key` (the scheduler guarantees no other load or unload runs meanwhile);
        `task_group` runs its timer for the requests waiting."""
        started = self._clock()
        logger.info("loading model %s", key)
        try:
            instance = await self._existing_instance(key)
            if instance is None:
                loaded = await self._load_outlasting_waiters(key, task_group)
                instance = loaded.instance_id
                self.context_lengths[key] = loaded.context_length
        except ProxyError as exc:
            self._upstream_result(exc)
            result = "timeout" if exc.status_code == 504 else "failed"
            self._metrics.loads.labels(key, result).inc()
            logger.warning("loading model %s failed: %s", key, exc.message)
            self.model_event(key, "failed", error=exc.message, code=exc.code)
            self._scheduler.load_failed(key, exc)
        else:
            self._upstream_result(None)
            elapsed = self._clock() - started
            self._metrics.loads.labels(key, "ok").inc()
            self._metrics.load_duration.labels(key).observe(elapsed)
            self._metrics.loaded.labels(key).set(1)
            logger.info("loaded model %s as %s in %.2f s", key, instance, elapsed)
            self.model_event(key, "loaded", instance_id=instance, load_s=round(elapsed, 3))
            self._scheduler.load_done(key, instance, self._clock())
        self._epoch += 1
        self._kick()

    async def _load_outlasting_waiters(self, key: str, task_group: TaskGroup) -> Loaded:
        """LM Studio goes on with a load however long it takes, and another load meanwhile would
        make a second copy or overrun its memory. So the call stays open: the requests waiting
        get a 504 at `load_timeout`, while the model stays `loading` (no other load or unload
        starts, new requests for it wait) until LM Studio answers, for twice that at most."""
        limit = self._settings.upstream.load_timeout
        timer = anyio.CancelScope()
        task_group.start_soon(self._fail_waiters_after, key, limit, timer)
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
            self._scheduler.fail_waiters(key, error)
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
        if (context_length := self.context_overrides.get(key)) is not None:
            body["context_length"] = context_length
        return body

    async def unload(self, action: sch.Unload) -> None:
        logger.info("unloading model %s (%s)", action.model, action.reason)
        try:
            await self._client.unload(action.instance_id)
        except ProxyError as exc:
            self._upstream_result(exc)
            logger.warning("unloading model %s failed: %s", action.model, exc.message)
            self.model_event(action.model, "failed", error=exc.message, code=exc.code)
            self._scheduler.unload_failed(action.model, self._clock())
        else:
            self._upstream_result(None)
            self._metrics.unloads.labels(action.model, action.reason).inc()
            self._metrics.loaded.labels(action.model).set(0)
            self.model_event(action.model, "unloaded", reason=str(action.reason))
            self._scheduler.unload_done(action.model)
        self._epoch += 1
        self._kick()

    # -- staying true to LM Studio ------------------------------------------------------------

    def _upstream_result(self, error: ProxyError | None) -> None:
        up = error is None or not isinstance(error, UpstreamUnavailableError)
        self.reachable = up
        self._metrics.upstream_up.set(1 if up else 0)

    def upstream_failed(self, error: ProxyError, task_group: TaskGroup | None) -> None:
        """A request found LM Studio unreachable: note it and reconcile in the background."""
        self._upstream_result(error)
        if task_group is not None and self._refreshed is None:
            task_group.start_soon(self.refresh)

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
            self.last_refresh = self._clock()
        self._upstream_result(None)
        self.last_error = None
        self.catalog = {info.key: info for info in catalog}
        self.context_lengths.update(
            {info.key: info.context_length for info in catalog if info.instances}
        )
        self.catalog_known = True
        self._scheduler.set_catalog({info.key: info.size_bytes for info in catalog})
        if epoch == self._epoch:  # no load or unload finished meanwhile: the view is current
            instances = {info.key: info.instances for info in catalog if info.instances}
            self._scheduler.observed(instances, self._clock())
            self._report_duplicates()
        for key in self.catalog:  # every known model has its gauges, at 0 until used
            self._metrics.loaded.labels(key).set(1 if self._scheduler.is_loaded(key) else 0)
            self._metrics.in_flight.labels(key)
            self._metrics.queued.labels(key)
        self._kick()

    def _report_duplicates(self) -> None:
        """Say once when LM Studio holds more than one instance of a model (they all count)."""
        for key, model in self._scheduler.models.items():
            extra = tuple(model.duplicates)
            if extra and self._duplicates.get(key) != extra:
                logger.warning(
                    "LM Studio holds %d instances of %s (%s); each counts toward capacity",
                    1 + len(extra),
                    key,
                    ", ".join((str(model.instance_id), *extra)),
                )
            self._duplicates[key] = extra
