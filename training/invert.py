"""``python -m training.invert``: what do the features keep? Train a decoder from a frozen
backbone's patch tokens back to the image, and export it beside the served model.

    python -m training.invert --checkpoint runs/mine/checkpoint.pth --model-dir models/mine
    python -m training.invert --checkpoint ckpt.pth --loss l1+fp --padding pad-crop --steps 3000

The backbone's shape is read from the checkpoint (ours or an official DINO file). Training uses
random crops of ``--data`` (any image folder) or of photos bundled with scikit-image. The run
folder gets ``decoder.pth`` (resumable), ``grid.png`` (held-out inputs over reconstructions) and
``summary.json``; with ``--model-dir`` the decoder is exported there as ``decoder.onnx`` +
``decoder.json`` for the server's ``POST /reconstruct``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from artifact.cli import DefaultsHelpFormatter, UsageError, run_cli
from training.checkpoints import read_checkpoint
from training.decoder import PADDINGS
from training.decoder_training import (
    CHECKPOINT,
    LOSSES,
    InvertConfig,
    Tokens,
    reconstruct,
    train_decoder,
)
from training.invert_data import held_out_batch, load_images, load_photo, to_tensor

__all__ = ["CHECKPOINT", "InvertConfig", "main", "reconstruct", "save_grid", "train_decoder"]

log = logging.getLogger("training.invert")


def save_grid(inputs: Tensor, outputs: Tensor, path: str | Path, gap: int = 2) -> Path:
    """A PNG with the inputs on the top row and their reconstructions below (8 at most)."""
    n = min(8, inputs.shape[0])
    rows = [inputs[:n], outputs[:n].detach()]
    h, w = inputs.shape[-2:]
    canvas = np.ones((2 * h + 3 * gap, n * w + (n + 1) * gap, 3), np.float32)
    for r, row in enumerate(rows):
        for i in range(n):
            y, x = gap + r * (h + gap), gap + i * (w + gap)
            canvas[y : y + h, x : x + w] = row[i].clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((canvas * 255).round().astype(np.uint8)).save(path)
    return path


# ---------------------------------------------------------------------- command line


def _stats(args: argparse.Namespace, ckpt: dict) -> tuple[tuple, tuple]:
    """Normalisation: the served model's manifest, else the training config, else ImageNet."""
    from training.augment import IMAGENET_MEAN, IMAGENET_STD
    from training.perceptual import checkpoint_stats

    if args.model_dir is not None:
        from artifact import load_manifest

        m = load_manifest(args.model_dir, verify_files=False)
        return tuple(m.mean), tuple(m.std)
    return checkpoint_stats(ckpt) or (IMAGENET_MEAN, IMAGENET_STD)


