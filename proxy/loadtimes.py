"""LoadTimes: how long a load of each model is expected to take, from this proxy's own loads.

Pure, like `proxy.scheduler`: each `Host` records the loads it made and asks for estimates, which
its views, events and waiting requests show (docs/design.md §3.6). A model's expected load time
is the median of its last `KEPT` loads; a model never loaded here is estimated from its size
and the load speed seen for the others (the median of their speeds); else it is unknown.
"""

from __future__ import annotations

import statistics
from collections import deque

# Loads of a model remembered for its estimate (DESIGN §11.2: the median of the last 5).
KEPT = 5


class LoadTimes:
    """The durations of the last loads of each model, and its size when it was loaded."""

    __slots__ = ("_sizes", "_times")

    def __init__(self) -> None:
        self._times: dict[str, deque[float]] = {}
        self._sizes: dict[str, int] = {}

    def record(self, key: str, seconds: float, size_bytes: int) -> None:
        """A load of `key` (of `size_bytes`) succeeded in `seconds`."""
        if (times := self._times.get(key)) is None:
            times = self._times[key] = deque(maxlen=KEPT)
        times.append(seconds)
        if size_bytes > 0:
            self._sizes[key] = size_bytes

    def expected(self, key: str, size_bytes: int) -> float | None:
        """How long a load of `key` should take, in seconds, or None if nothing tells."""
        if (times := self._times.get(key)) is not None:
            return statistics.median(times)
        if size_bytes <= 0:
            return None
        taken = (
            (size, statistics.median(self._times[other])) for other, size in self._sizes.items()
        )
        speeds = [size / seconds for size, seconds in taken if seconds > 0]
        if not speeds:
            return None
        return size_bytes / statistics.median(speeds)
