"""Multi-crop augmentation (DINO paper, section 3 and appendix) and the k-NN eval transform
(``artifact.transform``, wrapped as a tensor transform)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms as T

from artifact.transform import eval_pixels

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
BICUBIC = T.InterpolationMode.BICUBIC


class _ToMode:
    """Convert a PIL image to a mode (a class, not a lambda: DataLoader workers pickle it)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        if not isinstance(img, Image.Image):
            raise TypeError(f"expected a PIL image, got {type(img).__name__}")
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.mode!r})"


def blur_kernel_size(crop_size: int, sigma_max: float) -> int:
    """Odd kernel covering +-3 sigma of the widest blur, but no wider than about half the crop.

    PIL's blur (used by DINO) has no kernel size; torchvision needs one, so it is scaled to the
    crop: 13 for 224 and 96 px crops at sigma 2, smaller for tiny crops.
    """
    k = 2 * math.ceil(3 * sigma_max) + 1
    limit = max(3, crop_size // 2)
    k = min(k, limit)
    return k if k % 2 else k - 1


def _blur(size: int, sigma: tuple[float, float], p: float) -> T.RandomApply:
    return T.RandomApply([T.GaussianBlur(blur_kernel_size(size, sigma[1]), sigma=sigma)], p=p)


def _check_crops(
    global_size: int,
    local_size: int,
    global_scale: tuple[float, float],
    local_scale: tuple[float, float],
    n_local_crops: int,
) -> None:
    """Refuse crop settings that would fail later, deep inside a DataLoader worker."""
    if global_size <= 0 or local_size <= 0:
        raise ValueError(f"crop sizes must be positive, got {global_size} and {local_size}")
    if n_local_crops < 0:
        raise ValueError(f"n_local_crops must be >= 0, got {n_local_crops}")
    for name, (lo, hi) in (("global_scale", global_scale), ("local_scale", local_scale)):
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got {(lo, hi)}")


class MultiCropAugmentation:
    """``img -> [global_1, global_2, local_1, ..., local_n]`` tensors, normalised.

    Colour (default): flip, colour jitter (0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale p 0.2;
    blur p 1.0 on global 1, blur p 0.1 and solarize p 0.2 on global 2, blur p 0.5 on locals.

    ``grayscale=True`` (small single-channel images such as 28-px Fashion-MNIST): hue, saturation
    and random grayscale mean nothing there, so only brightness/contrast jitter; blur is lighter
    (sigma 0.1-1.0, p 0.5/0.1/0.2) because a 2-sigma blur erases a 28-px image; solarize stays.
    The output always has 3 identical channels so every backbone is 3-channel.
    """

    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        n_local_crops: int = 8,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        grayscale: bool = False,
    ) -> None:
        _check_crops(global_size, local_size, global_scale, local_scale, n_local_crops)
        mean, std = _three(mean, "mean"), _three(std, "std")
        self.global_size = global_size
        self.local_size = local_size
        self.n_local_crops = n_local_crops
        self.grayscale = grayscale

        if grayscale:
            mode = "L"
            jitter = [T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4)], p=0.8)]
            sigma, p_blur = (0.1, 1.0), (0.5, 0.1, 0.2)
            # Back to 3 identical channels before ToTensor: the model is always 3-channel.
            finish = [T.Grayscale(num_output_channels=3), T.ToTensor(), T.Normalize(mean, std)]
        else:
            mode = "RGB"
            jitter = [
                T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                T.RandomGrayscale(p=0.2),
            ]
            sigma, p_blur = (0.1, 2.0), (1.0, 0.1, 0.5)
            finish = [T.ToTensor(), T.Normalize(mean, std)]

        def crop(size: int, scale: tuple[float, float]) -> list:
            return [
                _ToMode(mode),
                T.RandomResizedCrop(size, scale=scale, interpolation=BICUBIC),
                T.RandomHorizontalFlip(p=0.5),
                *jitter,
            ]

        self.global1 = T.Compose(
            [*crop(global_size, global_scale), _blur(global_size, sigma, p_blur[0]), *finish]
        )
        self.global2 = T.Compose(
            [
                *crop(global_size, global_scale),
                _blur(global_size, sigma, p_blur[1]),
                T.RandomSolarize(threshold=128, p=0.2),
                *finish,
            ]
        )
        self.local = T.Compose(
            [*crop(local_size, local_scale), _blur(local_size, sigma, p_blur[2]), *finish]
        )

    @property
    def n_crops(self) -> int:
        return 2 + self.n_local_crops

    def __call__(self, img: Image.Image) -> list[Tensor]:
        crops = [self.global1(img), self.global2(img)]
        crops += [self.local(img) for _ in range(self.n_local_crops)]
        return crops


def _three(values: Sequence[float], name: str) -> tuple[float, float, float]:
    vals = tuple(float(v) for v in values)
    if len(vals) == 1:
        vals = vals * 3
    if len(vals) != 3:
        raise ValueError(f"{name} must have 1 or 3 values, got {len(vals)}")
    if name == "std" and min(vals) <= 0:
        raise ValueError(f"std must be positive, got {vals}")
    return vals  # type: ignore[return-value]


class EvalTensor:
    """DINO's k-NN / linear-eval protocol as a dataset transform: ``artifact.transform`` (the
    exporter's and the server's eval transform, torchvision's ``Resize`` + ``CenterCrop`` bit for
    bit) as a ``[3, crop, crop]`` float32 tensor. Grayscale images come out with 3 identical
    channels. A class, not a closure: DataLoader workers pickle it."""

    def __init__(self, resize: int, crop: int, mean: Sequence[float], std: Sequence[float]) -> None:
        if crop > resize:
            raise ValueError(f"crop {crop} is larger than resize {resize}")
        self.resize, self.crop = resize, crop
        self.mean, self.std = _three(mean, "mean"), _three(std, "std")
        self.to_rgb = _ToMode("RGB")

    def __call__(self, img: Image.Image) -> Tensor:
        pixels = eval_pixels(self.to_rgb(img), self.resize, self.crop, self.mean, self.std)
        return torch.from_numpy(pixels)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(resize={self.resize}, crop={self.crop})"


def eval_transform(
    resize: int = 256,
    crop: int = 224,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> EvalTensor:
    """DINO's k-NN / linear-eval protocol: RGB, short side to ``resize`` (bicubic), centre
    ``crop``, ToTensor, Normalize (see ``EvalTensor``)."""
    return EvalTensor(resize, crop, mean, std)


def stack_crops(batch: list[list[Tensor]]) -> list[Tensor]:
    """Collate ``[sample][crop]`` into ``[crop] -> [B, C, H, W]`` (the MultiCropWrapper input)."""
    return [torch.stack(crops) for crops in zip(*batch, strict=True)]
