"""The micro-batcher with an engine that runs several batches at once (OpenVINO streams) and with
one that does not (onnxruntime), on a real exported tiny ViT."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from artifact import INPUT_NAME, MODEL_FILE
from service.batcher import MicroBatcher
from service.engine_onnxruntime import OrtEngine

ov = pytest.importorskip("openvino", reason="OpenVINO is optional: pip install '.[fast]'")
from service.engine_openvino import OpenVinoEngine  # noqa: E402


class Watched:
    """The real engine, counting how many calls are inside it at once; an optional barrier makes
    each call wait until ``parties`` calls are in (it times out, failing the batch, otherwise)."""

    def __init__(self, engine, parties: int = 0, release: threading.Event | None = None) -> None:
        self.engine, self.release = engine, release
        self.input_name, self.output_names = engine.input_name, engine.output_names
        self.barrier = threading.Barrier(parties, timeout=20) if parties else None
        self.inside = self.most = self.calls = 0
        self._lock = threading.Lock()

    @property
    def parallel_calls(self) -> int:
        return getattr(self.engine, "parallel_calls", 1)

    def run(self, batch: np.ndarray, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        with self._lock:
            self.inside += 1
            self.calls += 1
            self.most = max(self.most, self.inside)
        try:
            if self.barrier is not None:
                self.barrier.wait()
            if self.release is not None:
                self.release.wait(20)
            return self.engine.run(batch, outputs)
        finally:
            with self._lock:
                self.inside -= 1


def pixels(seed: int, width: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((3, 32, width)).astype(np.float32)


def test_two_streams_run_two_batches_at_once(tiny_vit_dir):
    engine = OpenVinoEngine(tiny_vit_dir / MODEL_FILE, 2, INPUT_NAME, "fp32", streams=2)
    watched = Watched(engine, parties=2)  # both batches must be in the engine together

    async def main():
        batcher = MicroBatcher(watched, max_batch=8, wait_ms=20, queue_limit=64)
        assert batcher.parallel == 2
        batcher.start()
        try:
            # Two shapes cannot share a batch: two batches, side by side.
            square = [batcher.infer([pixels(i)], ("embedding",)) for i in range(3)]
            wide = [batcher.infer([pixels(10 + i, 48)], ("embedding",)) for i in range(2)]
            return await asyncio.gather(*square, *wide)
        finally:
            await batcher.stop()

    results = asyncio.run(main())
    assert watched.calls == 2 and watched.most == 2
    expected = engine.run(np.stack([pixels(i) for i in range(3)]), ("embedding",))["embedding"]
    expected_wide = engine.run(np.stack([pixels(10, 48), pixels(11, 48)]), ("embedding",))[
        "embedding"
    ]
    for i in range(3):
        assert np.allclose(results[i]["embedding"][0], expected[i], atol=1e-5)
    for i in range(2):
        assert np.allclose(results[3 + i]["embedding"][0], expected_wide[i], atol=1e-5)


def test_a_single_session_engine_gets_one_call_at_a_time(tiny_vit_dir):
    watched = Watched(OrtEngine(tiny_vit_dir / MODEL_FILE, 1, INPUT_NAME))

    async def main():
        batcher = MicroBatcher(watched, max_batch=2, wait_ms=5, queue_limit=64)
        assert batcher.parallel == 1
        batcher.start()
        try:
            shapes = [pixels(i, 32 + 16 * (i % 3)) for i in range(9)]
            calls = [batcher.infer([px], ("embedding",)) for px in shapes]
            return await asyncio.gather(*calls)
        finally:
            await batcher.stop()

    results = asyncio.run(main())
    assert len(results) == 9 and watched.most == 1 and watched.calls >= 5


def test_stop_fails_every_batch_in_flight(tiny_vit_dir):
    release = threading.Event()
    engine = OpenVinoEngine(tiny_vit_dir / MODEL_FILE, 2, INPUT_NAME, "fp32", streams=2)
    watched = Watched(engine, release=release)

    async def main() -> list:
        batcher = MicroBatcher(watched, max_batch=8, wait_ms=1, queue_limit=64)
        batcher.start()
        jobs = [
            asyncio.ensure_future(batcher.infer([pixels(i, 32 + 16 * i)], ("embedding",)))
            for i in range(3)
        ]
        while watched.inside < 2:  # two batches in the engine, the third queued
            await asyncio.sleep(0.01)
        assert batcher.depth == 1
        threading.Timer(0.3, release.set).start()  # lets the engine threads finish after stop
        await batcher.stop()
        return await asyncio.gather(*jobs, return_exceptions=True)

    outcomes = asyncio.run(main())
    assert all(isinstance(o, RuntimeError) and "shutting down" in str(o) for o in outcomes)


FIRST_CALLS = """
import sys, threading, numpy as np
from pathlib import Path
from service.engine_openvino import OpenVinoEngine
engine = OpenVinoEngine(Path(sys.argv[1]), 2, "pixel_values", "fp32", streams=2)
inputs = [np.zeros((1, 3, 32, 32), np.float32), np.zeros((2, 3, 32, 48), np.float32)]
start = threading.Barrier(2)
def call(i):
    start.wait()
    engine.run(inputs[i], ("embedding",))
threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
[t.start() for t in threads]
[t.join() for t in threads]
print("ok")
"""


@pytest.mark.slow
def test_first_calls_on_two_streams_at_once_do_not_deadlock(tiny_vit_dir):
    """Two threads making a fresh engine's first calls together: OpenVINO's Python layer used to
    deadlock there about one process in five; each process gets one try."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for _ in range(8):
        done = subprocess.run(
            [sys.executable, "-c", FIRST_CALLS, str(tiny_vit_dir / MODEL_FILE)],
            cwd=root, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
