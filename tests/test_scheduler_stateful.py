"""The pure scheduler under Hypothesis' stateful testing, plus simulated workloads.

`SchedulerMachine` plays the driver (`manager.py`) and a fake LM Studio with a fake clock: it
feeds random events into `Scheduler`, carries out every action `decide` returns, and checks the
contract of docs/design.md §2.5 after every step. `Sim` is a tiny discrete-event driver for
fixed workloads: the alternating clients, a stream that must not starve another model, and the
bounded wait of the fairness rule.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)

from proxy.errors import InsufficientMemoryError
from proxy.scheduler import RETRY_HOLD_S, Scheduler
from proxy.scheduling import (
    Action,
    Drain,
    Eviction,
    Fail,
    FailReason,
    Grant,
    Load,
    Observed,
    Phase,
    Policy,
    Unload,
    UnloadReason,
    Waiter,
)

GiB = 2**30
KEYS = ("m0", "m1", "m2", "m3")
# The clients requests come from (their connections), None for one not known: the fairness
# rule's idle gap waits only for a client that may come back.
CLIENTS = (None, "c1", "c2", "c3")
EPS = 1e-9
QUEUE_FULL = FailReason.QUEUE_FULL


# -- the stateful machine -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setup:
    sizes: dict[str, int]
    policy: Policy
    pinned: frozenset[str]
    memory: int | None  # LM Studio's real memory, hidden from the scheduler: past it, it refuses


@st.composite
def setups(draw: st.DrawFn) -> Setup:
    keys = KEYS[: draw(st.integers(3, 4))]
    sizes = {key: draw(st.integers(1, 8)) * GiB for key in keys}
    budget = draw(st.sampled_from([None, None, 6, 9, 12, 16]))
    # LM Studio's real memory: with it, sets of models that hold more are refused (§2.8).
    memory = draw(st.sampled_from([None, None, 5, 7, 10, 12, 14]))
    counts = [0, 1, 1, 2] if budget is None and memory is None else [0, 0, 1, 2]
    policy = Policy(
        max_loaded=draw(st.sampled_from(counts)),
        memory_budget=None if budget is None else budget * GiB,
        swap_grace_s=draw(st.sampled_from([0.0, 0.5, 2.0, 10.0])),
        idle_ttl_s=draw(st.none() | st.sampled_from([0.5, 3.0, 60.0])),
        max_queue=draw(st.integers(1, 8)),
        queue_timeout_s=draw(st.sampled_from([1.0, 5.0, 30.0, 30.0, 300.0])),
        priority_aging_s=draw(st.sampled_from([0.1, 1.0, 30.0])),
        eviction=draw(st.sampled_from(Eviction)),
        learn_capacity=budget is None and draw(st.booleans()),
    )
    pinned = draw(st.frozensets(st.sampled_from(keys), max_size=1))
    return Setup(sizes, policy, pinned, None if memory is None else memory * GiB)


# Instance lists a fake LM Studio can hold for one model: gone, ours, a duplicate, a new id.
def _instances(key: str) -> list[list[str]]:
    return [[], [key], [key, f"{key}:2"], [f"{key}:2"]]


class SchedulerMachine(RuleBasedStateMachine):
    """The driver and a fake LM Studio around one `Scheduler`, checking the contract each step."""

    def __init__(self) -> None:
        super().__init__()
        self.s = Scheduler(Policy())
        self.policy = self.s.policy
        self.sizes: dict[str, int] = {}
        self.keys: list[str] = []
        self.pinned: set[str] = set()
        self.now = 0.0
        self.wake: float | None = None
        self.truth: dict[str, list[str]] = {}  # LM Studio's loaded instances per model
        self.owned: set[str] = set()  # models in `truth` because the proxy loaded them
        self.inflight: Load | Unload | None = None
        self.waiting: dict[int, Waiter] = {}
        self.running: list[tuple[str, str | None]] = []  # each lease held: model, client
        self.expired: list[Waiter] = []
        self.load_failed_for: str | None = None
        self.evicted_since_load = False  # an eviction was started since the last load
        self.committed: str | None = None  # the swap under way before this step's `decide`
        self.memory: int | None = None  # LM Studio's real memory (its guardrail refuses past it)
        # Refused loads not answered yet: model -> the models LM Studio refused it beside.
        self.refused: dict[str, frozenset[str]] = {}
        self.refusals = 0
        self.fit_since_refusal = 0  # the largest set LM Studio held since the last refusal
        self.last_refused: int | None = None  # the total of the last refused set
        self.fit_past_refused = False  # a set at least that large fitted since

    @property
    def leased(self) -> list[str]:
        """The model of each lease held."""
        return [key for key, _ in self.running]

    # -- set-up and events ----------------------------------------------------------------------

    @initialize(setup=setups())
    def start(self, setup: Setup) -> None:
        self.s = Scheduler(setup.policy)
        self.policy = setup.policy
        self.sizes = dict(setup.sizes)
        self.keys = list(setup.sizes)
        self.s.set_catalog(self.sizes)
        for key in setup.pinned:
            self.s.pin(key, True)
        self.pinned = set(setup.pinned)
        self.memory = setup.memory
        self.step()

    @rule(
        data=st.data(),
        n=st.sampled_from([1, 1, 2, 3]),
        priority=st.integers(0, 3),
        client=st.sampled_from(CLIENTS),
    )
    def arrive(self, data: st.DataObject, n: int, priority: int, client: str | None) -> None:
        """Requests of one priority from one client arrive for one model, `decide` after each."""
        key = data.draw(st.sampled_from(self.keys), label="model")
        self.arrivals(key, n, takes_lease=True, priority=priority, client=client)

    @rule(data=st.data())
    def admin_load(self, data: st.DataObject) -> None:
        """An operator's load: a waiter that takes no lease."""
        self.arrivals(data.draw(st.sampled_from(self.keys), label="model"), 1, takes_lease=False)

    def arrivals(
        self, key: str, n: int, *, takes_lease: bool, priority: int = 0, client: str | None = None
    ) -> None:
        for _ in range(n):
            waiter = self.s.arrive(
                key, self.now, takes_lease=takes_lease, priority=priority, client=client
            )
            # Arrivals come in time order here: its rank is its arrival less its priority's worth.
            assert waiter.rank == self.now - priority * self.policy.priority_aging_s
            assert waiter.id not in self.waiting
            self.waiting[waiter.id] = waiter
            self.step()

    @precondition(lambda self: bool(self.waiting))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        waiter_id = data.draw(st.sampled_from(sorted(self.waiting)), label="waiter")
        assert self.s.cancel(waiter_id), "a waiting request could not leave the queue"
        del self.waiting[waiter_id]
        self.step()

    @precondition(lambda self: bool(self.running))
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        key, client = self.running.pop(
            data.draw(st.integers(0, len(self.running) - 1), label="lease")
        )
        self.s.release(key, self.now, client)
        self.step()

    @precondition(lambda self: self.inflight is not None)
    @rule(
        ok=st.sampled_from([True, True, True, False]),
        took=st.none() | st.sampled_from([0.5, 3.0, 60.0]),
    )
    def upstream_returns(self, ok: bool, took: float | None) -> None:
        self.complete(ok=ok, took_s=took)

    @rule(dt=st.sampled_from([0.0, 0.01, 0.1, 0.25, 0.3, 1.0, 3.0, 10.0, 40.0, 400.0]))
    def advance(self, dt: float) -> None:
        self.tick(self.now + dt)

    @precondition(lambda self: self.wake is not None)
    @rule(early=st.sampled_from([0.0, 0.0, 0.001]))
    def advance_to_wakeup(self, early: float) -> None:
        assert self.wake is not None
        self.tick(max(self.now, self.wake - early))

    @precondition(lambda self: self.inflight is None or len(self.keys) > 1)
    @rule(data=st.data())
    def lmstudio_changes(self, data: st.DataObject) -> None:
        """LM Studio loads, unloads or duplicates a model on its own; a poll then sees it."""
        busy = self.inflight.model if self.inflight is not None else None
        key = data.draw(st.sampled_from([k for k in self.keys if k != busy]), label="model")
        ids = data.draw(st.sampled_from(_instances(key)), label="instances")
        if ids:
            self.truth[key] = ids
        else:
            self.truth.pop(key, None)
            self.owned.discard(key)
        self.s.observed(self.truth, self.now)
        self.held()
        self.step()

    @rule(data=st.data(), pinned=st.booleans())
    def pin(self, data: st.DataObject, pinned: bool) -> None:
        key = data.draw(st.sampled_from(self.keys), label="model")
        self.s.pin(key, pinned)
        if pinned:
            self.pinned.add(key)
        else:
            self.pinned.discard(key)
        self.step()

    @rule(data=st.data())
    def request_unload(self, data: st.DataObject) -> None:
        self.s.request_unload(data.draw(st.sampled_from(self.keys), label="model"))
        self.step()

    @rule(readable=st.sampled_from([True, True, False]))
    def listing(self, readable: bool) -> None:
        """A listing of LM Studio's models succeeds, or fails (its state cannot be read)."""
        self.s.set_unreadable(None if readable else "LM Studio did not list its models")
        self.step()

    @rule(data=st.data(), probed=st.booleans())
    def probe(self, data: st.DataObject, probed: bool) -> None:
        """A request LM Studio may JIT-load a model for goes out, or its answer begins."""
        self.s.set_probed(data.draw(st.sampled_from(self.keys)), probed)
        self.step()

    @rule(data=st.data(), ttl=st.none() | st.sampled_from([0.5, 30.0]))
    def set_idle_ttl(self, data: st.DataObject, ttl: float | None) -> None:
        self.s.set_idle_ttl(data.draw(st.sampled_from(self.keys), label="model"), ttl)
        self.step()

    # -- the driver -----------------------------------------------------------------------------

    def tick(self, when: float) -> None:
        """Time passes; before `next_wakeup` said so, `decide` must have nothing to do."""
        assert when >= self.now
        quiet = self.wake is None or when < self.wake
        self.now = when
        self.step(quiet=quiet)

    def complete(self, *, ok: bool, took_s: float | None = None) -> None:
        """The in-flight load or unload call returns."""
        action, self.inflight = self.inflight, None
        assert action is not None
        key = action.model
        if isinstance(action, Load):
            total = self.truth_bytes() + self.sizes[key]
            if ok and self.memory is not None and total > self.memory:
                # The guardrail refuses: the scheduler keeps its waiters and makes room.
                self.s.load_refused(key, InsufficientMemoryError("no memory"), self.now)
                self.refused[key] = self.s.refusals[key].beside
                assert self.refused[key] == set(self.truth), "refused beside another set"
                self.refusals += 1
                self.fit_since_refusal = 0
                self.last_refused, self.fit_past_refused = total, False
            elif ok:
                self.truth[key] = [key]
                self.owned.add(key)
                self.refused.pop(key, None)
                self.s.load_done(key, key, self.now, took_s)
                self.held()
            else:
                self.load_failed_for = key
                self.s.load_failed(key, RuntimeError("no memory"))
        elif ok:
            ids = [i for i in self.truth[key] if i != action.instance_id]
            if ids:
                self.truth[key] = ids
            else:
                del self.truth[key]
            self.owned.discard(key)
            self.s.unload_done(key)
        else:
            self.s.unload_failed(key, self.now)
        self.step()

    def hopeless(self, key: str) -> bool:
        """Nothing more may be unloaded for `key`'s refusal: every model LM Studio refused it
        beside is still loaded, and pinned (or being loaded again, pinned)."""
        loading = self.inflight.model if isinstance(self.inflight, Load) else None
        held = (k in self.truth or k == loading for k in self.refused[key])
        return all(held) and self.refused[key] <= self.pinned

    def truth_bytes(self) -> int:
        return sum(len(ids) * self.sizes[k] for k, ids in self.truth.items())

    def held(self) -> None:
        """LM Studio holds what it holds: a set that fits."""
        total = self.truth_bytes()
        self.fit_since_refusal = max(self.fit_since_refusal, total)
        if self.last_refused is not None and total >= self.last_refused:
            self.fit_past_refused = True

    def step(self, *, quiet: bool = False) -> None:
        """Ask the scheduler what to do now, carry it out, and check the contract."""
        waiting_before = dict(self.waiting)
        self.committed = self.s.swap_for
        actions = self.s.decide(self.now)
        if quiet:
            assert not actions, f"decide acted before next_wakeup ({self.wake}): {actions}"
        upstream = [a for a in actions if isinstance(a, Load | Unload)]
        assert len(upstream) <= 1, f"more than one upstream call at once: {upstream}"
        for i, action in enumerate(actions):
            self.carry_out(action, actions[i + 1 :])
        full = [a.waiter.id for a in actions if isinstance(a, Fail) and a.reason is QUEUE_FULL]
        if full:
            assert len(waiting_before) > self.policy.max_queue, "queue full below max_queue"
            # The lowest effective priority, the newest of them first.
            failed = [waiting_before[i] for i in full]
            worst_kept = max(map(self.order, self.waiting.values()), default=(-math.inf, 0))
            assert min(map(self.order, failed)) > worst_kept, "queue full: not the last in line"
        self.load_failed_for = None
        for key in [k for k in self.refused if k not in self.s.refusals]:
            # The scheduler let the refusal go (its waiters answered, or none left): only
            # once nothing more may be unloaded.
            assert self.hopeless(key), f"{key}'s refusal dropped while room may yet be made"
            del self.refused[key]
        self.check()
        self.wake = self.s.next_wakeup(self.now)
        assert self.wake is None or self.wake > self.now, "next_wakeup is not in the future"
        if self.waiting:
            # Each deadline is a wake-up time: no waiter can outlive it unnoticed.
            assert self.wake is not None
            assert self.wake <= min(w.deadline for w in self.waiting.values()) + EPS

    def carry_out(self, action: Action, later: list[Action]) -> None:
        if isinstance(action, Grant):
            waiter = action.waiter
            assert self.waiting.pop(waiter.id, None) is not None, f"grant of a non-waiter {waiter}"
            assert self.now < waiter.deadline, f"grant after the deadline: {waiter} at {self.now}"
            # The phase after `decide`; a Drain or Unload later in the same batch came after it.
            model = self.s.models[waiter.model]
            moved = any(isinstance(a, Drain | Unload) and a.model == waiter.model for a in later)
            assert model.phase is Phase.READY or moved, f"grant on a model that is {model.phase}"
            assert waiter.model in self.truth, "grant on a model LM Studio does not have"
            if waiter.takes_lease:
                self.running.append((waiter.model, waiter.client))
        elif isinstance(action, Fail):
            self.check_fail(action)
        elif isinstance(action, Load):
            self.check_load(action)
            self.inflight = action
        elif isinstance(action, Unload):
            self.check_unload(action)
            self.inflight = action
        elif isinstance(action, Drain):
            model = self.s.models[action.model]
            assert not (model.pinned and not model.unload_requested), "pinned model drained"
        else:
            assert isinstance(action, Observed)

    def order(self, waiter: Waiter) -> tuple[float, int]:
        """Serving order (§2.4): effective priority, priority + waited / priority_aging, the
        highest first, then first come; the same order at any time, as all waited alike."""
        return waiter.arrived - waiter.priority * self.policy.priority_aging_s, waiter.id

    def first_in_line(self, committed: str | None, loading: str | None = None) -> str | None:
        """The model the next load must be for (`loading` counted as absent): the model of the
        first waiter of an absent model in serving order, unless that waiter came after the
        first waiter of the model a swap is under way for (`committed`: an eviction was started
        for it), which is then completed."""
        absent = [
            w
            for w in self.waiting.values()
            if w.model == loading or self.s.models[w.model].phase is Phase.ABSENT
        ]
        if not absent:
            return None
        first = min(absent, key=self.order)
        ids = [w.id for w in absent if w.model == committed]
        if ids and first.model != committed and first.id > min(ids):
            return committed
        return first.model

    def check_fail(self, action: Fail) -> None:
        waiter = action.waiter
        assert self.waiting.pop(waiter.id, None) is not None, f"fail of a non-waiter {waiter}"
        if action.reason is FailReason.EXPIRED:
            assert self.now >= waiter.deadline, f"expired early: {waiter} at {self.now}"
            self.expired.append(waiter)
        elif action.reason is FailReason.NO_FIT:
            assert self.never_fits(waiter.model), f"refused though it fits: {action.message}"
        elif action.reason is FailReason.QUEUE_FULL:
            pass  # checked over the whole batch in `step`
        elif action.reason is FailReason.UNREADABLE:
            assert self.s.unreadable is not None, "failed as unreadable while readable"
            assert self.s.models[waiter.model].phase is Phase.ABSENT
        elif waiter.model in self.refused and waiter.model != self.load_failed_for:
            assert action.reason is FailReason.LOAD_FAILED
            # A refusal is answered only when nothing more may be unloaded: every model it was
            # refused beside is still loaded, and pinned.
            assert self.hopeless(waiter.model), "refusal answered while room may yet be made"
        else:
            assert action.reason is FailReason.LOAD_FAILED
            assert waiter.model == self.load_failed_for, "failed by another model's load"

    def check_load(self, action: Load) -> None:
        key = action.model
        assert self.inflight is None, f"{action} while {self.inflight} is in flight"
        assert self.s.unreadable is None, "a load on a state that could not be read"
        assert not any(m.probed for m in self.s.models.values()), "a load beside a JIT load"
        assert key not in self.truth, "a second load of a loaded model"
        assert any(w.model == key for w in self.waiting.values()), "a load nobody waits for"
        # Priorities (§2.4): the load is for the first in line. So a waiter is passed only by
        # waiters ranked before it, which joined at most (their priority - its priority) x
        # priority_aging after it, and by the swap under way: a bounded number, and the
        # fairness rule bounds each of their swaps.
        first = self.first_in_line(self.committed, loading=key)
        assert key == first, f"{action}, but {first} is first in line"
        self.evicted_since_load = False
        # Everything LM Studio holds, adopted models included, must leave room for this one.
        assert self.fits(key, ()), f"{action} exceeds capacity: {self.truth}"

    def check_unload(self, action: Unload) -> None:
        key = action.model
        assert self.inflight is None, f"{action} while {self.inflight} is in flight"
        assert action.instance_id in self.truth.get(key, ()), "unload of an unknown instance"
        if action.reason is UnloadReason.EVICTED:
            self.evicted_since_load = True
        assert key not in self.leased, f"unload of {key} under a lease"
        if action.reason is UnloadReason.ADMIN:
            assert self.s.models[key].unload_requested
        else:
            assert self.s.unreadable is None, "an eviction on a state that could not be read"
            assert key not in self.pinned, f"pinned model unloaded ({action.reason})"

    # -- capacity, as the test sees it ----------------------------------------------------------

    def fits(self, key: str, leaving: tuple[str, ...] | set[str]) -> bool:
        """Would `key` fit in LM Studio's real state, once the models in `leaving` are gone?"""
        count = size = 0
        for other, ids in self.truth.items():
            if other not in leaving and other != key:
                count += len(ids)
                size += len(ids) * self.sizes[other]
        if self.policy.max_loaded and count + 1 > self.policy.max_loaded:
            return False
        beside = self.refused.get(key)
        if beside is not None and all(k in self.truth and k not in leaving for k in beside):
            return False  # refused beside these: one must go first (§2.8)
        budget = self.s.budget  # `memory_budget`, or the capacity learned
        if budget is None or size + self.sizes[key] <= budget:
            return True
        # A learned capacity never keeps a model from being tried beside only pinned models.
        return self.policy.learn_capacity and all(
            k in self.pinned for k in self.truth if k not in leaving and k != key
        )

    def never_fits(self, key: str) -> bool:
        """Would `key` not fit even with every unpinned model gone (counting instances)?"""
        loading = self.inflight.model if isinstance(self.inflight, Load) else None
        pinned = {k: len(self.truth[k]) for k in self.pinned if k in self.truth}
        if loading is not None and loading in self.pinned:
            pinned[loading] = 1
        pinned.pop(key, None)
        if self.policy.max_loaded and sum(pinned.values()) >= self.policy.max_loaded:
            return True
        budget = self.policy.memory_budget
        used = sum(n * self.sizes[k] for k, n in pinned.items())
        return budget is not None and self.sizes[key] + used > budget

    # -- invariants after every step ------------------------------------------------------------

    def check(self) -> None:
        s, policy = self.s, self.policy
        assert s.busy == (self.inflight is not None), "upstream busy flag out of step"
        assert set(s.waiters) == set(self.waiting), "scheduler and driver disagree on the queue"
        assert len(self.waiting) <= policy.max_queue, "queue longer than max_queue"
        for key, model in s.models.items():
            assert model.leases == self.leased.count(key), f"lease count of {key} is wrong"
        for waiter in self.waiting.values():
            assert waiter.deadline > self.now, f"{waiter} outlived its deadline"
            assert s.models[waiter.model].phase is not Phase.READY, f"{waiter} not granted"
        # Models the proxy loaded never exceed capacity (adopted ones may).
        owned_bytes = sum(self.sizes[k] for k in self.owned)
        if policy.max_loaded:
            assert len(self.owned) <= policy.max_loaded, f"over max_loaded: {self.owned}"
        if policy.memory_budget is not None:
            assert owned_bytes <= policy.memory_budget, f"over memory_budget: {self.owned}"
        # The capacity learned is never below the largest set seen to fit since the last
        # refusal, and stays below that refusal until a set at least as large fits (§2.8).
        learned = s.capacity.learned_bytes
        if learned is not None:
            assert learned >= self.fit_since_refusal, f"learned {learned} below what fitted"
            if self.last_refused is not None and not self.fit_past_refused:
                assert learned < self.last_refused, f"learned {learned}, refused at or below"
        if self.inflight is None and self.now >= s.hold_until:
            self.check_progress()

    def check_progress(self) -> None:
        """With the upstream idle, the scheduler is not sitting on work it could do now."""
        s = self.s
        for key, model in s.models.items():
            if model.unload_requested and model.phase in (Phase.READY, Phase.DRAINING):
                assert key in self.leased, f"operator's unload of idle {key} not started"
        for waiter in self.waiting.values():
            if s.models[waiter.model].phase is Phase.ABSENT:
                assert not self.never_fits(waiter.model), f"{waiter} can never fit: not refused"
                hopeless = waiter.model in self.refused and self.hopeless(waiter.model)
                assert not hopeless, f"{waiter}'s refusal could be answered, and is not"
        assert s.swap_for is None or self.evicted_since_load, "a swap under way, none started"
        first = self.first_in_line(s.swap_for)
        if first is None or s.unreadable is not None or s.load_held:
            return  # nothing is loaded on an unread state, nor beside a JIT load
        key = first
        assert not self.fits(key, ()), f"{key} fits and waits, but is not loaded"
        leaving = {k for k, m in s.models.items() if m.unload_requested}
        if self.fits(key, leaving):
            return  # waiting for an operator's unload of a busy model
        idle = {
            k
            for k, m in s.models.items()
            if m.phase in (Phase.READY, Phase.DRAINING)
            and k in self.truth
            and k != key
            and not m.pinned
            and k not in self.leased
        }
        oldest = min(w.arrived for w in self.waiting.values() if w.model == key)
        grace_over = self.now >= oldest + self.policy.swap_grace_s + EPS
        if grace_over and self.fits(key, leaving | idle):
            raise AssertionError(f"grace is over and idle models {idle} could make room for {key}")

    # -- the end: everything completes, every waiter is answered --------------------------------

    def teardown(self) -> None:
        if sys.exc_info()[1] is not None or not self.keys:
            return  # a step already failed: let its error speak
        start = self.now
        self.expired.clear()
        self.s.set_unreadable(None)
        for key in self.keys:
            self.s.set_probed(key, False)
        self.step()  # as the driver kicks the scheduler on either event
        for _ in range(200):
            while self.running:
                key, client = self.running.pop()
                self.s.release(key, self.now, client)
                self.step()
            if self.inflight is not None:
                self.complete(ok=True)
            elif self.waiting:
                assert self.wake is not None, "waiters left but no wake-up time"
                self.tick(self.wake)
            else:
                break
        assert not self.waiting, f"waiters never answered: {list(self.waiting.values())}"
        assert self.inflight is None
        assert all(m.leases == 0 for m in self.s.models.values()), "leases leaked"
        # With every call returning at once and every request done, each swap takes one idle
        # gap at most: a waiter with time left must be served, not expired.
        slack = RETRY_HOLD_S + (len(self.keys) + 1) * (self.policy.idle_gap_s + 0.01) + 1.0
        late = [w for w in self.expired if w.deadline > start + slack]
        assert not late, f"waiters starved until their deadline: {late}"


