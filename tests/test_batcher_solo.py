"""A lone client: its batch goes at once (no batch wait) and, on an engine with streams, runs on
every thread (``run_solo``); real OpenVINO engine on a real exported tiny ViT."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from artifact import INPUT_NAME, MODEL_FILE
from artifact.cosine import row_cosines
from service.batcher import MicroBatcher

pytest.importorskip("openvino", reason="OpenVINO is optional: pip install '.[fast]'")
from service.engine_openvino import OpenVinoEngine  # noqa: E402


class Counted(OpenVinoEngine):
    """The real engine, counting which entry point each batch took."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.plain = self.solo = 0

    def run(self, pixels, outputs):
        self.plain += 1
        return super().run(pixels, outputs)

    def run_solo(self, pixels, outputs):
        self.solo += 1
        return super().run_solo(pixels, outputs)


def test_run_solo_computes_what_run_computes(tiny_vit_dir):
    engine = OpenVinoEngine(tiny_vit_dir / MODEL_FILE, 2, INPUT_NAME, "fp32", 2)
    assert engine.parallel_calls == 2 and engine.has_solo
    px = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    a = engine.run(px, ("embedding",))["embedding"]
    b = engine.run_solo(px, ("embedding",))["embedding"]
    assert row_cosines(a, b).min() > 0.99999


def test_lone_requests_skip_the_wait_and_use_every_thread(tiny_vit_dir):
    engine = Counted(tiny_vit_dir / MODEL_FILE, 2, INPUT_NAME, "fp32", 2)
    px = np.zeros((3, 32, 32), np.float32)

    async def scenario() -> tuple[float, int]:
        batcher = MicroBatcher(engine, 8, 400.0, 64)  # a wait no lone request should pay
        batcher.start()
        try:
            await batcher.infer([px], ("embedding",))  # warm-up
            t0 = time.perf_counter()
            for _ in range(5):  # one client, one image at a time
                await batcher.infer([px], ("embedding",))
            lone = (time.perf_counter() - t0) / 5
            # Twelve at once: more than a batch, so batches go to the streams as before.
            await asyncio.gather(*(batcher.infer([px], ("embedding",)) for _ in range(12)))
            return lone, engine.plain
        finally:
            await batcher.stop()

    lone, plain = asyncio.run(scenario())
    assert lone < 0.2, f"a lone request took {lone:.3f} s: it waited for a batch"
    assert engine.solo >= 6  # every lone batch ran on both threads
    assert plain >= 1  # with others waiting, batches went to the streams
