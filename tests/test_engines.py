"""The OpenVINO engine (extra ``fast``) against onnxruntime fp32 on a real exported tiny ViT."""

from __future__ import annotations

import numpy as np
import pytest

from artifact import INPUT_NAME, MODEL_FILE, ArtifactError, load_manifest
from artifact.cosine import l2_normalise
from service.engine_onnxruntime import OrtEngine
from service.preprocess import eval_pixels

ov = pytest.importorskip("openvino", reason="OpenVINO is optional: pip install '.[fast]'")
from service.engine_openvino import OpenVinoEngine, cpu_supports_bf16  # noqa: E402

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "clock", "moon")


@pytest.fixture(scope="module")
def photo_pixels(tiny_vit_dir) -> np.ndarray:
    """Real photos through the server's own eval transform: [8, 3, 32, 32]."""
    from PIL import Image
    from skimage import data

    manifest = load_manifest(tiny_vit_dir)
    images = [Image.fromarray(getattr(data, n)()).convert("RGB") for n in PHOTOS]
    return np.stack([eval_pixels(img, manifest) for img in images])


@pytest.fixture(scope="module")
def reference(tiny_vit_dir, photo_pixels) -> dict[str, np.ndarray]:
    engine = OrtEngine(tiny_vit_dir / MODEL_FILE, 1, INPUT_NAME)
    return engine.run(photo_pixels, engine.output_names)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (l2_normalise(a) * l2_normalise(b)).sum(axis=1)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_openvino_matches_onnxruntime(tiny_vit_dir, photo_pixels, reference, precision):
    engine = OpenVinoEngine(tiny_vit_dir / MODEL_FILE, 1, INPUT_NAME, precision)
    assert engine.input_name == INPUT_NAME
    assert engine.output_names == ("embedding", "patch_tokens", "attention", "layer_tokens")
    expected = "bf16" if precision == "bf16" and cpu_supports_bf16() else "fp32"
    assert engine.precision == expected
    out = engine.run(photo_pixels, ("embedding", "attention"))
    assert set(out) == {"embedding", "attention"}
    assert out["embedding"].dtype == np.float32 and out["embedding"].shape == (8, 192)
    assert out["attention"].shape == reference["attention"].shape == (8, 3, 16)
    cos = cosines(out["embedding"], reference["embedding"])
    assert cos.min() >= (0.999 if precision == "bf16" else 0.99999), cos
    # Attention rows are softmax distributions in both engines.
    assert np.allclose(
        out["attention"].sum(axis=-1), reference["attention"].sum(axis=-1), atol=2e-2
    )
    # Batch 1 and another image size (dynamic H, W) give the same rows as the batch.
    single = engine.run(photo_pixels[:1], ("embedding",))["embedding"]
    assert cosines(single, out["embedding"][:1]).min() > 0.9999
    wide = np.concatenate([photo_pixels[:2], photo_pixels[:2]], axis=3)  # 32 x 64
    wide_ref = OrtEngine(tiny_vit_dir / MODEL_FILE, 1, INPUT_NAME).run(wide, ("patch_tokens",))
    wide_out = engine.run(wide, ("patch_tokens",))["patch_tokens"]
    assert wide_out.shape == wide_ref["patch_tokens"].shape == (2, 32, 192)


def test_openvino_outputs_are_not_overwritten_by_the_next_call(tiny_vit_dir, photo_pixels):
    engine = OpenVinoEngine(tiny_vit_dir / MODEL_FILE, 1, INPUT_NAME, "fp32")
    first = engine.run(photo_pixels[:2], ("embedding",))["embedding"]
    kept = first.copy()
    engine.run(photo_pixels[2:4], ("embedding",))
    assert np.array_equal(first, kept)


def test_openvino_errors_are_actionable(tiny_vit_dir):
    with pytest.raises(ValueError, match="precision must be one of"):
        OpenVinoEngine(tiny_vit_dir / MODEL_FILE, 1, INPUT_NAME, "int4")
    with pytest.raises(ArtifactError, match="manifest says 'pixels'"):
        OpenVinoEngine(tiny_vit_dir / MODEL_FILE, 1, "pixels", "fp32")
    with pytest.raises(ArtifactError, match="OpenVINO cannot load"):
        OpenVinoEngine(tiny_vit_dir / "manifest.json", 1, INPUT_NAME, "fp32")
    engine = OpenVinoEngine(tiny_vit_dir / MODEL_FILE, 1, INPUT_NAME, "fp32")
    with pytest.raises(KeyError, match="unknown outputs"):
        engine.run(np.zeros((1, 3, 32, 32), np.float32), ("logits",))


def test_engine_selection(tiny_vit_dir):
    from service.engine_choice import open_engine, resolve
    from service.engine_onnxruntime import OrtEngine as Ort

    manifest = load_manifest(tiny_vit_dir)
    bf16 = "bf16" if cpu_supports_bf16() else "fp32"
    assert resolve("onnxruntime", "auto") == ("onnxruntime", "fp32")
    assert resolve("openvino", "auto") == ("openvino", "bf16")
    assert resolve("openvino", "fp32") == ("openvino", "fp32")
    assert resolve("auto", "fp32") == ("onnxruntime", "fp32")
    assert resolve("auto", "auto", "int8") == ("onnxruntime", "fp32")
    assert resolve("auto", "auto") == (
        ("openvino", "bf16") if bf16 == "bf16" else ("onnxruntime", "fp32")
    )
    with pytest.raises(ValueError, match="needs DINO_ENGINE=openvino"):
        resolve("onnxruntime", "bf16")
    with pytest.raises(ValueError, match="DINO_ENGINE must be one of"):
        resolve("tensorrt", "auto")
    opened = open_engine(tiny_vit_dir, manifest, "fp32", 1, "openvino", "bf16")
    assert isinstance(opened, OpenVinoEngine) and opened.precision == bf16
    assert isinstance(open_engine(tiny_vit_dir, manifest, "fp32", 1, "onnxruntime", "auto"), Ort)
    int8 = open_engine(tiny_vit_dir, manifest, "int8", 1, "auto", "auto")
    assert isinstance(int8, Ort) and int8.path.name == "model.int8.onnx"


