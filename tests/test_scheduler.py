"""The pure scheduler, driven by hand: no I/O, no clock but the one passed in."""

from __future__ import annotations

from proxy import scheduling as sch
from proxy.scheduler import Scheduler
from proxy.scheduling import Phase, Policy

GiB = 2**30


def make(**policy: object) -> Scheduler:
    s = Scheduler(Policy(**policy))  # type: ignore[arg-type]
    s.set_catalog({"a": 4 * GiB, "b": 4 * GiB, "c": 8 * GiB})
    return s


def kinds(actions: list[sch.Action]) -> list[str]:
    return [type(a).__name__ for a in actions]


def load_ready(s: Scheduler, key: str, now: float) -> None:
    """Bring `key` to ready through a real load."""
    waiter = s.arrive(key, now, takes_lease=False)
    actions = s.decide(now)
    assert sch.Load(key) in actions
    s.load_done(key, key, now)
    assert sch.Grant(waiter) in s.decide(now)


def test_arrivals_for_an_absent_model_cause_one_load() -> None:
    s = make()
    waiters = [s.arrive("a", 0.0) for _ in range(10)]
    assert kinds(s.decide(0.0)) == ["Load"]
    assert s.decide(0.1) == []  # the load is in flight: nothing more
    s.load_done("a", "a", 1.0)
    actions = s.decide(1.0)
    assert actions == [sch.Grant(w) for w in waiters]
    assert s.models["a"].leases == 10


def test_ready_model_grants_at_once() -> None:
    s = make()
    load_ready(s, "a", 0.0)
    waiter = s.arrive("a", 1.0)
    assert s.decide(1.0) == [sch.Grant(waiter)]


def test_swap_waits_for_the_lease_and_the_idle_gap() -> None:
    s = make(max_loaded=1, swap_grace_s=10.0)
    load_ready(s, "a", 0.0)
    s.arrive("a", 1.0)
    s.decide(1.0)  # a has one lease
    s.arrive("b", 1.0)
    assert s.decide(1.0) == []  # b waits: a is busy and within grace
    s.release("a", 2.0)
    assert s.decide(2.0) == []  # a just went idle: its client may come back
    assert s.next_wakeup(2.0) == 2.0 + sch.IDLE_GAP_S
    actions = s.decide(2.0 + sch.IDLE_GAP_S)
    assert actions == [sch.Unload("a", "a", sch.UnloadReason.EVICTED)]
    s.unload_done("a")
    assert s.decide(3.0) == [sch.Load("b")]


def test_grace_over_drains_a_busy_model() -> None:
    s = make(max_loaded=1, swap_grace_s=5.0)
    load_ready(s, "a", 0.0)
    s.arrive("a", 0.0)
    s.decide(0.0)
    s.arrive("b", 1.0)
    assert s.decide(5.9) == []
    assert s.decide(6.0) == [sch.Drain("a")]
    late = s.arrive("a", 6.5)
    assert s.decide(6.5) == []  # a draining: new a requests queue
    s.release("a", 7.0)
    assert s.decide(7.0) == [sch.Unload("a", "a", sch.UnloadReason.EVICTED)]
    s.unload_done("a")
    assert s.decide(7.1) == [sch.Load("b")]
    s.load_done("b", "b", 8.0)
    grants = s.decide(8.0)
    assert [type(a) for a in grants] == [sch.Grant]
    assert s.waiters == {late.id: late}  # a's late request waits for the next swap


def test_pinned_models_are_never_victims_and_no_fit_is_refused() -> None:
    s = make(max_loaded=1)
    s.pin("a", True)
    load_ready(s, "a", 0.0)
    waiter = s.arrive("b", 1.0)
    [fail] = s.decide(1.0)
    assert isinstance(fail, sch.Fail)
    assert fail.waiter == waiter
    assert fail.reason is sch.FailReason.NO_FIT
    assert "pinned" in fail.message
    assert s.models["a"].phase is Phase.READY


def test_memory_budget_picks_enough_victims_lru_first() -> None:
    s = make(max_loaded=0, memory_budget=12 * GiB)
    load_ready(s, "a", 0.0)
    load_ready(s, "b", 1.0)  # a and b: 8 GiB of 12
    s.arrive("c", 2.0)  # needs 8 GiB: one of them must go, a (least recently used)
    assert s.decide(2.0) == [sch.Unload("a", "a", sch.UnloadReason.EVICTED)]


def test_model_bigger_than_the_budget_is_refused_at_once() -> None:
    s = make(memory_budget=6 * GiB)
    s.arrive("c", 0.0)
    [fail] = s.decide(0.0)
    assert isinstance(fail, sch.Fail)
    assert fail.reason is sch.FailReason.NO_FIT
    assert "memory_budget" in fail.message


def test_load_failure_fails_every_waiter_and_allows_a_retry() -> None:
    s = make()
    first = [s.arrive("a", 0.0) for _ in range(3)]
    s.decide(0.0)
    error = RuntimeError("no memory")
    s.load_failed("a", error)
    failed = s.decide(1.0)
    assert [a.waiter for a in failed if isinstance(a, sch.Fail)] == first
    assert [a.error for a in failed if isinstance(a, sch.Fail)] == [error] * 3
    s.arrive("a", 2.0)
    assert s.decide(2.0) == [sch.Load("a")]