# Pure and bounded by its example count, it cannot hang; its 1,000 runs take ~15 s, and twice
# that under CI's coverage tracing, past the suite's 30 s guard against hangs (CI timed it out).
@pytest.mark.timeout(120)
def test_scheduler_state_machine() -> None:
    run_state_machine_as_test(
        SchedulerMachine,
        settings=settings(
            max_examples=1000,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
            report_multiple_bugs=False,  # shrink one failure well rather than many slowly
        ),
    )


# -- a tiny simulated driver ------------------------------------------------------------------


class Driven(Protocol):
    """What `Sim` needs of a scheduler: `Scheduler`, or the FCFS baseline below."""

    def arrive(
        self, key: str, now: float, *, takes_lease: bool = ..., priority: int = ...
    ) -> Waiter: ...
    def release(self, key: str, now: float) -> None: ...
    def load_done(self, key: str, instance_id: str, now: float) -> None: ...
    def unload_done(self, key: str) -> None: ...
    def decide(self, now: float) -> list[Action]: ...
    def next_wakeup(self, now: float) -> float | None: ...


@dataclass(slots=True)
class Request:
    model: str
    duration: float
    then: Callable[[], None] | None = None  # a closed-loop client's next request
    priority: int = 0
    arrived: float = math.nan
    granted: float | None = None
    contested: bool = False  # arrived with its model absent and the other one ready

    @property
    def waited(self) -> float:
        assert self.granted is not None
        return self.granted - self.arrived


