"""Pure scheduling decisions: who gets a lease, what to evict, what to load next, fair swapping.

No I/O, no async and no clock of its own: the driver (`manager.py`) feeds events in, passes the
time, and carries out the actions that `Scheduler.decide` returns. docs/design.md §2 describes
the phases, the decision order, the fairness rule and the invariants.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from proxy.capacity import Capacity, Held
from proxy.loadtimes import LoadTimes
from proxy.placement import HostView, Presence
from proxy.scheduling import (
    LOADED,
    RESIDENT,
    Action,
    Drain,
    Eviction,
    Fail,
    FailReason,
    Grant,
    Load,
    Model,
    Observed,
    Phase,
    Policy,
    Refusal,
    Unload,
    UnloadReason,
    Waiter,
)

# After a failed unload, no upstream action is started for this long, so that an upstream that
# keeps failing is not hammered in a tight loop.
RETRY_HOLD_S = 1.0
# A client that used a model this recently may be about to use it again: the fairness rule's
# idle gap waits for it (docs/design.md §2.4).
RECENT_S = 10.0
# A model's clients are pruned of those not seen for RECENT_S once there are more than this.
_CLIENTS_KEPT = 64


def _serving_order(waiter: Waiter) -> tuple[float, int]:
    return waiter.rank, waiter.id


def _forget_clients(model: Model, now: float) -> None:
    """Forget the clients that have not used `model` for RECENT_S."""
    for client in [c for c, seen in model.clients.items() if now - seen > RECENT_S]:
        del model.clients[client]


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"


class Scheduler:
    """The state of every model and waiter, and the rules that move it along.

    Event methods record what happened; `decide(now)` applies the rules and returns what the
    driver must do. At most one `Load` or `Unload` is outstanding at any time: none is returned
    while a model is `loading` or `unloading`.
    """

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.models: dict[str, Model] = {}
        self.waiters: dict[int, Waiter] = {}  # insertion order is arrival order
        self.hold_until = 0.0
        # Why LM Studio's state cannot be read now (its last listing failed), or None. Nothing
        # is loaded or evicted on the strength of a state that could not be read (§2.3).
        self.unreadable: str | None = None
        self.load_held = False  # the last `decide` held a load back for a probed model (§2.3)
        self._outbox: list[Action] = []
        self._next_id = 0
        self._joined = float("-inf")  # when the last waiter joined the queue (never goes back)
        # The target an eviction was started for: a swap under way is not turned back for a
        # newer waiter of higher priority (§2.4). None once it is loaded or nobody waits for it.
        self.swap_for: str | None = None
        # How long loads took here (learned from the loads the driver reports): cost eviction
        # weighs what a reload would cost, and views show what a load should take (§3.6).
        self.load_times = LoadTimes()
        # Cost eviction's inflation (GDSF's L): the worth of the last model evicted to make
        # room, so that what was used long ago counts less than what is used now (§2.7).
        self.inflation = 0.0
        self.now = 0.0  # the time `decide` last ran at
        # What this host holds, learned from the sets LM Studio accepted and refused; the
        # budget under `memory_budget: auto` (§2.8).
        self.capacity = Capacity()
        # Loads LM Studio refused for lack of memory, by model: room is made before the next try.
        self.refusals: dict[str, Refusal] = {}

    # -- events -----------------------------------------------------------------------------

    def model(self, key: str) -> Model:
        """The model record for `key`, created on first use."""
        if (model := self.models.get(key)) is None:
            model = self.models[key] = Model(key)
        return model

    def set_catalog(self, sizes: Mapping[str, int]) -> None:
        for key, size in sizes.items():
            self.model(key).size_bytes = size

    def set_unreadable(self, why: str | None) -> None:
        """LM Studio's state could not be read (`why`), or could again (None)."""
        self.unreadable = why

    def set_probed(self, key: str, probed: bool) -> None:
        """A request LM Studio may load `key` for is out (True), or no longer (False)."""
        self.model(key).probed = probed

    def pin(self, key: str, pinned: bool) -> None:
        self.model(key).pinned = pinned

    def set_idle_ttl(self, key: str, ttl_s: float | None) -> None:
        self.model(key).idle_ttl_s = ttl_s

    def arrive(
        self,
        key: str,
        now: float,
        *,
        takes_lease: bool = True,
        priority: int = 0,
        client: str | None = None,
    ) -> Waiter:
        """A request for `key` joins the queue; `now` is when it arrived (a retried request's
        first arrival: its deadline counts from then)."""
        self.model(key)
        self._next_id += 1
        # Its rank counts from when it joined, never before an earlier waiter joined, so that
        # with equal priorities the serving order is the order of joining.
        self._joined = max(self._joined, now)
        rank = self._joined - priority * self.policy.priority_aging_s
        deadline = now + self.policy.queue_timeout_s
        waiter = Waiter(self._next_id, key, now, deadline, takes_lease, priority, rank, client)
        self.waiters[waiter.id] = waiter
        return waiter

    def try_grant(self, key: str, now: float, client: str | None = None) -> bool:
        """The fast path: lease a ready model at once when nobody waits for any model.

        Between events the state is settled (every event is followed by `decide`), so with no
        waiters this is exactly what `arrive` + `decide` would do, for a fraction of the work.
        """
        model = self.models.get(key)
        if self.waiters or model is None or model.phase is not Phase.READY:
            return False
        if model.unload_requested:
            return False
        self._lease(model, now, client)
        return True

    def release_settles(self, key: str) -> bool:
        """True if releasing a lease on `key` leaves nothing for `decide` to do at once (an idle
        TTL of 0, Ollama's `keep_alive: 0`, runs out as the lease ends: it does not)."""
        model = self.models[key]
        ttl = self._ttl(model)
        return not self.waiters and not model.unload_requested and (ttl is None or ttl > 0)

    def cancel(self, waiter_id: int) -> bool:
        """The waiter's client went away; False if it was already granted or failed."""
        return self.waiters.pop(waiter_id, None) is not None

    def release(self, key: str, now: float, client: str | None = None) -> None:
        model = self.models[key]
        model.clients[client] = now  # its last request here ended: it may send another
        model.leases -= 1
        assert model.leases >= 0, f"lease underflow on {key}"  # noqa: S101 - an invariant
        if model.leases == 0:
            model.last_used = now

    def load_done(
        self, key: str, instance_id: str, now: float, took_s: float | None = None
    ) -> None:
        """The proxy's load of `key` succeeded at `now`, after `took_s` (learned, if given)."""
        model = self.models[key]
        model.phase = Phase.READY
        model.instance_id = instance_id
        model.adopted = False
        model.last_used = now
        self._fresh(model)
        if took_s is not None:
            self.load_times.record(key, took_s, model.size_bytes)
        self.refusals.pop(key, None)
        self.capacity.fitted(self._held(m for m in self.models.values() if m.instances), now)

    def load_refused(self, key: str, error: Exception, now: float) -> None:
        """LM Studio refused to load `key` for lack of memory (§2.8). Its waiters stay queued:
        `decide` makes room by the eviction policy and tries again, and answers them with
        `error` only once nothing more may be unloaded."""
        model = self.models[key]
        model.phase = Phase.ABSENT
        model.instance_id = None
        beside = [m for m in self.models.values() if m.instances and m is not model]
        self.refusals[key] = Refusal(frozenset(m.key for m in beside), error)
        held = self._held(beside)
        self.capacity.refused_load(
            [*held, Held(key, model.context_length, 1, model.size_bytes)], now
        )

    def set_contexts(self, contexts: Mapping[str, int | None]) -> None:
        """The context lengths models are loaded with, as LM Studio says (a load's answer, a
        listing): what was learned of the capacity at another one is forgotten (§2.8)."""
        for key, context_length in contexts.items():
            if context_length is not None:
                self.model(key).context_length = context_length
                self.capacity.context_seen(key, context_length)

    def _held(self, models: Iterable[Model]) -> list[Held]:
        return [Held(m.key, m.context_length, m.instances, m.size_bytes) for m in models]

    def load_failed(self, key: str, error: Exception) -> None:
        """Every request waiting on this load fails with `error`; the next one may try again."""
        model = self.models[key]
        model.phase = Phase.ABSENT
        model.instance_id = None
        self.fail_waiters(key, error)

    def fail_waiters(self, key: str, error: Exception) -> None:
        """Every request waiting for `key` fails with `error`; the model's phase stays as it is
        (a load that LM Studio goes on with after the proxy stopped waiting for it)."""
        for waiter in [w for w in self.waiters.values() if w.model == key]:
            del self.waiters[waiter.id]
            self._outbox.append(Fail(waiter, FailReason.LOAD_FAILED, str(error), error))

    def unload_done(self, key: str) -> None:
        model = self.models[key]
        model.unload_requested = model.drained_for_swap = False
        if model.duplicates:
            model.phase, model.adopted = Phase.READY, True
            model.instance_id = model.duplicates.pop(0)
            return
        model.phase = Phase.ABSENT
        model.instance_id = None
        model.adopted = False
        model.idle_ttl_s = None  # a request's TTL was its instance's, as LM Studio's JIT has it

    def unload_failed(self, key: str, now: float) -> None:
        model = self.models[key]
        model.phase = Phase.DRAINING if model.unload_requested else Phase.READY
        self.hold_until = now + RETRY_HOLD_S

    def request_unload(self, key: str) -> None:
        """An operator's unload: drain, then unload once the last lease ends."""
        model = self.model(key)
        if model.phase in RESIDENT:
            model.unload_requested = True

    def observed(self, instances: Mapping[str, Sequence[str]], now: float) -> None:
        """Reconcile with LM Studio's real state: `instances` maps model key to instance ids."""
        for key in instances:
            self.model(key)
        for key, model in self.models.items():
            ids = list(instances.get(key, ()))
            if model.phase in (Phase.LOADING, Phase.UNLOADING):
                continue  # our own call in flight will settle it
            if model.phase is Phase.ABSENT:
                if ids:
                    primary = key if key in ids else ids[0]
                    model.phase, model.adopted, model.last_used = Phase.READY, True, now
                    model.instance_id = primary
                    model.duplicates = [i for i in ids if i != primary]
                    self._fresh(model)
                    self._outbox.append(Observed(key, "adopted"))
            elif not ids:
                model.phase, model.instance_id = Phase.ABSENT, None
                model.duplicates.clear()
                model.unload_requested = model.drained_for_swap = model.adopted = False
                model.idle_ttl_s = None
                self._outbox.append(Observed(key, "vanished"))
            else:
                if model.instance_id not in ids:
                    model.instance_id = key if key in ids else ids[0]
                model.duplicates = [i for i in ids if i != model.instance_id]
        # What LM Studio lists, it holds at once (a load of its own may raise what is known).
        held = [
            Held(key, self.model(key).context_length, len(ids), self.model(key).size_bytes)
            for key, ids in instances.items()
        ]
        self.capacity.fitted(held, now)

    # -- queries ----------------------------------------------------------------------------

    def is_loaded(self, key: str) -> bool:
        """Whether `key` is loaded and answering (ready, or draining its last requests)."""
        model = self.models.get(key)
        return model is not None and model.phase in LOADED

    @property
    def busy(self) -> bool:
        """A load or unload call to LM Studio is in flight."""
        return any(m.phase in (Phase.LOADING, Phase.UNLOADING) for m in self.models.values())

    @property
    def loading(self) -> bool:
        """The proxy's load call is in flight."""
        return any(m.phase is Phase.LOADING for m in self.models.values())

    def usage(self, exclude: Iterable[str] = ()) -> tuple[int, int]:
        """Instances and bytes resident in LM Studio, leaving out the models in `exclude`."""
        skip = set(exclude)
        count = size = 0
        for model in self.models.values():
            if model.key not in skip and (n := model.instances):
                count += n
                size += n * model.size_bytes
        return count, size

    def queued(self, key: str) -> int:
        return sum(1 for w in self.waiters.values() if w.model == key)

    def ranked(self) -> list[Waiter]:
        """The waiters in serving order: highest effective priority first, then first come
        (with equal priorities, the order they joined the queue)."""
        return sorted(self.waiters.values(), key=_serving_order)

    def queue(self) -> list[tuple[str, int]]:
        """The models requests wait for and how many wait for each, in the order they are to
        be served: the model loading, then the others by their first waiter in serving order
        (the fairness rule and priorities, §2.4)."""
        order = {m.key: 0 for m in self.models.values() if m.phase is Phase.LOADING}
        for waiter in self.ranked():
            order[waiter.model] = order.get(waiter.model, 0) + waiter.takes_lease
        return list(order.items())

    @property
    def budget(self) -> int | None:
        """The memory budget in bytes: `memory_budget`, or under `auto` the capacity learned
        (None: no limit, or none known yet)."""
        if self.policy.learn_capacity:
            return self.capacity.learned_bytes
        return self.policy.memory_budget

    def fits(self, target: Model, exclude: Iterable[str] = ()) -> bool:
        skip = set(exclude)
        count, size = self.usage(skip)
        policy = self.policy
        if policy.max_loaded and count + 1 > policy.max_loaded:
            return False
        refusal = self.refusals.get(target.key)
        if refusal is not None and all(
            k not in skip and self.models[k].instances for k in refusal.beside
        ):
            return False  # LM Studio refused it beside these: one of them must go first (§2.8)
        budget = self.budget
        if budget is None or size + target.size_bytes <= budget:
            return True
        # A learned capacity is no reason not to try a model beside nothing that may go: only
        # LM Studio can tell whether it fits (§2.8).
        return policy.learn_capacity and all(
            m.pinned
            for m in self.models.values()
            if m.instances and m.key not in skip and m is not target
        )

    def never_fits(self, target: Model) -> str | None:
        """Why `target` cannot fit even with every unpinned model unloaded, or None."""
        pinned = [
            m for m in self.models.values() if m.pinned and m.phase in RESIDENT and m is not target
        ]
        policy = self.policy
        if policy.max_loaded and sum(m.instances for m in pinned) >= policy.max_loaded:
            names = ", ".join(m.key for m in pinned)
            return (
                f"model {target.key!r} cannot be loaded: max_loaded is {policy.max_loaded} "
                f"and pinned models fill every slot ({names})"
            )
        if policy.memory_budget is not None:
            pinned_size = sum(m.instances * m.size_bytes for m in pinned)
            if target.size_bytes + pinned_size > policy.memory_budget:
                beside = f" beside pinned models using {_gib(pinned_size)}" if pinned else ""
                return (
                    f"model {target.key!r} needs {_gib(target.size_bytes)}, which does not fit "
                    f"in memory_budget {_gib(policy.memory_budget)}{beside}"
                )
        return None

    def next_wakeup(self, now: float) -> float | None:
        """The earliest future time at which `decide` could act without a new event."""
        times = [w.deadline for w in self.waiters.values()]
        if (target := self._target()) is not None and target.phase is Phase.ABSENT:
            times.append(self._oldest(target.key) + self.policy.swap_grace_s)
            times.extend(m.last_used + self.policy.idle_gap_s for m in self._idle_ready())
        ttls = ((m, self._ttl(m)) for m in self._idle_ready())
        times.extend(m.last_used + ttl for m, ttl in ttls if ttl is not None)
        times.append(self.hold_until)
        future = [t for t in times if t > now]
        return min(future) if future else None

    # -- the rules --------------------------------------------------------------------------

    def decide(self, now: float) -> list[Action]:
        """Apply the rules at time `now`; return what the driver must carry out, in order."""
        actions, self._outbox = self._outbox, []
        self.now = now
        self.load_held = False
        self._expire(now, actions)
        self._refuse(actions)
        self._grant(now, actions)
        self._limit_queue(actions)
        if self.swap_for is not None and self._committed() is None:
            self.swap_for = None  # loaded, or nobody waits for it any more
        target = self._target()
        victims = self._victims(target) if target is not None else []
        self._drain(target, victims, now, actions)
        self._grant(now, actions)
        if not self.busy and now >= self.hold_until:
            upstream = self._upstream_action(target, victims, now)
            if upstream is not None:
                if isinstance(upstream, Load):
                    self.swap_for = None
                elif upstream.reason is UnloadReason.EVICTED and target is not None:
                    self.swap_for = target.key
                self._start(upstream)
                actions.append(upstream)
                self._refuse(actions)
        return actions

    def _fail(
        self, waiter: Waiter, reason: FailReason, message: str, actions: list[Action]
    ) -> None:
        del self.waiters[waiter.id]
        actions.append(Fail(waiter, reason, message))

    def _expire(self, now: float, actions: list[Action]) -> None:
        for waiter in [w for w in self.waiters.values() if w.deadline <= now]:
            message = (
                f"timed out after {self.policy.queue_timeout_s:g} s waiting for "
                f"model {waiter.model!r}"
            )
            self._fail(waiter, FailReason.EXPIRED, message, actions)

    def _refuse(self, actions: list[Action]) -> None:
        for key, refusal in list(self.refusals.items()):
            if self.models[key].phase is Phase.ABSENT and not self.may_make_room(refusal):
                del self.refusals[key]  # answered: the next request for it tries again
                for waiter in [w for w in self.waiters.values() if w.model == key]:
                    del self.waiters[waiter.id]
                    message = str(refusal.error)
                    actions.append(Fail(waiter, FailReason.LOAD_FAILED, message, refusal.error))
        for waiter in list(self.waiters.values()):
            model = self.models[waiter.model]
            if model.phase is not Phase.ABSENT:
                continue
            if (why := self.never_fits(model)) is not None:
                self._fail(waiter, FailReason.NO_FIT, why, actions)
            elif self.unreadable is not None:
                message = (
                    f"model {waiter.model!r} is not loaded, and LM Studio's models cannot be read "
                    f"({self.unreadable}); nothing is loaded or evicted until they can"
                )
                self._fail(waiter, FailReason.UNREADABLE, message, actions)

    def may_make_room(self, refusal: Refusal) -> bool:
        """Whether unloading may yet make room after `refusal`: one of the models it was refused
        beside is gone already (try again), or is not pinned (it may go, once idle)."""
        return any(
            not self.models[k].instances or not self.models[k].pinned for k in refusal.beside
        )

    def _oldest(self, key: str) -> float:
        return min(w.arrived for w in self.waiters.values() if w.model == key)

    def _target(self) -> Model | None:
        """The model being loaded, else the absent model of the first waiter in serving order.

        Except that once an eviction was started for a target, a waiter that joined the queue
        after the target's first waiter does not take its place by priority: the swap under
        way is completed (with equal priorities, no waiter can take its place that way)."""
        for model in self.models.values():
            if model.phase is Phase.LOADING:
                return model
        first: Waiter | None = None
        for waiter in self.waiters.values():
            if self.models[waiter.model].phase is Phase.ABSENT and (
                first is None or _serving_order(waiter) < _serving_order(first)
            ):
                first = waiter
        if first is None:
            return None
        committed = self._committed()
        if (
            committed is not None
            and first.model != committed.key
            and first.id > min(w.id for w in self.waiters.values() if w.model == committed.key)
        ):
            return committed
        return self.models[first.model]

    def _committed(self) -> Model | None:
        """The target an eviction was started for, while it is absent and waited for."""
        if self.swap_for is None:
            return None
        model = self.models[self.swap_for]
        if model.phase is not Phase.ABSENT or not self.queued(model.key):
            return None
        return model

    def _victims(self, target: Model) -> list[Model]:
        """The fewest models to unload, idle ones first then least recently used, to fit."""
        if target.phase is not Phase.ABSENT:
            return []
        leaving = [
            m.key for m in self.models.values() if m.unload_requested or m.phase is Phase.UNLOADING
        ]
        if self.fits(target, leaving):
            return []
        candidates = sorted(
            self.evictable_order(
                m
                for m in self.models.values()
                if m.phase in LOADED and not m.pinned and not m.unload_requested and m is not target
            ),
            key=lambda m: m.leases > 0,  # stable: idle ones first, each group in policy order
        )
        # None: cannot make room yet (models are loading or being unloaded): wait.
        return self._room_made(target, candidates, leaving) or []

    def _room_made(
        self, target: Model, candidates: Iterable[Model], leaving: Sequence[str] = ()
    ) -> list[Model] | None:
        """The first of `candidates`, as few as can be, whose unloading (beside the models
        `leaving`) lets `target` fit; None if all of them are not enough."""
        victims: list[Model] = []
        for model in candidates:
            victims.append(model)
            if self.fits(target, [*leaving, *(v.key for v in victims)]):
                break
        else:
            return None
        # Those before the last that it alone makes unneeded stay: a small model is not
        # unloaded on the way to a large one that has to go anyway.
        for model in reversed(victims[:-1]):
            rest = [v.key for v in victims if v is not model]
            if self.fits(target, [*leaving, *rest]):
                victims.remove(model)
        return victims

    def place_view(self, key: str, name: str, *, up: bool, has: bool, size: int) -> HostView:
        """This scheduler's host as placement weighs it for `key` (`proxy.placement`): `name`,
        whether it is `up`, whether it `has` the model, and the model's catalogue `size`."""
        model = self.models.get(key) or Model(key, size)
        if model.phase is Phase.READY:
            presence = Presence.READY
        elif model.phase is Phase.LOADING or (model.phase is Phase.ABSENT and self.queued(key)):
            presence = Presence.LOADING  # loading, or queued for its load here
        elif model.phase is Phase.ABSENT:
            presence = Presence.ABSENT
        else:
            presence = Presence.LEAVING
        budget = self.budget
        # Without a budget, room is what is not used of a nominal one: the emptier host wins.
        room = (budget if budget is not None else 2**62) - self.usage()[1] - model.size_bytes
        idle = self.idle_victims(model) if presence is Presence.ABSENT else None
        return HostView(
            name=name,
            up=up,
            has=has,
            presence=presence,
            in_flight=model.leases,
            fits=presence is Presence.ABSENT and self.fits(model),
            room=room,
            idle_victims_used=max((m.last_used for m in idle), default=0.0)
            if idle is not None
            else None,
            never=self.never_fits(model) is not None,
            waiting=len(self.waiters),
        )

    def idle_victims(self, target: Model) -> list[Model] | None:
        """The idle, unpinned models to unload (least recently used first) for `target` to
        fit, evicting nobody's running or awaited model; [] if it fits now, None if that
        cannot make room. For placement across hosts (`proxy.placement`)."""
        if self.fits(target):
            return []
        idle = self.evictable_order(
            m for m in self._idle_ready() if not m.pinned and m is not target
        )
        return self._room_made(target, idle)

    def evictable_order(self, models: Iterable[Model]) -> list[Model]:
        """`models` in the order the eviction policy gives them up, first to go first: least
        recently used (`lru`), or least worth keeping (`cost`: GDSF, docs/design.md §2.7)."""
        if self.policy.eviction is Eviction.COST:
            waiting = {w.client for w in self.waiters.values() if w.client is not None}
            return sorted(
                models, key=lambda m: (self._awaited(m, waiting), self.worth(m), m.last_used)
            )
        return sorted(models, key=lambda m: m.last_used)

    def _awaited(self, model: Model, waiting: set[str]) -> bool:
        """Whether a client that used `model` lately waits now (for another model): a pipeline
        that calls models in turn is coming back for it once it has its answer (§2.7)."""
        return any(client in waiting for client in self._recent_clients(model))

    def _recent_clients(self, model: Model) -> list[str | None]:
        """The clients that used `model` in the last RECENT_S, as of the last `decide`; those
        not seen since are forgotten."""
        _forget_clients(model, self.now)
        return list(model.clients)

    def worth(self, model: Model) -> float:
        """What keeping `model` loaded is worth under cost eviction (GDSF): the inflation when
        it was last used, plus its uses x its reload seconds / the share of the capacity it
        takes (§2.7)."""
        reload_s = self.load_times.expected(model.key, model.size_bytes)
        return model.value + model.uses * (1.0 if reload_s is None else reload_s) / self._share(
            model
        )

    def _share(self, model: Model) -> float:
        """The share of the host's capacity `model` takes: of its memory budget (set, or
        learned under `auto`) by its size, or one of `max_loaded` slots, whichever is more (the
        limit that binds)."""
        budget, slots, shares = self.budget, self.policy.max_loaded, [1e-12]
        if budget:
            shares.append(model.size_bytes / budget)
        if slots:
            shares.append(1 / slots)
        return max(shares)

    def _fresh(self, model: Model) -> None:
        """`model` became resident: valued at today's inflation. Its uses count on from its
        last stay: a popular model reloaded is still popular (§2.7)."""
        model.value = self.inflation

    def _lease(self, model: Model, now: float, client: str | None) -> None:
        model.leases += 1
        model.uses += 1
        model.value = self.inflation
        model.last_used = max(model.last_used, now)
        model.clients[client] = now
        if len(model.clients) > _CLIENTS_KEPT:
            _forget_clients(model, now)

    def _idle_ready(self) -> list[Model]:
        return [
            m
            for m in self.models.values()
            if m.phase is Phase.READY and m.leases == 0 and not self.queued(m.key)
        ]

    def _drain(
        self, target: Model | None, victims: list[Model], now: float, actions: list[Action]
    ) -> None:
        """Apply the fairness rule: a busy victim is drained once the target waited swap_grace."""
        grace_over = (
            target is not None
            and target.phase is Phase.ABSENT
            and now >= self._oldest(target.key) + self.policy.swap_grace_s
        )
        victim_keys = {v.key for v in victims}
        for model in self.models.values():
            if model.phase is Phase.DRAINING and model.drained_for_swap:
                if model.unload_requested:
                    model.drained_for_swap = False
                elif model.key not in victim_keys:  # no longer needed: take requests again
                    model.phase, model.drained_for_swap = Phase.READY, False
            elif model.phase is Phase.READY and (
                model.unload_requested or (grace_over and model.key in victim_keys)
            ):
                model.phase = Phase.DRAINING
                model.drained_for_swap = not model.unload_requested
                actions.append(Drain(model.key))

    def _grant(self, now: float, actions: list[Action]) -> None:
        """Lease ready models to their waiters. An operator's load (no lease) is done once its
        model is ready, even if an unload was asked for meanwhile (it happens next)."""
        for waiter in self.ranked():
            model = self.models[waiter.model]
            if model.phase is Phase.READY and not (model.unload_requested and waiter.takes_lease):
                del self.waiters[waiter.id]
                if waiter.takes_lease:
                    self._lease(model, now, waiter.client)
                else:
                    model.last_used = max(model.last_used, now)
                actions.append(Grant(waiter))

    def _limit_queue(self, actions: list[Action]) -> None:
        excess = len(self.waiters) - self.policy.max_queue
        if excess > 0:
            newest = self.ranked()[-excess:]  # lowest effective priority, newest first
            message = f"too many requests waiting for models (max_queue is {self.policy.max_queue})"
            for waiter in newest:
                self._fail(waiter, FailReason.QUEUE_FULL, message, actions)

    def _upstream_action(
        self, target: Model | None, victims: list[Model], now: float
    ) -> Load | Unload | None:
        for model in self.models.values():  # operators' unloads first
            if model.unload_requested and model.phase is Phase.DRAINING and model.leases == 0:
                return self._unload(model, UnloadReason.ADMIN)
        if self.unreadable is not None:
            return None  # no eviction, load or idle unload on a state that could not be read
        grace_over = (
            target is not None
            and target.phase is Phase.ABSENT
            and now >= self._oldest(target.key) + self.policy.swap_grace_s
        )
        for victim in victims:
            # A draining victim's own waiters wait for the swap; a ready one has none (granted).
            done = victim.phase is Phase.DRAINING or grace_over
            gap_over = now >= victim.last_used + self.policy.idle_gap_s
            if victim.leases == 0 and (done or gap_over or not self._may_come_back(victim)):
                if self.policy.eviction is Eviction.COST:  # only its order reads the worth
                    self.inflation = max(self.inflation, self.worth(victim))
                return self._unload(victim, UnloadReason.EVICTED)
        if target is not None and target.phase is Phase.ABSENT and self.fits(target):
            if not any(m.probed for m in self.models.values()):
                return Load(target.key)
            self.load_held = True  # LM Studio may be loading a probed model: one load at a time
        for model in self._idle_ready():
            ttl = self._ttl(model)
            if ttl is not None and now >= model.last_used + ttl:
                return self._unload(model, UnloadReason.IDLE)
        return None

    def _may_come_back(self, model: Model) -> bool:
        """Whether a client may yet ask for `model`, idle now, so that the idle gap could batch
        its request: a client that used it lately and is not waiting here for another model
        (a client, one connection, waits for one answer at a time), or one not known (§2.4)."""
        waiting = {w.client for w in self.waiters.values() if w.model != model.key}
        return any(
            client is None or client not in waiting for client in self._recent_clients(model)
        )

    def idle_ttl(self, key: str) -> float | None:
        """How long `key` may sit idle before it is unloaded; None: it is not (pinned, or no
        idle TTL set)."""
        model = self.models.get(key)
        ttl = self._ttl(model) if model is not None else self.policy.idle_ttl_s
        return None if ttl == float("inf") else ttl

    def _ttl(self, model: Model) -> float | None:
        if model.pinned:
            return None
        return model.idle_ttl_s if model.idle_ttl_s is not None else self.policy.idle_ttl_s

    def _unload(self, model: Model, reason: UnloadReason) -> Unload:
        assert model.instance_id is not None  # noqa: S101 - resident models have an instance
        return Unload(model.key, model.instance_id, reason)

    def _start(self, action: Load | Unload) -> None:
        model = self.models[action.model]
        if isinstance(action, Load):
            model.phase = Phase.LOADING
        else:
            assert model.leases == 0, "unload under a lease"  # noqa: S101 - an invariant
            model.phase = Phase.UNLOADING
