"""Static int8 for OpenVINO: NNCF post-training quantisation of the exported ONNX graph.

Why next to onnxruntime's dynamic int8: on CPUs with VNNI (and AMX) OpenVINO's int8 kernels run
the matrix products at up to twice bf16's rate, and static quantisation (activation ranges fixed
from calibration images) spends no time measuring ranges per batch. The result is an OpenVINO IR
(``model.int8_openvino.xml`` + ``.bin``) that the server opens with OpenVINO only; NNCF and the
calibration images are export-time (training-side) dependencies, the server needs only openvino.

The variant is kept only when it passes the accuracy gate (``artifact.gates``): min embedding
cosine vs the fp32 graph on the bundled photos, and, when a labelled set is named, DINO's
weighted k-NN accuracy change vs fp32. Both numbers go into the manifest.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from artifact import INPUT_NAME, MODEL_FILE, EvalTransform, Variant
from artifact.cosine import row_cosines
from artifact.gates import MAX_KNN_CHANGE, MIN_COSINE
from artifact.photos import load_photo
from training.int8_gate import FMNIST_DIR, knn_change, prepare
from training.parity import PHOTO_NAMES, ort_session, photo_batch

log = logging.getLogger(__name__)

VARIANT_KEY = "int8_openvino"
XML_FILE = "model.int8_openvino.xml"
BIN_FILE = "model.int8_openvino.bin"
CALIBRATION_IMAGES = 300


@functools.cache
def _core():
    """One ``openvino.Core`` for the process, never released (see ``service.engine_openvino``
    for why dropping one can break signal handling later)."""
    import openvino as ov

    return ov.Core()


def _source_photos() -> list[Image.Image]:
    """Real photos available offline: scikit-image's and scikit-learn's bundled ones."""
    from sklearn.datasets import load_sample_images

    photos = [load_photo(name) for name in PHOTO_NAMES]
    photos += [Image.fromarray(a).convert("RGB") for a in load_sample_images().images]
    return photos


def _augment(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random crop (10-100 % of the area), flip and brightness/contrast change."""
    w, h = img.size
    area = rng.uniform(0.1, 1.0) * w * h
    side_w = int(min(w, max(16, np.sqrt(area * rng.uniform(0.75, 1.33)))))
    side_h = int(min(h, max(16, area / side_w)))
    x, y = int(rng.integers(0, w - side_w + 1)), int(rng.integers(0, h - side_h + 1))
    out = img.crop((x, y, x + side_w, y + side_h))
    if rng.random() < 0.5:
        out = ImageOps.mirror(out)
    out = ImageEnhance.Brightness(out).enhance(rng.uniform(0.7, 1.3))
    return ImageEnhance.Contrast(out).enhance(rng.uniform(0.7, 1.3))


def calibration_images(count: int = CALIBRATION_IMAGES, seed: int = 0) -> Iterator[Image.Image]:
    """``count`` real images: the bundled photos, then random crops of them, with a quarter
    Fashion-MNIST items where that data set is installed."""
    rng = np.random.default_rng(seed)
    photos = _source_photos()
    fmnist: np.ndarray | None = None
    if FMNIST_DIR.is_dir():
        from training.data import load_fashion_mnist

        fmnist = load_fashion_mnist(FMNIST_DIR)[0].images  # type: ignore[attr-defined]
    for i in range(count):
        if i < len(photos):
            yield photos[i]
        elif fmnist is not None and i % 4 == 0:
            yield Image.fromarray(fmnist[int(rng.integers(len(fmnist)))]).convert("RGB")
        else:
            yield _augment(photos[int(rng.integers(len(photos)))], rng)


def quantize_openvino(
    onnx_path: Path,
    xml_path: Path,
    pixels: Sequence[np.ndarray],
    transformer: bool,
) -> None:
    """NNCF's post-training quantisation of ``onnx_path`` into the IR ``xml_path`` (+ .bin),
    calibrated on ``pixels`` (preprocessed ``[3, crop, crop]`` images, one per call)."""
    import nncf
    import openvino as ov

    model = _core().read_model(str(onnx_path))
    data = nncf.Dataset(list(pixels), lambda x: {INPUT_NAME: x[None]})
    kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
    quantised = nncf.quantize(model, data, subset_size=len(pixels), **kwargs)
    ov.save_model(quantised, str(xml_path), compress_to_fp16=False)


def _ov_embed(xml_path: Path, pixels: np.ndarray, batch: int = 32) -> np.ndarray:
    """Embeddings from the IR, compiled as the server runs int8 (other ops in fp32)."""
    compiled = _core().compile_model(str(xml_path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    out = []
    for start in range(0, len(pixels), batch):
        request.infer({INPUT_NAME: np.ascontiguousarray(pixels[start : start + batch])})
        out.append(request.get_tensor("embedding").data.copy())
    return np.concatenate(out)


def _ort_embed(onnx_path: Path, pixels: np.ndarray, batch: int = 32) -> np.ndarray:
    session = ort_session(onnx_path)
    parts = [
        session.run(["embedding"], {INPUT_NAME: pixels[s : s + batch]})[0]
        for s in range(0, len(pixels), batch)
    ]
    return np.concatenate(parts)


def openvino_int8_variant(
    tmp: Path,
    transform: EvalTransform,
    mean: Sequence[float],
    std: Sequence[float],
    transformer: bool,
    labelled: Sequence[str] = (),
    calibration: int = CALIBRATION_IMAGES,
    min_cosine: float = MIN_COSINE,
) -> dict[str, Variant]:
    """Quantise ``tmp/model.onnx`` for OpenVINO and return the manifest's ``variants`` entry,
    or ``{}`` (files removed, warning logged) when it fails its gate (``min_cosine`` on the
    photos: a lower one keeps a variant the server still refuses, for a benchmark to measure)."""
    t0 = time.perf_counter()
    xml = tmp / XML_FILE
    pixels = prepare(list(calibration_images(calibration)), transform, mean, std)
    quantize_openvino(tmp / MODEL_FILE, xml, list(pixels), transformer)
    photos = photo_batch(PHOTO_NAMES, transform, mean, std)
    cos = row_cosines(_ort_embed(tmp / MODEL_FILE, photos), _ov_embed(xml, photos))
    cos_min, cos_mean = float(cos.min()), float(cos.mean())
    change = knn_change(
        lambda px: _ort_embed(tmp / MODEL_FILE, px),
        lambda px: _ov_embed(xml, px),
        labelled,
        transform,
        mean,
        std,
        "OpenVINO int8",
    )
    took = time.perf_counter() - t0
    kept = cos_min >= min_cosine and (change is None or abs(change) <= MAX_KNN_CHANGE)
    if not kept:
        xml.unlink(missing_ok=True)
        (tmp / BIN_FILE).unlink(missing_ok=True)
        log.warning("quantize: OpenVINO int8 SKIPPED: cosine vs fp32 min %.5f (gate %.2f), k-NN "
                    "change %s (gate %.1f points); %.1f s", cos_min, min_cosine, change,
                    MAX_KNN_CHANGE, took)  # fmt: skip
        return {}
    log.info("quantize: OpenVINO int8 kept, cosine vs fp32 min %.5f mean %.5f on %d photos, "
             "calibrated on %d images, in %.1f s", cos_min, cos_mean, len(photos), len(pixels),
             took)  # fmt: skip
    variant = Variant(
        file=XML_FILE,
        precision="int8",
        engine="openvino",
        embedding_cosine_min=cos_min,
        embedding_cosine_mean=cos_mean,
        knn_change=change,
    )
    return {VARIANT_KEY: variant}