@dataclass
class Sim:
    """Requests that take fixed durations, upstream calls that take `load_s`/`unload_s`."""

    sched: Driven
    load_s: float = 2.0
    unload_s: float = 2.0
    now: float = 0.0
    loads: int = 0
    requests: list[Request] = field(default_factory=list)
    failed: list[Fail] = field(default_factory=list)
    on_submit: Callable[[Request], None] | None = None
    _events: list[tuple[float, int, Callable[[], None]]] = field(default_factory=list)
    _seq: itertools.count[int] = field(default_factory=itertools.count)
    _waiting: dict[int, Request] = field(default_factory=dict)

    def at(self, when: float, event: Callable[[], None]) -> None:
        heapq.heappush(self._events, (when, next(self._seq), event))

    def submit(self, request: Request) -> None:
        request.arrived = self.now
        waiter = self.sched.arrive(request.model, self.now, priority=request.priority)
        self._waiting[waiter.id] = request
        self.requests.append(request)
        if self.on_submit is not None:
            self.on_submit(request)
        self.kick()

    def client(self, start: float, plan: list[tuple[str, float, float]]) -> None:
        """A closed-loop client: each (model, duration, think) request after the previous one."""

        def send(i: int) -> None:
            model, duration, think = plan[i]
            nxt = (
                None if i + 1 == len(plan) else partial(self.at_after, think, partial(send, i + 1))
            )
            self.submit(Request(model, duration, nxt))

        self.at(start, partial(send, 0))

    def at_after(self, delay: float, event: Callable[[], None]) -> None:
        self.at(self.now + delay, event)

    def kick(self) -> None:
        for action in self.sched.decide(self.now):
            if isinstance(action, Grant):
                request = self._waiting.pop(action.waiter.id)
                request.granted = self.now
                self.at(self.now + request.duration, partial(self._finish, request))
            elif isinstance(action, Fail):
                self.failed.append(action)
            elif isinstance(action, Load):
                self.loads += 1
                # Every load here has requests to serve: more loads than requests is thrashing.
                assert self.loads <= len(self.requests), "loads that serve nobody"
                self.at(self.now + self.load_s, partial(self._loaded, action.model))
            elif isinstance(action, Unload):
                self.at(self.now + self.unload_s, partial(self._unloaded, action.model))

    def _finish(self, request: Request) -> None:
        self.sched.release(request.model, self.now)
        if request.then is not None:
            request.then()

    def _loaded(self, key: str) -> None:
        self.sched.load_done(key, key, self.now)

    def _unloaded(self, key: str) -> None:
        self.sched.unload_done(key)

    def run(self, until: float) -> None:
        """Play events and scheduler wake-ups in time order until nothing is left to do."""
        for _ in range(20_000):
            wake = self.sched.next_wakeup(self.now)
            due = self._events[0][0] if self._events else math.inf
            when = min(due, math.inf if wake is None else wake)
            if when == math.inf:
                return
            assert when <= until, f"still busy at {until} s"
            self.now = max(self.now, when)
            if due <= when:
                heapq.heappop(self._events)[2]()
            self.kick()
        raise AssertionError(f"no end in sight at {self.now} s (swapping in a loop?)")


