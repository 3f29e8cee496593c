"""The pool of hosts under Hypothesis' stateful testing, plus two fixed workloads.

`PoolMachine` plays the pool driver as `proxy.manager` does it (every request placed by
`proxy.placement.place` over each host's `Scheduler.place_view`; a replica warmed where placement
names one; a request whose host went down while it waited placed again, with its first queue
budget) and a fake LM Studio per host, all on one fake clock. It checks after every step that
each host keeps its single-host rules and that the pool keeps its own: no more copies of a model
than its `replicas`, no request on a host that lacks its model, every wait bounded. `PoolSim` is
a tiny discrete-event driver for the fixed workloads.
"""

from __future__ import annotations

import heapq
import itertools
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from proxy.placement import Placement, Where, place
from proxy.scheduler import Scheduler
from proxy.scheduling import (
    RESIDENT,
    Action,
    Drain,
    Fail,
    FailReason,
    Grant,
    Load,
    Phase,
    Policy,
    Unload,
    UnloadReason,
    Waiter,
)

GiB = 2**30
KEYS = ("m0", "m1", "m2", "m3", "m4")
EPS = 1e-9
QUEUE_TIMEOUT_S = 5.0  # the pool's one scheduler.queue_timeout


# -- the stateful machine -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PoolSetup:
    sizes: dict[str, int]  # a model's size, the same on every host that has it
    catalogs: list[frozenset[str]]  # per host: the models downloaded there
    policies: list[Policy]  # per host
    pinned: frozenset[str]
    replicas: dict[str, int]


@st.composite
def pool_setups(draw: st.DrawFn) -> PoolSetup:
    keys = KEYS[: draw(st.integers(3, 5))]
    sizes = {key: draw(st.integers(2, 8)) * GiB for key in keys}
    # The scheduler's settings are the pool's; the limits are each host's.
    grace = draw(st.sampled_from([0.0, 0.5, 2.0]))
    ttl = draw(st.sampled_from([None, None, None, 0.5, 3.0]))
    catalogs, policies = [], []
    for _ in range(draw(st.sampled_from([1, 2, 2, 3, 3, 4]))):
        catalogs.append(draw(st.frozensets(st.sampled_from(keys), min_size=1)))
        budget = draw(st.sampled_from([None, 6, 9, 12, 16]))
        policies.append(
            Policy(
                max_loaded=draw(st.sampled_from([0, 1, 1, 1, 2, 3])),
                memory_budget=None if budget is None else budget * GiB,
                swap_grace_s=grace,
                idle_ttl_s=ttl,
                queue_timeout_s=QUEUE_TIMEOUT_S,
            )
        )
    pinned = draw(st.frozensets(st.sampled_from(keys), max_size=1))
    replicas = {key: draw(st.integers(1, 2)) for key in keys}
    return PoolSetup(sizes, catalogs, policies, pinned, replicas)


@dataclass(slots=True)
class Host:
    """One host: its scheduler, and the fake LM Studio behind it."""

    name: str
    s: Scheduler
    catalog: dict[str, int]
    up: bool = True
    truth: set[str] = field(default_factory=set)  # the models LM Studio holds
    inflight: Load | Unload | None = None
    wake: float | None = None
    load_failed_for: str | None = None
    # Models it held when it came back up while others held them too: not the pool's loads.
    returned: set[str] = field(default_factory=set)


@dataclass(slots=True)
class Request:
    key: str
    arrived: float  # its first arrival: its queue budget counts from then, wherever it waits
    takes_lease: bool = True  # False: a replica warmed where placement named one
    avoid: list[str] = field(default_factory=list)  # hosts it waited on that went down


