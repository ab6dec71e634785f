"""An int8 variant's accuracy gate, measured again on the vectors the server will return once an
embedding transform is added.

Why: the gate at export compares raw embeddings, where int8 moves the cosine by ~1e-5. Whitening
scales every principal axis to unit variance, so the weak axes, where int8's rounding noise is
relatively largest, weigh as much as the strong ones: on the quickstart model the served cosine
of onnxruntime's dynamic int8 fell to 0.963 on Fashion-MNIST images (0.993 on photos) while the
raw one stayed at 0.99999. A variant is therefore re-measured through the transform (cosine on
the bundled photos; the k-NN on the labelled sets that are available, when its export measured
one) and dropped, files and all, when it no longer passes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from artifact import INPUT_NAME, MODEL_FILE, Manifest, Variant
from artifact.cosine import row_cosines
from artifact.gates import gate_failure
from training.int8_gate import FMNIST_DIR, knn_change
from training.parity import PHOTO_NAMES, ort_session, photo_batch

log = logging.getLogger(__name__)

Served = Callable[[np.ndarray], np.ndarray]  # raw embeddings -> what the server returns


def _runner(model_dir: Path, variant: Variant) -> Callable[[np.ndarray], np.ndarray]:
    if variant.engine == "openvino":
        from training.quantize_openvino import _ov_embed

        return lambda px: _ov_embed(model_dir / variant.file, px)
    session = ort_session(model_dir / variant.file)
    return lambda px: np.concatenate(
        [session.run(["embedding"], {INPUT_NAME: px[s : s + 32]})[0] for s in range(0, len(px), 32)]
    )


def _labelled_sets() -> tuple[str, ...]:
    return ("digits", "fashion-mnist") if FMNIST_DIR.is_dir() else ("digits",)


def regate(
    model_dir: Path, manifest: Manifest, served: Served
) -> tuple[dict[str, Variant], list[str]]:
    """The manifest's variants re-measured through ``served``, without those that now fail, and
    the files of the failed ones (for the caller to delete once the new manifest is written)."""
    if not manifest.variants:
        return {}, []
    fp32 = _runner(model_dir, Variant(file=MODEL_FILE, precision="fp32", embedding_cosine_min=1,
                                      embedding_cosine_mean=1))  # fmt: skip
    kept: dict[str, Variant] = {}
    dropped: list[str] = []
    for key, variant in manifest.variants.items():
        again = _measure(key, variant, manifest, lambda px: served(fp32(px)),
                         _served_runner(model_dir, variant, served))  # fmt: skip
        why = gate_failure(again)
        if why is None:
            kept[key] = again
            log.info("variant %s with the transform: cosine min %.5f, k-NN change %s: kept", key,
                     again.embedding_cosine_min, again.knn_change)  # fmt: skip
        else:
            log.warning("variant %s dropped: with the embedding transform %s", key, why)
            dropped += _variant_files(variant)
    return kept, dropped


def _served_runner(model_dir: Path, variant: Variant, served: Served) -> Served:
    run = _runner(model_dir, variant)
    return lambda px: served(run(px))


def _measure(key: str, variant: Variant, manifest: Manifest, fp32: Served, int8: Served) -> Variant:
    """``variant`` with its gate numbers measured on served vectors."""
    t = manifest.eval_transform
    photos = photo_batch(PHOTO_NAMES, t, manifest.mean, manifest.std)
    cos = row_cosines(fp32(photos), int8(photos))
    change = variant.knn_change
    if change is not None:
        what = f"{key} with the transform"
        change = knn_change(fp32, int8, _labelled_sets(), t, manifest.mean, manifest.std, what)
    update = {
        "embedding_cosine_min": float(cos.min()),
        "embedding_cosine_mean": float(cos.mean()),
        "knn_change": change,
    }
    return variant.model_copy(update=update)


def _variant_files(variant: Variant) -> list[str]:
    """A variant's files: an OpenVINO IR is the .xml and its .bin."""
    if variant.file.endswith(".xml"):
        return [variant.file, variant.file[: -len(".xml")] + ".bin"]
    return [variant.file]
