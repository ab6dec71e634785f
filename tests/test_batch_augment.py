"""Batched multi-crop for grey images: shapes, each operation, reproducibility, and the same
pixel statistics as the per-image torchvision pipeline on real Fashion-MNIST-like images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from training.augment import MultiCropAugmentation
from training.batch_augment import (
    BatchMultiCrop,
    GreyTensor,
    batch_generator,
    gaussian_blur,
    jitter,
    resized_crop,
    solarize,
)

MEAN, STD = (0.3, 0.3, 0.3), (0.4, 0.4, 0.4)


def digit_images(n: int = 256, size: int = 28) -> torch.Tensor:
    """Real handwritten digits (scikit-learn), upscaled to grey uint8 ``[n, 1, size, size]``."""
    d = load_digits()
    raw = (d.images[:n] * 255 / 16).clip(0, 255).astype(np.uint8)
    up = [np.asarray(Image.fromarray(i).resize((size, size), Image.BICUBIC)) for i in raw]
    return torch.from_numpy(np.stack(up))[:, None]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_crops_have_the_configured_sizes_and_three_equal_channels():
    aug = BatchMultiCrop(28, 14, (0.4, 1.0), (0.1, 0.4), 3, MEAN, STD)
    crops = aug(digit_images(16), gen())
    assert aug.n_crops == 5 and len(crops) == 5
    assert [tuple(c.shape) for c in crops] == [(16, 3, 28, 28)] * 2 + [(16, 3, 14, 14)] * 3
    for c in crops:
        assert c.dtype == torch.float32 and torch.isfinite(c).all()
        assert torch.equal(c[:, 0], c[:, 1]) and torch.equal(c[:, 0], c[:, 2])
        pixels = c * STD[0] + MEAN[0]
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_the_generator_alone_decides_the_crops():
    aug = BatchMultiCrop(28, 14, (0.4, 1.0), (0.1, 0.4), 2, MEAN, STD)
    images = digit_images(8)
    a = aug(images, batch_generator(0, 0, 5))
    b = aug(images, batch_generator(0, 0, 5))
    c = aug(images, batch_generator(0, 0, 6))
    d = aug(images, batch_generator(0, 1, 5))  # another rank draws other crops
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], d[0])


def test_full_scale_crop_keeps_the_image_and_flips_half_of_them():
    # Left half bright, right half dark; a whole-image crop is either it or its mirror image.
    img = torch.zeros(400, 1, 16, 16)
    img[..., :8] = 1.0
    out = resized_crop(img, 16, (1.0, 1.0), gen())
    left, right = out[..., :8].mean(dim=(1, 2, 3)), out[..., 8:].mean(dim=(1, 2, 3))
    flipped = (right > left).float().mean().item()
    assert 0.4 < flipped < 0.6
    assert ((left - right).abs() > 0.5).all()  # no box lost the split


def test_small_scale_crops_zoom_in():
    img = digit_images(64).float() / 255
    out = resized_crop(img, 28, (0.05, 0.1), gen())

    # A zoomed-in crop of a digit is smoother: less gradient energy per pixel than the whole.
    def energy(x: torch.Tensor) -> float:
        return x.diff(dim=-1).abs().mean().item()

    assert energy(out) < 0.7 * energy(img)


def test_jitter_probability_and_range():
    img = torch.full((500, 1, 8, 8), 0.5)
    img[:, :, :4] = 0.25
    assert torch.equal(jitter(img, 0.0, gen()), img)
    out = jitter(img, 1.0, gen())
    ratio = out.mean(dim=(1, 2, 3)) / img.mean(dim=(1, 2, 3))
    # brightness x [0.6, 1.4] (contrast keeps the mean); values stay in [0, 1]
    assert ratio.min() >= 0.6 - 1e-5 and ratio.max() <= 1.4 + 1e-5
    assert out.min() >= 0 and out.max() <= 1
    assert (ratio - 1).abs().mean() > 0.1
    half = jitter(img, 0.5, gen())
    changed = (half != img).flatten(1).any(dim=1).float().mean().item()
    assert 0.4 < changed < 0.6


def test_blur_smooths_keeps_constants_and_respects_p():
    img = digit_images(32).float() / 255
    assert torch.equal(gaussian_blur(img, 0.0, gen()), img)
    out = gaussian_blur(img, 1.0, gen())
    assert out.diff(dim=-1).abs().mean() < img.diff(dim=-1).abs().mean()
    flat = torch.full((4, 1, 14, 14), 0.7)
    torch.testing.assert_close(gaussian_blur(flat, 1.0, gen()), flat)


def test_solarize_inverts_only_bright_pixels():
    img = torch.linspace(0, 1, 64).view(1, 1, 8, 8).repeat(3, 1, 1, 1)
    out = solarize(img, 1.0, gen())
    bright = img >= 128 / 255
    torch.testing.assert_close(out[bright], 1 - img[bright])
    torch.testing.assert_close(out[~bright], img[~bright])
    assert torch.equal(solarize(img, 0.0, gen()), img)


def test_pixel_statistics_match_the_per_image_pipeline():
    """Same distribution as MultiCropAugmentation(grayscale=True): per-crop mean and spread of
    the pixels agree within a few hundredths over 256 real images."""
    torch.manual_seed(0)
    images = digit_images(256)
    reference = MultiCropAugmentation(28, 14, (0.4, 1.0), (0.1, 0.4), 2, MEAN, STD, grayscale=True)
    per_image = [reference(Image.fromarray(i[0].numpy())) for i in images]
    ref_crops = [torch.stack([p[k] for p in per_image]) for k in range(4)]
    ours = BatchMultiCrop(28, 14, (0.4, 1.0), (0.1, 0.4), 2, MEAN, STD)(images, gen())
    for k, (r, o) in enumerate(zip(ref_crops, ours, strict=True)):
        assert abs(r.mean().item() - o.mean().item()) < 0.06, k
        assert abs(r.std().item() - o.std().item()) < 0.06, k


def test_grey_tensor_resizes_other_sizes_and_keeps_28_pixels_as_they_are():
    arr = digit_images(1)[0, 0].numpy()
    same = GreyTensor(28)(Image.fromarray(arr).convert("RGB"))
    assert same.dtype == torch.uint8 and torch.equal(same[0], torch.from_numpy(arr))
    wide = GreyTensor(28)(Image.new("RGB", (90, 40), (10, 200, 30)))
    assert tuple(wide.shape) == (1, 28, 28)


def test_rejects_colour_batches():
    aug = BatchMultiCrop(28, 14, (0.4, 1.0), (0.1, 0.4), 2, MEAN, STD)
    with pytest.raises(ValueError, match="grey images"):
        aug(torch.zeros(2, 3, 28, 28, dtype=torch.uint8), gen())
