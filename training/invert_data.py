"""Images for ``training.invert``: random square crops of a few photos or of a folder, in [0, 1].

Photos are held in memory as tensors; each batch takes a random square of a random size, resizes
it (antialiased) to ``size`` and flips half of them, so a dozen photos give endless variety.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from artifact.photos import load_photo
from training.data import DatasetError, scan_image_folder

# Bundled scikit-image photos (offline). The held-out ones never feed training in the benchmark.
TRAIN_PHOTOS = (
    "astronaut",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "brick",
    "grass",
    "gravel",
    "cell",
    "clock",
    "coins",
    "moon",
    "page",
    "text",
    "colorwheel",
)
HELD_OUT_PHOTOS = ("chelsea", "camera", "coffee")
MAX_SIDE = 512  # photos are shrunk to this long side: crops then hold whole objects


def load_images(data: str | Path | None, names: Sequence[str] = TRAIN_PHOTOS) -> list[Tensor]:
    """``[3, H, W]`` float tensors in [0, 1]: every image under ``data``, else bundled photos."""
    if data is not None:
        files, _, _ = scan_image_folder(Path(data))
        images = []
        for f in files:
            with Image.open(f) as im:
                images.append(im.convert("RGB"))
    else:
        images = [load_photo(n) for n in names]
    return [to_tensor(_shrink(im)) for im in images]


def _shrink(im: Image.Image) -> Image.Image:
    scale = MAX_SIDE / max(im.size)
    if scale >= 1:
        return im
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    return im.resize(size, Image.Resampling.BICUBIC)


def to_tensor(im: Image.Image) -> Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


class RandomCrops:
    """Batches of random square crops ``[B, 3, size, size]`` from ``images`` (seeded)."""

    def __init__(
        self,
        images: Sequence[Tensor],
        size: int,
        scale: tuple[float, float] = (0.15, 0.5),
        seed: int = 0,
    ) -> None:
        usable = [im for im in images if min(im.shape[-2:]) >= size // 2]
        if not usable:
            raise DatasetError(f"no image is at least {size // 2} pixels on its short side")
        self.images, self.size, self.scale = usable, size, scale
        self.rng = np.random.default_rng(seed)

    def crop(self) -> Tensor:
        im = self.images[int(self.rng.integers(len(self.images)))]
        h, w = im.shape[-2:]
        lo = max(self.size // 2, int(self.scale[0] * min(h, w)))
        hi = max(lo, int(self.scale[1] * min(h, w)))
        side = int(self.rng.integers(lo, hi + 1))
        y, x = int(self.rng.integers(0, h - side + 1)), int(self.rng.integers(0, w - side + 1))
        patch = im[None, :, y : y + side, x : x + side]
        if side != self.size:
            patch = F.interpolate(
                patch, size=(self.size, self.size), mode="bilinear", antialias=True
            ).clamp(0, 1)
        if self.rng.random() < 0.5:
            patch = patch.flip(-1)
        return patch[0]

    def batch(self, n: int) -> Tensor:
        return torch.stack([self.crop() for _ in range(n)])


def held_out_batch(images: Sequence[Tensor], size: int, n: int, seed: int = 1234) -> Tensor:
    """A fixed set of ``n`` crops for evaluation: the same for every run with the same seed."""
    return RandomCrops(images, size, seed=seed).batch(n)
