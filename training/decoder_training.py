"""Training a decoder from a frozen backbone's patch tokens back to the image (the library part of
``python -m training.invert``).

The decoder run saves and resumes through ``training.run_state``'s generic pieces, as the DINO
trainer does: ``decoder.pth`` holds the decoder, optimiser and scheduler states, the step, the
config and the loss history.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from training.checkpoints import read_checkpoint, save_atomic
from training.decoder import PADDINGS, PatchDecoder, tokens_to_grid
from training.invert_data import RandomCrops
from training.perceptual import FeaturePredictionLoss, reflect_pad_to
from training.run_state import load_state_dicts, state_dicts

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


@dataclass
class DecoderTraining:
    """Everything a decoder run updates; ``parts`` are what its checkpoint saves and restores."""

    decoder: PatchDecoder
    tokens: Tokens
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    perceptual: FeaturePredictionLoss | None
    crops: RandomCrops
    history: list[dict]
    step: int = 0  # steps taken

    @property
    def parts(self) -> dict:
        return {"decoder": self.decoder, "optimizer": self.optimizer, "scheduler": self.scheduler}


def _setup(
    backbone: nn.Module,
    images: Sequence[Tensor],
    cfg: InvertConfig,
    mean: Sequence[float],
    std: Sequence[float],
) -> DecoderTraining:
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
    return DecoderTraining(decoder, tokens, opt, sched, perceptual, crops, [])


def _save(run: DecoderTraining, cfg: InvertConfig, path: Path) -> None:
    state = {
        **state_dicts(run.parts),
        "step": run.step,
        "config": asdict(cfg),
        "decoder_config": run.decoder.config,
        "history": run.history,
    }
    save_atomic(state, path)


def _resume(run: DecoderTraining, cfg: InvertConfig, path: Path) -> None:
    state = read_checkpoint(path)
    if state.get("config") != asdict(cfg):
        raise ValueError(f"{path} was trained with another configuration; use a new run")
    load_state_dicts(run.parts, state)
    run.crops.rng = np.random.default_rng([cfg.seed, state["step"]])  # fresh, reproducible crops
    run.step, run.history = state["step"], state["history"]
    log.info("resumed %s at step %d", path, run.step)


def _train_step(run: DecoderTraining, cfg: InvertConfig, pool: tuple | None) -> dict:
    """One optimiser step on a batch of random crops (or of the cached pool); its losses."""
    if pool is not None:
        pool_images, pool_tokens = pool
        pick = torch.from_numpy(run.crops.rng.integers(0, cfg.pool, cfg.batch_size))
        batch = pool_images[pick]
        h, w = batch.shape[-2:]
        out = run.decoder(pool_tokens[pick])[..., :h, :w]
    else:
        batch = run.crops.batch(cfg.batch_size)
        out = reconstruct(run.decoder, run.tokens, batch)
    l1 = F.l1_loss(out, batch)
    fp = None if run.perceptual is None else run.perceptual(out, batch)
    loss = l1 if fp is None else l1 + cfg.fp_weight * fp
    if not torch.isfinite(loss):
        raise RuntimeError(f"loss is {loss.item()} at step {run.step}; lower --lr")
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    run.optimizer.step()
    run.scheduler.step()
    run.step += 1
    record = {"step": run.step, "l1": round(l1.item(), 5)}
    if fp is not None:
        record["fp"] = round(fp.item(), 5)
    run.history.append(record)
    return record


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
    run = _setup(backbone, images, cfg, mean, std)
    ckpt_path = Path(run_dir) / CHECKPOINT if run_dir is not None else None
    if resume and ckpt_path is not None and ckpt_path.is_file():
        _resume(run, cfg, ckpt_path)
    pool = None
    if cfg.pool:
        # The frozen backbone gives the same tokens for the same crop: compute them once.
        pool_images = run.crops.batch(cfg.pool)
        pool = pool_images, torch.cat([run.tokens(chunk) for chunk in pool_images.split(64)])
    run.decoder.train()
    bar = tqdm(total=cfg.steps, desc="decoder", disable=not progress, initial=run.step)
    while run.step < cfg.steps:
        record = _train_step(run, cfg, pool)
        bar.update()
        bar.set_postfix({k: v for k, v in record.items() if k != "step"})
        if ckpt_path is not None and run.step % cfg.checkpoint_every == 0:
            _save(run, cfg, ckpt_path)
    bar.close()
    if ckpt_path is not None:
        _save(run, cfg, ckpt_path)
    return run.decoder.eval(), run.tokens, run.history