class Fcfs:
    """Baseline: serve the oldest request's model; swap when it differs and the slot is idle."""

    def __init__(self) -> None:
        self.queue: list[Waiter] = []
        self.loaded: str | None = None
        self.leases = 0
        self.busy = False
        self._ids = itertools.count(1)

    def arrive(
        self, key: str, now: float, *, takes_lease: bool = True, priority: int = 0
    ) -> Waiter:
        waiter = Waiter(next(self._ids), key, now, math.inf, takes_lease)  # priority ignored
        self.queue.append(waiter)
        return waiter

    def release(self, key: str, now: float) -> None:
        self.leases -= 1

    def load_done(self, key: str, instance_id: str, now: float) -> None:
        self.loaded, self.busy = key, False

    def unload_done(self, key: str) -> None:
        self.loaded, self.busy = None, False

    def decide(self, now: float) -> list[Action]:
        actions: list[Action] = []
        while self.queue and self.queue[0].model == self.loaded and not self.busy:
            actions.append(Grant(self.queue.pop(0)))
            self.leases += 1
        if self.queue and not self.busy and self.leases == 0:
            self.busy = True
            if self.loaded is None:
                actions.append(Load(self.queue[0].model))
            else:
                actions.append(Unload(self.loaded, self.loaded, UnloadReason.EVICTED))
        return actions

    def next_wakeup(self, now: float) -> float | None:
        return None


