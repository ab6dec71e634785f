"""OpenVINO static int8 (NNCF) at export: gated on real photos (and a labelled set), written as
a manifest variant that the server runs on OpenVINO only."""

from __future__ import annotations

import pytest

pytest.importorskip("nncf")
pytest.importorskip("openvino")

from service_helpers import settings_for  # noqa: E402
from test_engine_measure import AUTO, _close_to_fp32  # noqa: E402

from artifact import INT8_FILE, load_manifest  # noqa: E402
from artifact.gates import MIN_COSINE  # noqa: E402
from service.engine_measure import candidates, choose_engine  # noqa: E402
from training.quantize_openvino import BIN_FILE, XML_FILE, calibration_images  # noqa: E402


def _export(backbone, store, labels: str | None):
    from conftest import TINY_VIT

    from training.augment import IMAGENET_MEAN, IMAGENET_STD
    from training.export import export_backbone, knn_eval_sizes

    resize, crop = knn_eval_sizes(TINY_VIT["img_size"])
    return export_backbone(
        backbone,
        "tiny-ov-int8",
        store,
        arch="vit_tiny",
        train_image_size=TINY_VIT["img_size"],
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        eval_resize=resize,
        eval_crop=crop,
        provenance={"source": "random"},
        int8=True,
        int8_openvino=True,
        int8_labels=labels,
    )


@pytest.fixture(scope="module")
def ov_int8_dir(tiny_vit, tmp_path_factory):
    return _export(tiny_vit, tmp_path_factory.mktemp("ov-int8"), labels=())


def test_calibration_images_are_real_and_varied():
    images = list(calibration_images(40))
    assert len(images) == 40 and all(i.mode == "RGB" for i in images)
    assert len({i.size for i in images}) > 10  # crops of many sizes, not one photo repeated


def test_openvino_int8_is_gated_recorded_and_served(ov_int8_dir, tmp_path):
    manifest = load_manifest(ov_int8_dir)
    variant = manifest.variants["int8_openvino"]
    assert variant.engine == "openvino" and variant.precision == "int8"
    assert variant.file == XML_FILE and {XML_FILE, BIN_FILE} <= set(manifest.files)
    assert variant.embedding_cosine_min >= MIN_COSINE and variant.knn_change is None
    found, refused = candidates(manifest)
    assert refused == {}
    assert [c.engine for c in found if c.variant == "int8_openvino"] == ["openvino"]
    settings = settings_for(ov_int8_dir, tmp_path / "data", **{**AUTO, "precision": "int8"})
    choice, engine = choose_engine(ov_int8_dir, manifest, settings)
    assert (choice.candidate.engine, choice.candidate.variant) == ("openvino", "int8_openvino")
    assert engine.path.name == XML_FILE
    _close_to_fp32(ov_int8_dir, engine, MIN_COSINE)
    # Forced onto onnxruntime, the OpenVINO file is refused with the reason.
    forced = {**AUTO, "engine": "onnxruntime", "model_variant": "int8_openvino"}
    with pytest.raises(ValueError, match="runs on openvino"):
        choose_engine(ov_int8_dir, manifest, settings_for(ov_int8_dir, tmp_path / "d", **forced))
    # The automatic choice times it with the others.
    choice, _ = choose_engine(ov_int8_dir, manifest, settings_for(ov_int8_dir, tmp_path, **AUTO))
    assert "openvino int8 (int8_openvino)" in choice.timings


def test_a_variant_failing_the_knn_gate_is_not_written(tiny_vit, tmp_path):
    # A random network's k-NN on digits moves by more than 0.5 points under int8.
    model_dir = _export(tiny_vit, tmp_path, labels=("digits",))
    manifest = load_manifest(model_dir)
    assert "int8_openvino" not in manifest.variants
    assert not (model_dir / XML_FILE).exists() and not (model_dir / BIN_FILE).exists()
    # The onnxruntime variant is gated on its own, by the same k-NN rule.
    for variant in manifest.variants.values():
        assert variant.knn_change is not None and abs(variant.knn_change) <= 0.5
    assert ("int8" in manifest.variants) == (model_dir / INT8_FILE).exists()
