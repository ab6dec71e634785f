"""The served engine chosen by measurement (cached beside the data), or forced by the settings;
a variant whose accuracy gate failed is never served. Real exported tiny models, real engines."""

from __future__ import annotations

import json
import shutil

import anyio
import numpy as np
import pytest
from service_helpers import photo_bytes, serve, settings_for

from artifact import INPUT_NAME, MODEL_FILE, ArtifactError, load_manifest
from artifact.cosine import row_cosines
from service.engine_measure import CACHE_NAME, candidates, choose_engine
from service.engine_onnxruntime import OrtEngine
from service.engine_openvino import cpu_supports_bf16, openvino_available

needs_ov = pytest.mark.skipif(not openvino_available(), reason="openvino not installed")
AUTO = {"engine": "auto", "precision": "auto", "model_variant": "auto", "max_batch": 2}


def _photos(manifest, n: int = 3) -> np.ndarray:
    from service.images import decode_image
    from service.preprocess import eval_pixels

    return np.stack([eval_pixels(decode_image(photo_bytes(i), 10**8), manifest) for i in range(n)])


def _close_to_fp32(model_dir, engine, minimum: float) -> None:
    manifest = load_manifest(model_dir)
    pixels = _photos(manifest)
    want = OrtEngine(model_dir / MODEL_FILE, 1, INPUT_NAME).run(pixels, ("embedding",))
    got = engine.run(pixels, ("embedding",))
    assert row_cosines(want["embedding"], got["embedding"]).min() >= minimum


def _with_failing_gate(tiny_vit_dir, tmp_path):
    """A copy of the tiny ViT whose int8 variant records a cosine below the gate."""
    model_dir = tmp_path / "models" / "gated"
    shutil.copytree(tiny_vit_dir, model_dir)
    path = model_dir / "manifest.json"
    data = json.loads(path.read_text())
    data["name"] = "gated"
    data["variants"]["int8"]["embedding_cosine_min"] = 0.9
    path.write_text(json.dumps(data))
    return model_dir


FORCED = [
    ({"engine": "onnxruntime", "precision": "fp32"}, ("onnxruntime", "fp32", "fp32")),
    ({"engine": "onnxruntime", "model_variant": "int8"}, ("onnxruntime", "int8", "int8")),
    ({"precision": "int8"}, ("onnxruntime", "int8", "int8")),
    ({"engine": "openvino", "precision": "fp32"}, ("openvino", "fp32", "fp32")),
    ({"engine": "openvino", "precision": "bf16"}, ("openvino", "bf16", "fp32")),
]


@pytest.mark.parametrize(("forced", "want"), FORCED)
def test_forced_choice_serves_without_measuring(tiny_vit_dir, tmp_path, forced, want):
    if want[0] == "openvino" and not openvino_available():
        pytest.skip("openvino not installed")
    settings = settings_for(tiny_vit_dir, tmp_path / "data", **{**AUTO, **forced})
    choice, engine = choose_engine(tiny_vit_dir, load_manifest(tiny_vit_dir), settings)
    c = choice.candidate
    assert (c.engine, c.precision, c.variant) == want and choice.how == "forced"
    assert not (tmp_path / "data" / CACHE_NAME).exists()  # nothing was measured
    _close_to_fp32(tiny_vit_dir, engine, 0.99 if c.precision == "int8" else 0.999)


