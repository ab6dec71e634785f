"""The server's Prometheus metrics, through ``prometheus_client``.

Each ``Metrics`` has its own registry (tests run several apps in one process); the names and
label sets are part of the contract (dashboards read them). Gauges read live objects at scrape
time; one whose source is not ready yet (the index while it opens) has no sample.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

# No ``*_created`` series: they doubled the output, and the hand-written registry this replaced
# never had them (process-wide, but this process is the server).
disable_created_metrics()
# The text format 0.0.4, as scraped since the first release.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# Method tokens are client-chosen: anything else is counted as "other", so made-up methods
# cannot grow the label set (and /metrics) without bound.
KNOWN_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT")
)


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else "other"


class _CallbackGauges(Collector):
    """Gauges read from callbacks at scrape time; a callback that raises gives no sample."""

    def __init__(self) -> None:
        self.gauges: list[tuple[str, str, Callable[[], float]]] = []

    def collect(self) -> Iterator[Metric]:
        for name, help_text, read in self.gauges:
            family = GaugeMetricFamily(name, help_text)
            # A source not ready yet (the index while it opens) gives the header only.
            with contextlib.suppress(Exception):
                family.add_metric([], float(read()))
            yield family


class Metrics:
    """The server's metrics; gauges are bound to live objects once the app has started."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "dino_http_requests_total",
            "HTTP requests by method, endpoint and status",
            ("method", "endpoint", "status"),
            registry=r,
        )
        self.latency = Histogram(
            "dino_http_request_duration_seconds",
            "HTTP request latency by method and endpoint",
            ("method", "endpoint"),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "dino_batch_size",
            "images per inference call",
            ("kind",),
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "dino_inference_seconds",
            "time in the model per inference call",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.images = Counter("dino_images_total", "images run through the model", registry=r)
        self.rejected = Counter(
            "dino_queue_rejections_total", "requests refused: queue full", registry=r
        )
        self._gauges = _CallbackGauges()
        r.register(self._gauges)

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self._gauges.gauges.append((name, help_text, read))

    def request(self, method: str, endpoint: str, status: int, seconds: float) -> None:
        """Count one HTTP request and its latency (unknown methods as ``other``)."""
        method = method_label(method)
        self.requests.labels(method, endpoint, str(status)).inc()
        self.latency.labels(method, endpoint).observe(seconds)

    def render(self) -> str:
        return generate_latest(self.registry).decode()
