"""Feature prediction (perceptual) loss: compare images in the feature space of a frozen backbone.

Pixel losses (L1, L2) average over every plausible answer and so reward blur; comparing the
backbone's token features of prediction and target instead rewards getting edges and textures
right. ``FeaturePredictionLoss`` wraps any backbone of ``build_backbone`` (random, trained by
``training.run`` or an official DINO checkpoint) and never trains it.

Per layer, each patch token (ViT) or feature-map position (ResNet stage) is L2-normalised across
its channels, as LPIPS does, and the layer term is the mean over positions of ``1 - cos``; the
served ``/distance`` reports the same quantity over the same default layers (the artifact's
``layer_tokens`` output).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.augment import IMAGENET_MEAN, IMAGENET_STD
from training.backbones import build_backbone, family_kwargs, is_family_arch
from training.checkpoints import (
    CheckpointError,
    extract_backbone_state_dict,
    load_backbone_weights,
    read_checkpoint,
)
from training.vision_transformer import VIT_SIZES

log = logging.getLogger(__name__)

RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")
RESNET_STRIDE = 32  # total downsampling of a torchvision ResNet


def reflect_pad_to(x: Tensor, multiple: int) -> Tensor:
    """Reflect-pad ``x [B, C, H, W]`` at the bottom and right up to a multiple of ``multiple``
    (the server pads the same way). Images smaller than the pad are reflected repeatedly."""
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % multiple, -w % multiple
    while pad_h or pad_w:
        # A reflect pad must be smaller than the side it reflects: grow in steps if needed.
        step_h, step_w = min(pad_h, x.shape[-2] - 1), min(pad_w, x.shape[-1] - 1)
        if (pad_h and step_h <= 0) or (pad_w and step_w <= 0):
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")  # a 1-pixel side: no reflection
            break
        x = F.pad(x, (0, step_w, 0, step_h), mode="reflect")
        pad_h, pad_w = pad_h - step_h, pad_w - step_w
    return x


def token_distance(a: Tensor, b: Tensor) -> Tensor:
    """Mean over positions of ``1 - cos`` between channel vectors; ``a, b [B, N, D]`` -> ``[B]``."""
    return (1.0 - F.cosine_similarity(a, b, dim=-1, eps=1e-8)).mean(dim=-1)


def backbone_from_checkpoint(
    source: str | Path | Mapping,
    arch: str | None = None,
    patch_size: int | None = None,
    which: str = "teacher",
) -> nn.Module:
    """Build the backbone a checkpoint holds and load it strictly, reading its shape from the
    weights themselves (ViT size, patch, depth, trained grid; ResNet-18/50), so ours and the
    official DINO files load without flags. ``arch``/``patch_size`` only cross-check."""
    obj = read_checkpoint(source) if isinstance(source, (str, Path)) else source
    sd = extract_backbone_state_dict(obj, which)
    if arch is not None and is_family_arch(arch):  # DINOv2/v3 hub names fix the rest
        backbone = build_backbone(arch, **family_kwargs(arch, sd))
        load_backbone_weights(backbone, sd)
        return backbone
    if "patch_embed.proj.weight" in sd and "pos_embed" in sd:
        dim, _, patch, _ = sd["patch_embed.proj.weight"].shape
        found = next((a for a, v in VIT_SIZES.items() if v["embed_dim"] == dim), None)
        if found is None:
            raise CheckpointError(f"a ViT with embed_dim {dim} is none of {sorted(VIT_SIZES)}")
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        grid = round((sd["pos_embed"].shape[1] - 1) ** 0.5)
        kw: dict = {"depth": depth, "img_size": grid * patch}
    elif "conv1.weight" in sd and "layer1.0.conv1.weight" in sd:
        found, patch, kw = ("resnet50" if "layer1.0.conv3.weight" in sd else "resnet18"), 16, {}
    else:
        raise CheckpointError("the checkpoint holds neither a ViT nor a ResNet backbone")
    if arch is not None and arch != found:
        raise CheckpointError(f"the checkpoint holds a {found}, not the {arch} asked for")
    if patch_size is not None and found in VIT_SIZES and patch_size != patch:
        raise CheckpointError(f"the checkpoint has patch size {patch}, not {patch_size}")
    backbone = build_backbone(found, patch, **kw)
    load_backbone_weights(backbone, sd)
    return backbone


def checkpoint_stats(source: str | Path | Mapping) -> tuple[tuple, tuple] | None:
    """The (mean, std) a ``training.run`` checkpoint was trained with, if it records them."""
    obj = read_checkpoint(source) if isinstance(source, (str, Path)) else source
    config = obj.get("config")
    if isinstance(config, Mapping) and "mean" in config and "std" in config:
        return tuple(config["mean"]), tuple(config["std"])
    return None


def _backbone_and_stats(
    backbone: nn.Module | str,
    checkpoint: str | Path | Mapping | None,
    patch_size: int,
    which: str,
) -> tuple[nn.Module, tuple[tuple, tuple] | None]:
    """The backbone (built from an arch name, or given) with the checkpoint's weights, and the
    (mean, std) the checkpoint records, if any."""
    if isinstance(backbone, str):
        if checkpoint is None:
            log.warning("FeaturePredictionLoss: %s has random weights (no checkpoint)", backbone)
            return build_backbone(backbone, patch_size), None
        obj = read_checkpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
        return backbone_from_checkpoint(obj, arch=backbone, which=which), checkpoint_stats(obj)
    if checkpoint is not None:
        load_backbone_weights(backbone, checkpoint, which=which)
    return backbone, None


class FeaturePredictionLoss(nn.Module):
    """Distance between prediction and target in a frozen backbone's feature space.

    ``loss = sum_l w_l * mean_tokens(1 - cos(f_l(pred), f_l(target)))
    + cls_weight * (1 - cos(cls(pred), cls(target))) + pixel_weight * L1(pred, target)``

    Args:
        backbone: a module from ``build_backbone`` or an arch name (``vit_small``...).
        checkpoint: weights to load (any format ``load_backbone_weights`` reads); with an arch
            name the backbone's shape is read from the checkpoint.
        layers: ViT block indices (negative from the end; default the last 4 blocks, or all if
            fewer) or ResNet stages ``1..4`` (default all four).
        layer_weights: one weight per layer (default equal weights summing to 1).
        cls_weight: weight of the CLS-token cosine distance (ViT only; 0 disables).
        pixel_weight: weight of an L1 term on the inputs (0 disables).
        input_range: ``"unit"``: inputs are RGB in [0, 1] and are normalised with ``mean``/
            ``std`` here (default ImageNet's, or the checkpoint's own); ``"normalized"``: inputs
            are already normalised.

    Inputs ``pred, target [B, C, H, W]`` (C 3, or 1 repeated to RGB) of any size: a ViT gets them
    reflect-padded at the bottom/right to a patch multiple. The loss is differentiable w.r.t.
    ``pred``; the backbone is frozen (no parameter needs a gradient, always in eval mode) and the
    target's features are computed without a graph.

    Example, a super-resolution or generator loop::

        perceptual = FeaturePredictionLoss("vit_small", "dino_deitsmall16_pretrain.pth",
                                           pixel_weight=1.0).to(device)
        for low, high in loader:                    # images in [0, 1]
            pred = generator(low)
            loss = perceptual(pred, high)           # features + L1
            optimizer.zero_grad(); loss.backward(); optimizer.step()
    """

    def __init__(
        self,
        backbone: nn.Module | str = "vit_small",
        checkpoint: str | Path | Mapping | None = None,
        *,
        layers: Sequence[int] | None = None,
        layer_weights: Sequence[float] | None = None,
        cls_weight: float = 0.0,
        pixel_weight: float = 0.0,
        input_range: str = "unit",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        patch_size: int = 16,
        which: str = "teacher",
    ) -> None:
        super().__init__()
        if input_range not in ("unit", "normalized"):
            raise ValueError(f"input_range must be 'unit' or 'normalized', got {input_range!r}")
        backbone, stats = _backbone_and_stats(backbone, checkpoint, patch_size, which)
        self.backbone = backbone.eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.family = backbone.family
        if self.family not in ("vit", "resnet"):
            raise ValueError(f"FeaturePredictionLoss takes a ViT or a ResNet, not a {self.family}")
        self.layers = self._resolve_layers(layers)
        if layer_weights is None:
            layer_weights = [1.0 / len(self.layers)] * len(self.layers)
        if len(layer_weights) != len(self.layers):
            raise ValueError(
                f"{len(layer_weights)} layer_weights for {len(self.layers)} layers {self.layers}"
            )
        if cls_weight and self.family != "vit":
            raise ValueError("cls_weight needs a ViT backbone (a ResNet has no CLS token)")
        if cls_weight < 0 or pixel_weight < 0 or any(w < 0 for w in layer_weights):
            raise ValueError("weights must be >= 0")
        self.layer_weights = tuple(float(w) for w in layer_weights)
        self.cls_weight, self.pixel_weight = float(cls_weight), float(pixel_weight)
        self.input_range = input_range
        mean, std = (mean, std) if mean is not None else (stats or (IMAGENET_MEAN, IMAGENET_STD))
        std = std if std is not None else IMAGENET_STD
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def _resolve_layers(self, layers: Sequence[int] | None) -> tuple[int, ...]:
        if self.family == "vit":
            depth = len(self.backbone.blocks)
            if layers is None:
                return tuple(range(max(0, depth - 4), depth))
            out = []
            for i in layers:
                if not -depth <= i < depth:
                    raise ValueError(f"layer {i} is outside the ViT's blocks 0..{depth - 1}")
                out.append(i % depth)
        else:
            if layers is None:
                return (1, 2, 3, 4)
            out = list(layers)
            if any(i not in (1, 2, 3, 4) for i in out):
                raise ValueError(f"ResNet layers are stages 1..4, got {list(layers)}")
        if len(set(out)) != len(out) or not out:
            raise ValueError(f"layers must be distinct and non-empty, got {list(layers)}")
        return tuple(sorted(out))

    def train(self, mode: bool = True) -> FeaturePredictionLoss:
        super().train(mode)
        self.backbone.eval()  # dropout / drop-path / batch-norm statistics must never move
        return self

    # ------------------------------------------------------------------ features

    def _prepare(self, x: Tensor) -> Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images [B, 1 or 3, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = x.float()
        if self.input_range == "unit":
            x = (x - self.mean) / self.std
        multiple = self.backbone.patch_size if self.family == "vit" else RESNET_STRIDE
        return reflect_pad_to(x, multiple)

    def features(self, x: Tensor) -> tuple[list[Tensor], Tensor | None]:
        """Per chosen layer, tokens ``[B, N, D]`` (ViT patch tokens; ResNet positions), and the
        last layer's CLS token (ViT) or None."""
        x = self._prepare(x)
        if self.family == "vit":
            depth = len(self.backbone.blocks)
            n = depth - self.layers[0]
            if hasattr(self.backbone, "n_prefix_tokens"):  # DINOv2/v3: (patches, CLS) pairs
                pairs = self.backbone.get_intermediate_layers(x, n=n, return_class_token=True)
                seqs = [torch.cat((c[:, None], p), dim=1) for p, c in pairs]
            else:
                seqs = self.backbone.get_intermediate_layers(x, n=n)
            chosen = [seqs[i - self.layers[0]] for i in self.layers]
            cls = seqs[-1][:, 0] if self.cls_weight else None
            return [s[:, 1:] for s in chosen], cls
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        maps = []
        for i, name in enumerate(RESNET_STAGES, start=1):
            x = getattr(b, name)(x)
            if i in self.layers:
                maps.append(x.flatten(2).transpose(1, 2))
            if i == self.layers[-1]:
                break
        return maps, None

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        """Scalar loss averaged over the batch."""
        return self.per_sample(pred, target).mean()

    def per_sample(self, pred: Tensor, target: Tensor) -> Tensor:
        """The loss of each sample, ``[B]``."""
        if pred.shape != target.shape:
            raise ValueError(
                f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape"
            )
        pred_f, pred_cls = self.features(pred)
        with torch.no_grad():
            tgt_f, tgt_cls = self.features(target)
        loss = pred.new_zeros(pred.shape[0], dtype=torch.float32)
        for w, a, b in zip(self.layer_weights, pred_f, tgt_f, strict=True):
            loss = loss + w * token_distance(a, b)
        if self.cls_weight:
            loss = loss + self.cls_weight * (1.0 - F.cosine_similarity(pred_cls, tgt_cls, dim=-1))
        if self.pixel_weight:
            loss = loss + self.pixel_weight * (pred - target).abs().flatten(1).mean(dim=1)
        return loss

    @torch.no_grad()
    def distance_map(self, pred: Tensor, target: Tensor) -> Tensor:
        """Where two images differ: the weighted per-position feature distance, upsampled to
        pixels and cropped back to the inputs' ``[B, H, W]`` (the padding removed)."""
        h, w = pred.shape[-2:]
        pred_f, _ = self.features(pred)
        tgt_f, _ = self.features(target)
        padded = self._prepare(pred).shape[-2:]
        total = None
        for weight, a, b in zip(self.layer_weights, pred_f, tgt_f, strict=True):
            d = 1.0 - F.cosine_similarity(a, b, dim=-1)  # [B, N]
            stride = round((padded[0] * padded[1] / d.shape[1]) ** 0.5)
            grid = d.view(-1, 1, padded[0] // stride, padded[1] // stride)
            up = F.interpolate(grid, size=padded, mode="nearest")[:, 0, :h, :w]
            total = weight * up if total is None else total + weight * up
        return total
