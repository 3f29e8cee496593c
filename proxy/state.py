"""State: what the lifespan yields and request handlers read, as `Request[State]`."""

from __future__ import annotations

from typing import TypedDict

from proxy.config import Settings
from proxy.events import EventBus
from proxy.lmstudio import LMStudioClient
from proxy.manager import ModelManager
from proxy.metrics import Metrics
from proxy.usage import Usage


class State(TypedDict):
    settings: Settings
    manager: ModelManager
    clients: dict[str, LMStudioClient]  # by host name
    metrics: Metrics
    events: EventBus
    usage: Usage  # per key since start (`GET /api/v1/usage`)
    started_at: float  # wall-clock seconds since the epoch
