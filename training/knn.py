"""Weighted k-NN evaluation exactly as DINO does it, and ``python -m training.knn``.

Features are L2-normalised, similarity is the cosine, the ``k`` nearest training samples vote
for their class with weight ``exp(sim / T)``; top-1 and top-5 accuracy (percent) are reported.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

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
) -> tuple[Tensor, Tensor]:
    """Run ``model`` over ``dataset`` (items ``(image_tensor, label)``): L2-normalised float32
    features ``[N, D]`` and int64 labels ``[N]``."""
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
        feats.append(F.normalize(out.float(), dim=1).cpu())
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


def evaluate_knn(
    backbone: nn.Module,
    train_set: Dataset,
    test_set: Dataset,
    *,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    bf16: bool = False,
    show_progress: bool = True,
) -> dict[str, float]:
    """Extract features of both sets with ``backbone`` and return accuracy and timing."""
    t0 = time.perf_counter()
    kw = dict(
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        bf16=bf16,
        show_progress=show_progress,
    )
    train_f, train_l = extract_features(backbone, train_set, desc="k-NN train features", **kw)
    test_f, test_l = extract_features(backbone, test_set, desc="k-NN test features", **kw)
    result = knn_classify(train_f, train_l, test_f, test_l, k=k, temperature=temperature)
    result.update(
        k=k,
        temperature=temperature,
        n_train=len(train_f),
        n_test=len(test_f),
        seconds=round(time.perf_counter() - t0, 2),
        precision="bf16" if bf16 else "fp32",
    )
    log.info(
        "k-NN (k=%d, T=%.2f): top-1 %.2f%%, top-5 %.2f%% on %d test / %d train images (%.1f s)",
        k,
        temperature,
        result["top1"],
        result["top5"],
        result["n_test"],
        result["n_train"],
        result["seconds"],
    )
    return result


def save_result(result: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


# ---------------------------------------------------------------- command line


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m training.knn",
        description="Weighted k-NN accuracy (DINO protocol) of a checkpoint's teacher backbone.",
    )
    p.add_argument("--checkpoint", required=True, help="a training checkpoint or official .pth")
    p.add_argument("--data", help="image folder with class subfolders (or train/ and val/)")
    p.add_argument("--fmnist-dir", help="Fashion-MNIST IDX folder (default: the Debian path)")
    p.add_argument("--arch", help="backbone for official checkpoints (ours record it)")
    p.add_argument("--patch-size", type=int, default=None)
    p.add_argument("--resize", type=int, default=None, help="eval resize (short side)")
    p.add_argument("--crop", type=int, default=None, help="eval centre crop")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=1, help="image decoding processes")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--out", help="write the result JSON here")
    p.add_argument(
        "--untrained",
        action="store_true",
        help="evaluate the checkpoint's architecture with random weights (a baseline)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    from training.augment import eval_transform
    from training.backbones import build_backbone
    from training.checkpoints import load_backbone_weights, read_checkpoint
    from training.config import TrainConfig
    from training.data import load_splits
    from training.precision import resolve_precision

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = _parse(argv)
    state = read_checkpoint(args.checkpoint)
    cfg = TrainConfig.from_dict(state["config"]) if "config" in state else TrainConfig()
    arch = args.arch or cfg.arch
    patch = args.patch_size or cfg.patch_size
    dataset = "folder" if args.data else ("fmnist" if args.fmnist_dir else cfg.dataset)
    if "config" not in state and not args.arch:
        raise SystemExit(
            "an official checkpoint needs --arch (and --patch-size) to build the model"
        )
    # Our checkpoints record the model's shape; official ones are the arch's standard shape.
    kwargs = cfg.backbone_kwargs(arch) if "config" in state else {}
    torch.manual_seed(cfg.seed)  # --untrained: the same initial weights training started from
    backbone = build_backbone(arch, patch_size=patch, **kwargs)
    if not args.untrained:
        load_backbone_weights(backbone, state)
    splits = load_splits(dataset, args.data or cfg.data, args.fmnist_dir or cfg.fmnist_dir)
    if not splits.labelled:
        raise SystemExit(f"k-NN needs labels; {splits.description} has none")
    resize = args.resize or cfg.eval_resize
    crop = args.crop or cfg.eval_crop
    tf = eval_transform(resize, crop, cfg.mean, cfg.std)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":  # as training.run does: compute threads only on the cores workers leave
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - args.num_workers))
    result = evaluate_knn(
        backbone.to(device),
        splits.knn_train.with_transform(tf),
        splits.knn_test.with_transform(tf),
        k=args.k,
        temperature=args.temperature,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=device,
        bf16=resolve_precision(args.precision, device) == "bf16",
    )
    result.update(
        checkpoint=str(args.checkpoint), data=splits.description, untrained=args.untrained
    )
    default_name = "knn_untrained.json" if args.untrained else "knn.json"
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / default_name
    save_result(result, out)
    log.info("result written to %s", out)
    return result


if __name__ == "__main__":
    main()
