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


def test_the_idle_gap_waits_only_for_a_client_that_may_come_back() -> None:
    """A lone client that used a and now waits for b cannot send another request for a: the
    swap starts at once. A second client of a, or a client not known, may: the gap holds."""
    evicted = sch.Unload("a", "a", sch.UnloadReason.EVICTED)
    cases: list[tuple[list[str | None], bool]] = [([], False), (["c2"], True), ([None], True)]
    for others, expect_gap in cases:
        s = make(max_loaded=1, swap_grace_s=10.0)
        load_ready(s, "a", 0.0)
        for client in ["c1", *others]:
            s.arrive("a", 1.0, client=client)
            s.decide(1.0)
            s.release("a", 2.0, client)
        s.arrive("b", 2.0, client="c1")
        assert s.decide(2.0) == ([] if expect_gap else [evicted]), others
        if expect_gap:
            assert s.decide(2.0 + sch.IDLE_GAP_S) == [evicted]


def test_a_client_not_seen_for_a_while_is_not_waited_for() -> None:
    s = make(max_loaded=1, swap_grace_s=10.0)
    load_ready(s, "a", 0.0)
    for client, at in [("c2", 1.0), ("c1", 20.0)]:
        s.arrive("a", at, client=client)
        s.decide(at)
        s.release("a", at, client)
    s.arrive("b", 20.0, client="c1")  # c2 last used a 19 s ago: not coming back for it
    assert s.decide(20.0) == [sch.Unload("a", "a", sch.UnloadReason.EVICTED)]


def _used(s: Scheduler, key: str, times: list[float]) -> None:
    for now in times:
        s.arrive(key, now)
        s.decide(now)
        s.release(key, now + 0.1)


def test_cost_eviction_keeps_the_model_that_costs_most_to_reload_per_byte() -> None:
    """A 20 GiB model that took 90 s to load outlives a 2 GiB one that took 3 s under `cost`,
    though it was used less recently; `lru` gives up the least recently used."""
    for eviction, victim in [(sch.Eviction.LRU, "big"), (sch.Eviction.COST, "small")]:
        s = Scheduler(Policy(max_loaded=0, memory_budget=24 * GiB, eviction=eviction))
        s.set_catalog({"big": 20 * GiB, "small": 2 * GiB, "new": 3 * GiB})
        for key, now, took in [("big", 0.0, 90.0), ("small", 100.0, 3.0)]:
            s.arrive(key, now)
            assert s.decide(now) == [sch.Load(key)]
            s.load_done(key, key, now + took, took)
            s.decide(now + took)
            s.release(key, now + took + 1)
        _used(s, "big", [200.0, 210.0])
        _used(s, "small", [300.0, 310.0])
        s.arrive("new", 400.0)
        assert s.decide(400.0) == [sch.Unload(victim, victim, sch.UnloadReason.EVICTED)]
        assert s.worth(s.models["big"]) > s.worth(s.models["small"])


def test_cost_eviction_inflation_lets_old_uses_decay() -> None:
    """Each eviction raises the inflation to the victim's worth, and a model's worth counts from
    the inflation when it was last used: many uses long ago lose to a few uses now."""
    s = Scheduler(Policy(max_loaded=2, eviction=sch.Eviction.COST))
    s.set_catalog(dict.fromkeys("abcd", 4 * GiB))
    for key, now in [("a", 0.0), ("b", 10.0)]:
        s.arrive(key, now)
        s.decide(now)
        s.load_done(key, key, now + 1, 1.0)
        s.decide(now + 1)
        s.release(key, now + 2)
    _used(s, "a", [float(t) for t in range(20, 40)])  # a: 21 uses; b: 1 use
    s.arrive("c", 50.0)
    assert s.decide(50.0) == [sch.Unload("b", "b", sch.UnloadReason.EVICTED)]
    assert s.inflation == s.worth(s.models["b"]) > 0
    s.unload_done("b")
    assert s.decide(50.0) == [sch.Load("c")]
    s.load_done("c", "c", 51.0, 1.0)
    s.decide(51.0)
    s.release("c", 52.0)
    # c's one use counts from the raised inflation: a's many uses before it still count more
    assert s.worth(s.models["a"]) > s.worth(s.models["c"])
    for round_ in range(30):  # c and d take turns for a while; a is not used at all
        key = "d" if round_ % 2 == 0 else "c"
        now = 100.0 + 10 * round_
        s.arrive(key, now)
        for action in s.decide(now):
            if isinstance(action, sch.Unload):
                s.unload_done(action.model)
        for action in s.decide(now):
            if isinstance(action, sch.Load):
                s.load_done(key, key, now + 1, 1.0)
        s.decide(now + 1)
        s.release(key, now + 2)
        if s.models["a"].phase is Phase.ABSENT:
            break
    assert s.models["a"].phase is Phase.ABSENT, "uses long ago never decayed"


