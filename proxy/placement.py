"""Placement: which host of the pool a request for a model goes to (docs/design.md §3.5).

Pure, like `proxy.scheduler`: the pool (`proxy.manager`) takes a `HostView` of every host for the
model, asks `place`, and queues the request on the host it names, whose own scheduler does the
rest (its one load at a time, fair swapping, pins, idle TTL).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass


class Presence(enum.StrEnum):
    """A model on one host, as placement sees it."""

    READY = "ready"  # loaded and taking requests
    LOADING = "loading"  # being loaded, or queued for a load there
    LEAVING = "leaving"  # draining or unloading: it takes no new requests until loaded again
    ABSENT = "absent"


class Where(enum.StrEnum):
    """Why a request goes to the host it goes to: the step of the placement order."""

    READY = "ready"  # 1. ready there: it goes at once
    LOADING = "loading"  # 2. loading there: it waits for that load
    FITS = "fits"  # 3. it fits there without evicting anything: loaded there
    EVICT = "evict"  # 3. evicting idle, unpinned models there makes room: loaded there
    QUEUE = "queue"  # 4. it waits there, under that host's fair-swapping rules
    DOWN = "down"  # no host that is up has it: a host that is down and has it (ready there, or
    # loading, by preference), tried all the same


@dataclass(frozen=True, slots=True)
class HostView:
    """One host, for one model: what placement weighs."""

    name: str
    up: bool  # its last listing was read, and its last call reached it
    has: bool  # the model is in its catalogue (downloaded there)
    presence: Presence
    in_flight: int  # requests running on the model there
    fits: bool  # the model fits there beside what is resident, evicting nothing
    room: int  # bytes left under its budget with the model loaded (large without a budget)
    idle_victims_used: float | None  # evicting idle, unpinned models makes room: when the
    # most recently used of them was last used; None if that cannot make room
    never: bool  # the model can never fit there (its budget, or its pinned models)
    waiting: int  # requests queued there, for any model


@dataclass(frozen=True, slots=True)
class Placement:
    host: str
    where: Where
    replica: str | None = None  # a host to load another copy on meanwhile (`replicas` > 1)


def place(hosts: Sequence[HostView], replicas: int = 1) -> Placement | None:
    """Where a request for the model goes, among `hosts` (in configuration order, which breaks
    ties); None if no host has the model.

    Among the hosts that are up and have it: (1) where it is ready, the one with the fewest
    requests on it; (2) where it is loading; (3) if fewer than `replicas` hosts hold it, where it
    fits without evicting (most room left), then where evicting idle models makes room (whose
    victims were used least recently); (4) else the host where it will fit soonest. A ready model
    all of whose hosts are busy loads another replica where it fits without evicting, while its
    request goes to a ready one. With no host that is up having it, a host that is down and has
    it: where it is ready, else loading, else the first.
    """
    usable = [h for h in hosts if h.up and h.has]
    if not usable:
        # Nothing up has it: a host that is down may still answer for a model loaded there (its
        # listings fail, its requests may not) or being loaded; else one that has it says why
        # nothing can be loaded there, as a lone host would (None would send the request to a
        # host without the model).
        down = [h for h in hosts if h.has]
        if ready := [h for h in down if h.presence is Presence.READY]:
            return Placement(min(ready, key=_load).name, Where.DOWN)
        if loading := [h for h in down if h.presence is Presence.LOADING]:
            return Placement(min(loading, key=_queue).name, Where.DOWN)
        return Placement(down[0].name, Where.DOWN) if down else None
    holders = [h for h in usable if h.presence is not Presence.ABSENT]
    ready = [h for h in usable if h.presence is Presence.READY]
    if ready:
        best = min(ready, key=_load)
        replica = None
        if len(holders) < replicas and all(h.in_flight for h in ready):
            spare = [h for h in usable if h.presence is Presence.ABSENT and h.fits]
            replica = max(spare, key=_room).name if spare else None
        return Placement(best.name, Where.READY, replica)
    if loading := [h for h in usable if h.presence is Presence.LOADING]:
        return Placement(min(loading, key=_queue).name, Where.LOADING)
    if len(holders) >= replicas:  # leaving every host that holds it: wait for one
        return Placement(min(holders, key=_queue).name, Where.QUEUE)
    candidates = [h for h in usable if not h.never] or usable
    if fits := [h for h in candidates if h.fits]:
        return Placement(max(fits, key=_room).name, Where.FITS)
    if evict := [h for h in candidates if h.idle_victims_used is not None]:
        return Placement(min(evict, key=_victims).name, Where.EVICT)
    return Placement(min(candidates, key=_queue).name, Where.QUEUE)


def _load(host: HostView) -> int:
    return host.in_flight


def _queue(host: HostView) -> int:
    return host.waiting


def _room(host: HostView) -> int:
    return host.room


def _victims(host: HostView) -> float:
    assert host.idle_victims_used is not None  # noqa: S101 - filtered by the caller
    return host.idle_victims_used
