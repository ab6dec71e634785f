"""Multi-crop for small grayscale images, applied to a whole batch of tensors at once.

The per-image torchvision pipeline (``MultiCropAugmentation(grayscale=True)``) costs ~3.5 ms per
28-px image for 4 crops, so on 2 cores one loader worker cannot feed the model
(benchmarks/results/quickstart_tuning.md). The same operations on a ``[B, 1, H, W]`` batch cost
a few milliseconds per batch, run on the training device, and leave every core to the model.

Same distribution as the grayscale variant of ``MultiCropAugmentation``: random resized crop
(scale and log-uniform aspect 3/4-4/3, bicubic, antialiased by sampling at twice the size and
averaging), horizontal flip, brightness/contrast jitter 0.4 with p 0.8 in random order, Gaussian
blur sigma 0.1-1.0 (p 0.5 / 0.1 / 0.2 for global 1 / global 2 / locals, reflect padding),
solarize p 0.2 on global 2, three identical channels, normalised. Randomness comes from an
explicit ``torch.Generator``, so a batch is reproducible from (seed, iteration) alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor

from training.augment import blur_kernel_size

LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))
JITTER = 0.4
P_JITTER = 0.8
SIGMA = (0.1, 1.0)
P_BLUR = (0.5, 0.1, 0.2)  # global 1, global 2, locals
P_SOLARIZE = 0.2


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _coin(n: int, p: float, gen: torch.Generator) -> Tensor:
    return torch.rand(n, generator=gen) < p


def resized_crop(
    images: Tensor, size: int, scale: tuple[float, float], gen: torch.Generator
) -> Tensor:
    """Random resized crop + horizontal flip of every image, as one ``grid_sample``.

    A box of ``scale`` x the image area and aspect ratio in [3/4, 4/3] (shrunk to fit) at a
    random place, mapped onto a ``size`` x ``size`` output; half the boxes are mirrored.
    """
    b, _, h, w = images.shape
    area = _uniform(b, *scale, gen) * h * w
    ratio = torch.exp(_uniform(b, *LOG_RATIO, gen))
    box_w = torch.sqrt(area * ratio).clamp(max=w)
    box_h = torch.sqrt(area / ratio).clamp(max=h)
    x0 = torch.rand(b, generator=gen) * (w - box_w)
    y0 = torch.rand(b, generator=gen) * (h - box_h)
    flip = torch.where(_coin(b, 0.5, gen), -1.0, 1.0)
    # affine_grid works in [-1, 1] coordinates of the input: centre and half-extent of the box.
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = box_w / w * flip
    theta[:, 0, 2] = (2 * x0 + box_w) / w - 1
    theta[:, 1, 1] = box_h / h
    theta[:, 1, 2] = (2 * y0 + box_h) / h - 1
    theta = theta.to(images.device, images.dtype)
    # Sampling at twice the size and averaging 2x2 is the antialiasing PIL's resize does.
    grid = F.affine_grid(theta, [b, 1, 2 * size, 2 * size], align_corners=False)
    out = F.grid_sample(images, grid, mode="bicubic", padding_mode="border", align_corners=False)
    return F.avg_pool2d(out, 2).clamp_(0.0, 1.0)


def jitter(images: Tensor, p: float, gen: torch.Generator) -> Tensor:
    """Brightness and contrast factors in [0.6, 1.4] applied in random order with probability p."""
    b = images.shape[0]
    shape = (b, 1, 1, 1)
    dev = images.device
    bright = _uniform(b, 1 - JITTER, 1 + JITTER, gen).view(shape).to(dev)
    contrast = _uniform(b, 1 - JITTER, 1 + JITTER, gen).view(shape).to(dev)
    bright_first = _coin(b, 0.5, gen).view(shape).to(dev)
    apply = _coin(b, p, gen).view(shape).to(dev)

    def brightness(x: Tensor) -> Tensor:
        return (x * bright).clamp(0.0, 1.0)

    def contrasted(x: Tensor) -> Tensor:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return ((x - mean) * contrast + mean).clamp(0.0, 1.0)

    out = torch.where(bright_first, contrasted(brightness(images)), brightness(contrasted(images)))
    return torch.where(apply, out, images)


def gaussian_blur(images: Tensor, p: float, gen: torch.Generator) -> Tensor:
    """Separable Gaussian blur, sigma uniform in SIGMA per image, applied with probability p."""
    b, c, h, w = images.shape
    k = blur_kernel_size(min(h, w), SIGMA[1])
    sigma = _uniform(b, *SIGMA, gen)
    apply = _coin(b, p, gen)
    if k < 3 or not bool(apply.any()):
        return images
    offsets = torch.arange(k, dtype=torch.float32) - (k - 1) / 2
    kernel = torch.exp(-(offsets[None, :] ** 2) / (2 * sigma[:, None] ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).to(images.device, images.dtype)
    pad = k // 2
    # One group per image: each image gets its own kernel in a single convolution.
    x = images.reshape(1, b * c, h, w)
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    kx = kernel.repeat_interleave(c, dim=0)
    x = F.conv2d(x, kx.view(b * c, 1, 1, k), groups=b * c)
    x = F.conv2d(x, kx.view(b * c, 1, k, 1), groups=b * c)
    blurred = x.view(b, c, h, w)
    return torch.where(apply.view(b, 1, 1, 1).to(images.device), blurred, images)


def solarize(images: Tensor, p: float, gen: torch.Generator) -> Tensor:
    """Invert pixels at or above mid-grey (PIL's threshold 128 of 255) with probability p."""
    apply = _coin(images.shape[0], p, gen).view(-1, 1, 1, 1).to(images.device)
    return torch.where(apply & (images >= 128 / 255), 1.0 - images, images)


class GreyTensor:
    """PIL image -> grey ``uint8 [1, size, size]`` (short side to ``size``, centre crop), the
    loader's output in batch mode; a no-op resize for 28-px Fashion-MNIST at ``size`` 28."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: Image.Image) -> Tensor:
        img = img.convert("L")
        if img.size != (self.size, self.size):
            img = TF.center_crop(TF.resize(img, self.size, TF.InterpolationMode.BICUBIC), self.size)
        return TF.pil_to_tensor(img)


class BatchMultiCrop:
    """``uint8 [B, 1, H, W]`` (or float in [0, 1]) -> ``[global_1, global_2, local_1, ...]``."""

    def __init__(
        self,
        global_size: int,
        local_size: int,
        global_scale: tuple[float, float],
        local_scale: tuple[float, float],
        n_local_crops: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        if global_size <= 0 or local_size <= 0:
            raise ValueError(f"crop sizes must be positive, got {global_size} and {local_size}")
        if n_local_crops < 0:
            raise ValueError(f"n_local_crops must be >= 0, got {n_local_crops}")
        self.global_size, self.local_size = global_size, local_size
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.n_local_crops = n_local_crops
        # Grey images: one mean/std (the channels of the grayscale statistics are equal).
        self.mean, self.std = float(mean[0]), float(std[0])

    @property
    def n_crops(self) -> int:
        return 2 + self.n_local_crops

    def __call__(self, images: Tensor, gen: torch.Generator) -> list[Tensor]:
        if images.dim() != 4 or images.shape[1] != 1:
            raise ValueError(f"expected grey images [B, 1, H, W], got {tuple(images.shape)}")
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        crops = []
        for i in range(self.n_crops):
            size, scale = (
                (self.global_size, self.global_scale)
                if i < 2
                else (self.local_size, self.local_scale)
            )
            crop = jitter(resized_crop(x, size, scale, gen), P_JITTER, gen)
            crop = gaussian_blur(crop, P_BLUR[min(i, 2)], gen)
            if i == 1:
                crop = solarize(crop, P_SOLARIZE, gen)
            crop = (crop - self.mean) / self.std
            crops.append(crop.expand(-1, 3, -1, -1).contiguous())
        return crops


def batch_generator(seed: int, rank: int, iteration: int) -> torch.Generator:
    """The generator for one step: a resumed run draws the same crops as an uninterrupted one."""
    return torch.Generator().manual_seed((seed * 1_000_003 + rank) * 1_000_033 + iteration)