class PoolMachine(RuleBasedStateMachine):
    """The pool driver and a fake LM Studio per host, checking the contract after each step.

    The replicas rule, precisely: when a host's scheduler returns a `Load` of a model, the hosts
    that are up and hold it (loading, ready, draining or unloading; the new load included)
    number at most its `replicas`. The one exception is a host that comes back up holding the
    model while it is on more up hosts than `replicas` as placement counts them (held, or
    queued for a load there): the pool placed those while that host was down and could not
    count it. That copy is then as one loaded behind the proxy's back, left out of the count
    until the model leaves that host or is on no more hosts than `replicas` again.
    """

    def __init__(self) -> None:
        super().__init__()
        self.hosts: list[Host] = []
        self.sizes: dict[str, int] = {}
        self.keys: list[str] = []
        self.replicas: dict[str, int] = {}
        self.pinned: set[str] = set()
        self.now = 0.0
        self.before = 0.0  # the time of the tick before the last one
        self.waiting: dict[tuple[int, int], tuple[Request, Waiter]] = {}  # by (host, waiter id)
        self.running: list[tuple[int, str]] = []  # one entry per lease held: (host, model)
        self.retry: list[Request] = []  # to place again once the hosts' decisions are carried out

    # -- set-up and events ----------------------------------------------------------------------

    @initialize(setup=pool_setups())
    def start(self, setup: PoolSetup) -> None:
        self.sizes = dict(setup.sizes)
        self.keys = list(setup.sizes)
        self.replicas = dict(setup.replicas)
        self.pinned = set(setup.pinned)
        for n, (keys, policy) in enumerate(zip(setup.catalogs, setup.policies, strict=True)):
            host = Host(f"h{n}", Scheduler(policy), {key: setup.sizes[key] for key in sorted(keys)})
            host.s.set_catalog(host.catalog)
            for key in setup.pinned:  # the pool pins a model on every host
                host.s.pin(key, True)
            self.hosts.append(host)
            self.kick(n)
        self.settle()

    @rule(data=st.data(), n=st.sampled_from([1, 1, 2, 3]))
    def arrive(self, data: st.DataObject, n: int) -> None:
        """Requests for one model of the pool's (it may be only on hosts that are down)."""
        offered = sorted({key for host in self.hosts for key in host.catalog})
        key = data.draw(st.sampled_from(offered), label="model")
        for _ in range(n):
            self.place_request(Request(key, self.now))
            self.settle()

    @precondition(lambda self: bool(self.running))
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        n, key = self.running.pop(data.draw(st.integers(0, len(self.running) - 1), label="lease"))
        self.hosts[n].s.release(key, self.now)
        self.kick(n)
        self.settle()

    @precondition(lambda self: bool(self.waiting))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        n, waiter_id = data.draw(st.sampled_from(sorted(self.waiting)), label="waiter")
        assert self.hosts[n].s.cancel(waiter_id), "a waiting request could not leave the queue"
        del self.waiting[n, waiter_id]
        self.kick(n)
        self.settle()

    @precondition(lambda self: any(h.inflight is not None for h in self.hosts))
    @rule(data=st.data(), ok=st.sampled_from([True, True, True, False]))
    def upstream_returns(self, data: st.DataObject, ok: bool) -> None:
        """A host's load or unload call returns (also on a host that went down meanwhile)."""
        busy = [n for n, h in enumerate(self.hosts) if h.inflight is not None]
        self.complete(data.draw(st.sampled_from(busy), label="host"), ok=ok)
        self.settle()

    @rule(dt=st.sampled_from([0.0, 0.1, 0.25, 0.3, 1.0, 2.0, 6.0]))
    def advance(self, dt: float) -> None:
        self.tick(self.now + dt)

    @precondition(lambda self: any(h.wake is not None for h in self.hosts))
    @rule()
    def advance_to_wakeup(self) -> None:
        self.tick(min(h.wake for h in self.hosts if h.wake is not None))

    @rule(data=st.data())
    def host_goes_down_or_up(self, data: st.DataObject) -> None:
        """A host stops answering (its listings fail, placement passes it over), or answers
        again, holding what it held (nothing changed behind the proxy's back)."""
        n = data.draw(st.integers(0, len(self.hosts) - 1), label="host")
        host = self.hosts[n]
        if host.up:
            host.up = False
            host.returned.clear()
            host.s.set_unreadable("LM Studio did not answer")
            self.kick(n)
        else:
            self.bring_up(n)
        self.settle()

    def bring_up(self, n: int) -> None:
        host = self.hosts[n]
        host.up = True
        host.s.set_unreadable(None)
        host.returned = {key for key in self.keys if n in self.holders(key) and self.surplus(key)}
        self.kick(n)

    @rule(data=st.data(), pinned=st.booleans())
    def pin(self, data: st.DataObject, pinned: bool) -> None:
        """An operator pins a model (or unpins it): on every host, as the pool does."""
        key = data.draw(st.sampled_from(self.keys), label="model")
        (self.pinned.add if pinned else self.pinned.discard)(key)
        for n, host in enumerate(self.hosts):
            host.s.pin(key, pinned)
            self.kick(n)
        self.settle()

    @rule(data=st.data(), everywhere=st.booleans())
    def operator_unload(self, data: st.DataObject, everywhere: bool) -> None:
        """An operator unloads a model on one host, or on every host (as the pool's unload)."""
        key = data.draw(st.sampled_from(self.keys), label="model")
        last = len(self.hosts) - 1
        for n in range(len(self.hosts)) if everywhere else [data.draw(st.integers(0, last))]:
            self.hosts[n].s.request_unload(key)
            self.kick(n)
        self.settle()

    # -- the pool driver ------------------------------------------------------------------------

    def place_request(self, request: Request) -> None:
        """As `ModelManager._placement` then `Host.acquire`: place, warm a replica, queue."""
        hosts = [n for n, h in enumerate(self.hosts) if h.name not in request.avoid]
        views = [
            self.hosts[n].s.place_view(
                request.key,
                self.hosts[n].name,
                up=self.hosts[n].up,
                has=request.key in self.hosts[n].catalog,
                size=self.hosts[n].catalog.get(request.key, 0),
            )
            for n in hosts
        ]
        placement = place(views, self.replicas[request.key])
        # Placement is None only if no host has the model, and every request here is for one
        # that some host has (a host not avoided, for one placed again).
        having = [self.hosts[n].name for n in hosts if request.key in self.hosts[n].catalog]
        assert placement is not None, f"no placement for {request.key}, which {having} have"
        self.check_placement(request.key, placement, hosts)
        if placement.replica is not None:
            self.enqueue(
                self.index(placement.replica), Request(request.key, self.now, takes_lease=False)
            )
        self.enqueue(self.index(placement.host), request)

    def index(self, name: str) -> int:
        return next(n for n, h in enumerate(self.hosts) if h.name == name)

    def enqueue(self, n: int, request: Request) -> None:
        waiter = self.hosts[n].s.arrive(
            request.key, request.arrived, takes_lease=request.takes_lease
        )
        assert waiter.deadline == request.arrived + QUEUE_TIMEOUT_S, "queue budget not kept"
        self.waiting[n, waiter.id] = (request, waiter)
        self.kick(n)

    def tick(self, when: float) -> None:
        """Time passes and every host decides; before its `next_wakeup`, a host has nothing
        to do (the pool wakes each host only then, or on an event of its own)."""
        assert when >= self.now
        quiet = [h.wake is None or when < h.wake for h in self.hosts]
        self.before, self.now = self.now, when
        for n in range(len(self.hosts)):
            self.kick(n, quiet=quiet[n])
        self.settle()

    def complete(self, n: int, *, ok: bool) -> None:
        """The host's load or unload call returns."""
        host = self.hosts[n]
        action, host.inflight = host.inflight, None
        assert action is not None
        key = action.model
        if isinstance(action, Load):
            if ok:
                host.truth.add(key)
                host.s.load_done(key, key, self.now)
            else:
                host.load_failed_for = key
                host.s.load_failed(key, RuntimeError("no memory"))
        elif ok:
            host.truth.discard(key)
            host.s.unload_done(key)
        else:
            host.s.unload_failed(key, self.now)
        self.kick(n)

    def kick(self, n: int, *, quiet: bool = False) -> None:
        """Ask host `n`'s scheduler what to do now and carry it out."""
        host = self.hosts[n]
        actions = host.s.decide(self.now)
        if quiet:
            assert not actions, f"{host.name} acted before next_wakeup ({host.wake}): {actions}"
        upstream = [a for a in actions if isinstance(a, Load | Unload)]
        assert len(upstream) <= 1, f"more than one upstream call at once on {host.name}"
        for i, action in enumerate(actions):
            self.carry_out(n, action, actions[i + 1 :])
        host.load_failed_for = None
        host.wake = host.s.next_wakeup(self.now)

    def settle(self) -> None:
        """Place again the requests whose host went down, then check the contract."""
        while self.retry:
            self.place_request(self.retry.pop(0))
        self.check()

    def carry_out(self, n: int, action: Action, later: list[Action]) -> None:
        host = self.hosts[n]
        if isinstance(action, Grant | Fail):
            entry = self.waiting.pop((n, action.waiter.id), None)
            assert entry is not None, f"{action} of a request not waiting on {host.name}"
            request, waiter = entry
            if isinstance(action, Fail):
                self.check_fail(n, request, action)
                return
            assert self.now < waiter.deadline, f"grant after the deadline: {waiter} at {self.now}"
            key = waiter.model
            assert key in host.catalog, f"{key} granted on {host.name}, which lacks it"
            model = host.s.models[key]
            moved = any(isinstance(a, Drain | Unload) and a.model == key for a in later)
            assert model.phase is Phase.READY or moved, f"grant on a model that is {model.phase}"
            assert key in host.truth, f"grant on {key}, which {host.name}'s LM Studio lacks"
            if request.takes_lease:
                self.running.append((n, key))
        elif isinstance(action, Load):
            self.check_load(n, action)
            host.inflight = action
        elif isinstance(action, Unload):
            assert host.inflight is None, f"{action} while {host.inflight} is in flight"
            assert action.instance_id in host.truth, "unload of an unknown instance"
            assert (n, action.model) not in self.running, f"unload of {action.model} under a lease"
            if action.reason is UnloadReason.ADMIN:
                assert host.s.models[action.model].unload_requested
            else:
                assert host.up, "an eviction on a host whose state could not be read"
                assert action.model not in self.pinned, f"pinned model unloaded ({action.reason})"
            host.inflight = action
        else:
            assert isinstance(action, Drain), f"unexpected {action}"
            model = host.s.models[action.model]
            assert not (model.pinned and not model.unload_requested), "pinned model drained"

    def check_fail(self, n: int, request: Request, action: Fail) -> None:
        host, waiter = self.hosts[n], action.waiter
        if action.reason is FailReason.EXPIRED:
            # Not late: the tick before this one came before its deadline.
            assert self.before < waiter.deadline <= self.now, f"expired at {self.now}: {waiter}"
        elif action.reason is FailReason.NO_FIT:
            assert self.never_fits(n, waiter.model), f"refused though it fits: {action.message}"
        elif action.reason is FailReason.UNREADABLE:
            assert not host.up, f"failed as unreadable on {host.name}, which is up"
            assert host.s.models[waiter.model].phase is Phase.ABSENT
            # As `ModelManager.acquire`: a request whose host is down goes to another that is
            # up and has its model, if any, with what is left of its budget. Only hosts it has
            # not waited on yet count here: placing it among none would find no host at all.
            others = [
                h
                for h in self.hosts
                if h is not host
                and h.up
                and waiter.model in h.catalog
                and h.name not in request.avoid
            ]
            if request.takes_lease and others:
                self.retry.append(
                    Request(request.key, request.arrived, avoid=[*request.avoid, host.name])
                )
        else:
            assert action.reason is FailReason.LOAD_FAILED, f"unexpected {action}"
            assert waiter.model == host.load_failed_for, "failed by another model's load"

    def check_load(self, n: int, action: Load) -> None:
        host, key = self.hosts[n], action.model
        assert host.inflight is None, f"{action} while {host.inflight} is in flight"
        assert host.up, f"a load on {host.name}, whose state could not be read"
        assert key in host.catalog, f"a load of {key} on {host.name}, which lacks it"
        assert key not in host.truth, "a second load of a loaded model"
        assert any(n == m and r.key == key for (m, _), (r, _) in self.waiting.items()), (
            "a load nobody waits for"
        )
        assert self.fits(n, key), f"{action} exceeds {host.name}'s capacity: {host.truth}"
        holders = self.holders(key)
        counted = [m for m in holders if key not in self.hosts[m].returned]
        assert len(counted) <= self.replicas[key], (
            f"{key} loaded on {host.name} while on {[self.hosts[m].name for m in holders]} "
            f"(replicas {self.replicas[key]})"
        )

    # -- capacity and copies, as the test sees them ---------------------------------------------

    def holders(self, key: str) -> list[int]:
        """The hosts that are up and hold `key`: loading, ready, draining or unloading it."""
        return [
            n
            for n, h in enumerate(self.hosts)
            if h.up and key in h.s.models and h.s.models[key].phase in RESIDENT
        ]

    def surplus(self, key: str) -> bool:
        """Whether `key` is on more up hosts than its `replicas` as placement counts them:
        held, or queued for a load there."""
        claims = [n for n, h in enumerate(self.hosts) if h.up and h.s.queued(key)]
        return len(set(self.holders(key) + claims)) > self.replicas[key]

    def fits(self, n: int, key: str) -> bool:
        """Would `key` fit beside what the host's LM Studio holds?"""
        host = self.hosts[n]
        others = [k for k in host.truth if k != key]
        policy = host.s.policy
        if policy.max_loaded and len(others) + 1 > policy.max_loaded:
            return False
        size = sum(self.sizes[k] for k in others) + host.catalog[key]
        return policy.memory_budget is None or size <= policy.memory_budget

    def never_fits(self, n: int, key: str) -> bool:
        """Would `key` not fit on host `n` even with every unpinned model gone?"""
        host = self.hosts[n]
        pinned = {k for k in self.pinned if k in host.truth}
        if isinstance(host.inflight, Load) and host.inflight.model in self.pinned:
            pinned.add(host.inflight.model)
        pinned.discard(key)
        policy = host.s.policy
        if policy.max_loaded and len(pinned) >= policy.max_loaded:
            return True
        used = sum(self.sizes[k] for k in pinned)
        budget = policy.memory_budget
        return budget is not None and used + host.catalog.get(key, 0) > budget

    def check_placement(self, key: str, placement: Placement, hosts: list[int]) -> None:
        """What placement says of its host holds in that host's scheduler."""
        host = self.hosts[self.index(placement.host)]
        model = host.s.models.get(key)
        phase = model.phase if model is not None else Phase.ABSENT
        assert key in host.catalog, f"{key} placed on {host.name}, which lacks it"
        usable = [self.hosts[n] for n in hosts if self.hosts[n].up and key in self.hosts[n].catalog]
        if placement.where is Where.DOWN:
            assert not host.up, f"{key} placed on {host.name} by {placement.where}, yet it is up"
            assert not usable, f"{key} placed on {host.name}, down, though usable elsewhere"
            return
        assert host.up, f"{key} placed on {host.name}, which is down"
        ready = [
            h.name for h in usable if key in h.s.models and h.s.models[key].phase is Phase.READY
        ]
        if placement.where is Where.READY:
            assert phase is Phase.READY
        else:
            assert not ready, f"{key} is ready on {ready}, yet placed by {placement.where}"
        if placement.where is Where.LOADING:
            assert phase is Phase.LOADING or (phase is Phase.ABSENT and host.s.queued(key))
        if placement.where in (Where.FITS, Where.EVICT):
            assert phase is Phase.ABSENT, f"{key} loaded on {host.name}, where it is {phase}"
            assert not host.s.queued(key), f"{key} loaded on {host.name}, queued for it already"
            holding = [
                h
                for h in usable
                if key in h.s.models and (h.s.models[key].phase in RESIDENT or h.s.queued(key))
            ]
            assert len(holding) < self.replicas[key], f"{key} loaded beyond its replicas"
        if placement.where is Where.FITS:
            assert host.s.fits(host.s.models[key]), f"{key} does not fit on {host.name}"
        if placement.where is Where.EVICT:
            victims = host.s.idle_victims(host.s.models[key])
            assert victims, f"{key} placed to evict on {host.name}, with no idle victims"
        if placement.replica is not None:
            spare = self.hosts[self.index(placement.replica)]
            assert spare.up, f"replica of {key} on {spare.name}, which is down"
            assert key in spare.catalog, f"replica of {key} on {spare.name}, which lacks it"
            assert spare.name != host.name, "replica on the host the request goes to"
            spare_model = spare.s.models[key]
            assert spare_model.phase is Phase.ABSENT, f"replica of {key}, {spare_model.phase}"
            assert not spare.s.queued(key), f"replica of {key} on {spare.name}, queued there"
            assert spare.s.fits(spare_model), f"replica of {key} where it does not fit"

    # -- invariants after every step ------------------------------------------------------------

    def check(self) -> None:
        for n, host in enumerate(self.hosts):
            s, policy = host.s, host.s.policy
            phases = [m.phase for m in s.models.values()]
            calls = sum(p in (Phase.LOADING, Phase.UNLOADING) for p in phases)
            assert calls <= 1, f"{calls} loads or unloads at once on {host.name}"
            assert s.busy == (host.inflight is not None), "upstream busy flag out of step"
            mine = {w for (m, w) in self.waiting if m == n}
            assert set(s.waiters) == mine, f"scheduler and driver disagree on {host.name}'s queue"
            for key, model in s.models.items():
                assert model.leases == self.running.count((n, key)), (
                    f"lease count of {key} is wrong"
                )
            # Nothing is loaded behind the proxy's back here: all of it keeps within the limits,
            # and LM Studio holds what the scheduler takes to be loaded, no more and no less.
            count, size = s.usage()
            held = {k for k, m in s.models.items() if m.phase in RESIDENT - {Phase.LOADING}}
            assert host.truth == held, f"{host.name} holds {host.truth}, its scheduler {held}"
            if policy.max_loaded:
                assert count <= policy.max_loaded, f"over max_loaded on {host.name}: {phases}"
            if policy.memory_budget is not None:
                assert size <= policy.memory_budget, f"over memory_budget on {host.name}"
            deadlines = [w.deadline for (m, _), (_, w) in self.waiting.items() if m == n]
            for deadline in deadlines:
                assert deadline > self.now, f"a waiter on {host.name} outlived its deadline"
            if deadlines:
                # Each deadline is a wake-up time: no waiter can outlive it unnoticed.
                assert host.wake is not None
                assert host.wake <= min(deadlines) + EPS
            host.returned = {k for k in host.returned if n in self.holders(k)}
        for key in self.keys:
            if not self.surplus(key):  # the copies of hosts come back are the pool's again
                for host in self.hosts:
                    host.returned.discard(key)

    # -- the end: everything completes, every waiter is answered --------------------------------

    def teardown(self) -> None:
        if sys.exc_info()[1] is not None or not self.hosts:
            return  # a step already failed: let its error speak
        for n, host in enumerate(self.hosts):
            if not host.up:
                self.bring_up(n)
        self.settle()
        for _ in range(200):
            while self.running:
                n, key = self.running.pop()
                self.hosts[n].s.release(key, self.now)
                self.kick(n)
                self.settle()
            if busy := [n for n, h in enumerate(self.hosts) if h.inflight is not None]:
                self.complete(busy[0], ok=True)
                self.settle()
            elif self.waiting:
                self.advance_to_wakeup()
            else:
                break
        assert not self.waiting, f"waiters never answered: {list(self.waiting.values())}"
        assert all(m.leases == 0 for h in self.hosts for m in h.s.models.values()), "leases leaked"


