"""What a checkpoint says about itself: how its backbone sees images at evaluation (resize, centre
crop, normalisation), the size it was trained at, its training config and k-NN result.

A checkpoint of ``training.run`` records them in its config. Official DINO files (ViT and ResNet
weights from the paper's repository) carry no such config: they were trained on ImageNet, so
they get ImageNet's eval defaults, DINO's resize 256 / centre crop 224 at the size the weights
were trained at, with ImageNet's mean and std. ``training.knn`` and ``training.export`` both ask
here, so the two never disagree about an official checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from training.augment import IMAGENET_MEAN, IMAGENET_STD
from training.checkpoints import extract_backbone_state_dict

IMAGENET_IMAGE_SIZE = 224  # the official checkpoints' training crop
DEFAULT_PATCH_SIZE = 16  # DINO's released ViTs are /16 (and /8, which the weights say)


def knn_eval_sizes(image_size: int) -> tuple[int, int]:
    """DINO's k-NN eval transform (resize 256, centre crop 224) scaled to ``image_size``:
    224 -> (256, 224), 28 -> (32, 28)."""
    return round(image_size * 256 / 224), image_size


@dataclass(frozen=True)
class EvalSettings:
    resize: int  # short side after resizing
    crop: int  # centre crop side
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def as_dict(self) -> dict:
        return {"resize": self.resize, "crop": self.crop, "mean": self.mean, "std": self.std}

    def export_kwargs(self) -> dict:
        """These settings as ``export_backbone``'s keyword arguments, for every caller to share."""
        return {
            "mean": self.mean,
            "std": self.std,
            "eval_resize": self.resize,
            "eval_crop": self.crop,
        }


def official_eval_settings(image_size: int = IMAGENET_IMAGE_SIZE) -> EvalSettings:
    """ImageNet eval defaults for weights trained at ``image_size`` (224 for the official files)."""
    resize, crop = knn_eval_sizes(image_size)
    return EvalSettings(resize, crop, tuple(IMAGENET_MEAN), tuple(IMAGENET_STD))


def records_eval_settings(config: Mapping | None) -> bool:
    """True for a ``training.run`` config (it names its eval sizes and normalisation)."""
    return isinstance(config, Mapping) and {"eval_resize", "eval_crop", "mean", "std"} <= set(
        config
    )


def checkpoint_eval_settings(
    config: Mapping | None, image_size: int = IMAGENET_IMAGE_SIZE
) -> EvalSettings:
    """The settings a checkpoint's config records, else the official ImageNet defaults."""
    if not records_eval_settings(config):
        return official_eval_settings(image_size)
    return EvalSettings(
        int(config["eval_resize"]),
        int(config["eval_crop"]),
        tuple(config["mean"]),
        tuple(config["std"]),
    )


def _json_safe(value: Any) -> Any:
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value, default=str))


def checkpoint_meta(obj: Mapping) -> tuple[dict | None, dict | None]:
    """The training config (ours: ``config``; official: ``args``) and k-NN result, if present."""
    config = obj.get("config", obj.get("args"))
    config = _json_safe(config) if config is not None else None
    knn = obj.get("knn")
    knn = _json_safe(knn) if isinstance(knn, Mapping) else None
    return (config if isinstance(config, dict) else None), knn


def inferred_image_size(obj: Mapping, which: str, patch_size: int) -> int | None:
    """A ViT checkpoint's training size, from its positional-embedding grid."""
    pos = extract_backbone_state_dict(obj, which).get("pos_embed")
    if pos is None or pos.ndim != 3:
        return None
    grid = round((pos.shape[1] - 1) ** 0.5)
    return grid * patch_size if grid * grid == pos.shape[1] - 1 else None
