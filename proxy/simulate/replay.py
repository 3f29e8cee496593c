"""Replay: a trace's requests through the real `proxy.scheduler.Scheduler`, in virtual time.

Driven as `proxy.host.Host` drives it (docs/design.md §3.1): an arrival tries the fast path,
else joins the queue; every event is followed by `decide`, whose actions are carried out (a
grant starts the request's service, a load or unload ends after the trace's `load_s` or
`unload_s`); a release that settles needs no `decide`; `next_wakeup` sets the one alarm. No
sockets, no sleeping: the clock jumps from one event to the next.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import Counter
from dataclasses import dataclass, field

from proxy.scheduler import Scheduler
from proxy.scheduling import Drain, Fail, Grant, Load, Phase, Policy, Unload, UnloadReason
from proxy.simulate.trace import Trace

# Event kinds, in the order they are carried out when they fall at the same time.
_END, _LOADED, _UNLOADED, _ARRIVE, _WAKE = range(5)


@dataclass(slots=True)
class Span:
    """A model resident over [start, end): `loading`, `loaded` (ready or draining) or
    `unloading`."""

    model: str
    phase: str
    start: float
    end: float


@dataclass(slots=True)
class Run:
    """What one replay did: the figures of the report, and the timeline of the page."""

    policy: Policy
    requests: int = 0
    granted: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    waits: list[float] = field(default_factory=list)  # of the granted requests, in seconds
    waited_on_load: int = 0
    loads: int = 0
    load_seconds: float = 0.0
    unloads: int = 0
    evictions: int = 0
    total_s: float = 0.0  # when the last request was answered
    wall_s: float = 0.0
    spans: list[Span] = field(default_factory=list)
    queue: list[tuple[float, int]] = field(default_factory=list)  # (time, waiters) on change


def replay(trace: Trace, policy: Policy, *, timeline: bool = True) -> Run:
    """Replay `trace` under `policy`; `timeline` records spans and queue lengths (the page)."""
    return _Replay(trace, policy, timeline).run()


class _Replay:
    def __init__(self, trace: Trace, policy: Policy, timeline: bool) -> None:
        self.trace = trace
        self.sched = Scheduler(policy)
        self.out = Run(policy)
        self.timeline = timeline
        self.heap: list[tuple[float, int, int, int | str]] = []
        self.seq = 0
        self.alarm = math.inf
        self.pending: dict[int, int] = {}  # waiter id -> request index
        self.arrived: dict[int, float] = {}  # request index -> when it was sent (queued ones)
        self.on_load: set[int] = set()  # requests queued while their model was not ready
        self.open: dict[str, Span] = {}
        self.queue_len = 0
        requests = trace.requests
        # Closed-loop requests follow their client's previous request, in file order.
        self.next_of: dict[int, int] = {}
        last: dict[str | None, int] = {}
        self.first_closed: list[int] = []
        for i, request in enumerate(requests):
            previous = last.get(request.client) if request.client is not None else None
            if request.after is not None:
                if previous is None:
                    self.first_closed.append(i)
                else:
                    self.next_of[previous] = i
            last[request.client] = i

    def push(self, t: float, kind: int, data: int | str) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, kind, self.seq, data))

    def run(self) -> Run:
        started = time.perf_counter()
        trace, sched = self.trace, self.sched
        sched.set_catalog({key: spec.size_bytes for key, spec in trace.models.items()})
        if trace.loaded:
            sched.observed({key: [key] for key in trace.loaded}, 0.0)
            for key in trace.loaded:
                self._span(key, "loaded", 0.0)
            sched.decide(0.0)
        requests = trace.requests
        for i, request in enumerate(requests):
            if request.after is None:
                self.push(request.t, _ARRIVE, i)
        for i in self.first_closed:
            self.push(requests[i].after or 0.0, _ARRIVE, i)
        heap = self.heap
        while heap:
            now, kind, _, data = heapq.heappop(heap)
            if kind == _ARRIVE:
                self._arrive(now, data)  # type: ignore[arg-type]
            elif kind == _END:
                self._end(now, data)  # type: ignore[arg-type]
            elif kind == _LOADED:
                key = str(data)
                sched.load_done(key, key, now, took_s=trace.models[key].load_s)
                self._span(key, "loaded", now)
                self._kick(now)
            elif kind == _UNLOADED:
                key = str(data)
                sched.unload_done(key)
                self._close(key, now)
                self._kick(now)
            elif now == self.alarm:  # a stale alarm (moved since) is skipped
                self.alarm = math.inf
                self._kick(now)
        for key in list(self.open):
            self._close(key, self.out.total_s)
        self.out.wall_s = time.perf_counter() - started
        return self.out

    # -- requests ---------------------------------------------------------------------------

    def _arrive(self, now: float, i: int) -> None:
        request = self.trace.requests[i]
        sched = self.sched
        self.out.requests += 1
        if sched.try_grant(request.model, now, request.client):
            self._granted(now, i, 0.0)
            return
        waiter = sched.arrive(request.model, now, client=request.client)
        self.pending[waiter.id] = i
        self.arrived[i] = now
        if sched.models[request.model].phase is not Phase.READY:
            self.on_load.add(i)  # as `Host._enqueue` tells it: its model must be loaded
        self._kick(now)

    def _granted(self, now: float, i: int, waited: float) -> None:
        out = self.out
        out.granted += 1
        out.waits.append(waited)
        if i in self.on_load:
            self.on_load.discard(i)
            out.waited_on_load += 1
        self.push(now + self.trace.requests[i].service_s, _END, i)

    def _end(self, now: float, i: int) -> None:
        request = self.trace.requests[i]
        sched = self.sched
        sched.release(request.model, now, request.client)
        self._answered(now, i)
        if not sched.release_settles(request.model):
            self._kick(now)
        elif sched.policy.idle_ttl_s is not None:
            self._wake(now)

    def _answered(self, now: float, i: int) -> None:
        self.out.total_s = max(self.out.total_s, now)
        if (following := self.next_of.get(i)) is not None:
            self.push(now + (self.trace.requests[following].after or 0.0), _ARRIVE, following)

    # -- decisions --------------------------------------------------------------------------

    def _kick(self, now: float) -> None:
        """Ask the scheduler what to do now and do it, as `Host._kick` does."""
        sched, out, models = self.sched, self.out, self.trace.models
        for action in sched.decide(now):
            if isinstance(action, Grant):
                i = self.pending.pop(action.waiter.id)
                self._granted(now, i, now - self.arrived.pop(i))
            elif isinstance(action, Fail):
                i = self.pending.pop(action.waiter.id)
                self.arrived.pop(i)
                self.on_load.discard(i)
                out.failed[str(action.reason)] += 1
                self._answered(now, i)
            elif isinstance(action, Load):
                spec = models[action.model]
                out.loads += 1
                out.load_seconds += spec.load_s
                self._span(action.model, "loading", now)
                self.push(now + spec.load_s, _LOADED, action.model)
            elif isinstance(action, Unload):
                out.unloads += 1
                if action.reason is UnloadReason.EVICTED:
                    out.evictions += 1
                self._span(action.model, "unloading", now)
                self.push(now + models[action.model].unload_s, _UNLOADED, action.model)
            elif isinstance(action, Drain):
                pass  # still loaded until it is unloaded; the page shows it as such
        if self.timeline and len(sched.waiters) != self.queue_len:
            self.queue_len = len(sched.waiters)
            out.queue.append((now, self.queue_len))
        self._wake(now)

    def _wake(self, now: float) -> None:
        wake = self.sched.next_wakeup(now)
        if wake is None:
            self.alarm = math.inf
        elif wake != self.alarm:
            self.alarm = wake
            self.push(wake, _WAKE, 0)

    # -- the timeline -----------------------------------------------------------------------

    def _span(self, key: str, phase: str, now: float) -> None:
        self._close(key, now)
        if self.timeline:
            self.open[key] = Span(key, phase, now, now)

    def _close(self, key: str, now: float) -> None:
        if (span := self.open.pop(key, None)) is not None:
            span.end = now
            self.out.spans.append(span)
