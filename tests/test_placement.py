"""Placement across the pool's hosts: `place` on hand-built views, one rule or tie-break per test,
then `Scheduler.place_view` on real schedulers (what each host tells placement about a model)."""

from __future__ import annotations

from proxy import scheduling as sch
from proxy.placement import HostView, Placement, Presence, Where, place
from proxy.scheduler import Scheduler
from proxy.scheduling import Phase, Policy

GiB = 2**30
READY, LOADING, LEAVING, ABSENT = (
    Presence.READY,
    Presence.LOADING,
    Presence.LEAVING,
    Presence.ABSENT,
)


def view(
    name: str,
    presence: Presence = ABSENT,
    *,
    up: bool = True,
    has: bool = True,
    in_flight: int = 0,
    fits: bool = False,
    room: int = 0,
    victims: float | None = None,
    never: bool = False,
    waiting: int = 0,
) -> HostView:
    """A host as placement sees it for one model; by default up, has it, absent, no room."""
    return HostView(name, up, has, presence, in_flight, fits, room, victims, never, waiting)


# -- the placement order ------------------------------------------------------------------------


def test_ready_comes_first() -> None:
    """A host where the model is ready beats one loading it, one it fits on, one to evict on."""
    hosts = [
        view("fits", fits=True, room=10 * GiB),
        view("evict", victims=1.0),
        view("loading", LOADING),
        view("ready", READY, in_flight=5),
    ]
    assert place(hosts) == Placement("ready", Where.READY)


def test_fewest_in_flight_wins_among_ready() -> None:
    hosts = [view("a", READY, in_flight=3), view("b", READY, in_flight=1), view("c", READY)]
    assert place(hosts) == Placement("c", Where.READY)


def test_ready_ties_break_by_configuration_order() -> None:
    hosts = [
        view("a", READY, in_flight=2),
        view("b", READY, in_flight=1),
        view("c", READY, in_flight=1),
    ]
    assert place(hosts) == Placement("b", Where.READY)
    assert place(list(reversed(hosts))) == Placement("c", Where.READY)


def test_loading_comes_before_a_new_load() -> None:
    """Where the model is loading (or queued for its load) the request waits for that load,
    even with room elsewhere and replicas to spare."""
    hosts = [view("fits", fits=True, room=10 * GiB), view("loading", LOADING, waiting=7)]
    assert place(hosts, replicas=2) == Placement("loading", Where.LOADING)


def test_fewest_waiting_wins_among_loading_then_configuration_order() -> None:
    hosts = [
        view("a", LOADING, waiting=4),
        view("b", LOADING, waiting=2),
        view("c", LOADING, waiting=2),
    ]
    assert place(hosts) == Placement("b", Where.LOADING)


def test_fits_without_evicting_comes_before_evicting() -> None:
    hosts = [view("evict", victims=0.0), view("fits", fits=True, room=0)]
    assert place(hosts) == Placement("fits", Where.FITS)


def test_most_room_wins_among_fits_then_configuration_order() -> None:
    hosts = [
        view("a", fits=True, room=2 * GiB),
        view("b", fits=True, room=6 * GiB),
        view("c", fits=True, room=6 * GiB),
    ]
    assert place(hosts) == Placement("b", Where.FITS)


def test_least_recently_used_victims_win_then_configuration_order() -> None:
    """Evicting the victims used longest ago: their clients are the likeliest to be gone."""
    hosts = [view("a", victims=50.0), view("b", victims=20.0), view("c", victims=20.0)]
    assert place(hosts) == Placement("b", Where.EVICT)


def test_queue_on_the_host_with_fewest_waiting_when_nothing_fits() -> None:
    hosts = [view("a", waiting=3), view("b", waiting=1), view("c", waiting=1)]
    assert place(hosts) == Placement("b", Where.QUEUE)


# -- which hosts count ----------------------------------------------------------------------------


def test_a_host_that_is_down_gets_nothing_new() -> None:
    """Ready, loading or roomy: a host that is down is passed over while one that is up has it."""
    hosts = [
        view("down-ready", READY, up=False),
        view("down-loading", LOADING, up=False),
        view("down-fits", up=False, fits=True, room=99 * GiB),
        view("up", waiting=9),
    ]
    assert place(hosts) == Placement("up", Where.QUEUE)


