"""The k-NN half of an int8 variant's accuracy gate, shared by onnxruntime's dynamic int8 and
OpenVINO's static int8: DINO's weighted k-NN top-1 on each named labelled set, fp32 graph vs int8
graph, through the artifact's eval transform. The manifest records the largest change (in points)
and ``artifact.gates`` refuses a variant beyond ``MAX_KNN_CHANGE``.

With a trained model the labelled sets are what the gate is for: the quickstart model on
Fashion-MNIST, and sklearn's digits for anything (both offline, no download).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from artifact import EvalTransform
from artifact.transform import eval_pixels

log = logging.getLogger(__name__)

LABELLED_SETS = ("digits", "fashion-mnist")
FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
Embed = Callable[[np.ndarray], np.ndarray]  # [B, 3, H, W] pixels -> [B, D] embeddings


def labelled_set(name: str, limit: int = 2000) -> tuple[list[Image.Image], np.ndarray]:
    """Images and labels of a labelled set for the k-NN gate: sklearn's digits (1,797 8x8
    scans, no download) or Fashion-MNIST's test split (the first ``limit``)."""
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = (digits.images * (255 / 16)).astype(np.uint8)[:limit]
        labels = digits.target[:limit]
    elif name == "fashion-mnist":
        from training.data import load_fashion_mnist

        test = load_fashion_mnist(FMNIST_DIR)[1]
        images, labels = test.images[:limit], test.labels[:limit]  # type: ignore[attr-defined]
    else:
        raise ValueError(f"labelled set must be one of {LABELLED_SETS}, got {name!r}")
    return [Image.fromarray(a).convert("RGB") for a in images], np.asarray(labels, np.int64)


def knn_top1(features: np.ndarray, labels: np.ndarray) -> float:
    """DINO's weighted k-NN top-1 (k=20, T=0.07), first two thirds as memory, rest as queries."""
    import torch

    from training.knn import knn_classify

    feats = features / np.linalg.norm(features, axis=1, keepdims=True).clip(1e-12)
    split = len(feats) * 2 // 3
    f, y = torch.from_numpy(feats.astype(np.float32)), torch.from_numpy(labels)
    return knn_classify(f[:split], y[:split], f[split:], y[split:])["top1"]


def prepare(images: Sequence[Image.Image], t: EvalTransform, mean, std) -> np.ndarray:
    """``images`` through the artifact's eval transform, as the server feeds them."""
    return np.stack([eval_pixels(i, t.resize, t.crop, mean, std, t.interpolation) for i in images])


def knn_change(
    fp32: Embed, int8: Embed, sets: Sequence[str], t: EvalTransform, mean, std, what: str
) -> float | None:
    """The k-NN change (points) of ``int8`` vs ``fp32`` with the largest magnitude over ``sets``;
    ``None`` when no set is named."""
    worst: float | None = None
    for name in sets:
        images, labels = labelled_set(name)
        pixels = prepare(images, t, mean, std)
        base = knn_top1(fp32(pixels), labels)
        change = round(knn_top1(int8(pixels), labels) - base, 3)
        log.info("quantize: %s k-NN on %s: fp32 %.2f %%, change %+.2f points", what, name, base,
                 change)  # fmt: skip
        if worst is None or abs(change) > abs(worst):
            worst = change
    return worst