def check_served_backbone(tokens: Tokens, model_dir: Path, images: Tensor) -> float:
    """Min cosine between this backbone's patch tokens and the served ``model.onnx``'s on
    ``images``; below 0.999 the decoder would be exported beside weights it never saw."""
    import onnxruntime as ort

    from artifact import INPUT_NAME, MODEL_FILE

    session = ort.InferenceSession(str(model_dir / MODEL_FILE), providers=["CPUExecutionProvider"])
    x = (images - tokens.mean) / tokens.std
    (served,) = session.run(["patch_tokens"], {INPUT_NAME: x.numpy()})
    with torch.no_grad():
        _, ours, _ = tokens.backbone.forward_features(x)
    cos = F.cosine_similarity(torch.from_numpy(served), ours, dim=-1)
    return float(cos.min())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m training.invert",
        description=__doc__.split("\n\n")[0],
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="backbone weights, any format")
    p.add_argument(
        "--which",
        choices=("teacher", "student"),
        default="teacher",
        help="network of a training checkpoint; the served model is the teacher",
    )
    p.add_argument(
        "--model-dir",
        type=Path,
        help="exported model to put decoder.onnx beside (its normalisation is used); without "
        "it nothing is exported",
    )
    p.add_argument("--data", type=Path, help="image folder (default: bundled photos)")
    p.add_argument("--out", type=Path, help="run folder (default: runs/invert-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    _add_training_flags(p, InvertConfig())
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    return p.parse_args(argv)


def _add_training_flags(p: argparse.ArgumentParser, d: InvertConfig) -> None:
    """The decoder's ``InvertConfig`` fields (``d`` gives the defaults)."""
    p.add_argument(
        "--image-size",
        type=int,
        default=d.image_size,
        help="training crop side, a multiple of the patch size; larger sees more context, slower",
    )
    p.add_argument(
        "--steps", type=int, default=d.steps, help="optimiser steps; more for sharper output"
    )
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="crops per step; lower it on OOM"
    )
    p.add_argument(
        "--lr", type=float, default=d.lr, help="AdamW peak lr; lower it if the loss turns NaN"
    )
    p.add_argument(
        "--padding",
        choices=PADDINGS,
        default=d.padding,
        help="border handling; zeros shows a black frame, pad-crop and reflect avoid it",
    )
    p.add_argument(
        "--loss",
        choices=LOSSES,
        default=d.loss,
        help="l1: pixels only (blurry); l1+fp adds the backbone's feature prediction loss",
    )
    p.add_argument(
        "--fp-weight", type=float, default=d.fp_weight, help="weight of fp in --loss l1+fp"
    )
    p.add_argument("--fp-layers", type=int, nargs="+", help="ViT blocks (default: last 4)")
    p.add_argument(
        "--width", type=int, default=d.width, help="channels after the stem; wider is sharper"
    )
    p.add_argument(
        "--margin", type=int, default=d.margin, help="pad-crop margin in tokens (--padding)"
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=d.checkpoint_every,
        help="steps between decoder.pth saves (what --resume continues from)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="crops and initial weights")
    p.add_argument(
        "--pool",
        type=int,
        default=d.pool,
        help="fixed pool of this many crops, tokens computed once: much faster on CPU, less "
        "variety; 0: fresh crops every step",
    )


def _config(args: argparse.Namespace) -> InvertConfig:
    return InvertConfig(
        image_size=args.image_size,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        padding=args.padding,
        loss=args.loss,
        fp_weight=args.fp_weight,
        fp_layers=tuple(args.fp_layers) if args.fp_layers else None,
        width=args.width,
        margin=args.margin,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        pool=args.pool,
    )


def run(argv: Sequence[str] | None = None) -> Path:
    """The invert command: the run folder; raises on bad input or a failed run."""
    from training.decoder_export import export_decoder
    from training.invert_data import HELD_OUT_PHOTOS
    from training.perceptual import backbone_from_checkpoint

    args = parse_args(argv)
    cfg = _config(args)
    run_dir = args.out or Path(f"runs/invert-{time.strftime('%Y%m%d-%H%M%S')}")
    ckpt = read_checkpoint(args.checkpoint)
    backbone = backbone_from_checkpoint(ckpt, which=args.which)
    mean, std = _stats(args, ckpt)
    images = load_images(args.data)
    held = held_out_batch([to_tensor(load_photo(n)) for n in HELD_OUT_PHOTOS], cfg.image_size, 8)
    t0 = time.perf_counter()
    decoder, tokens, history = train_decoder(
        backbone,
        images,
        cfg,
        mean=mean,
        std=std,
        run_dir=run_dir,
        resume=args.resume,
        progress=not args.no_progress,
    )
    with torch.no_grad():
        recon = reconstruct(decoder, tokens, held)
    held_l1 = float(F.l1_loss(recon, held))
    grid = save_grid(held, recon, run_dir / "grid.png")
    summary = {
        "config": asdict(cfg),
        "checkpoint": str(args.checkpoint),
        "train_seconds": round(time.perf_counter() - t0, 1),
        "final": history[-1] if history else None,
        "held_out_l1": round(held_l1, 5),
        "grid": str(grid),
    }
    if args.model_dir is not None:
        cos = check_served_backbone(tokens, args.model_dir, held)
        if cos < 0.999:
            raise UsageError(
                f"{args.model_dir} serves other weights than {args.checkpoint} (patch-token "
                f"cosine {cos:.4f}); pass the checkpoint that model was exported from"
            )
        summary["decoder"] = str(export_decoder(decoder, args.model_dir, summary))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("held-out L1 %.4f; grid %s", held_l1, grid)
    print(run_dir)
    return run_dir


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.invert``: exit 0; 2 for bad input (a checkpoint that is missing or
    does not match ``--model-dir``); 1 when training or the export fails."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return run_cli(run, argv, prog="python -m training.invert")


if __name__ == "__main__":
    sys.exit(main())