def test_pool_state_machine() -> None:
    run_state_machine_as_test(
        PoolMachine,
        settings=settings(
            max_examples=200,
            stateful_step_count=60,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
            report_multiple_bugs=False,
        ),
    )


# -- fixed workloads ----------------------------------------------------------------------------


@dataclass
class PoolSim:
    """Requests that take fixed durations on a pool of hosts, loads that take `load_s`."""

    catalogs: dict[str, dict[str, int]]  # per host, in configuration order
    policy: Policy
    load_s: float = 2.0
    now: float = 0.0
    loads: list[tuple[float, str, str]] = field(default_factory=list)  # (when, host, model)
    granted: list[tuple[float, str, str]] = field(default_factory=list)
    others: list[Action] = field(default_factory=list)  # fails, unloads, drains
    most_loads_at_once: int = 0
    scheds: dict[str, Scheduler] = field(init=False)
    _loading: set[str] = field(default_factory=set)  # hosts with a load in flight
    _events: list[tuple[float, int, Callable[[], None]]] = field(default_factory=list)
    _seq: itertools.count[int] = field(default_factory=itertools.count)
    _then: dict[tuple[str, int], Callable[[], None] | None] = field(default_factory=dict)
    _duration: dict[tuple[str, int], float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scheds = {name: Scheduler(self.policy) for name in self.catalogs}
        for name, catalog in self.catalogs.items():
            self.scheds[name].set_catalog(catalog)

    def at(self, when: float, event: Callable[[], None]) -> None:
        heapq.heappush(self._events, (when, next(self._seq), event))

    def submit(self, key: str, duration: float, then: Callable[[], None] | None = None) -> None:
        views = [
            s.place_view(
                key,
                name,
                up=True,
                has=key in self.catalogs[name],
                size=self.catalogs[name].get(key, 0),
            )
            for name, s in self.scheds.items()
        ]
        placement = place(views)
        assert placement is not None
        waiter = self.scheds[placement.host].arrive(key, self.now)
        self._then[placement.host, waiter.id] = then
        self._duration[placement.host, waiter.id] = duration
        self.kick(placement.host)

    def client(self, plan: list[str], duration: float) -> None:
        """A closed-loop client: each request to the next model of `plan` after the previous."""

        def send(i: int) -> None:
            self.submit(plan[i], duration, partial(send, i + 1) if i + 1 < len(plan) else None)

        self.at(0.0, partial(send, 0))

    def kick(self, name: str) -> None:
        s = self.scheds[name]
        for action in s.decide(self.now):
            if isinstance(action, Grant):
                waiter = action.waiter
                self.granted.append((self.now, name, waiter.model))
                then = self._then.pop((name, waiter.id))
                done = partial(self._finish, name, waiter.model, then)
                self.at(self.now + self._duration.pop((name, waiter.id)), done)
            elif isinstance(action, Load):
                self.loads.append((self.now, name, action.model))
                self._loading.add(name)
                self.most_loads_at_once = max(self.most_loads_at_once, len(self._loading))
                self.at(self.now + self.load_s, partial(self._loaded, name, action.model))
            else:  # nothing else is expected of these workloads: the test says so
                self.others.append(action)

    def _finish(self, name: str, key: str, then: Callable[[], None] | None) -> None:
        self.scheds[name].release(key, self.now)
        self.kick(name)
        if then is not None:
            then()

    def _loaded(self, name: str, key: str) -> None:
        self._loading.discard(name)
        self.scheds[name].load_done(key, key, self.now)
        self.kick(name)

    def run(self, until: float) -> None:
        """Play events and the hosts' wake-ups in time order until nothing is left to do."""
        for _ in range(20_000):
            wakes = [w for s in self.scheds.values() if (w := s.next_wakeup(self.now)) is not None]
            when = min(wakes + ([self._events[0][0]] if self._events else []), default=None)
            if when is None:
                return
            assert when <= until, f"still busy at {until} s"
            self.now = max(self.now, when)
            if self._events and self._events[0][0] <= self.now:
                heapq.heappop(self._events)[2]()
            for name in self.scheds:
                self.kick(name)
        raise AssertionError(f"no end in sight at {self.now} s")


def test_two_models_each_on_its_own_host_never_swap() -> None:
    """Two hosts each with room for one of two models; 8 clients alternating between them.
    The pool loads each model once, on a host of its own, and serves every request there: no
    swap, no drain, no unload (one host with room for one would swap back and forth)."""
    sizes = {"a": 4 * GiB, "b": 4 * GiB}
    sim = PoolSim({"h0": sizes, "h1": sizes}, Policy(max_loaded=1, swap_grace_s=1.0))
    for i in range(8):
        sim.client(["a", "b"] * 3 if i % 2 == 0 else ["b", "a"] * 3, duration=1.0)
    sim.run(until=3600.0)
    assert len(sim.granted) == 48
    assert sorted(host + model for _, host, model in sim.loads) == ["h0a", "h1b"]
    assert sim.others == []  # no unload, no drain, no failure
    assert {(host, model) for _, host, model in sim.granted} == {("h0", "a"), ("h1", "b")}


def test_cold_models_load_at_once_on_two_hosts() -> None:
    """Two cold models and two empty hosts with room for both: both loads start at once, one
    per host (the one with the most room left), where a lone host loads one after the other."""
    sizes = {"a": 8 * GiB, "b": 8 * GiB}
    sim = PoolSim(
        {"h0": sizes, "h1": sizes}, Policy(max_loaded=0, memory_budget=16 * GiB), load_s=2.0
    )
    sim.submit("a", 1.0)
    sim.submit("b", 1.0)
    assert sim.loads == [(0.0, "h0", "a"), (0.0, "h1", "b")]
    assert sim.most_loads_at_once == 2
    sim.run(until=60.0)
    assert sim.others == []
    assert sorted(sim.granted) == [(2.0, "h0", "a"), (2.0, "h1", "b")]