@pytest.mark.parametrize("env", [{"DINO_ENGINE": "openvino"}, {"DINO_ENGINE": "auto"}])
def test_settings_select_openvino_for_the_server(tiny_vit_dir, tmp_path, monkeypatch, env):
    """DINO_ENGINE picks the engine the running app uses; /embed stays within bf16 rounding of
    the onnxruntime fp32 reference."""
    import anyio
    from service_helpers import photo_bytes, serve, settings_for

    from service.images import decode_image

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = settings_for(tiny_vit_dir, tmp_path / "data")
    assert settings.engine == env["DINO_ENGINE"] and settings.precision == "auto"
    blobs = [photo_bytes(i) for i in range(3)]
    manifest = load_manifest(tiny_vit_dir)
    pixels = np.stack([eval_pixels(decode_image(b, 10**8), manifest) for b in blobs])
    expected = OrtEngine(tiny_vit_dir / MODEL_FILE, 1, INPUT_NAME).run(pixels, ("embedding",))

    async def embed() -> tuple[object, np.ndarray]:
        async with serve(settings) as client:
            engine = client._transport.app.state.runtime.engine
            files = [("images", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(blobs)]
            resp = await client.post("/embed", files=files, data={"normalize": "false"})
            assert resp.status_code == 200, resp.text
            return engine, np.array(resp.json()["embeddings"], np.float32)

    engine, rows = anyio.run(embed)
    want_ov = env["DINO_ENGINE"] == "openvino" or cpu_supports_bf16()
    assert isinstance(engine, OpenVinoEngine) == want_ov
    assert cosines(rows, expected["embedding"]).min() >= 0.999


def test_impossible_engine_settings_stop_the_server(tiny_vit_dir, tmp_path):
    import anyio
    from service_helpers import serve, settings_for

    from service.settings import SettingsError

    settings = settings_for(tiny_vit_dir, tmp_path, engine="onnxruntime", precision="bf16")

    async def start() -> None:
        async with serve(settings):
            pass

    with pytest.raises(SettingsError, match="needs DINO_ENGINE=openvino"):
        anyio.run(start)


def test_streams_setting_maps_to_openvino_streams():
    from service.engine_choice import openvino_streams
    from service.settings import SettingsError

    assert [openvino_streams(0, t) for t in (1, 2, 4, 8, 16, 32)] == [1, 2, 2, 2, 4, 8]
    assert openvino_streams(1, 2) == 1 and openvino_streams(3, 2) == 2  # at most one per thread
    with pytest.raises(SettingsError, match="DINO_ENGINE_STREAMS"):
        openvino_streams(-1, 2)


def test_openvino_streams_run_calls_side_by_side(tiny_vit_dir, photo_pixels, reference):
    """Two streams: two callers are inside the engine at once (a barrier both must reach proves
    it) and each gets its own rows, the same as one stream computes."""
    import threading

    one = OpenVinoEngine(tiny_vit_dir / MODEL_FILE, 2, INPUT_NAME, "fp32")
    two = OpenVinoEngine(tiny_vit_dir / MODEL_FILE, 2, INPUT_NAME, "fp32", streams=2)
    assert (one.parallel_calls, two.parallel_calls) == (1, 2)
    assert two.compiled.get_property("NUM_STREAMS") == 2
    halves = [photo_pixels[:4], photo_pixels[4:]]
    barrier = threading.Barrier(2, timeout=30)
    results: dict[int, np.ndarray] = {}

    def call(i: int) -> None:
        barrier.wait()
        for _ in range(5):
            results[i] = two.run(halves[i], ("embedding",))["embedding"]

    callers = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    for i, half in enumerate(halves):
        expected = one.run(half, ("embedding",))["embedding"]
        assert np.allclose(results[i], expected, atol=1e-5)
        assert cosines(results[i], reference["embedding"][4 * i : 4 * i + 4]).min() > 0.99999
    with pytest.raises(ValueError, match="streams must be >= 1"):
        OpenVinoEngine(tiny_vit_dir / MODEL_FILE, 2, INPUT_NAME, "fp32", streams=0)


def test_engine_streams_setting_reaches_the_server(tiny_vit_dir, tmp_path):
    """DINO_ENGINE_STREAMS (0 = auto) sets the engine's streams and the batcher's parallel calls;
    /embed answers the same rows either way."""
    import anyio
    from service_helpers import photo_bytes, serve, settings_for

    blobs = [photo_bytes(i) for i in range(5)]

    async def embed(streams: int) -> tuple[int, int, np.ndarray]:
        settings = settings_for(
            tiny_vit_dir, tmp_path / f"data{streams}", engine="openvino", precision="fp32",
            threads=2, engine_streams=streams,
        )  # fmt: skip
        async with serve(settings) as client:
            rt = client._transport.app.state.runtime
            files = [("images", (f"{i}.jpg", b, "image/jpeg")) for i, b in enumerate(blobs)]
            resp = await client.post("/embed", files=files)
            assert resp.status_code == 200, resp.text
            rows = np.array(resp.json()["embeddings"], np.float32)
            return rt.engine.parallel_calls, rt.batcher.parallel, rows

    auto, one = anyio.run(embed, 0), anyio.run(embed, 1)
    assert auto[:2] == (2, 2) and one[:2] == (1, 1)
    assert np.allclose(auto[2], one[2], atol=1e-5)
