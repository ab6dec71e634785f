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
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from training.checkpoints import CheckpointError, read_checkpoint, save_atomic
from training.decoder import PADDINGS, PatchDecoder, tokens_to_grid
from training.invert_data import RandomCrops, held_out_batch, load_images, load_photo, to_tensor
from training.perceptual import FeaturePredictionLoss, reflect_pad_to

log = logging.getLogger("training.invert")

LOSSES = ("l1", "l1+fp")
CHECKPOINT = "decoder.pth"


@dataclass
class InvertConfig:
    image_size: int = 64
    steps: int = 2000
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    padding: str = "reflect"
    loss: str = "l1"
    fp_weight: float = 1.0
    fp_layers: tuple[int, ...] | None = None  # None: the loss's default (last 4 blocks)
    width: int = 128
    min_width: int = 32
    margin: int = 2
    seed: int = 0
    checkpoint_every: int = 500
    pool: int = 0  # >0: a fixed pool of this many crops with their tokens computed once (CPU)

    def validate(self, patch_size: int) -> None:
        if self.padding not in PADDINGS:
            raise ValueError(f"--padding must be one of {PADDINGS}, got {self.padding!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"--loss must be one of {LOSSES}, got {self.loss!r}")
        if self.image_size % patch_size:
            raise ValueError(
                f"--image-size {self.image_size} is not a multiple of the patch size {patch_size}"
            )
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("--steps, --batch-size and --lr must be positive")


def warmup_cosine(step: int, total: int) -> float:
    """Learning-rate factor: linear warm-up over 5% of the steps, then cosine to zero."""
    warm = max(1, total // 20)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


class Tokens(nn.Module):
    """Frozen backbone -> patch-token grid ``[B, D, h, w]`` for images in [0, 1]."""

    def __init__(self, backbone: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if getattr(backbone, "family", None) != "vit":
            raise ValueError("inverting needs a ViT backbone (patch tokens); got a ResNet")
        self.backbone = backbone.eval().requires_grad_(False)
        self.patch = backbone.patch_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = reflect_pad_to((images - self.mean) / self.std, self.patch)
        _, tokens, _ = self.backbone.forward_features(x)
        return tokens_to_grid(tokens, (x.shape[-2] // self.patch, x.shape[-1] // self.patch))


def reconstruct(decoder: PatchDecoder, tokens: Tokens, images: Tensor) -> Tensor:
    """Decode ``images``' tokens and crop the padding back off: ``[B, 3, H, W]`` in [0, 1]."""
    h, w = images.shape[-2:]
    return decoder(tokens(images))[..., :h, :w]


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


def train_decoder(
    backbone: nn.Module,
    images: Sequence[Tensor],
    cfg: InvertConfig,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> tuple[PatchDecoder, Tokens, list[dict]]:
    """Train a ``PatchDecoder`` on random crops of ``images``; returns it (eval mode), the token
    extractor and the loss history. With ``run_dir`` it checkpoints every
    ``cfg.checkpoint_every`` steps and at the end; ``resume`` continues from that checkpoint."""
    cfg.validate(backbone.patch_size)
    torch.manual_seed(cfg.seed)
    tokens = Tokens(backbone, mean, std)
    decoder = PatchDecoder(
        backbone.embed_dim, backbone.patch_size, cfg.padding, cfg.width, cfg.min_width, cfg.margin
    )
    opt = torch.optim.AdamW(decoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(warmup_cosine, total=cfg.steps))
    perceptual = None
    if cfg.loss == "l1+fp":
        perceptual = FeaturePredictionLoss(backbone, layers=cfg.fp_layers, mean=mean, std=std)
    crops = RandomCrops(images, cfg.image_size, seed=cfg.seed)
    history: list[dict] = []
    start = 0
    ckpt_path = Path(run_dir) / CHECKPOINT if run_dir is not None else None
    if resume and ckpt_path is not None and ckpt_path.is_file():
        state = read_checkpoint(ckpt_path)
        if state.get("config") != asdict(cfg):
            raise ValueError(f"{ckpt_path} was trained with another configuration; use a new run")
        decoder.load_state_dict(state["decoder"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        crops.rng = np.random.default_rng([cfg.seed, state["step"]])  # fresh, reproducible crops
        start, history = state["step"], state["history"]
        log.info("resumed %s at step %d", ckpt_path, start)

    def save(step: int) -> None:
        if ckpt_path is not None:
            state = {
                "decoder": decoder.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "step": step,
                "config": asdict(cfg),
                "decoder_config": decoder.config,
                "history": history,
            }
            save_atomic(state, ckpt_path)

    pool_images = pool_tokens = None
    if cfg.pool:
        # The frozen backbone gives the same tokens for the same crop: compute them once.
        pool_images = crops.batch(cfg.pool)
        pool_tokens = torch.cat([tokens(chunk) for chunk in pool_images.split(64)])
    decoder.train()
    bar = tqdm(range(start, cfg.steps), desc="decoder", disable=not progress, initial=start)
    for step in bar:
        if pool_images is not None:
            pick = torch.from_numpy(crops.rng.integers(0, cfg.pool, cfg.batch_size))
            batch = pool_images[pick]
            h, w = batch.shape[-2:]
            out = decoder(pool_tokens[pick])[..., :h, :w]
        else:
            batch = crops.batch(cfg.batch_size)
            out = reconstruct(decoder, tokens, batch)
        l1 = F.l1_loss(out, batch)
        loss = l1
        fp = None
        if perceptual is not None:
            fp = perceptual(out, batch)
            loss = l1 + cfg.fp_weight * fp
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss is {loss.item()} at step {step}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        record = {"step": step + 1, "l1": round(l1.item(), 5)}
        if fp is not None:
            record["fp"] = round(fp.item(), 5)
        history.append(record)
        bar.set_postfix({k: v for k, v in record.items() if k != "step"})
        if ckpt_path is not None and (step + 1) % cfg.checkpoint_every == 0:
            save(step + 1)
    save(cfg.steps)
    return decoder.eval(), tokens, history


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
    d = InvertConfig()
    p = argparse.ArgumentParser(
        prog="python -m training.invert",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="backbone weights, any format")
    p.add_argument("--which", choices=("teacher", "student"), default="teacher")
    p.add_argument("--model-dir", type=Path, help="exported model to put decoder.onnx beside")
    p.add_argument("--data", type=Path, help="image folder (default: bundled photos)")
    p.add_argument("--out", type=Path, help="run folder (default: runs/invert-<time>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--padding", choices=PADDINGS, default=d.padding)
    p.add_argument("--loss", choices=LOSSES, default=d.loss)
    p.add_argument("--fp-weight", type=float, default=d.fp_weight)
    p.add_argument("--fp-layers", type=int, nargs="+", help="ViT blocks (default: last 4)")
    p.add_argument("--width", type=int, default=d.width, help="channels after the stem")
    p.add_argument("--margin", type=int, default=d.margin, help="pad-crop margin in tokens")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--pool", type=int, default=d.pool, help="fixed crop pool, tokens cached")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from training.decoder_export import export_decoder
    from training.invert_data import HELD_OUT_PHOTOS
    from training.perceptual import backbone_from_checkpoint

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = InvertConfig(
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
    run_dir = args.out or Path(f"runs/invert-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        ckpt = read_checkpoint(args.checkpoint)
        backbone = backbone_from_checkpoint(ckpt, which=args.which)
        mean, std = _stats(args, ckpt)
        images = load_images(args.data)
        held = held_out_batch(
            [to_tensor(load_photo(n)) for n in HELD_OUT_PHOTOS], cfg.image_size, 8
        )
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
                raise ValueError(
                    f"{args.model_dir} serves other weights than {args.checkpoint} (patch-token "
                    f"cosine {cos:.4f}); pass the checkpoint that model was exported from"
                )
            summary["decoder"] = str(export_decoder(decoder, args.model_dir, summary))
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.info("held-out L1 %.4f; grid %s", held_l1, grid)
    except (CheckpointError, ValueError, OSError) as exc:
        log.error("invert failed: %s", exc)
        return 1
    print(run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
