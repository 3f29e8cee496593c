"""Capacity: how much one LM Studio host holds, learned from the loaded sets it accepted and
refused (`models.memory_budget: auto`, docs/design.md §2.8).

Pure: no I/O, no clock (the caller passes `now`). Each host's scheduler owns one.

A set is counted in LM Studio's `size_bytes` (its instances times its size, for each model in
it), each model at the context length it was loaded with: LM Studio's guardrail counts the
context's cache on top of the weights, so a fact learned at one context length says nothing of
another. When a model is seen at a context length other than a fact's, the fact is forgotten.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Held:
    """One model of a set: its key, the context length it is counted at (None if unknown, which
    matches any), its instances and its size in bytes."""

    key: str
    context_length: int | None
    instances: int
    size_bytes: int


@dataclass(frozen=True, slots=True)
class Fact:
    """A set LM Studio held at once (a fit) or refused to load (the load's model included)."""

    models: tuple[Held, ...]
    at: float  # when it was seen

    @property
    def total(self) -> int:
        return sum(m.instances * m.size_bytes for m in self.models)

    def row(self) -> dict[str, Any]:
        return {
            "bytes": self.total,
            "models": [
                {"model": m.key, "context_length": m.context_length, "instances": m.instances}
                for m in self.models
            ],
        }


def _fact(models: Iterable[Held], now: float) -> Fact:
    return Fact(tuple(sorted((m for m in models if m.instances), key=lambda m: m.key)), now)


class Capacity:
    """The largest set seen to fit and the smallest seen refused, and the capacity they give.

    The newest fact wins: a set that fits though a smaller one was refused (memory was freed,
    LM Studio loaded it behind the proxy's back) forgets the refusal; a refusal of a set no
    larger than one that fitted (memory was taken) forgets the fit, and what fits is learned
    again from the loads that follow.
    """

    def __init__(self) -> None:
        self.fit: Fact | None = None  # the largest set seen to fit
        self.refused: Fact | None = None  # the smallest set seen refused

    @property
    def learned_bytes(self) -> int | None:
        """The capacity to plan with: None while LM Studio has refused nothing (no limit known);
        else the largest set seen to fit, or, if none is known, just under the smallest refused.
        """
        if self.refused is None:
            return None
        if self.fit is not None:
            return self.fit.total
        return self.refused.total - 1

    def fitted(self, models: Iterable[Held], now: float) -> bool:
        """LM Studio holds `models` at once; True if that changed what is known."""
        fact = _fact(models, now)
        total = fact.total
        if total == 0 or (self.fit is not None and total <= self.fit.total):
            return False
        self.fit = fact
        if self.refused is not None and total >= self.refused.total:
            self.refused = None  # it holds more than it once refused: memory was freed
        return True

    def refused_load(self, models: Iterable[Held], now: float) -> bool:
        """LM Studio refused a load for lack of memory beside the others of `models`; True if
        that changed what is known."""
        fact = _fact(models, now)
        total = fact.total
        if total == 0 or (self.refused is not None and total >= self.refused.total):
            return False
        self.refused = fact
        if self.fit is not None and self.fit.total >= total:
            self.fit = None  # it refuses what it once held: memory was taken
        return True

    def context_seen(self, key: str, context_length: int | None) -> bool:
        """`key` is loaded at `context_length`: facts that count it at another one are
        forgotten. True if any was."""
        if context_length is None:
            return False

        def other(fact: Fact | None) -> bool:
            return fact is not None and any(
                m.key == key and m.context_length not in (None, context_length) for m in fact.models
            )

        changed = False
        if other(self.fit):
            self.fit, changed = None, True
        if other(self.refused):
            self.refused, changed = None, True
        return changed

    def how(self) -> str:
        """How the capacity was learned, in words."""
        if self.refused is None:
            if self.fit is None:
                return "nothing learned yet"
            return "LM Studio has refused nothing: no limit known"
        refused = f"a set of {_gb(self.refused.total)} was refused"
        if self.fit is None:
            return f"{refused}; nothing smaller is known to fit"
        return f"the largest set seen to fit is {_gb(self.fit.total)}; {refused}"

    def row(self) -> dict[str, Any]:
        """What `/api/v1/status` shows of it (`learned`)."""
        return {
            "learned_bytes": self.learned_bytes,
            "fit": None if self.fit is None else self.fit.row(),
            "refused": None if self.refused is None else self.refused.row(),
            "how": self.how(),
        }


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB"