def _loaded(s: Scheduler, key: str, now: float, took: float = 1.0) -> None:
    """`key` loaded through a real load that took `took` s, then used once at `now`."""
    s.arrive(key, now)
    actions = s.decide(now)
    for action in actions:
        if isinstance(action, sch.Unload):
            s.unload_done(action.model)
            actions = s.decide(now)
    assert sch.Load(key) in actions
    s.load_done(key, key, now + took, took)
    s.decide(now + took)
    s.release(key, now + took + 0.1)


def test_no_model_is_unloaded_that_the_room_made_does_not_need() -> None:
    """Under either policy: when the victims' order reaches a large model that alone makes
    room, the small ones before it stay loaded."""
    for eviction in sch.Eviction:
        s = Scheduler(Policy(max_loaded=0, memory_budget=10 * GiB, eviction=eviction))
        s.set_catalog({"small": 1 * GiB, "large": 8 * GiB, "new": 8 * GiB})
        _loaded(s, "small", 0.0)  # the least recently used, and worth less than large
        _loaded(s, "large", 10.0, took=20.0)
        s.arrive("new", 40.0)
        actions = s.decide(40.0)
        assert actions == [sch.Unload("large", "large", sch.UnloadReason.EVICTED)], eviction
        s.unload_done("large")
        assert s.decide(40.0) == [sch.Load("new")]
        assert s.models["small"].phase is Phase.READY


def test_cost_eviction_keeps_a_model_whose_client_is_coming_back() -> None:
    """A pipeline calls a small model, then a large one: while its client waits for the large
    one, the small one it just used is the last to go, though it is worth less."""
    s = Scheduler(Policy(max_loaded=2, eviction=sch.Eviction.COST))
    s.set_catalog({"small": 2 * GiB, "other": 2 * GiB, "large": 20 * GiB})
    _loaded(s, "other", 0.0, took=3.0)
    _used(s, "other", [5.0, 6.0, 7.0])  # worth more than small: used more
    _loaded(s, "small", 8.0, took=3.0)
    s.arrive("small", 12.0, client="pipeline")
    s.decide(12.0)
    s.release("small", 13.0, "pipeline")
    assert s.worth(s.models["small"]) < s.worth(s.models["other"])
    s.arrive("large", 13.5, client="pipeline")
    assert s.decide(13.5) == [sch.Unload("other", "other", sch.UnloadReason.EVICTED)]


def test_with_a_count_limit_cost_weighs_reloads_per_slot_not_per_byte() -> None:
    """With max_loaded binding and no memory_budget, a small model that reloads in 3 s is worth
    less than a large one that reloads in 20 s, used as often, though it costs more per byte:
    each takes one slot, and the large one stays."""
    s = Scheduler(Policy(max_loaded=2, eviction=sch.Eviction.COST))
    s.set_catalog({"small": 2 * GiB, "large": 20 * GiB, "new": 4 * GiB})
    _loaded(s, "large", 0.0, took=20.0)
    _loaded(s, "small", 100.0, took=3.0)
    s.arrive("new", 200.0)
    assert s.decide(200.0) == [sch.Unload("small", "small", sch.UnloadReason.EVICTED)]


def test_cost_eviction_remembers_uses_across_reloads() -> None:
    """A popular model evicted and loaded again is still popular."""
    s = Scheduler(Policy(max_loaded=1, eviction=sch.Eviction.COST))
    s.set_catalog({"a": GiB, "b": GiB})
    _loaded(s, "a", 0.0)
    _used(s, "a", [float(t) for t in range(2, 12)])
    _loaded(s, "b", 20.0)
    _loaded(s, "a", 30.0)
    assert s.models["a"].uses == 12


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
