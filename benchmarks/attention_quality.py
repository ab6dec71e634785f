"""Attention quality of served ViT artifacts: are CLS maps free of isolated high-norm patches?

    python -m benchmarks.attention_quality --models models/dinov2-noreg models/dinov2-reg

For each artifact, over the bundled photos at its eval size: the share of CLS attention mass on
the top 1 % of patches (mean over heads and photos; high when a few artefact patches soak up the
attention) and the share of patch tokens whose norm is over 3x the photo's median (DINOv2's
high-norm outliers, which register/storage tokens are meant to absorb). Written side by side to
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from artifact.cli import run_cli
from artifact.photos import load_photo
from artifact.transform import eval_pixels
from training.parity import PHOTO_NAMES

RESULTS = Path(__file__).parent / "results"


def top_share(attention: np.ndarray, fraction: float = 0.01) -> float:
    """Mean over heads of the attention mass on the top ``fraction`` of patches,
    ``attention [heads, patches]`` (renormalised: register tokens are not in it)."""
    maps = attention / attention.sum(axis=-1, keepdims=True)
    k = max(1, math.ceil(fraction * maps.shape[-1]))
    return float(np.sort(maps, axis=-1)[:, -k:].sum(axis=-1).mean())


def norm_outliers(tokens: np.ndarray, factor: float = 3.0) -> float:
    """Share of patch tokens ``[patches, D]`` whose norm exceeds ``factor`` x the median."""
    norms = np.linalg.norm(tokens, axis=-1)
    return float((norms > factor * np.median(norms)).mean())


def measure(folder: Path) -> dict:
    manifest = json.loads((folder / "manifest.json").read_text())
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    crop, resize = manifest["eval_transform"]["crop"], manifest["eval_transform"]["resize"]
    shares, outliers = [], []
    for name in PHOTO_NAMES:
        x = eval_pixels(load_photo(name), resize, crop, manifest["mean"], manifest["std"])
        _, patches, attention, _ = session.run(None, {"pixel_values": x[None]})
        shares.append(top_share(attention[0]))
        outliers.append(norm_outliers(patches[0]))
    return {
        "model": manifest["name"],
        "arch": manifest["arch"],
        "register_tokens": manifest.get("n_register_tokens", 0),
        "top1pct_attention_share": float(np.mean(shares)),
        "norm_outlier_share": float(np.mean(outliers)),
        "photos": len(PHOTO_NAMES),
    }


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", type=Path, required=True, help="artifact folders")
    parser.add_argument("--label", default="attention-quality", help="result file name suffix")
    args = parser.parse_args(argv)
    rows = [measure(folder) for folder in args.models]
    lines = [
        "# Attention quality: top-1 % attention share and patch-norm outliers",
        "",
        f"{time.strftime('%Y-%m-%d')}; `python -m benchmarks.attention_quality`; "
        f"{rows[0]['photos']} bundled photos at each model's eval size.",
        "",
        "| model | arch | register tokens | attention on top 1 % patches "
        "| tokens with norm > 3x median |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['arch']} | {r['register_tokens']} | "
            f"{r['top1pct_attention_share']:.3f} | {r['norm_outlier_share']:.4f} |"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{time.strftime('%Y-%m-%d')}-{args.label}.md"
    out.write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    print(out)
    return out


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="python -m benchmarks.attention_quality"))
