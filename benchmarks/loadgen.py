"""A bounded load generator: N concurrent clients for T seconds against a loopback server.

    python -m benchmarks.loadgen http://127.0.0.1:8000 --clients 8 --seconds 10 --pid 1234

Each client sends one request at a time (POST /embed with a small generated JPEG by default) and
waits for its answer, on its own keep-alive connection. Requests are encoded once and sent as bytes
(``benchmarks.httpclient``): the generator shares the CPU with the server, so its own cost is kept
small and reported (``client_cpu_ms_per_request``). The report (printed as JSON, optionally written
to a file) gives requests, status counts, latency percentiles (all answers and admitted 2xx
answers, overall and per third of the run, to see whether admitted latency grows), 503s that lack
``Retry-After``, and the server's RSS before and after when its pid is given. Bounded: at most
``MAX_CLIENTS`` clients and ``MAX_SECONDS`` seconds, and only loopback addresses, so it cannot be
turned on someone else.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import ipaddress
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from PIL import Image

from artifact.cli import run_cli
from benchmarks.httpclient import Connection, HttpError, encode_request, multipart

log = logging.getLogger(__name__)

MAX_CLIENTS = 64
MAX_SECONDS = 120.0
ENDPOINTS = ("embed", "items", "similar", "healthz")


def rss_bytes(pid: int) -> int:
    """Resident set size of a live process (Linux /proc), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS line for pid {pid}")


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"{url}: the load generator only targets loopback (127.0.0.1, ::1, localhost)")


