"""Export parity of the DINOv2 / DINOv3 backbones at full size, written to benchmarks/results/.

    python -m benchmarks.family_parity [--names dinov2_vits14 ...]

Random weights with every layerscale at 1 (a trained model's residual branches are not the
1e-5 of a fresh init, and that is where a wrong position resize would show), exported through
the normal path (its own parity gate), then onnxruntime against PyTorch at more sizes,
including the trained 37 x 37 grid of DINOv2 and a thin non-square one. For DINOv2 it also
reports how far the resize to an explicit size without the +0.1 offset (what a naive dynamic
export computes) is from the official one.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from artifact.cli import run_cli
from training.backbones import build_backbone
from training.export import export_backbone
from training.onnx_graph import FeatureGraph
from training.parity import row_cosines

RESULTS = Path(__file__).parent / "results"
NAMES = ("dinov2_vits14", "dinov2_vits14_reg", "dinov3_vits16", "dinov3_convnext_tiny")


def realistic(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_backbone(name).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if key.endswith("gamma"):
                p.fill_(1.0)
            elif key in ("pos_embed", "cls_token", "register_tokens", "storage_tokens"):
                p.normal_(0, 0.5)
    return model


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(row_cosines(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])).min())


def measure(name: str, work: Path) -> list[str]:
    model = realistic(name)
    t0 = time.perf_counter()
    folder = export_backbone(
        model,
        name,
        work,
        arch=name,
        train_image_size=224,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        eval_resize=256,
        eval_crop=224,
        provenance={"source": "random"},
    )
    export_s = time.perf_counter() - t0
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    patch = getattr(model, "patch_size", None) or 32
    sizes = [
        (224, 224),
        (37 * patch, 37 * patch),
        (37 * patch, 28 * patch),
        (5 * patch, 40 * patch),
    ]
    rows = []
    for h, w in sizes:
        x = np.random.default_rng(h * w).standard_normal((1, 3, h, w), dtype=np.float32)
        got = session.run(None, {"pixel_values": x})
        with torch.no_grad():
            want = [t.numpy() for t in FeatureGraph(model)(torch.from_numpy(x))]
        emb = cosine(got[0], want[0])
        tokens = cosine(got[1], want[1]) if len(got) > 1 else float("nan")
        naive = naive_gap(model, x) if name.startswith("dinov2") else "-"
        rows.append(
            f"| {name} | {h} x {w} | {emb:.7f} | {tokens:.7f} | "
            f"{np.abs(got[0] - want[0]).max():.1e} | {naive} | {export_s:.0f} |"
        )
    return rows


def naive_gap(model: torch.nn.Module, x: np.ndarray) -> str:
    """Min patch-token cosine of the official model against the same model resizing to an
    explicit size without offset or antialias (the form a size-baked export avoids)."""
    if model.interpolate_antialias:
        return "(exact size already)"
    with torch.no_grad():
        official = model.forward_features(torch.from_numpy(x))[1].numpy()
        model.interpolate_offset = 0.0
        try:
            plain = model.forward_features(torch.from_numpy(x))[1].numpy()
        finally:
            model.interpolate_offset = 0.1
    return f"{cosine(official, plain):.7f}"


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--names", nargs="+", default=list(NAMES), help="hub names to measure")
    args = parser.parse_args(argv)
    lines = [
        "# Export parity of the DINO family (random weights, layerscale 1)",
        "",
        f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}; "
        "`python -m benchmarks.family_parity`.",
        "",
        "The last column is no parity check: it is how far the resize to an explicit size "
        "without the +0.1 offset lands from the official one, on these random (not smooth) "
        "position grids; smooth trained grids differ far less. The export reproduces the "
        "official resize itself, so its parity does not depend on it.",
        "",
        "| model | input | embedding cosine | patch token min cosine | embedding max abs diff "
        "| official vs explicit-size resize (min token cosine) | export s |",
        "|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as work:
        for name in args.names:
            lines += measure(name, Path(work))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{time.strftime('%Y-%m-%d')}-family-export-parity.md"
    out.write_text("\n".join(lines) + "\n")
    print(out)
    return out


if __name__ == "__main__":
    sys.exit(run_cli(main, prog="python -m benchmarks.family_parity"))
