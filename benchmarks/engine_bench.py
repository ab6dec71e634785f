"""Engine section: img/s of every inference path per model and batch size, as ratios to PyTorch
eager fp32 and onnxruntime fp32 and as a fraction of the GEMM ceiling of its precision; then the
embedding cosine of each path vs onnxruntime fp32 on real photos and the k-NN accuracy change on
sklearn's labelled digits (leave-one-out, DINO's weighted vote)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from artifact.cosine import row_cosines
from benchmarks.artifacts import ModelSpec, flops_per_image, model_dir, spec_for
from benchmarks.ceiling import ceilings
from benchmarks.common import Mode, interleaved
from benchmarks.paths import PATHS, Embed, available_paths, make_path
from benchmarks.photos import digits, real_photos

log = logging.getLogger(__name__)

REFERENCE = "ort_fp32"
BASELINE = "torch_fp32"
# k-NN runs over the servable reduced-precision paths; fp32 ones agree with the reference to ~1e-6.
EMBED_DIMS = {"vit_tiny": 192, "vit_small": 384, "vit_base": 768}
KNN_PATHS = ("ort_fp32", "ort_int8", "ov_bf16", "ov_int8")


def knn_loo(features: np.ndarray, labels: np.ndarray, k: int = 20, t: float = 0.07) -> float:
    """Leave-one-out weighted k-NN top-1 accuracy (percent) on L2-normalised features."""
    f = features / np.linalg.norm(features, axis=1, keepdims=True)
    sim = f @ f.T
    np.fill_diagonal(sim, -np.inf)
    k = min(k, len(f) - 1)
    idx = np.argpartition(-sim, k, axis=1)[:, :k]
    weights = np.exp(np.take_along_axis(sim, idx, axis=1) / t)
    votes = np.zeros((len(f), int(labels.max()) + 1))
    np.add.at(votes, (np.arange(len(f))[:, None], labels[idx]), weights)
    return float(100.0 * (votes.argmax(axis=1) == labels).mean())


def embed_all(fn: Embed, pixels: np.ndarray, batch: int = 8) -> np.ndarray:
    return np.concatenate([fn(pixels[i : i + batch]) for i in range(0, len(pixels), batch)])


def _speed(
    spec: ModelSpec, fns: dict[str, Embed], mode: Mode, flops: float, ceil: dict
) -> list[dict]:
    rows = []
    rng = np.random.default_rng(0)
    for batch in mode.batches:
        pixels = rng.standard_normal((batch, 3, spec.image_size, spec.image_size), np.float32)
        calls = {name: (lambda fn=fn, px=pixels: fn(px)) for name, fn in fns.items()}
        log.info("engine %s batch %d: %s", spec.label, batch, ", ".join(calls))
        speed = interleaved(calls, batch, mode.min_time, mode.rounds)
        for name, img_s in speed.items():
            gflops = img_s * flops / 1e9
            peak = ceil.get(PATHS[name].precision)
            rows.append(
                {
                    "model": spec.label,
                    "batch": batch,
                    "path": name,
                    "img_s": round(img_s, 2),
                    "x_torch_fp32": round(img_s / speed[BASELINE], 3),
                    "x_ort_fp32": round(img_s / speed[REFERENCE], 3),
                    "gflops": round(gflops, 1),
                    "ceiling_fraction": round(gflops / peak, 3) if peak else None,
                }
            )
    return rows


def _accuracy(spec: ModelSpec, folder: Path, fns: dict[str, Embed], mode: Mode) -> list[dict]:
    from artifact import load_manifest
    from service.preprocess import eval_pixels

    manifest = load_manifest(folder)
    photos, names = real_photos()
    photo_px = np.stack([eval_pixels(img, manifest) for img in photos])
    ref = embed_all(fns[REFERENCE], photo_px)
    images, labels = digits(mode.knn_images)
    digit_px = np.stack([eval_pixels(img, manifest) for img in images])
    knn_ref = knn_loo(embed_all(fns[REFERENCE], digit_px), labels)
    rows = []
    for name, fn in tqdm(fns.items(), desc=f"accuracy {spec.label}", leave=False):
        cos = row_cosines(ref, embed_all(fn, photo_px))
        row = {
            "model": spec.label,
            "path": name,
            "photos": len(names),
            "cosine_min": float(cos.min()),
            "cosine_mean": float(cos.mean()),
        }
        if name in KNN_PATHS:
            acc = knn_ref if name == REFERENCE else knn_loo(embed_all(fn, digit_px), labels)
            row.update(knn_top1=round(acc, 2), knn_images=len(labels))
            row["knn_delta_points"] = round(acc - knn_ref, 2)
        rows.append(row)
    return rows


def run(mode: Mode, threads: int, so_far: dict) -> dict:
    ceil = ceilings(mode.min_time, threads, n=512 if mode.smoke else 2048)
    names = available_paths()
    out: dict = {"gemm_gflops": ceil, "paths": {n: PATHS[n].note for n in names}, "speed": []}
    out["accuracy"] = []
    for arch in mode.archs:
        spec = spec_for(arch, mode.smoke)
        folder = model_dir(spec, mode.cache)
        flops = flops_per_image(spec, EMBED_DIMS[arch], spec.depth or 12)
        out.setdefault("gflop_per_image", {})[spec.label] = round(flops / 1e9, 3)
        fns = {name: make_path(name, spec, folder, threads) for name in names}
        out["speed"] += _speed(spec, fns, mode, flops, ceil)
        out["accuracy"] += _accuracy(spec, folder, fns, mode)
        del fns
    return out