def lmswitch(**policy: float | int | None) -> Scheduler:
    s = Scheduler(Policy(**policy))  # type: ignore[arg-type]
    s.set_catalog({"a": 4 * GiB, "b": 4 * GiB})
    return s


def alternating(sched: Driven) -> Sim:
    """8 clients, 5 one-second requests each, alternating a and b; half start with b."""
    sim = Sim(sched, load_s=2.0, unload_s=2.0)
    for i in range(8):
        models = ["a", "b"] if i % 2 == 0 else ["b", "a"]
        sim.client(0.0, [(models[j % 2], 1.0, 0.0) for j in range(5)])
    sim.run(until=3600.0)
    assert not sim.failed
    assert len(sim.requests) == 40
    assert all(r.granted is not None for r in sim.requests)
    return sim


# A swap_grace shorter than one load must work as well as the default.
@pytest.mark.parametrize("grace", [1.0, 10.0])
def test_alternating_clients_batch_instead_of_thrashing(grace: float) -> None:
    assert alternating(lmswitch(max_loaded=1, swap_grace_s=grace)).loads <= 6


def test_fcfs_baseline_thrashes_on_alternating_clients() -> None:
    """The baseline the fairness rule is measured against swaps for nearly every request."""
    fcfs = alternating(Fcfs()).loads
    assert fcfs >= 4 * alternating(lmswitch(max_loaded=1)).loads


