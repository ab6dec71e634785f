"""Check an exported graph against PyTorch, and preprocess the bundled photos both checks use
(with ``artifact.transform``, the server's own eval transform)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from artifact import INPUT_NAME, LAYER_TOKENS, EvalTransform, ParityCheck
from artifact.cosine import row_cosines
from artifact.photos import load_photo
from artifact.transform import eval_pixels
from training.onnx_graph import FeatureGraph

log = logging.getLogger(__name__)

MIN_FP32_COSINE = 0.9999
# Photos bundled with scikit-image (no download); greyscale ones are converted to RGB.
PHOTO_NAMES = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "camera",
    "coins",
    "immunohistochemistry",
    "hubble_deep_field",
    "colorwheel",
    "clock",
    "moon",
    "page",
)


class ParityError(RuntimeError):
    """The exported graph does not compute what the PyTorch model computes."""


def photo_batch(
    names: Sequence[str], transform: EvalTransform, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """Bundled photos through the server's eval transform: float32 ``[N, 3, crop, crop]``."""
    t = transform
    return np.stack(
        [eval_pixels(load_photo(n), t.resize, t.crop, mean, std, t.interpolation) for n in names]
    )


def ort_session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def parity_inputs(
    size: int,
    step: int,
    photo: np.ndarray,
    seed: int = 0,
) -> list[np.ndarray]:
    """The three shapes every export is checked at: the training size at batch 1 (a real photo),
    a non-square size (random) and a batch of 2 (the photo and a random image).

    ``step`` is the patch size (ViT) or any stride (ResNet); the non-square width is ~1.5x.
    """
    rng = np.random.default_rng(seed)
    wide = math.ceil(size * 1.5 / step) * step
    random_square = rng.standard_normal((1, 3, size, size), dtype=np.float32)
    return [
        photo[None],
        rng.standard_normal((1, 3, size, wide), dtype=np.float32),
        np.concatenate([photo[None], random_square]),
    ]


def _max_diff(out: dict, ref: dict, name: str) -> float | None:
    return float(np.abs(out[name] - ref[name]).max()) if name in out else None


def _compare(x: np.ndarray, out: dict, ref: dict) -> ParityCheck:
    """One input's ``ParityCheck``; ``ParityError`` when an embedding's or a layer token's
    (ViT ``layer_tokens``: what ``/distance`` compares) cosine is below ``MIN_FP32_COSINE``."""
    cosine = float(row_cosines(out["embedding"], ref["embedding"]).min())
    check = ParityCheck(
        shape=tuple(x.shape),
        embedding_max_abs_diff=_max_diff(out, ref, "embedding"),
        embedding_cosine_min=cosine,
        attention_max_abs_diff=_max_diff(out, ref, "attention"),
        layer_tokens_max_abs_diff=_max_diff(out, ref, LAYER_TOKENS),
    )
    extra = {  # patch tokens are logged only: the manifest's ParityCheck has no field for them
        k: f"{_max_diff(out, ref, k):.2e}"
        for k in ("attention", "patch_tokens", LAYER_TOKENS)
        if k in out
    }
    log.info(
        "parity %s: embedding max|diff| %.2e, cosine %.7f%s",
        "x".join(map(str, x.shape)),
        check.embedding_max_abs_diff,
        cosine,
        "".join(f", {k} max|diff| {v}" for k, v in extra.items()),
    )
    cosines = {"embedding": cosine}
    if LAYER_TOKENS in out:  # every token of every exported block: what /distance compares
        d = out[LAYER_TOKENS].shape[-1]
        flat = out[LAYER_TOKENS].reshape(-1, d), ref[LAYER_TOKENS].reshape(-1, d)
        cosines["layer token"] = float(row_cosines(*flat).min())
    for what, value in cosines.items():
        if not np.isfinite(value) or value < MIN_FP32_COSINE:
            raise ParityError(
                f"onnxruntime and PyTorch disagree at input {x.shape}: {what} cosine "
                f"{value:.6f} < {MIN_FP32_COSINE}; refusing to write this artifact"
            )
    return check


def far_parity_inputs(backbone: nn.Module, seed: int = 1) -> list[np.ndarray]:
    """One more input for backbones that declare ``parity_far_size`` (h, w): a non-square size
    far from the served one, e.g. 518 x 392 for DINOv2, where a position-embedding resize baked
    to one size would show."""
    size = getattr(backbone, "parity_far_size", None)
    if size is None:
        return []
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, 3, *size), dtype=np.float32)]


def check_parity(
    backbone: nn.Module, onnx_path: Path, inputs: Sequence[np.ndarray], pooling: str = "cls"
) -> tuple[ParityCheck, ...]:
    """Run PyTorch and onnxruntime on each input; raise ``ParityError`` if an embedding's cosine
    or a layer token's (ViT ``layer_tokens``: what ``/distance`` compares) falls below
    ``MIN_FP32_COSINE``, or any output's shape differs."""
    session = ort_session(onnx_path)
    names = [o.name for o in session.get_outputs()]
    graph = FeatureGraph(backbone, pooling).eval()
    checks = []
    for x in inputs:
        with torch.no_grad():
            expected = [t.numpy() for t in graph(torch.from_numpy(x))]
        got = session.run(None, {INPUT_NAME: x})
        for name, e, g in zip(names, expected, got, strict=True):
            if e.shape != g.shape:
                raise ParityError(
                    f"output {name!r} at input {x.shape}: onnxruntime gave {g.shape}, "
                    f"PyTorch {e.shape}; the graph is not dynamic in this dimension"
                )
        out = dict(zip(names, got, strict=True))
        checks.append(_compare(x, out, dict(zip(names, expected, strict=True))))
    return tuple(checks)
