"""Weighted k-NN evaluation exactly as DINO does it, and ``python -m training.knn``.

Features are L2-normalised, similarity is the cosine, the ``k`` nearest training samples vote
for their class with weight ``exp(sim / T)``; top-1 and top-5 accuracy (percent) are reported.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from artifact.cli import DefaultsHelpFormatter, UsageError, run_cli
from training.config import TrainConfig
from training.eval_settings import (
    DEFAULT_PATCH_SIZE,
    IMAGENET_IMAGE_SIZE,
    EvalSettings,
    checkpoint_eval_settings,
    official_eval_settings,
)

log = logging.getLogger(__name__)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    bf16: bool = False,
    desc: str = "features",
    show_progress: bool = True,
    normalise: bool = True,
) -> tuple[Tensor, Tensor]:
    """Run ``model`` over ``dataset`` (items ``(image_tensor, label)``): float32 features
    ``[N, D]`` (L2-normalised unless ``normalise`` is false) and int64 labels ``[N]``."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    )
    feats, labels = [], []
    for images, target in tqdm(loader, desc=desc, leave=False, disable=not show_progress):
        with autocast:
            out = model(images.to(device, non_blocking=True))
        out = out.float()
        feats.append((F.normalize(out, dim=1) if normalise else out).cpu())
        labels.append(torch.as_tensor(target))
    model.train(was_training)
    return torch.cat(feats), torch.cat(labels).long()


@torch.no_grad()
def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 1000,
) -> dict[str, float]:
    """DINO's weighted k-NN: top-1 and top-5 accuracy in percent over the test set."""
    if len(train_features) == 0 or len(test_features) == 0:
        raise ValueError("k-NN needs at least one training and one test sample")
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, len(train_features))
    train_t = train_features.t()
    top1 = top5 = 0
    for start in range(0, len(test_features), chunk):
        feats = test_features[start : start + chunk]
        targets = test_labels[start : start + chunk]
        sim, idx = (feats @ train_t).topk(k, dim=1)
        neighbours = train_labels[idx]  # [b, k]
        weights = (sim / temperature).exp()
        votes = torch.zeros(len(feats), num_classes)
        votes.scatter_add_(1, neighbours, weights)
        ranked = votes.argsort(dim=1, descending=True)
        correct = ranked.eq(targets[:, None])
        top1 += correct[:, :1].sum().item()
        top5 += correct[:, : min(5, num_classes)].sum().item()
    n = len(test_features)
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n}


def save_result(result: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


# ---------------------------------------------------------------- command line


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m training.knn",
        description="Weighted k-NN accuracy (DINO protocol) of a checkpoint's teacher backbone.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a training checkpoint (its config says how to evaluate) or an official DINO .pth "
        "(evaluated as on ImageNet: resize 256, crop 224, ImageNet mean/std)",
    )
    p.add_argument(
        "--data",
        help="image folder with class subfolders (or train/ and val/); default: the run's own "
        "data, Fashion-MNIST for official checkpoints",
    )
    p.add_argument("--fmnist-dir", help="Fashion-MNIST IDX folder (default: the Debian path)")
    p.add_argument(
        "--arch",
        help="official checkpoints: cross-check the architecture read from the weights; needed "
        "with --untrained (ours record it)",
    )
    p.add_argument(
        "--patch-size",
        type=int,
        help="official checkpoints: cross-check the ViT patch size read from the weights "
        f"(--untrained: default {DEFAULT_PATCH_SIZE})",
    )
    p.add_argument(
        "--resize",
        type=int,
        help="eval resize of the short side; default: the run's eval_resize, 256 for official "
        "ones. Change it only with --crop, keeping DINO's 256/224 ratio",
    )
    p.add_argument(
        "--crop",
        type=int,
        help="eval centre crop; default: the run's eval_crop, 224 for official checkpoints",
    )
    _add_run_flags(p)
    return p.parse_args(argv)


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    """The k-NN's own settings and how it runs."""
    p.add_argument("--k", type=int, default=20, help="neighbours that vote (DINO reports 20)")
    p.add_argument(
        "--temperature", type=float, default=0.07, help="vote weight exp(sim / T), as DINO"
    )
    p.add_argument(
        "--batch-size", type=int, default=256, help="images per forward pass; lower it on OOM"
    )
    p.add_argument(
        "--num-workers", type=int, default=1, help="image decoding processes; raise for photos"
    )
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="auto: bf16 where the hardware has it; fp32 for bit-comparable numbers",
    )
    p.add_argument(
        "--out", help="write the result JSON here (default: knn.json beside the checkpoint)"
    )
    p.add_argument(
        "--untrained",
        action="store_true",
        help="evaluate the checkpoint's architecture with random weights (a baseline)",
    )


