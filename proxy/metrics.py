"""Metrics: owns one CollectorRegistry per app and every Prometheus instrument (DESIGN §6)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Seconds, from sub-millisecond proxy answers up to long generations.
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600,
)  # fmt: skip
_LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)

# The `model` label for requests that never resolved to a model LM Studio knows.
UNKNOWN_MODEL = "unknown"


class Metrics:
    """Every instrument of DESIGN §6, registered on a registry of this app's own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lmswitch_requests", "Requests answered.", ["model", "endpoint", "status"], registry=r
        )
        self.request_duration = Histogram(
            "lmswitch_request_duration_seconds",
            "Time from request to the last byte of the answer.",
            ["model", "endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttfb = Histogram(
            "lmswitch_time_to_first_byte_seconds",
            "Time from request to the first byte of the answer's body.",
            ["model", "endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "lmswitch_queue_wait_seconds",
            "Time a request waited for its model.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.loads = Counter(
            "lmswitch_model_loads", "Model loads, by result.", ["model", "result"], registry=r
        )
        self.load_duration = Histogram(
            "lmswitch_model_load_duration_seconds",
            "Time LM Studio took to load a model.",
            ["model"],
            buckets=_LOAD_BUCKETS,
            registry=r,
        )
        self.unloads = Counter(
            "lmswitch_model_unloads", "Model unloads, by reason.", ["model", "reason"], registry=r
        )
        self.loaded = Gauge(
            "lmswitch_model_loaded", "1 if the model is loaded, else 0.", ["model"], registry=r
        )
        self.in_flight = Gauge(
            "lmswitch_in_flight_requests", "Requests running on a model.", ["model"], registry=r
        )
        self.queued = Gauge(
            "lmswitch_queued_requests", "Requests waiting for a model.", ["model"], registry=r
        )
        self.tokens = Counter(
            "lmswitch_tokens", "Tokens reported by LM Studio.", ["model", "kind"], registry=r
        )
        self.disconnects = Counter(
            "lmswitch_client_disconnects",
            "Clients that went away before their answer was complete.",
            ["model"],
            registry=r,
        )
        self.upstream_up = Gauge(
            "lmswitch_upstream_up", "1 if LM Studio answered the last call, else 0.", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
