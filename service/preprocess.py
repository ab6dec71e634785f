"""RGB Pillow images -> float32 CHW arrays the ONNX model takes.

``eval_pixels`` is the artifact's one eval transform (``artifact.transform``: torchvision's
``Resize`` + ``CenterCrop`` semantics, bit for bit) with the manifest's sizes and statistics,
the same function the exporter's parity check and int8 gate use. ``attention_pixels`` keeps the
whole image: it fits the long side to a maximum and reflect-pads to a multiple of the patch
size, so border patches are never dropped or zero-padded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from artifact import transform
from artifact.manifest import Manifest
from artifact.transform import RESAMPLE, normalise

__all__ = ["AttentionInput", "attention_pixels", "attention_size", "eval_pixels", "normalise"]


def eval_pixels(img: Image.Image, manifest: Manifest) -> np.ndarray:
    """One image through the manifest's eval transform: float32 ``[3, crop, crop]``."""
    t = manifest.eval_transform
    mean, std = manifest.mean, manifest.std
    return transform.eval_pixels(img, t.resize, t.crop, mean, std, t.interpolation)


@dataclass(frozen=True)
class AttentionInput:
    pixels: np.ndarray  # float32 [3, grid_h * patch, grid_w * patch], reflect-padded
    image: Image.Image  # the resized RGB image (what the maps and overlay refer to)
    grid: tuple[int, int]  # patches down and across
    image_size: tuple[int, int]  # (H, W) of ``image``


def attention_size(width: int, height: int, max_side: int, patch: int) -> tuple[int, int]:
    """Fit the long side into ``max_side`` (never upscale beyond it); keep at least one patch."""
    scale = min(1.0, max_side / max(width, height))
    if min(width, height) * scale < patch:  # tiny or very thin: grow so one patch fits
        scale = patch / min(width, height)
    new_w = min(max(1, round(width * scale)), max(max_side, patch))
    new_h = min(max(1, round(height * scale)), max(max_side, patch))
    return max(new_w, patch), max(new_h, patch)


def attention_pixels(img: Image.Image, manifest: Manifest, max_side: int) -> AttentionInput:
    """The whole image for dense outputs: long side <= ``max_side``, reflect-padded at the bottom
    and right to a multiple of the patch size (the patch grid starts at the image's corner)."""
    patch = manifest.patch_size or 1
    width, height = attention_size(img.width, img.height, max_side, patch)
    resample = RESAMPLE[manifest.eval_transform.interpolation]
    resized = img if (width, height) == img.size else img.resize((width, height), resample)
    grid = (math.ceil(height / patch), math.ceil(width / patch))
    arr = normalise(resized, manifest.mean, manifest.std)
    pad_h, pad_w = grid[0] * patch - height, grid[1] * patch - width
    if pad_h or pad_w:
        arr = np.pad(arr, ((0, 0), (0, pad_h), (0, pad_w)), mode="reflect")
    return AttentionInput(np.ascontiguousarray(arr), resized, grid, (height, width))
