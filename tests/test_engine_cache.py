"""OpenVINO's compiled-model cache in the data folder: a restart loads the compiled models instead
of compiling again, gives the same numbers, and a damaged or unusable cache never stops a start.
Real OpenVINO on the tiny exported ViT."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from artifact import INPUT_NAME, MODEL_FILE, load_manifest

pytest.importorskip("openvino", reason="OpenVINO is optional: pip install '.[fast]'")
from service.engine_openvino import OpenVinoEngine  # noqa: E402

PIXELS = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)


def _engine(model_dir: Path, cache: Path | None) -> OpenVinoEngine:
    """Two streams on two threads: the streams model and the all-threads one, both compiled."""
    return OpenVinoEngine(model_dir / MODEL_FILE, 2, INPUT_NAME, "fp32", 2, cache)


def _outputs(engine: OpenVinoEngine) -> tuple[np.ndarray, np.ndarray]:
    run = engine.run(PIXELS, ("embedding",))["embedding"]
    return run, engine.run_solo(PIXELS, ("embedding",))["embedding"]


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_a_second_open_loads_both_models_from_the_cache(tiny_vit_dir, tmp_path):
    cache = tmp_path / "cache"
    first = _engine(tiny_vit_dir, cache)
    assert first.has_solo and not first.from_cache and "written to" in first.cache_state
    written = _files(cache)
    # One blob serves both: streams and the performance hint are applied when it is loaded.
    assert written and all(name.endswith(".blob") for name in written)
    second = _engine(tiny_vit_dir, cache)
    assert second.from_cache and second.parallel_calls == first.parallel_calls == 2
    assert second.has_solo and "from the compiled-model cache" in second.cache_state
    assert second.compiled_solo.get_property("NUM_STREAMS") == 1
    assert str(second.compiled_solo.get_property("PERFORMANCE_HINT")) == "LATENCY"
    assert _files(cache) == written  # nothing new, nothing rewritten
    for a, b in zip(_outputs(first), _outputs(second), strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign"])
def test_a_damaged_cache_is_recompiled_not_fatal(tiny_vit_dir, tmp_path, damage):
    """Every cached blob replaced by random bytes, cut in half, or by the blob of another
    model (the int8 file): the next start compiles again and serves the same numbers."""
    cache, other = tmp_path / "cache", tmp_path / "other"
    expected = _outputs(_engine(tiny_vit_dir, None))
    _engine(tiny_vit_dir, cache)
    OpenVinoEngine(tiny_vit_dir / "model.int8.onnx", 1, INPUT_NAME, "fp32", 1, other)
    foreign = next(other.iterdir()).read_bytes()
    rng = np.random.default_rng(1)
    for path in cache.iterdir():
        content = path.read_bytes()
        path.chmod(0o600)  # OpenVINO writes its blobs read-only
        if damage == "garbage":
            path.write_bytes(rng.bytes(len(content)))
        elif damage == "truncated":
            path.write_bytes(content[: len(content) // 2])
        else:
            path.write_bytes(foreign)
    again = _engine(tiny_vit_dir, cache)
    assert not again.from_cache
    for a, b in zip(expected, _outputs(again), strict=True):
        assert np.allclose(a, b, atol=1e-5)
    assert _engine(tiny_vit_dir, cache).from_cache  # rewritten whole: the next start loads it


def test_an_unusable_cache_folder_costs_one_warning(tiny_vit_dir, tmp_path, caplog):
    blocker = tmp_path / "data"
    blocker.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger="service.engine_openvino"):
        engine = _engine(tiny_vit_dir, blocker / "openvino-cache")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "no compiled-model cache" in warnings[0], warnings
    assert engine.cache_dir is None and not engine.from_cache
    assert "no compiled-model cache" in engine.cache_state
    expected = _outputs(_engine(tiny_vit_dir, None))
    for a, b in zip(expected, _outputs(engine), strict=True):
        assert np.array_equal(a, b)


def test_the_cache_folder_is_per_model(tiny_vit_dir, tmp_path):
    """``openvino_cache``: one folder per model sha256; another model's folder is removed."""
    from service.engine_choice import open_engine, openvino_cache

    manifest = load_manifest(tiny_vit_dir)
    root = tmp_path / "openvino-cache"
    (root / "0123456789abcdef").mkdir(parents=True)  # an earlier model's blobs
    (root / "0123456789abcdef" / "1.blob").write_bytes(b"old")
    assert openvino_cache(None, manifest) is None
    engine = open_engine(tiny_vit_dir, manifest, "fp32", 2, "openvino", "fp32", 2, root)
    assert [p.name for p in root.iterdir()] == [manifest.model_sha256[:16]]
    assert engine.cache_dir == root / manifest.model_sha256[:16]  # type: ignore[attr-defined]


def test_a_restarted_server_opens_its_engine_from_the_cache(tiny_vit_dir, tmp_path):
    """The server keeps the cache in DINO_DATA_DIR/openvino-cache: the second start loads the
    compiled models and answers /embed with the same rows."""
    import anyio
    from service_helpers import photo_bytes, serve, settings_for

    settings = settings_for(
        tiny_vit_dir, tmp_path / "data", engine="openvino", precision="fp32", threads=2
    )
    blobs = [photo_bytes(i) for i in range(3)]

    async def start() -> tuple[bool, np.ndarray]:
        async with serve(settings) as client:
            rt = client._transport.app.state.runtime
            assert rt.engine_open_s is not None and rt.engine_open_s > 0
            files = [("images", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(blobs)]
            resp = await client.post("/embed", files=files)
            assert resp.status_code == 200, resp.text
            return rt.engine.from_cache, np.array(resp.json()["embeddings"], np.float32)

    cold, rows = anyio.run(start)
    cache = tmp_path / "data" / "openvino-cache"
    assert not cold and list(cache.glob("*/*.blob"))
    warm, again = anyio.run(start)
    assert warm and np.array_equal(rows, again)
    shutil.rmtree(cache)  # deleting it any time only costs a compile
    cold_again, third = anyio.run(start)
    assert not cold_again and np.array_equal(rows, third)