def test_a_host_without_the_model_is_passed_over() -> None:
    hosts = [view("a", READY, has=False), view("b", fits=True)]
    assert place(hosts) == Placement("b", Where.FITS)


def test_ready_on_a_host_that_is_down_is_the_fallback() -> None:
    """No host that is up has the model: a down host where it is ready is tried all the same
    (its listings fail, its requests may not), the least busy one."""
    hosts = [
        view("a", READY, up=False, in_flight=2),
        view("b", READY, up=False, in_flight=1),
        view("c", READY, has=False),
    ]
    assert place(hosts) == Placement("b", Where.DOWN)


def test_a_model_only_on_hosts_that_are_down_goes_to_one_of_them() -> None:
    """No host that is up has the model, nor has any that is down it ready: the request still
    goes to a down host that has it, one loading it first, else the first in order (there its
    scheduler says that the host cannot be read, as a lone host's would). None would send it to
    the pool's first host, which may be up without the model, and load it there (the pool's
    state machine found this)."""
    hosts = [view("a", has=False, fits=True), view("b", up=False), view("c", LEAVING, up=False)]
    assert place(hosts) == Placement("b", Where.DOWN)
    hosts += [view("d", LOADING, up=False, waiting=2), view("e", LOADING, up=False, waiting=1)]
    assert place(hosts) == Placement("e", Where.DOWN)


def test_no_host_has_it() -> None:
    assert place([view("a", READY, has=False), view("b", has=False, fits=True)]) is None
    assert place([]) is None


# -- replicas -----------------------------------------------------------------------------------


def test_one_replica_leaving_a_host_queues_there() -> None:
    """With replicas=1 a model draining or unloading on a host is not loaded on another: its
    request waits there (that host's fair swapping brings it back)."""
    hosts = [view("a", LEAVING, waiting=5), view("b", fits=True, room=10 * GiB)]
    assert place(hosts, replicas=1) == Placement("a", Where.QUEUE)


def test_leaving_hosts_count_as_holders() -> None:
    """Replicas=2 and the model leaving two hosts: it waits on one of them (fewest waiting)."""
    hosts = [view("a", LEAVING, waiting=3), view("b", LEAVING, waiting=1), view("c", fits=True)]
    assert place(hosts, replicas=2) == Placement("b", Where.QUEUE)


def test_two_replicas_leaving_one_host_loads_on_another() -> None:
    hosts = [view("a", LEAVING), view("b", fits=True, room=GiB)]
    assert place(hosts, replicas=2) == Placement("b", Where.FITS)


def test_busy_ready_model_names_a_replica_where_it_fits() -> None:
    """Replicas=2, ready on one host that has requests in flight: the request goes there at
    once, and another copy loads where it fits without evicting (most room)."""
    hosts = [
        view("a", READY, in_flight=1),
        view("b", fits=True, room=2 * GiB),
        view("c", fits=True, room=8 * GiB),
        view("d", victims=0.0),
    ]
    assert place(hosts, replicas=2) == Placement("a", Where.READY, replica="c")


def test_no_replica_while_a_ready_host_is_idle() -> None:
    hosts = [view("a", READY, in_flight=1), view("b", READY), view("c", fits=True)]
    assert place(hosts, replicas=3) == Placement("b", Where.READY)


def test_no_replica_beyond_replicas() -> None:
    """A copy loading (or leaving) elsewhere already counts toward `replicas`."""
    busy, spare, at_a = (
        view("a", READY, in_flight=4),
        view("c", fits=True),
        Placement("a", Where.READY),
    )
    assert place([busy, view("b", LOADING), spare], replicas=2) == at_a
    assert place([busy, view("b", LEAVING), spare], replicas=2) == at_a
    assert place([busy, spare], replicas=1) == at_a


def test_no_replica_where_it_would_evict() -> None:
    hosts = [view("a", READY, in_flight=1), view("b", victims=0.0)]
    assert place(hosts, replicas=2) == Placement("a", Where.READY)


def test_hosts_where_it_never_fits_are_skipped() -> None:
    """A host whose budget (or pinned models) can never hold the model gets no request while
    another can: even one with a longer queue."""
    hosts = [view("never", never=True), view("b", waiting=4), view("c", waiting=6)]
    assert place(hosts) == Placement("b", Where.QUEUE)