@pytest.mark.parametrize("grace", [1.0, 10.0])
def test_a_stream_to_one_model_does_not_starve_another(grace: float) -> None:
    load_s, unload_s = 2.0, 2.0
    sim = Sim(lmswitch(max_loaded=1, swap_grace_s=grace), load_s=load_s, unload_s=unload_s)
    for i in range(120):  # a new 1 s request to a every 0.5 s for a minute
        sim.at(i * 0.5, partial(sim.submit, Request("a", 1.0)))
    b = Request("b", 1.0)
    sim.at(5.0, partial(sim.submit, b))  # a is loaded and busy by now
    sim.run(until=3600.0)
    assert not sim.failed
    assert all(r.granted is not None for r in sim.requests)
    assert b.waited <= grace + 1.0 + unload_s + load_s + EPS
    assert sim.loads <= 4  # a, b, a: no thrashing around the swap


@st.composite
def client_plans(draw: st.DrawFn, longest: float) -> tuple[float, list[tuple[str, float, float]]]:
    start = draw(st.sampled_from([0.0, 0.0, 0.1, 1.0, 5.0, 20.0]))
    steps = st.tuples(
        st.sampled_from(["a", "b"]),
        st.sampled_from([0.0, 0.1, longest / 2, longest]),
        st.sampled_from([0.0, 0.0, 0.1, 0.3, 2.0, 15.0]),
    )
    return start, draw(st.lists(steps, min_size=1, max_size=6))