def sample_jpeg(seed: int, side: int = 64) -> bytes:
    """A small distinct JPEG (smooth gradient plus noise) per seed."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    base = (ramp[None, :, None] * rng.uniform(0.2, 1.0, 3)) + rng.normal(0, 20, (side, side, 3))
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=90)
    return out.getvalue()


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p90/p99/max in milliseconds (None when empty)."""
    if not values:
        return {"n": 0, "p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None}
    arr = np.asarray(values) * 1000.0
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {
        "n": len(values),
        "p50_ms": round(float(p50), 2),
        "p90_ms": round(float(p90), 2),
        "p99_ms": round(float(p99), 2),
        "max_ms": round(float(arr.max()), 2),
    }


@dataclass
class LoadReport:
    url: str
    endpoint: str
    clients: int
    seconds: float
    requests: int = 0
    status: dict[str, int] = field(default_factory=dict)
    errors: int = 0  # transport failures and 5xx other than 503
    missing_retry_after: int = 0  # 503 answers without the header
    latency_all: dict = field(default_factory=dict)
    latency_ok: dict = field(default_factory=dict)
    latency_ok_by_third: list[dict] = field(default_factory=list)
    rss_before: int | None = None
    rss_after: int | None = None
    rss_max: int | None = None
    client_cpu_ms_per_request: float | None = None  # this generator's own CPU per request

    def to_dict(self) -> dict:
        return asdict(self)


def _request(endpoint: str, host: str, blob: bytes, i: int, headers: dict[str, str]) -> bytes:
    if endpoint == "healthz":
        return encode_request("GET", "/healthz", host, headers=headers)
    field, name = {"embed": ("images", "load.jpg"), "similar": ("image", "q.jpg")}.get(
        endpoint, ("images", f"{i}.jpg")
    )
    body, ctype = multipart([(field, name, blob)])
    return encode_request("POST", f"/{endpoint}", host, body, ctype, headers)


# (start in s from the run's start, status or exception name, latency in s, has Retry-After)
Sample = tuple[float, int | str, float, bool]


async def closed_loop(
    url: str,
    clients: int,
    seconds: float,
    request_for: Callable[[int], bytes],
    timeout: float = 60.0,
) -> tuple[list[Sample], float]:
    """``clients`` connections, each sending ``request_for(i)`` (i counts requests across them)
    and waiting for the answer, until ``seconds`` have passed. Returns the samples and the CPU
    seconds this process spent meanwhile (the client's share of a machine it may share)."""
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 80
    samples: list[Sample] = []
    counter = iter(range(10**9))
    cpu0, started = time.process_time(), time.perf_counter()
    deadline = started + seconds

    async def client_loop() -> None:
        conn = Connection(host, port, timeout)
        try:
            while time.perf_counter() < deadline:
                raw = request_for(next(counter))
                t0 = time.perf_counter()
                try:
                    answer = await conn.request(raw)
                    status: int | str = answer.status
                    retry = "retry-after" in answer.headers
                except (HttpError, TimeoutError, OSError) as exc:
                    status, retry = type(exc).__name__, False
                samples.append((t0 - started, status, time.perf_counter() - t0, retry))
        finally:
            conn.close()

    await asyncio.gather(*(client_loop() for _ in range(clients)))
    return samples, time.process_time() - cpu0


def _check_load_args(url: str, clients: int, seconds: float, endpoint: str) -> None:
    """Refuse a load run that is not on this machine or is out of the allowed bounds."""
    check_loopback(url)
    if not 1 <= clients <= MAX_CLIENTS:
        raise ValueError(f"clients must be within 1..{MAX_CLIENTS}, got {clients}")
    if not 0 < seconds <= MAX_SECONDS:
        raise ValueError(f"seconds must be within (0, {MAX_SECONDS}], got {seconds}")
    if endpoint not in ENDPOINTS:
        raise ValueError(f"endpoint must be one of {ENDPOINTS}, got {endpoint!r}")


async def run_load(
    url: str,
    clients: int,
    seconds: float,
    endpoint: str = "embed",
    pid: int | None = None,
    token: str | None = None,
    timeout: float = 60.0,
) -> LoadReport:
    """Run ``clients`` closed-loop clients against ``url`` for ``seconds`` and report."""
    _check_load_args(url, clients, seconds, endpoint)
    report = LoadReport(url, endpoint, clients, seconds)
    blobs = [sample_jpeg(i) for i in range(8)]
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    host = urlparse(url).netloc
    # Encoded once; /items names each file after its request (the stored source).
    fixed = [_request(endpoint, host, blob, 0, headers) for blob in blobs]

    def request_for(i: int) -> bytes:
        if endpoint == "items":
            return _request(endpoint, host, blobs[i % len(blobs)], i, headers)
        return fixed[i % len(fixed)]

    rss: list[int] = []
    if pid:
        report.rss_before = rss_bytes(pid)

    async def watch_rss(until: float) -> None:
        while time.perf_counter() < until:
            rss.append(rss_bytes(pid))
            await asyncio.sleep(0.25)

    load = closed_loop(url, clients, seconds, request_for, timeout)
    if pid:
        (samples, cpu), _ = await asyncio.gather(load, watch_rss(time.perf_counter() + seconds))
    else:
        samples, cpu = await load
    if pid:
        report.rss_after = rss_bytes(pid)
        report.rss_max = max(rss + [report.rss_after])
    _summarise(report, samples, seconds)
    report.client_cpu_ms_per_request = round(1000 * cpu / max(1, report.requests), 3)
    return report


def _summarise(report: LoadReport, samples: list, seconds: float) -> None:
    report.requests = len(samples)
    report.status = dict(sorted(Counter(str(s) for _, s, _, _ in samples).items()))
    report.errors = sum(
        1 for _, s, _, _ in samples if isinstance(s, str) or (s >= 500 and s != 503)
    )
    report.missing_retry_after = sum(1 for _, s, _, r in samples if s == 503 and not r)
    report.latency_all = percentiles([lat for _, _, lat, _ in samples])
    ok = [(t, lat) for t, s, lat, _ in samples if isinstance(s, int) and 200 <= s < 300]
    report.latency_ok = percentiles([lat for _, lat in ok])
    report.latency_ok_by_third = [
        percentiles([lat for t, lat in ok if k * seconds / 3 <= t < (k + 1) * seconds / 3])
        for k in range(3)
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="server base URL (loopback only)")
    parser.add_argument("--clients", type=int, default=4, help=f"1..{MAX_CLIENTS}")
    parser.add_argument("--seconds", type=float, default=5.0, help=f"at most {MAX_SECONDS:.0f}")
    parser.add_argument("--endpoint", choices=ENDPOINTS, default="embed")
    parser.add_argument("--pid", type=int, help="server pid, to report its RSS")
    parser.add_argument("--token", help="bearer token (for --endpoint items)")
    parser.add_argument("--timeout", type=float, default=60.0, help="per request, seconds")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report = asyncio.run(
            run_load(
                args.url, args.clients, args.seconds, args.endpoint, args.pid, args.token,
                args.timeout,
            )
        )  # fmt: skip
    except ValueError as exc:
        parser.error(str(exc))
    text = json.dumps(report.to_dict(), indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="python -m benchmarks.loadgen"))
