"""Expected load times (`proxy.loadtimes`) and the scheduler's queue order, pure."""

from __future__ import annotations

import pytest

from proxy.loadtimes import KEPT, LoadTimes
from proxy.scheduler import Scheduler
from proxy.scheduling import Policy

GB = 10**9


def test_a_model_never_loaded_with_nothing_else_known_has_no_estimate() -> None:
    assert LoadTimes().expected("a", 4 * GB) is None


def test_the_estimate_is_the_median_of_the_last_loads() -> None:
    times = LoadTimes()
    for seconds in (3.0, 30.0, 3.2):  # one slow outlier does not move the median far
        times.record("a", seconds, 4 * GB)
    assert times.expected("a", 4 * GB) == 3.2


def test_only_the_last_loads_count() -> None:
    times = LoadTimes()
    for _ in range(KEPT):
        times.record("a", 10.0, 4 * GB)
    for _ in range(KEPT // 2 + 1):  # a majority of the kept ones are now quick
        times.record("a", 2.0, 4 * GB)
    assert times.expected("a", 4 * GB) == 2.0


def test_a_model_never_loaded_is_estimated_from_its_size_and_the_others_speed() -> None:
    times = LoadTimes()
    times.record("small", 2.0, 2 * GB)  # 1 GB/s
    times.record("mid", 4.0, 4 * GB)  # 1 GB/s
    times.record("odd", 1.0, 4 * GB)  # 4 GB/s: the median speed ignores one odd host
    assert times.expected("big", 8 * GB) == pytest.approx(8.0)


def test_a_model_of_unknown_size_has_no_estimate_from_speed() -> None:
    times = LoadTimes()
    times.record("small", 2.0, 2 * GB)
    assert times.expected("other", 0) is None
    times.record("sizeless", 1.0, 0)  # a load of unknown size teaches no speed
    assert times.expected("other", 2 * GB) == pytest.approx(2.0)


def test_the_queue_is_in_serving_order_the_load_first() -> None:
    s = Scheduler(Policy(max_loaded=1, swap_grace_s=0.0))
    s.set_catalog({"a": GB, "b": GB, "c": GB})
    s.arrive("b", 0.0)
    s.arrive("c", 0.1)
    s.arrive("b", 0.2)
    s.arrive("a", 0.3, takes_lease=False)  # an operator's load counts no request
    assert s.queue() == [("b", 2), ("c", 1), ("a", 0)]
    s.decide(0.3)  # b loads
    s.arrive("c", 0.4)
    assert s.queue() == [("b", 2), ("c", 2), ("a", 0)]
    s.load_done("b", "b", 1.0)
    s.decide(1.0)  # b's requests are granted: c is next
    assert s.queue() == [("c", 2), ("a", 0)]