@pytest.mark.timeout(120)  # pure and bounded by its example count, as the one below
@settings(max_examples=500, deadline=None, report_multiple_bugs=False)
@given(
    data=st.data(),
    grace=st.sampled_from([0.0, 0.5, 2.0, 10.0]),
    longest=st.sampled_from([0.5, 1.0, 3.0]),
    load_s=st.sampled_from([0.0, 0.5, 2.0]),
    unload_s=st.sampled_from([0.0, 0.5, 2.0]),
)
def test_bounded_wait_with_one_slot(
    data: st.DataObject, grace: float, longest: float, load_s: float, unload_s: float
) -> None:
    """Fairness bound, upstream calls and requests taking at most the given times.

    A request that arrives with its model absent and the other model ready waits at most
    swap_grace + the longest request + one unload + one load (docs/design.md §2.4). One that arrives
    while a swap is under way (say, its own model being drained for the other one) may first
    wait for that swap to finish, which the weaker bound allows for.
    """
    s = lmswitch(max_loaded=1, swap_grace_s=grace, queue_timeout_s=1e9, max_queue=10_000)

    def note(request: Request) -> None:
        phases = {k: m.phase for k, m in s.models.items()}
        other = "b" if request.model == "a" else "a"
        request.contested = (
            phases[request.model] is Phase.ABSENT and phases.get(other) is Phase.READY
        )

    sim = Sim(s, load_s=load_s, unload_s=unload_s, on_submit=note)
    for start, plan in data.draw(st.lists(client_plans(longest), min_size=1, max_size=6)):
        sim.client(start, plan)
    sim.run(until=1000.0)
    assert not sim.failed
    swap = longest + unload_s + load_s
    for request in sim.requests:
        assert request.granted is not None
        bound = grace + swap if request.contested else max(grace, swap) + swap
        assert request.waited <= bound + EPS, f"{request} waited more than {bound}"