def _project_backbone(state: dict, args: argparse.Namespace) -> tuple[nn.Module, TrainConfig]:
    """A ``training.run`` checkpoint's teacher, built from the config it records."""
    from training.backbones import build_backbone
    from training.checkpoints import load_backbone_weights

    cfg = TrainConfig.from_dict(state["config"])
    arch = args.arch or cfg.arch
    torch.manual_seed(cfg.seed)  # --untrained: the same initial weights training started from
    backbone = build_backbone(
        arch, patch_size=args.patch_size or cfg.patch_size, **cfg.backbone_kwargs(arch)
    )
    if not args.untrained:
        load_backbone_weights(backbone, state)
    return backbone, cfg


def _official_backbone(state: dict, args: argparse.Namespace) -> nn.Module:
    """An official file's backbone, its shape read from the weights (``--untrained``: the arch's
    standard shape with random weights)."""
    from training.backbones import build_backbone
    from training.perceptual import backbone_from_checkpoint

    if args.untrained:
        if not args.arch:
            raise UsageError("--untrained with an official checkpoint needs --arch")
        torch.manual_seed(0)
        return build_backbone(args.arch, patch_size=args.patch_size or DEFAULT_PATCH_SIZE)
    return backbone_from_checkpoint(state, args.arch, args.patch_size)


def _knn_sets(args: argparse.Namespace, cfg: TrainConfig | None, settings: EvalSettings):
    from training.augment import eval_transform
    from training.data import load_splits

    dataset = "folder" if args.data else "fmnist" if args.fmnist_dir or cfg is None else cfg.dataset
    splits = load_splits(
        dataset, args.data or (cfg and cfg.data), args.fmnist_dir or (cfg and cfg.fmnist_dir)
    )
    if not splits.labelled:
        raise UsageError(f"k-NN needs labels; {splits.description} has none")
    tf = eval_transform(settings.resize, settings.crop, settings.mean, settings.std)
    return splits.knn_train.with_transform(tf), splits.knn_test.with_transform(tf), splits


def run(argv: Sequence[str] | None = None) -> dict:
    """The k-NN command; raises on bad input (see ``main`` for the exit statuses)."""
    from training.checkpoints import read_checkpoint
    from training.knn_served import evaluate_served_knn, served_embedding
    from training.precision import resolve_precision

    args = _parse(argv)
    state = read_checkpoint(args.checkpoint)
    if "config" in state:
        backbone, cfg = _project_backbone(state, args)
        settings = checkpoint_eval_settings(cfg.to_dict())
    else:  # official weights: ImageNet's eval, at the size they were trained at
        backbone, cfg = _official_backbone(state, args), None
        settings = official_eval_settings(getattr(backbone, "img_size", IMAGENET_IMAGE_SIZE))
    settings = dataclasses.replace(
        settings, resize=args.resize or settings.resize, crop=args.crop or settings.crop
    )
    train_set, test_set, splits = _knn_sets(args, cfg, settings)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":  # as training.run does: compute threads only on the cores workers leave
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - args.num_workers))
    result, _ = evaluate_served_knn(
        backbone.to(device),
        train_set,
        test_set,
        **served_embedding(cfg),
        k=args.k,
        temperature=args.temperature,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=device,
        bf16=resolve_precision(args.precision, device) == "bf16",
    )
    result.update(
        checkpoint=str(args.checkpoint),
        data=splits.description,
        untrained=args.untrained,
        eval=settings.as_dict(),
    )
    default_name = "knn_untrained.json" if args.untrained else "knn.json"
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / default_name
    save_result(result, out)
    log.info("result written to %s", out)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.knn``: exit 0, 2 on bad input, 1 when the run fails."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return run_cli(run, argv, prog="python -m training.knn")


if __name__ == "__main__":
    sys.exit(main())
