"""What every section shares: the run mode, machine facts, timing helpers, the photo set."""

from __future__ import annotations

import importlib.util
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from artifact.cpu import cpu_family
from artifact.cpu import cpu_flags as all_cpu_flags

log = logging.getLogger("benchmarks")

# The suite's sections in run order; ``python -m benchmarks --only`` picks a subset.
SECTIONS = ("engine", "http", "build", "search", "train", "memory")
VERSIONED = ("torch", "onnxruntime", "openvino", "faiss-cpu", "numpy", "fastapi", "uvicorn")


@dataclass(frozen=True)
class Mode:
    """How long and how big: ``smoke`` proves the code runs, ``quick`` for development,
    ``default`` for the committed results, ``full`` adds the 1M-vector HNSW build."""

    name: str
    min_time: float  # seconds per throughput measurement
    rounds: int  # interleaved rounds per measurement (median taken)
    archs: tuple[str, ...]
    batches: tuple[int, ...]
    knn_images: int  # sklearn digits used for the leave-one-out k-NN check
    http_seconds: float
    concurrency: tuple[int, ...]
    search_sizes: tuple[int, ...]
    search_queries: int
    train_steps: int

    @property
    def cache(self) -> Path:
        """Exported benchmark models live here (``DINO_BENCH_CACHE``, read at use)."""
        return Path(os.environ.get("DINO_BENCH_CACHE", Path.home() / ".cache/dino-bench"))

    @property
    def smoke(self) -> bool:
        return self.name == "smoke"


MODES = {
    "smoke": Mode("smoke", 0.05, 1, ("vit_tiny",), (1, 2), 60, 1.0, (1, 4), (2_000,), 20, 1),
    "quick": Mode(
        "quick", 1.0, 1, ("vit_tiny", "vit_small"), (1, 8), 400, 4.0, (1, 8, 32), (100_000,), 200, 3
    ),
    "default": Mode(
        "default",
        2.5,
        3,
        ("vit_tiny", "vit_small"),
        (1, 8),
        1797,
        12.0,
        (1, 8, 32),
        (100_000,),
        1000,
        6,
    ),
}
MODES["full"] = Mode(
    **{**MODES["default"].__dict__, "name": "full", "search_sizes": (100_000, 1_000_000)}
)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown-cpu"


def cpu_flags() -> list[str]:
    """The flags that matter for these figures, of those the CPU has."""
    have = set(all_cpu_flags())
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return [f for f in wanted if f in have]


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine() -> dict:
    return {
        "cpu": cpu_model(),
        "cpu_family": cpu_family(),  # by matrix extensions: AMX, AVX-512 BF16/VNNI, AVX2 only
        "cpu_flags": cpu_flags(),
        "cores": len(os.sched_getaffinity(0)),
        "load_avg": list(os.getloadavg()),
        "versions": versions(),
    }


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def throughput(fn: Callable[[], object], items: int, min_time: float) -> float:
    """Items per second of ``fn`` (one warm-up call, then repeated for at least ``min_time``)."""
    fn()
    calls, started = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_time:
            return calls * items / elapsed


def interleaved(
    fns: dict[str, Callable[[], object]], items: int, min_time: float, rounds: int
) -> dict[str, float]:
    """Median items/s per path over ``rounds`` where each round measures every path once in
    turn: load from other processes hits all paths alike, so their ratios stay meaningful."""
    seen: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            seen[name].append(throughput(fn, items, min_time))
    return {name: statistics.median(v) for name, v in seen.items()}


def percentiles(seconds: list[float]) -> dict[str, float]:
    """p50/p95/p99 in milliseconds."""
    if not seconds:
        return {"p50_ms": float("nan"), "p95_ms": float("nan"), "p99_ms": float("nan")}
    ms = np.asarray(seconds) * 1000
    return {f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 95, 99)}
