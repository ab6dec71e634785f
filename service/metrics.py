"""A minimal Prometheus text-format registry (counters, gauges, histograms).

Small enough to own instead of adding a dependency to the torch-free install; it writes the
text exposition format 0.0.4 that Prometheus scrapes.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LabelValues = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.label_names = name, help_text, tuple(labels)
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self.values: dict[LabelValues, float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        with self._lock:
            self.values[labels] = self.values.get(labels, 0.0) + amount

    def render(self) -> list[str]:
        lines = self.header()
        for key, value in sorted(self.values.items()):
            lines.append(f"{self.name}{_labels(self.label_names, key)} {_num(value)}")
        return lines


class Gauge(_Metric):
    """A value read at scrape time from a callback (queue depth, index size)."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        super().__init__(name, help_text)
        self.read = read

    def render(self) -> list[str]:
        try:
            value = float(self.read())
        except Exception:  # a gauge whose source is not ready yet is simply absent
            return self.header()
        return [*self.header(), f"{self.name} {_num(value)}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(
        self, name: str, help_text: str, buckets: Sequence[float], labels: Sequence[str] = ()
    ) -> None:
        super().__init__(name, help_text, labels)
        self.bounds = sorted(buckets)
        self.series: dict[LabelValues, list[float]] = {}  # per-bucket counts, then sum, count

    def observe(self, value: float, *labels: str) -> None:
        with self._lock:
            row = self.series.setdefault(labels, [0.0] * (len(self.bounds) + 2))
            slot = bisect.bisect_left(self.bounds, value)
            if slot < len(self.bounds):  # above the last bound: only +Inf (the count) holds it
                row[slot] += 1
            row[-2] += value
            row[-1] += 1

    def count(self, *labels: str) -> int:
        return int(self.series.get(labels, [0.0])[-1])

    def render(self) -> list[str]:
        lines = self.header()
        for key, row in sorted(self.series.items()):
            cumulative = 0.0
            for bound, count in zip(self.bounds, row, strict=False):
                cumulative += count
                le = _labels(self.label_names, key, f'le="{_num(bound)}"')
                lines.append(f"{self.name}_bucket{le} {_num(cumulative)}")
            inf = _labels(self.label_names, key, 'le="+Inf"')
            lines.append(f"{self.name}_bucket{inf} {_num(row[-1])}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {_num(row[-2])}")
            lines.append(f"{self.name}_count{_labels(self.label_names, key)} {_num(row[-1])}")
        return lines


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """The server's metrics; gauges are bound to live objects once the app has started."""

    def __init__(self) -> None:
        self.requests = Counter(
            "dino_http_requests_total",
            "HTTP requests by method, endpoint and status",
            ("method", "endpoint", "status"),
        )
        self.latency = Histogram(
            "dino_http_request_duration_seconds",
            "HTTP request latency by method and endpoint",
            LATENCY_BUCKETS,
            ("method", "endpoint"),
        )
        self.batch_size = Histogram(
            "dino_batch_size", "images per inference call", BATCH_BUCKETS, ("kind",)
        )
        self.inference = Histogram(
            "dino_inference_seconds", "time in the model per inference call", LATENCY_BUCKETS
        )
        self.images = Counter("dino_images_total", "images run through the model")
        self.rejected = Counter("dino_queue_rejections_total", "requests refused: queue full")
        self.gauges: list[Gauge] = []

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.gauges.append(Gauge(name, help_text, read))

    def render(self) -> str:
        lines: list[str] = []
        for metric in (
            self.requests,
            self.latency,
            self.batch_size,
            self.inference,
            self.images,
            self.rejected,
            *self.gauges,
        ):
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"