def test_where_it_never_fits_anywhere_it_queues_on_one_and_is_refused() -> None:
    """Every host's pinned models fill it: the request queues on one (fewest waiting) and
    that host's scheduler refuses it with no_fit, as a lone host would."""
    hosts = []
    for name in ("a", "b"):
        s = Scheduler(Policy(max_loaded=1))
        s.set_catalog({"pin": GiB, "m": GiB})
        s.pin("pin", True)
        s.arrive("pin", 0.0, takes_lease=False)
        assert s.decide(0.0) == [sch.Load("pin")]
        s.load_done("pin", "pin", 0.0)
        s.decide(0.0)
        hosts.append((name, s))
    views = [s.place_view("m", name, up=True, has=True, size=GiB) for name, s in hosts]
    assert all(v.never for v in views)
    placement = place(views)
    assert placement == Placement("a", Where.QUEUE)
    s = hosts[0][1]
    waiter = s.arrive("m", 1.0)
    [fail] = s.decide(1.0)
    assert isinstance(fail, sch.Fail)
    assert (fail.waiter, fail.reason) == (waiter, sch.FailReason.NO_FIT)


# -- Scheduler.place_view -----------------------------------------------------------------------


def make(**policy: object) -> Scheduler:
    s = Scheduler(Policy(**policy))  # type: ignore[arg-type]
    s.set_catalog({"a": 4 * GiB, "b": 4 * GiB, "c": 8 * GiB})
    return s


def load_ready(s: Scheduler, key: str, now: float) -> None:
    """Bring `key` to ready through a real load, used last at `now`."""
    s.arrive(key, now, takes_lease=False)
    assert sch.Load(key) in s.decide(now)
    s.load_done(key, key, now)
    s.decide(now)


def presence(s: Scheduler, key: str) -> Presence:
    return s.place_view(key, "h", up=True, has=True, size=4 * GiB).presence


def test_place_view_presence_follows_the_phase() -> None:
    """Ready is READY; loading, or queued for a load here, is LOADING; draining or unloading is
    LEAVING; a model the scheduler never saw is ABSENT."""
    s = make(max_loaded=1, swap_grace_s=0.0)
    assert presence(s, "a") is ABSENT
    s.arrive("a", 0.0)
    assert s.decide(0.0) == [sch.Load("a")]
    assert presence(s, "a") is LOADING
    s.arrive("b", 0.0)
    s.decide(0.0)
    assert s.models["b"].phase is Phase.ABSENT
    assert presence(s, "b") is LOADING  # queued for its load here
    s.load_done("a", "a", 1.0)
    s.decide(1.0)  # a's waiter holds a lease; grace is over for b: a drains
    assert s.models["a"].phase is Phase.DRAINING
    assert presence(s, "a") is LEAVING
    s.release("a", 2.0)
    assert s.decide(2.0) == [sch.Unload("a", "a", sch.UnloadReason.EVICTED)]
    assert presence(s, "a") is LEAVING
    s.unload_done("a")
    s.decide(2.0)
    assert presence(s, "a") is ABSENT
    s.load_done("b", "b", 3.0)
    s.decide(3.0)
    view_b = s.place_view("b", "h", up=False, has=False, size=0)
    assert (view_b.presence, view_b.up, view_b.has, view_b.in_flight) == (READY, False, False, 1)


def test_place_view_counts_leases_and_every_waiter() -> None:
    s = make(max_loaded=1)
    load_ready(s, "a", 0.0)
    for _ in range(3):
        s.arrive("a", 1.0)
    s.arrive("b", 1.0)
    s.arrive("c", 1.0)
    s.decide(1.0)
    assert s.place_view("a", "h", up=True, has=True, size=0).in_flight == 3
    assert s.place_view("a", "h", up=True, has=True, size=0).waiting == 2


def test_place_view_fits_and_room() -> None:
    """Room is what is left under the budget with the model loaded; without a budget every host
    has more room than any with one."""
    s = make(max_loaded=0, memory_budget=16 * GiB)
    load_ready(s, "a", 0.0)  # 4 GiB resident
    c = s.place_view("c", "h", up=True, has=True, size=8 * GiB)
    assert (c.fits, c.room, c.never) == (True, 4 * GiB, False)
    load_ready(s, "b", 0.0)  # 8 GiB resident: c (8 GiB) still fits, with no room left
    c = s.place_view("c", "h", up=True, has=True, size=8 * GiB)
    assert (c.fits, c.room) == (True, 0)
    big = s.place_view("big", "h", up=True, has=True, size=12 * GiB)  # not in its catalogue
    assert (big.fits, big.room) == (False, -4 * GiB)
    unlimited = make(max_loaded=0).place_view("c", "h", up=True, has=True, size=8 * GiB)
    assert unlimited.fits
    assert unlimited.room > 1024 * 16 * GiB


