"""The scheduler's vocabulary: a model's phases, the policy, the state kept per model and per
waiting request, and the actions `Scheduler.decide` returns (see `proxy.scheduler`)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

# How long a contested model must sit idle (no leases, no waiters) before it is taken to be done:
# long enough to tell "its clients are gone" from "its client is between two requests".
IDLE_GAP_S = 0.25


class Phase(enum.StrEnum):
    ABSENT = "absent"
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    UNLOADING = "unloading"


# Phases in which a model occupies (or is about to occupy) LM Studio's memory.
RESIDENT = frozenset({Phase.LOADING, Phase.READY, Phase.DRAINING, Phase.UNLOADING})
# Phases in which a model is loaded and answering: ready, or draining its last requests. The one
# definition of "loaded" that every view (and the page, through them) reads.
LOADED = frozenset({Phase.READY, Phase.DRAINING})


class FailReason(enum.StrEnum):
    EXPIRED = "expired"  # waited past queue_timeout
    NO_FIT = "no_fit"  # can never fit beside the pinned models
    QUEUE_FULL = "queue_full"  # more waiters than max_queue
    LOAD_FAILED = "load_failed"  # the load it waited on failed
    UNREADABLE = "unreadable"  # needs a load, and LM Studio's state cannot be read


class Eviction(enum.StrEnum):
    """Which idle models make room first (`models.eviction`, docs/design.md §2.7)."""

    LRU = "lru"  # least recently used
    COST = "cost"  # cheapest to reload per byte (GDSF)


class UnloadReason(enum.StrEnum):
    EVICTED = "evicted"
    IDLE = "idle"
    ADMIN = "admin"
    EXTERNAL = "external"


@dataclass(frozen=True, slots=True)
class Policy:
    """The limits the scheduler enforces (from `models` and `scheduler` settings)."""

    max_loaded: int = 1  # 0 = no count limit
    memory_budget: int | None = None  # bytes
    swap_grace_s: float = 10.0
    idle_ttl_s: float | None = None
    max_queue: int = 256
    queue_timeout_s: float = 300.0
    idle_gap_s: float = IDLE_GAP_S
    # Each this long a request waits counts as one more priority level (§2.4).
    priority_aging_s: float = 30.0
    eviction: Eviction = Eviction.LRU
    # `memory_budget: auto`: the budget is the capacity learned from LM Studio (§2.8).
    learn_capacity: bool = False


@dataclass(slots=True)
class Model:
    """What the scheduler knows of one model key."""

    key: str
    size_bytes: int = 0
    phase: Phase = Phase.ABSENT
    leases: int = 0
    last_used: float = 0.0  # when its last lease ended, or it became ready
    instance_id: str | None = None
    duplicates: list[str] = field(default_factory=list)  # extra instances seen in LM Studio
    pinned: bool = False
    adopted: bool = False  # loaded behind the proxy's back
    # A request's `ttl` (or Ollama's `keep_alive`) overrides the policy's; inf: never idle.
    idle_ttl_s: float | None = None
    unload_requested: bool = False  # an operator asked for an unload
    drained_for_swap: bool = False
    # A request is out to it that LM Studio may load it for (JIT): sent while the model was
    # not confirmed loaded, and not confirmed since.
    probed: bool = False
    uses: int = 0  # leases granted on it, across reloads (cost eviction's frequency)
    # Cost eviction's inflation when it was last used (or loaded): its worth is this plus
    # uses x reload seconds / the share of the capacity it takes (`Scheduler.worth`, §2.7).
    value: float = 0.0
    # Who used it lately: client -> when their last lease on it began or ended (§2.4).
    clients: dict[str | None, float] = field(default_factory=dict)
    context_length: int | None = None  # of its loaded instance, as last seen (§2.8)

    @property
    def instances(self) -> int:
        return (1 + len(self.duplicates)) if self.phase in RESIDENT else 0


@dataclass(slots=True)
class Waiter:
    """A request waiting for its model (or an operator's load, which takes no lease)."""

    id: int
    model: str
    arrived: float
    deadline: float
    takes_lease: bool = True
    priority: int = 0  # its key's: higher is served first when models are contended
    # Its place in the serving order, lower first: when it joined the queue, less
    # priority x priority_aging. Effective priority is priority + waited / priority_aging, so
    # two waiters compare the same way for as long as both wait (§2.4).
    rank: float = 0.0
    client: str | None = None  # who asked (a connection), for the fairness rule's idle gap


@dataclass(frozen=True, slots=True)
class Refusal:
    """LM Studio refused to load a model for lack of memory beside the models `beside`: until
    one of them is gone, the model does not fit (§2.8). `error` answers its waiters if nothing
    more may be unloaded."""

    beside: frozenset[str]
    error: Exception


@dataclass(frozen=True, slots=True)
class Grant:
    waiter: Waiter


@dataclass(frozen=True, slots=True)
class Fail:
    waiter: Waiter
    reason: FailReason
    message: str
    error: Exception | None = None


@dataclass(frozen=True, slots=True)
class Load:
    model: str


@dataclass(frozen=True, slots=True)
class Unload:
    model: str
    instance_id: str
    reason: UnloadReason


@dataclass(frozen=True, slots=True)
class Drain:
    """A model stops taking new leases so that it can be unloaded (no I/O)."""

    model: str


@dataclass(frozen=True, slots=True)
class Observed:
    """Reconciliation found a model loaded (`adopted`) or gone (`vanished`) behind our back."""

    model: str
    change: str


Action = Grant | Fail | Load | Unload | Drain | Observed