def mixed(sched: Driven, seed: int) -> Sim:
    """12 closed-loop clients, 6 requests each to one of three models at random, with random
    lengths (0.5-3 s) and think times (0-2 s)."""
    rng = random.Random(seed)  # noqa: S311 - a reproducible workload, not a secret
    sim = Sim(sched, load_s=2.0, unload_s=2.0)
    for _ in range(12):
        plan = [(rng.choice("abc"), rng.uniform(0.5, 3.0), rng.uniform(0.0, 2.0)) for _ in range(6)]
        sim.client(rng.uniform(0.0, 5.0), plan)
    sim.run(until=36_000.0)
    assert not sim.failed
    assert all(r.granted is not None for r in sim.requests)
    return sim


def three_models(**policy: float | int | None) -> Scheduler:
    s = lmswitch(**policy)
    s.set_catalog({"c": 4 * GiB})
    return s


@pytest.mark.parametrize("seed", range(5))
def test_mixed_three_model_workload_swaps_far_less_than_fcfs(seed: int) -> None:
    ours = mixed(three_models(max_loaded=1), seed)
    fcfs = mixed(Fcfs(), seed)
    assert ours.loads * 2 <= fcfs.loads
    # One swap can be ahead of a request's own: two models' turns at most, each bounded by
    # grace + the longest request + one unload + one load.
    assert max(r.waited for r in ours.requests) <= 2 * (10.0 + 3.0 + 2.0 + 2.0) + EPS


# -- priorities with aging (docs/design.md §2.4) ----------------------------------------------


@pytest.mark.parametrize("grace", [1.0, 10.0])
def test_an_interactive_key_is_not_stuck_behind_a_batch_job(grace: float) -> None:
    """One slot; a batch job (priority 0) streams to a and queues for c; an interactive request
    (priority 10) for b is served within swap_grace + the longest request + one swap."""
    load_s, unload_s = 2.0, 2.0
    sched = three_models(max_loaded=1, swap_grace_s=grace)
    sim = Sim(sched, load_s=load_s, unload_s=unload_s)
    for i in range(120):  # a new 1 s request to a every 0.5 s for a minute
        sim.at(i * 0.5, partial(sim.submit, Request("a", 1.0)))
    for i in range(5):  # and requests for c, queued first
        sim.at(4.0 + i * 0.1, partial(sim.submit, Request("c", 1.0)))
    b = Request("b", 1.0, priority=10)
    sim.at(5.0, partial(sim.submit, b))
    sim.run(until=3600.0)
    assert not sim.failed
    assert all(r.granted is not None for r in sim.requests)
    assert b.waited <= grace + 1.0 + unload_s + load_s + EPS
    first_c = min(r.granted or math.inf for r in sim.requests if r.model == "c")
    assert b.granted is not None
    assert b.granted < first_c  # b went ahead of the batch's c


# Pure and bounded by its example count: ~7 s here, past the suite's 30 s hang guard under CI's
# coverage tracing on a busy machine (a clean-clone run timed it out).
@pytest.mark.timeout(120)
@settings(max_examples=200, deadline=None, report_multiple_bugs=False)
@given(
    aging=st.sampled_from([0.5, 2.0, 10.0]),
    high=st.integers(1, 3),
    grace=st.sampled_from([0.0, 1.0, 5.0]),
    period=st.sampled_from([0.2, 0.5, 1.5]),
    longest=st.sampled_from([0.5, 1.0, 3.0]),
    upstream_s=st.sampled_from([0.0, 0.5, 2.0]),
    start=st.sampled_from([0.0, 3.0, 7.5]),
)
def test_aging_bounds_the_wait_behind_a_high_priority_stream(
    aging: float,
    high: int,
    grace: float,
    period: float,
    longest: float,
    upstream_s: float,
    start: float,
) -> None:
    """One slot; a steady stream of priority `high` alternates between models a and b (so one
    of them always waits for a load, ahead of anything of lower priority); a request of
    priority 0 for c still gets its turn.

    Its bound: no waiter that joins more than high x priority_aging after it is ahead of it
    (the next load is always for the first in line, §2.4), and once none joins ahead of it,
    every model with waiters ahead of it is loaded at most once more before c, each swap bounded
    by the fairness rule (grace + the longest request + one unload + one load)."""
    sched = three_models(
        max_loaded=1,
        swap_grace_s=grace,
        priority_aging_s=aging,
        queue_timeout_s=1e9,
        max_queue=10**6,
    )
    sim = Sim(sched, load_s=upstream_s, unload_s=upstream_s)
    n = int(120.0 / period)
    for i in range(n):  # for two minutes
        request = Request("ab"[i % 2], longest, priority=high)
        sim.at(i * period, partial(sim.submit, request))
    c = Request("c", longest)
    sim.at(start, partial(sim.submit, c))
    sim.run(until=36_000.0)
    assert not sim.failed
    assert all(r.granted is not None for r in sim.requests)
    swap = grace + longest + 2 * upstream_s
    bound = high * aging + 3 * swap
    assert c.waited <= bound + EPS, f"c waited {c.waited:.2f} s, more than {bound:.2f} s"