def test_place_view_fits_counts_max_loaded() -> None:
    s = make(max_loaded=1)
    assert s.place_view("b", "h", up=True, has=True, size=4 * GiB).fits
    load_ready(s, "a", 0.0)
    b = s.place_view("b", "h", up=True, has=True, size=4 * GiB)
    assert not b.fits
    assert b.idle_victims_used == 0.0  # a, idle, used at 0.0, makes room
    assert not s.place_view("a", "h", up=True, has=True, size=4 * GiB).fits  # present: no "fits"


def test_idle_victims_used_is_the_latest_use_among_the_victims() -> None:
    """The idle models to evict go least recently used first; the view gives when the most
    recent of them was used (placement prefers the host whose victims are stalest)."""
    s = make(max_loaded=0, memory_budget=12 * GiB)
    load_ready(s, "a", 3.0)
    load_ready(s, "b", 5.0)  # 8 GiB of 12 resident, a used before b
    fits = s.place_view("c", "h", up=True, has=True, size=8 * GiB)
    assert (fits.fits, fits.idle_victims_used) == (False, 3.0)  # evicting a is enough
    victims = s.idle_victims(s.model("c"))
    assert victims is not None
    assert [m.key for m in victims] == ["a"]
    huge = s.place_view("huge", "h", up=True, has=True, size=12 * GiB)
    assert huge.idle_victims_used == 5.0  # both must go
    fits_now = s.place_view("small", "h", up=True, has=True, size=GiB)
    assert (fits_now.fits, fits_now.idle_victims_used) == (True, 0.0)
    assert s.idle_victims(s.model("small")) == []


def test_idle_victims_none_when_only_busy_models_could_make_room() -> None:
    """A model with requests running, or requests waiting for it, is nobody's idle victim:
    evicting it would not make room now, so the view says None."""
    s = make(max_loaded=1)
    load_ready(s, "a", 0.0)
    s.arrive("a", 1.0)
    s.decide(1.0)  # a has a lease
    assert s.place_view("b", "h", up=True, has=True, size=4 * GiB).idle_victims_used is None
    s.release("a", 2.0)
    assert s.place_view("b", "h", up=True, has=True, size=4 * GiB).idle_victims_used == 2.0
    two = make(max_loaded=2)
    load_ready(two, "a", 0.0)
    two.arrive("b", 0.0)
    assert two.decide(0.0) == [sch.Load("b")]
    assert two.place_view("c", "h", up=True, has=True, size=8 * GiB).idle_victims_used == 0.0
    two.arrive("a", 1.0)
    two.decide(1.0)  # a busy, b loading: neither is an idle victim
    assert two.place_view("c", "h", up=True, has=True, size=8 * GiB).idle_victims_used is None


def test_pinned_models_are_not_victims() -> None:
    s = make(max_loaded=2)
    load_ready(s, "a", 0.0)
    load_ready(s, "b", 1.0)
    s.pin("a", True)
    c = s.place_view("c", "h", up=True, has=True, size=8 * GiB)
    assert (c.idle_victims_used, c.never) == (1.0, False)  # b, not a
    s.pin("b", True)
    c = s.place_view("c", "h", up=True, has=True, size=8 * GiB)
    assert (c.idle_victims_used, c.never) == (None, True)  # pins fill both slots


def test_without_a_budget_the_emptier_host_has_more_room() -> None:
    """Hosts with no memory budget and slots to spare: a cold model goes to the one holding
    less, so that two cold models load on two hosts at once rather than one after the other on
    the first (the helper's finding: room was a constant, and ties went to the first host)."""
    busy, empty = make(max_loaded=2), make(max_loaded=2)
    busy.arrive("a", 0.0)
    assert busy.decide(0.0) == [sch.Load("a")]  # a is loading there: it holds memory
    views = [
        scheduler.place_view("b", name, up=True, has=True, size=4 * GiB)
        for name, scheduler in (("h0", busy), ("h1", empty))
    ]
    assert views[0].room < views[1].room
    assert place(views) == Placement("h1", Where.FITS)
