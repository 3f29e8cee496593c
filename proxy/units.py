"""Durations and sizes as config values: `Seconds` and `ByteSize` take a number, or a string
such as "90s", "1h30m" or "20GiB", and validate to seconds or bytes.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h|d)", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*([kmgt]i?b|b)?", re.IGNORECASE)


def _bad_duration(value: object) -> ValueError:
    return ValueError(f"invalid duration {value!r} (use seconds or e.g. 90s, 15m, 2h)")


def _bad_size(value: object) -> ValueError:
    return ValueError(f"invalid size {value!r} (use bytes or e.g. 512MiB, 20GiB, 24GB)")


def _parse_duration(value: object) -> object:
    """Turn "250ms", "90s", "15m", "2h", "1h30m" or "30" into seconds; numbers pass through."""
    if isinstance(value, bool):  # True is an int, but not a duration
        raise _bad_duration(value)
    if not isinstance(value, str):
        return value  # numbers (and wrong types) go on to float validation
    text = value.strip()
    if not text:
        raise _bad_duration(value)
    try:
        return float(text)
    except ValueError:
        pass
    total, pos = 0.0, 0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        if match is None:
            raise _bad_duration(value)
        total += float(match[1]) * _DURATION_UNITS[match[2].lower()]
        pos = match.end()
    return total


def _parse_size(value: object) -> object:
    """Turn "512MiB", "20GiB", "24GB", "1.5GiB" or "512" into bytes; integers pass through."""
    if isinstance(value, bool):  # True is an int, but not a size
        raise _bad_size(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, str):
        return value  # ints (and wrong types) go on to int validation
    match = _SIZE.fullmatch(value.strip())
    if match is None:
        raise _bad_size(value)
    return int(Decimal(match[1]) * _SIZE_UNITS[(match[2] or "b").lower()])


Seconds = Annotated[float, BeforeValidator(_parse_duration), Field(ge=0, allow_inf_nan=False)]
"""A duration in seconds: a number, or a string such as "250ms", "90s", "15m", "2h", "1h30m"."""

ByteSize = Annotated[int, BeforeValidator(_parse_size), Field(ge=0)]
"""A size in bytes: an integer, or a string such as "512MiB", "20GiB", "24GB", "100KB"."""

AUTO = "auto"


def _parse_budget(value: object) -> object:
    """`auto` (in any case), or a size as `_parse_size` takes it."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        raise _bad_budget(value)
    try:
        return _parse_size(value)
    except ValueError:
        raise _bad_budget(value) from None


def _bad_budget(value: object) -> ValueError:
    return ValueError(
        f"invalid memory budget {value!r} (use auto, bytes or e.g. 512MiB, 20GiB, 24GB)"
    )


MemoryBudget = Annotated[
    Annotated[int, Field(ge=0)] | Literal["auto"], BeforeValidator(_parse_budget)
]
"""A memory budget: a size in bytes (as `ByteSize` takes it), or `auto`: learned from LM Studio
(docs/design.md §2.8)."""

MiB = 2**20
