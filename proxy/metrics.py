"""Metrics: owns one CollectorRegistry per app and every Prometheus instrument (docs/metrics.md)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

# Seconds, from sub-millisecond proxy answers up to long generations.
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600,
)  # fmt: skip
_LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)

# The `model` label for requests that never resolved to a model LM Studio knows.
UNKNOWN_MODEL = "unknown"


class _WithoutCreated(Collector):
    """A registry's metrics minus their `_created` samples.

    In the Prometheus text format those samples become extra gauges (`lmswitch_requests_created`,
    ...) outside the frozen list of docs/metrics.md, one series per labelled child, carrying only
    the time a child first appeared. `prometheus_client.disable_created_metrics()` would drop them
    for the whole process; this drops them for this app's registry only.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        for metric in self._registry.collect():  # fresh Metric objects on every collect
            created = metric.name + "_created"
            metric.samples = [s for s in metric.samples if s.name != created]
            yield metric


class Metrics:
    """Every instrument of docs/metrics.md, registered on a registry of this app's own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "lmswitch_requests",
            "Requests answered, by model, endpoint and HTTP status.",
            ["model", "endpoint", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "lmswitch_request_duration_seconds",
            "Seconds from a request's arrival to the last byte of its answer.",
            ["model", "endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttfb = Histogram(
            "lmswitch_time_to_first_byte_seconds",
            "Seconds from a request's arrival to the first byte of its answer's body.",
            ["model", "endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "lmswitch_queue_wait_seconds",
            "Seconds a request waited for its model to be ready.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.loads = Counter(
            "lmswitch_model_loads",
            "Model loads, by result (ok, failed, timeout) and host.",
            ["model", "result", "upstream"],
            registry=r,
        )
        self.load_duration = Histogram(
            "lmswitch_model_load_duration_seconds",
            "Seconds LM Studio took to load a model, by host.",
            ["model", "upstream"],
            buckets=_LOAD_BUCKETS,
            registry=r,
        )
        self.unloads = Counter(
            "lmswitch_model_unloads",
            "Model unloads, by reason (evicted, idle, admin, external) and host.",
            ["model", "reason", "upstream"],
            registry=r,
        )
        self.loaded = Gauge(
            "lmswitch_model_loaded",
            "1 while the model is loaded on the host, else 0.",
            ["model", "upstream"],
            registry=r,
        )
        self.in_flight = Gauge(
            "lmswitch_in_flight_requests",
            "Requests being answered by the model.",
            ["model"],
            registry=r,
        )
        self.queued = Gauge(
            "lmswitch_queued_requests", "Requests waiting for their model.", ["model"], registry=r
        )
        self.tokens = Counter(
            "lmswitch_tokens",
            "Tokens in the usage LM Studio reported, by kind (prompt, completion).",
            ["model", "kind"],
            registry=r,
        )
        self.disconnects = Counter(
            "lmswitch_client_disconnects",
            "Clients that went away before their answer was complete.",
            ["model"],
            registry=r,
        )
        self.upstream_up = Gauge(
            "lmswitch_upstream_up",
            "1 while the host is up (its models were read and its last call answered), else 0.",
            ["upstream"],
            registry=r,
        )

        # Per key (DESIGN §11.3): `key` holds config names only (`anonymous` for unnamed keys
        # and for no key), never a key itself, so these stay as small as the configuration.
        self.key_requests = Counter(
            "lmswitch_key_requests",
            "Requests answered, by the name of the key that asked (anonymous: none or unnamed) "
            "and HTTP status.",
            ["key", "status"],
            registry=r,
        )
        self.key_tokens = Counter(
            "lmswitch_key_tokens",
            "Tokens in the usage LM Studio reported, by key name and kind (prompt, completion).",
            ["key", "kind"],
            registry=r,
        )
        self.key_busy = Counter(
            "lmswitch_key_busy_seconds",
            "Seconds the key's requests held a model, from its lease to its release.",
            ["key"],
            registry=r,
        )
        self.key_queue_wait = Counter(
            "lmswitch_key_queue_wait_seconds",
            "Seconds the key's requests waited for their model to be ready.",
            ["key"],
            registry=r,
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of this app's metrics, without `_created` samples."""
        return generate_latest(_WithoutCreated(self.registry))