def test_waiters_expire_at_their_deadline() -> None:
    s = make(queue_timeout_s=30.0)
    first = s.arrive("a", 0.0)
    s.decide(0.0)  # loading a: slow
    late = s.arrive("b", 1.0)
    assert s.next_wakeup(1.0) == 30.0
    actions = s.decide(31.0)
    assert [(a.waiter, a.reason) for a in actions if isinstance(a, sch.Fail)] == [
        (first, sch.FailReason.EXPIRED),
        (late, sch.FailReason.EXPIRED),
    ]


def test_queue_limit_refuses_the_newest() -> None:
    s = make(max_queue=2)
    s.arrive("a", 0.0)
    s.arrive("a", 0.0)
    third = s.arrive("a", 0.0)
    actions = s.decide(0.0)
    fails = [a for a in actions if isinstance(a, sch.Fail)]
    assert [(f.waiter, f.reason) for f in fails] == [(third, sch.FailReason.QUEUE_FULL)]


def test_cancelled_waiter_does_not_trigger_a_load() -> None:
    s = make(max_loaded=1)
    load_ready(s, "a", 0.0)
    s.arrive("a", 0.0)
    s.decide(0.0)
    waiter = s.arrive("b", 1.0)
    s.decide(1.0)
    assert s.cancel(waiter.id)
    s.release("a", 2.0)
    assert s.decide(10.0) == []
    assert s.models["a"].phase is Phase.READY


def test_idle_ttl_unloads_an_idle_model() -> None:
    s = make(idle_ttl_s=60.0)
    load_ready(s, "a", 0.0)
    assert s.next_wakeup(1.0) == 60.0
    assert s.decide(59.0) == []
    assert s.decide(60.0) == [sch.Unload("a", "a", sch.UnloadReason.IDLE)]


def test_a_zero_ttl_unloads_as_the_last_lease_ends_and_ends_with_the_instance() -> None:
    """Ollama's `keep_alive: 0`: the release is not settled (the unload is due at once); once
    unloaded, the model's TTL is the policy's again. A negative keep_alive (inf) never expires."""
    s = make(idle_ttl_s=60.0)
    load_ready(s, "a", 0.0)
    s.set_idle_ttl("a", 0.0)
    assert s.try_grant("a", 1.0)
    s.release("a", 2.0)
    assert not s.release_settles("a")
    assert s.decide(2.0) == [sch.Unload("a", "a", sch.UnloadReason.IDLE)]
    s.unload_done("a")
    assert s.idle_ttl("a") == 60.0
    load_ready(s, "b", 3.0)
    s.set_idle_ttl("b", float("inf"))
    assert s.idle_ttl("b") is None
    assert s.release_settles("b")
    assert s.decide(1e9) == []


def test_observed_adopts_and_drops_models() -> None:
    s = make()
    s.observed({"a": ["a", "a:2"]}, 0.0)
    assert s.models["a"].phase is Phase.READY
    assert s.models["a"].adopted
    assert s.models["a"].duplicates == ["a:2"]
    assert s.usage() == (2, 8 * GiB)
    assert s.decide(0.0) == [sch.Observed("a", "adopted")]
    s.observed({}, 1.0)
    assert s.models["a"].instances == 0
    assert s.decide(1.0) == [sch.Observed("a", "vanished")]


def test_fast_grant_only_when_decide_would_grant_at_once() -> None:
    s = make(max_loaded=1)
    assert not s.try_grant("a", 0.0)  # absent
    load_ready(s, "a", 0.0)
    assert s.try_grant("a", 1.0)
    assert s.models["a"].leases == 1
    assert s.release_settles("a")
    s.arrive("b", 2.0)
    assert not s.try_grant("a", 2.0)  # someone waits: the fairness rule decides
    assert not s.release_settles("a")
    s.release("a", 3.0)
    s.request_unload("a")
    s.waiters.clear()
    assert not s.try_grant("a", 3.0)  # an operator is unloading it


def test_nothing_is_loaded_or_evicted_while_the_state_cannot_be_read() -> None:
    s = make(max_loaded=1)
    load_ready(s, "a", 0.0)
    s.set_unreadable("LM Studio did not list its models in 5 s")
    on_a = s.arrive("a", 1.0)
    on_b = s.arrive("b", 1.0)
    actions = s.decide(1.0)
    assert sch.Grant(on_a) in actions  # the loaded model still answers
    fails = [a for a in actions if isinstance(a, sch.Fail)]
    assert [(f.waiter, f.reason) for f in fails] == [(on_b, sch.FailReason.UNREADABLE)]
    assert "did not list its models" in fails[0].message
    assert not any(isinstance(a, sch.Load | sch.Unload) for a in actions)
    s.release("a", 2.0)
    s.set_unreadable(None)
    s.arrive("b", 3.0)
    assert kinds(s.decide(3.0 + sch.IDLE_GAP_S)) == ["Unload"]  # the swap goes on


