"""The ORT engine and the micro-batcher, on a real exported tiny ViT."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import onnxruntime as ort
import pytest
from service_helpers import metric_value

from artifact import ArtifactError, load_manifest
from artifact.cosine import l2_normalise
from service.batcher import MicroBatcher, Overloaded
from service.engine_choice import model_file
from service.engine_onnxruntime import OrtEngine, load_engine
from service.metrics import Metrics


@pytest.fixture(scope="module")
def manifest(tiny_vit_dir):
    return load_manifest(tiny_vit_dir)


@pytest.fixture(scope="module")
def engine(tiny_vit_dir, manifest):
    return load_engine(tiny_vit_dir, manifest, "fp32", threads=1)


def pixels(seed: int, shape=(3, 32, 32)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def direct(tiny_vit_dir, batch: np.ndarray, output: str = "embedding") -> np.ndarray:
    """The model run by a plain onnxruntime session, nothing of ours in between."""
    session = ort.InferenceSession(str(tiny_vit_dir / "model.onnx"))
    return session.run([output], {"pixel_values": batch})[0]


def test_engine_session_options_and_outputs(engine, tiny_vit_dir):
    options = engine.session.get_session_options()
    assert options.intra_op_num_threads == 1 and options.inter_op_num_threads == 1
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert engine.output_names == ("embedding", "patch_tokens", "attention", "layer_tokens")
    batch = np.stack([pixels(0), pixels(1)])
    out = engine.run(batch, ("embedding", "attention"))
    assert out["embedding"].shape == (2, 192) and out["attention"].shape == (2, 3, 16)
    assert np.allclose(out["embedding"], direct(tiny_vit_dir, batch), atol=1e-5)


def test_variants(tiny_vit_dir, manifest, engine):
    assert model_file(manifest, "fp32") == "model.onnx"
    assert model_file(manifest, "int8") == "model.int8.onnx"
    int8 = load_engine(tiny_vit_dir, manifest, "int8", threads=1)
    batch = np.stack([pixels(i) for i in range(3)])
    a = l2_normalise(int8.run(batch, ("embedding",))["embedding"])
    b = l2_normalise(engine.run(batch, ("embedding",))["embedding"])
    assert (a * b).sum(axis=1).min() > 0.99
    with pytest.raises(ArtifactError, match="no 'bf16' variant"):
        model_file(manifest, "bf16")
    with pytest.raises(ArtifactError, match="cannot load"):
        OrtEngine(tiny_vit_dir / "manifest.json", 1, "pixel_values")


class ThreadRecordingEngine:
    """The real engine, noting which thread each call runs in and the batch sizes."""

    def __init__(self, engine: OrtEngine) -> None:
        self.engine, self.threads, self.sizes = engine, [], []
        self.input_name, self.output_names = engine.input_name, engine.output_names

    def run(self, batch: np.ndarray, outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        self.threads.append(threading.current_thread().name)
        self.sizes.append(len(batch))
        return self.engine.run(batch, outputs)


def test_concurrent_callers_are_batched_and_get_their_own_rows(engine, tiny_vit_dir):
    recorder = ThreadRecordingEngine(engine)
    metrics = Metrics()

    async def main() -> list[dict[str, np.ndarray]]:
        batcher = MicroBatcher(recorder, max_batch=4, wait_ms=100, queue_limit=64, metrics=metrics)
        batcher.start()
        try:
            calls = [batcher.infer([pixels(i)], ("embedding",)) for i in range(6)]
            calls.append(batcher.infer([pixels(10), pixels(11)], ("embedding",)))
            return await asyncio.gather(*calls)
        finally:
            await batcher.stop()

    results = asyncio.run(main())
    expected = direct(tiny_vit_dir, np.stack([pixels(i) for i in [*range(6), 10, 11]]))
    for i in range(6):
        assert results[i]["embedding"].shape == (1, 192)
        assert np.allclose(results[i]["embedding"][0], expected[i], atol=1e-5)
    assert np.allclose(results[6]["embedding"], expected[6:], atol=1e-5)
    assert sum(recorder.sizes) == 8 and max(recorder.sizes) == 4  # capped at max_batch
    assert len(recorder.sizes) < 8
    assert threading.main_thread().name not in recorder.threads  # off the event loop
    assert metric_value(metrics.render(), "dino_batch_size_count", kind="embed") == len(
        recorder.sizes
    )


def test_only_same_shapes_and_outputs_batch_together(engine, tiny_vit_dir):
    recorder = ThreadRecordingEngine(engine)

    async def main():
        batcher = MicroBatcher(recorder, max_batch=8, wait_ms=50, queue_limit=64)
        batcher.start()
        try:
            return await asyncio.gather(
                batcher.infer([pixels(1)], ("embedding",)),
                batcher.infer([pixels(2, (3, 40, 48))], ("embedding",)),
                batcher.infer([pixels(3)], ("embedding",)),
                batcher.infer([pixels(4)], ("attention",)),
            )
        finally:
            await batcher.stop()

    small, big, other, att = asyncio.run(main())
    assert sorted(recorder.sizes) == [1, 1, 2]
    assert np.allclose(small["embedding"][0], direct(tiny_vit_dir, pixels(1)[None])[0], atol=1e-5)
    big_ref = direct(tiny_vit_dir, pixels(2, (3, 40, 48))[None])[0]
    assert np.allclose(big["embedding"][0], big_ref, atol=1e-5)
    assert np.allclose(other["embedding"][0], direct(tiny_vit_dir, pixels(3)[None])[0], atol=1e-5)
    assert att["attention"].shape == (1, 3, 16)


def test_full_queue_refuses_at_once_with_retry_after(engine):
    async def main() -> None:
        batcher = MicroBatcher(engine, max_batch=16, wait_ms=300, queue_limit=3, retry_after=2)
        batcher.start()
        try:
            first = asyncio.ensure_future(batcher.infer([pixels(0), pixels(1)], ("embedding",)))
            await asyncio.sleep(0.01)  # queued, waiting for the batch to fill
            assert batcher.depth == 2
            with pytest.raises(Overloaded) as info:
                await batcher.infer([pixels(2), pixels(3)], ("embedding",))
            assert info.value.retry_after == 2 and "limit 3" in str(info.value)
            # One more image still fits under the limit and rides in the same batch.
            second = await batcher.infer([pixels(4)], ("embedding",))
            assert second["embedding"].shape == (1, 192)
            assert (await first)["embedding"].shape == (2, 192)
            assert batcher.depth == 0
        finally:
            await batcher.stop()

    asyncio.run(main())


def test_cancelled_callers_are_dropped_and_stop_fails_waiters(engine):
    async def main() -> None:
        batcher = MicroBatcher(engine, max_batch=16, wait_ms=200, queue_limit=16)
        batcher.start()
        gone = asyncio.ensure_future(batcher.infer([pixels(0)], ("embedding",)))
        # Two images: after a batch of more than one the next batch waits to fill (a lone
        # client's batch would go at once and finish before stop()).
        stays = asyncio.ensure_future(batcher.infer([pixels(1), pixels(4)], ("embedding",)))
        await asyncio.sleep(0.01)
        gone.cancel()
        assert (await stays)["embedding"].shape == (2, 192)
        waiting = asyncio.ensure_future(batcher.infer([pixels(2)], ("embedding",)))
        await asyncio.sleep(0.01)
        await batcher.stop()
        with pytest.raises(RuntimeError, match="shutting down"):
            await waiting
        with pytest.raises(RuntimeError, match="not running"):
            await batcher.infer([pixels(3)], ("embedding",))

    asyncio.run(main())
