"""Dynamic int8 variant of an exported graph, kept only when it stays close to fp32 on photos."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from artifact import INPUT_NAME, INT8_FILE, MODEL_FILE, EvalTransform, Variant
from artifact.cosine import row_cosines
from artifact.gates import MAX_KNN_CHANGE
from training.int8_gate import knn_change
from training.parity import PHOTO_NAMES, ort_session, photo_batch

log = logging.getLogger(__name__)

MIN_INT8_COSINE = 0.99
# Weights of every Linear (MatMul/Gemm) to int8; activations are quantised per batch at run time.
# Conv (the patch embedding / ResNet stem) stays fp32: ORT's dynamic ConvInteger is slow on CPU.
OP_TYPES = ["MatMul", "Gemm"]
INT8_OPS = {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm"}


@dataclass(frozen=True)
class Int8Result:
    cosine_min: float
    cosine_mean: float
    kept: bool


def quantize_int8(src: Path, dst: Path) -> None:
    """Write the dynamic int8 quantisation of ``src`` to ``dst``.

    ORT recommends its pre-processing (symbolic shape inference + graph optimisation) first; if
    that fails on a graph, quantising the raw graph still works, only possibly slower.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = dst.with_name(dst.stem + ".pre.onnx")
    try:
        quant_pre_process(str(src), str(prepared))
        source = prepared
    except Exception as exc:  # noqa: BLE001 - any failure here only costs speed
        log.warning("int8 pre-processing failed (%s); quantising the raw graph", exc)
        source = src
    # The quantiser logs every skipped node at INFO on the root logger; keep the output readable.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        quantize_dynamic(
            str(source), str(dst), weight_type=QuantType.QInt8, op_types_to_quantize=OP_TYPES
        )
    finally:
        root.setLevel(level)
        prepared.unlink(missing_ok=True)


def _has_int8_ops(path: Path) -> bool:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return any(node.op_type in INT8_OPS for node in graph.node)


def compare_int8(
    fp32_path: Path, int8_path: Path, photos: np.ndarray, threshold: float
) -> Int8Result:
    """Embedding cosine of the int8 graph vs the fp32 graph on preprocessed ``photos``."""
    fp32 = ort_session(fp32_path).run(["embedding"], {INPUT_NAME: photos})[0]
    int8 = ort_session(int8_path).run(["embedding"], {INPUT_NAME: photos})[0]
    cosines = row_cosines(fp32, int8)
    cos_min, cos_mean = float(cosines.min()), float(cosines.mean())
    return Int8Result(cos_min, cos_mean, kept=bool(np.isfinite(cos_min) and cos_min >= threshold))


def int8_variant(
    tmp: Path,
    transform: EvalTransform,
    mean: Sequence[float],
    std: Sequence[float],
    threshold: float,
    labelled: Sequence[str] = (),
) -> dict[str, Variant]:
    """Quantise ``tmp/model.onnx`` into ``tmp/model.int8.onnx`` and return the manifest's
    ``variants`` entry, or ``{}`` (file removed, warning logged) when it is not close enough."""
    t0 = time.perf_counter()
    int8_path = tmp / INT8_FILE
    quantize_int8(tmp / MODEL_FILE, int8_path)
    if not _has_int8_ops(int8_path):
        int8_path.unlink()
        log.warning(
            "quantize: int8 SKIPPED: the graph has no MatMul/Gemm weights to quantise "
            "(ResNets are all Conv); the artifact has the fp32 model only"
        )
        return {}
    photos = photo_batch(PHOTO_NAMES, transform, mean, std)
    result = compare_int8(tmp / MODEL_FILE, int8_path, photos, threshold)
    change = _knn_change(tmp, labelled, transform, mean, std) if result.kept else None
    took = time.perf_counter() - t0
    if not result.kept or (change is not None and not abs(change) <= MAX_KNN_CHANGE):
        int8_path.unlink(missing_ok=True)
        log.warning(
            "quantize: int8 SKIPPED: min embedding cosine vs fp32 %.5f (mean %.5f) on %d photos "
            "(gate %.3f), k-NN change %s (gate %.1f points); the artifact has the fp32 model "
            "only (%.1f s)",
            result.cosine_min,
            result.cosine_mean,
            len(photos),
            threshold,
            change,
            MAX_KNN_CHANGE,
            took,
        )
        return {}
    log.info(
        "quantize: int8 kept, embedding cosine vs fp32 min %.5f mean %.5f on %d photos, "
        "%.1f MB, in %.1f s",
        result.cosine_min,
        result.cosine_mean,
        len(photos),
        int8_path.stat().st_size / 1e6,
        took,
    )
    variant = Variant(
        file=INT8_FILE,
        precision="int8",
        embedding_cosine_min=result.cosine_min,
        embedding_cosine_mean=result.cosine_mean,
        knn_change=change,
    )
    return {"int8": variant}


def _knn_change(tmp: Path, labelled: Sequence[str], t: EvalTransform, mean, std) -> float | None:
    """The k-NN gate's number for the dynamic int8 file (``None`` without labelled sets)."""
    fp32, int8 = ort_session(tmp / MODEL_FILE), ort_session(tmp / INT8_FILE)

    def runner(session):
        return lambda px: session.run(["embedding"], {INPUT_NAME: px})[0]

    return knn_change(runner(fp32), runner(int8), labelled, t, mean, std, "onnxruntime int8")
