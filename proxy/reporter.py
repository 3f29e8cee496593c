"""Reporter: says what happened to the models, as log lines, metrics and `model` events.

`ModelManager` decides and feeds the scheduler; it tells this what came of it. Holding no state
of its own but what it has already said, it never changes what happens (docs/design.md §4.3).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from proxy.errors import ProxyError, UpstreamUnavailableError
from proxy.events import EventBus
from proxy.metrics import Metrics
from proxy.scheduling import Model, UnloadReason

logger = logging.getLogger("lmswitch.manager")  # the manager's lines, as operators know them

# A log record's attribute holding its structured fields: the JSON log (`proxy.server`) adds them
# to the line, so that `lmswitch simulate --from-log` reads loads and unloads without parsing
# the message (docs/design.md §7.3). Text lines say the same in words.
LOG_FIELDS = "lmswitch_fields"

# While a host's models cannot be read, the warning is said again at most this often (a new
# kind of failure is said at once).
UNREADABLE_REPEAT_S = 60.0


class Reporter:
    """The log lines, metrics and `model` events of the models' changes of state."""

    def __init__(
        self,
        metrics: Metrics,
        events: EventBus,
        *,
        upstream: str,
        is_loaded: Callable[[str], bool],
        url: str,
        in_pool: bool,
        clock: Callable[[], float],
    ) -> None:
        self._metrics = metrics
        self._events = events
        self._upstream = upstream  # the host's name, from the configuration
        self._is_loaded = is_loaded  # the scheduler's, read when an event is published
        self._duplicates: dict[str, tuple[str, ...]] = {}  # as last reported
        self._up: bool | None = None  # the host, as last reported
        self._url = url  # where it listens, from the configuration
        self._in_pool = in_pool  # one of `upstreams` (else `upstream`)
        self._clock = clock
        self._read = False  # its models were read at least once
        self._unreadable_since: float | None = None  # the first failed listing in a row
        self._failures = 0  # failed listings in a row
        self._warned: tuple[float, str | None] = (-math.inf, None)  # when, and the error's code

    def model_event(self, key: str, state: str, **extra: Any) -> None:
        """A `model` event; `loaded` is the model's state after the change."""
        loaded = self._is_loaded(key)
        event = {"model": key, "upstream": self._upstream, "state": state, "loaded": loaded}
        self._events.publish("model", {**event, **extra})

    def queue(self, waiting: list[dict[str, Any]]) -> None:
        """A `queue` event: the models requests wait for on the host, as `/api/v1/status`
        lists them in `waiting`."""
        self._events.publish("queue", {"upstream": self._upstream, "waiting": waiting})

    def upstream(self, up: bool) -> None:
        """The host is up (its models read, its last call answered) or down: the gauge, and an
        `upstream` event when that changes."""
        self._metrics.upstream_up.labels(self._upstream).set(1 if up else 0)
        if up is not self._up:
            self._up = up
            self._events.publish("upstream", {"upstream": self._upstream, "up": up})

    def _fields(self, event: str, key: str, **fields: Any) -> dict[str, Any]:
        """`extra` for a log line: its structured fields (`LOG_FIELDS`)."""
        return {LOG_FIELDS: {"event": event, "model": key, "upstream": self._upstream, **fields}}

    def loading(self, key: str, expected_s: float | None, size_bytes: int = 0) -> None:
        """A load begins; `expected_s`, how long it should take (None if unknown)."""
        expected = None if expected_s is None else round(expected_s, 3)
        extra = self._fields("loading", key, size_bytes=size_bytes, expected_load_s=expected)
        if expected_s is None:
            logger.info("loading model %s on %s", key, self._upstream, extra=extra)
        else:
            logger.info(
                "loading model %s on %s (about %.1f s)",
                key,
                self._upstream,
                expected_s,
                extra=extra,
            )
        self.model_event(key, "loading", expected_load_s=expected)

    def loaded(self, key: str, instance_id: str, elapsed_s: float) -> None:
        self._metrics.loads.labels(key, "ok", self._upstream).inc()
        self._metrics.load_duration.labels(key, self._upstream).observe(elapsed_s)
        self._metrics.loaded.labels(key, self._upstream).set(1)
        logger.info(
            "loaded model %s as %s on %s in %.2f s",
            key,
            instance_id,
            self._upstream,
            elapsed_s,
            extra=self._fields(
                "loaded", key, instance_id=instance_id, elapsed_s=round(elapsed_s, 3)
            ),
        )
        self.model_event(key, "loaded", instance_id=instance_id, load_s=round(elapsed_s, 3))

    def load_failed(self, key: str, error: ProxyError) -> None:
        outcome = "timeout" if error.status_code == 504 else "failed"
        self._metrics.loads.labels(key, outcome, self._upstream).inc()
        logger.warning("loading model %s on %s failed: %s", key, self._upstream, error.message)
        self.model_event(key, "failed", error=error.message, code=error.code)

    def load_refused(
        self, key: str, error: ProxyError, beside: Iterable[str], *, making_room: bool
    ) -> None:
        """LM Studio's memory guardrail refused a load; the scheduler makes room and tries
        again, or answers the refusal if nothing more may be unloaded (docs/design.md §2.8)."""
        self._metrics.loads.labels(key, "failed", self._upstream).inc()
        others = ", ".join(sorted(beside)) or "nothing"
        logger.warning(
            "LM Studio on %s refused to load model %s beside %s for lack of memory; %s",
            self._upstream,
            key,
            others,
            "making room" if making_room else "nothing more may be unloaded",
        )
        self.model_event(
            key, "refused", error=error.message, code=error.code, making_room=making_room
        )

    def capacity(self, learned: Mapping[str, Any]) -> None:
        """A `capacity` event: what is learned of the host's capacity changed (§2.8)."""
        size = learned.get("learned_bytes")
        shown = "no limit known" if size is None else f"{size / 1e9:.2f} GB"
        logger.info("capacity of %s: %s (%s)", self._upstream, shown, learned.get("how"))
        self._events.publish("capacity", {"upstream": self._upstream, **learned})

    def load_slow(self, key: str, limit_s: float) -> None:
        logger.warning("loading model %s takes longer than load_timeout (%g s)", key, limit_s)

    def draining(self, key: str) -> None:
        logger.info("draining model %s (no new requests until it is unloaded)", key)
        self.model_event(key, "draining")

    def unloading(self, key: str, reason: UnloadReason) -> None:
        extra = self._fields("unloading", key, reason=str(reason))
        logger.info("unloading model %s on %s (%s)", key, self._upstream, reason, extra=extra)
        self.model_event(key, "unloading", reason=str(reason))

    def unloaded(self, key: str, reason: UnloadReason, elapsed_s: float) -> None:
        logger.info(
            "unloaded model %s on %s in %.2f s",
            key,
            self._upstream,
            elapsed_s,
            extra=self._fields("unloaded", key, reason=str(reason), elapsed_s=round(elapsed_s, 3)),
        )
        self._metrics.unloads.labels(key, reason, self._upstream).inc()
        self._metrics.loaded.labels(key, self._upstream).set(0)
        self.model_event(key, "unloaded", reason=str(reason))

    def unload_failed(self, key: str, error: ProxyError) -> None:
        logger.warning("unloading model %s on %s failed: %s", key, self._upstream, error.message)
        self.model_event(key, "failed", error=error.message, code=error.code)

    def adopted(self, key: str) -> None:
        logger.info("model %s was loaded on %s outside the proxy; adopted", key, self._upstream)
        self._metrics.loaded.labels(key, self._upstream).set(1)
        self.model_event(key, "loaded", adopted=True)

    def vanished(self, key: str) -> None:
        logger.info("model %s was unloaded on %s outside the proxy", key, self._upstream)
        self._metrics.loaded.labels(key, self._upstream).set(0)
        self._metrics.unloads.labels(key, UnloadReason.EXTERNAL, self._upstream).inc()
        self.model_event(key, "unloaded", reason=str(UnloadReason.EXTERNAL))

    def unreadable(self, error: ProxyError) -> None:
        """A listing failed. The first of a run of failures (and a new kind of failure) is said
        at once, with what to do when LM Studio is not reachable; the others at most once every
        UNREADABLE_REPEAT_S, with how long it has lasted."""
        now = self._clock()
        if self._unreadable_since is None:
            self._unreadable_since, self._failures = now, 0
        self._failures += 1
        warned_at, warned_code = self._warned
        if self._failures == 1 or error.code != warned_code:
            logger.warning(
                "cannot read LM Studio's models on %s: %s%s",
                self._upstream,
                error.message,
                self._fix(error),
            )
        elif now - warned_at >= UNREADABLE_REPEAT_S:
            logger.warning(
                "still cannot read LM Studio's models on %s, for %.0f s (%d failed attempts): %s",
                self._upstream,
                now - self._unreadable_since,
                self._failures,
                error.message,
            )
        else:
            return
        self._warned = (now, error.code)

    def _fix(self, error: ProxyError) -> str:
        if not isinstance(error, UpstreamUnavailableError):
            return ""  # the others' messages say what is wrong (an old LM Studio, a token)
        where = (
            f"the base_url of {self._upstream} in upstreams"
            if self._in_pool
            else "upstream.base_url (LMSWITCH_UPSTREAM__BASE_URL)"
        )
        return (
            ". Start LM Studio's server (in LM Studio: Developer > Start server, or "
            f"`lms server start`), or set {where} to where it listens. lmswitch keeps trying, "
            f"and repeats this warning every {UNREADABLE_REPEAT_S:.0f} s until it answers"
        )

    def readable(self) -> None:
        """A listing was read: say so if the ones before it failed."""
        if self._unreadable_since is not None:
            logger.info(
                "LM Studio on %s answers%s at %s, after %.0f s and %d failed attempts",
                self._upstream,
                " again" if self._read else "",
                self._url,
                self._clock() - self._unreadable_since,
                self._failures,
            )
            self._unreadable_since, self._failures = None, 0
            self._warned = (-math.inf, None)
        self._read = True

    def catalog(self, keys: Iterable[str]) -> None:
        """Every known model has its gauges, at their values (0 until used)."""
        for key in keys:
            self._metrics.loaded.labels(key, self._upstream).set(1 if self._is_loaded(key) else 0)
            self._metrics.in_flight.labels(key)
            self._metrics.queued.labels(key)

    def duplicates(self, models: Mapping[str, Model]) -> None:
        """Say once when LM Studio holds more than one instance of a model (they all count)."""
        for key, model in models.items():
            extra = tuple(model.duplicates)
            if extra and self._duplicates.get(key) != extra:
                logger.warning(
                    "LM Studio holds %d instances of %s (%s); each counts toward capacity",
                    1 + len(extra),
                    key,
                    ", ".join((str(model.instance_id), *extra)),
                )
            self._duplicates[key] = extra