def test_a_load_waits_while_lm_studio_may_be_loading_for_a_probe() -> None:
    s = make(max_loaded=2)
    load_ready(s, "a", 0.0)
    s.set_probed("a", True)  # a request LM Studio may JIT-load `a` for is out
    s.arrive("b", 1.0)
    assert s.decide(1.0) == []
    assert s.load_held
    s.set_probed("a", False)
    assert s.decide(1.1) == [sch.Load("b")]
    assert not s.load_held


def test_an_operators_load_answers_when_an_unload_came_meanwhile() -> None:
    s = make()
    load = s.arrive("a", 0.0, takes_lease=False)
    assert s.decide(0.0) == [sch.Load("a")]
    s.request_unload("a")  # during the load
    s.load_done("a", "a", 1.0)
    actions = s.decide(1.0)
    assert actions[0] == sch.Grant(load)
    assert sch.Unload("a", "a", sch.UnloadReason.ADMIN) in actions


# -- priorities with aging (docs/design.md §2.4) ----------------------------------------------


def test_priority_picks_the_next_model() -> None:
    s = make(max_loaded=1, swap_grace_s=5.0, priority_aging_s=30.0)
    load_ready(s, "a", 0.0)
    s.arrive("c", 1.0)  # a batch job came first
    s.arrive("b", 2.0, priority=10)  # an interactive request for another model
    assert s.queue() == [("b", 1), ("c", 1)]
    assert s.decide(2.0 + sch.IDLE_GAP_S) == [sch.Unload("a", "a", sch.UnloadReason.EVICTED)]
    s.unload_done("a")
    assert s.decide(3.0) == [sch.Load("b")]


def test_equal_priorities_keep_the_order_of_arrival() -> None:
    for priority in (0, 3):
        s = make(max_loaded=1, priority_aging_s=30.0)
        load_ready(s, "a", 0.0)
        s.arrive("c", 1.0, priority=priority)
        s.arrive("b", 2.0, priority=priority)
        s.arrive("c", 3.0, priority=priority)
        assert s.queue() == [("c", 2), ("b", 1)]
        assert s.decide(2.0 + sch.IDLE_GAP_S) == [sch.Unload("a", "a", sch.UnloadReason.EVICTED)]
        s.unload_done("a")
        assert s.decide(3.0) == [sch.Load("c")]


def test_aging_lets_a_low_priority_waiter_win_after_enough_waiting() -> None:
    # One level per 10 s waited: priority 2 counts as having come 20 s earlier.
    early = make(max_loaded=1, swap_grace_s=60.0, priority_aging_s=10.0)
    late = make(max_loaded=1, swap_grace_s=60.0, priority_aging_s=10.0)
    for s, when in ((early, 19.0), (late, 21.0)):
        load_ready(s, "a", 0.0)
        s.arrive("c", 0.0)  # low priority, waiting since 0 (a is idle, within the idle gap)
        s.arrive("b", when, priority=2)
        assert s.decide(when) == [sch.Unload("a", "a", sch.UnloadReason.EVICTED)]
        s.unload_done("a")
        loaded = s.decide(when)
        assert loaded == [sch.Load("b" if s is early else "c")], (when, loaded)


def test_a_swap_under_way_is_not_turned_back_by_a_higher_priority() -> None:
    s = make(max_loaded=1)
    load_ready(s, "a", 0.0)
    s.arrive("c", 1.0)
    assert s.decide(1.0) == [sch.Unload("a", "a", sch.UnloadReason.EVICTED)]
    s.arrive("b", 1.5, priority=10)  # during the unload made for c
    assert s.queue()[0] == ("b", 1)  # b is first in line, after the swap under way
    s.unload_done("a")
    assert s.decide(2.0) == [sch.Load("c")]
    s.load_done("c", "c", 3.0)
    assert kinds(s.decide(3.0)) == ["Grant"]
    s.release("c", 3.5)
    assert s.decide(3.5 + sch.IDLE_GAP_S) == [sch.Unload("c", "c", sch.UnloadReason.EVICTED)]
    s.unload_done("c")
    assert s.decide(4.0) == [sch.Load("b")]


def test_queue_overflow_refuses_the_lowest_effective_priority_newest_first() -> None:
    s = make(max_queue=3, priority_aging_s=10.0)
    old_low = s.arrive("a", 0.0)  # waited 30 s at 30: counts as priority 3
    high = s.arrive("b", 29.0, priority=5)
    low1 = s.arrive("a", 29.0)
    low2 = s.arrive("c", 30.0)  # the newest of the lowest
    mid = s.arrive("c", 30.0, priority=1)
    s.set_unreadable(None)
    s.models["a"].phase = s.models["b"].phase = s.models["c"].phase = Phase.LOADING
    fails = [a for a in s.decide(30.0) if isinstance(a, sch.Fail)]
    assert [f.waiter for f in fails] == [low1, low2]
    assert all(f.reason is sch.FailReason.QUEUE_FULL for f in fails)
    assert [w.id for w in s.ranked()] == [high.id, old_low.id, mid.id]