def test_automatic_choice_is_measured_cached_and_served(tiny_vit_dir, tmp_path):
    settings = settings_for(tiny_vit_dir, tmp_path / "data", **AUTO)
    found, refused = candidates(load_manifest(tiny_vit_dir))
    assert refused == {}

    async def models() -> dict:
        async with serve(settings) as client:
            files = [("images", ("a.jpg", photo_bytes(0), "image/jpeg"))]
            assert (await client.post("/embed", files=files)).status_code == 200
            return (await client.get("/models")).json()

    first = anyio.run(models)["engine_choice"]
    assert first["how"] == "measured" and first["measured_s"] > 0
    assert set(first["images_per_s"]) == {c.label for c in found}
    labels = {(c.engine, c.precision, c.variant): c.label for c in found}
    served = labels[(first["engine"], first["precision"], first["variant"])]
    assert first["images_per_s"][served] == max(first["images_per_s"].values())
    if openvino_available():
        assert "openvino fp32" in first["images_per_s"]
        assert ("openvino bf16" in first["images_per_s"]) == cpu_supports_bf16()
    cache = json.loads((tmp_path / "data" / CACHE_NAME).read_text())
    assert cache["key"]["model_sha256"] == load_manifest(tiny_vit_dir).model_sha256
    second = anyio.run(models)["engine_choice"]  # a restart: the cached choice, no timing
    assert second["how"] == "cached"
    assert second["images_per_s"] == first["images_per_s"]
    assert second["variant"] == first["variant"] and second["engine"] == first["engine"]


def test_cache_is_invalidated_when_the_model_changes(tiny_vit_dir, tmp_path):
    settings = settings_for(tiny_vit_dir, tmp_path / "data", **AUTO)
    assert choose_engine(tiny_vit_dir, load_manifest(tiny_vit_dir), settings)[0].how == "measured"
    assert choose_engine(tiny_vit_dir, load_manifest(tiny_vit_dir), settings)[0].how == "cached"
    other = _with_failing_gate(tiny_vit_dir, tmp_path)  # another manifest: another key
    settings = settings_for(other, tmp_path / "data", **AUTO)
    assert choose_engine(other, load_manifest(other), settings)[0].how == "measured"


def test_a_variant_that_failed_its_gate_is_never_served(tiny_vit_dir, tmp_path):
    model_dir = _with_failing_gate(tiny_vit_dir, tmp_path)
    manifest = load_manifest(model_dir)
    found, refused = candidates(manifest)
    assert "int8" in refused and "below 0.99" in refused["int8"]
    assert all(c.variant != "int8" for c in found)
    settings = settings_for(model_dir, tmp_path / "data", **AUTO)
    choice, _ = choose_engine(model_dir, manifest, settings)
    assert choice.candidate.variant == "fp32" and "int8" in choice.refused
    for forced in ({"model_variant": "int8"}, {"precision": "int8"}):
        settings = settings_for(model_dir, tmp_path / "data", **{**AUTO, **forced})
        with pytest.raises(ArtifactError, match="accuracy gate"):
            choose_engine(model_dir, manifest, settings)


def test_forcing_a_missing_variant_says_what_there_is(tiny_vit_dir, tmp_path):
    settings = settings_for(tiny_vit_dir, tmp_path / "data", **{**AUTO, "model_variant": "int4"})
    with pytest.raises(ArtifactError, match="no 'int4' variant"):
        choose_engine(tiny_vit_dir, load_manifest(tiny_vit_dir), settings)


@needs_ov
def test_a_file_quantised_for_onnxruntime_cannot_be_forced_onto_openvino(tiny_vit_dir, tmp_path):
    forced = {**AUTO, "engine": "openvino", "model_variant": "int8"}
    settings = settings_for(tiny_vit_dir, tmp_path / "data", **forced)
    with pytest.raises(ValueError, match="runs on onnxruntime"):
        choose_engine(tiny_vit_dir, load_manifest(tiny_vit_dir), settings)


def test_cpu_family_follows_the_flags():
    from artifact.cpu import cpu_family, cpu_flags

    family, flags = cpu_family(), set(cpu_flags())
    assert family in ("AMX", "AVX-512 BF16/VNNI", "AVX-512 VNNI", "AVX-512", "AVX2 only", "other")
    assert (family == "AMX") == bool({"amx_bf16", "amx_int8"} & flags)
    assert (family == "AVX2 only") == ("avx2" in flags and "avx512f" not in flags and not
                                       {"amx_bf16", "amx_int8"} & flags)  # fmt: skip
