"""Multi-crop augmentation and the k-NN eval transform on real photos (skimage.data)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from training.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiCropAugmentation,
    blur_kernel_size,
    eval_transform,
    stack_crops,
)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.fromarray(data.astronaut())  # 512 x 512 RGB


def test_colour_multicrop_counts_and_sizes(photo):
    torch.manual_seed(0)
    aug = MultiCropAugmentation(global_size=64, local_size=32, n_local_crops=3)
    crops = aug(photo)
    assert aug.n_crops == 5 and len(crops) == 5
    assert [tuple(c.shape) for c in crops] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 3
    assert all(c.dtype == torch.float32 for c in crops)
    # Normalised: the values are no longer in [0, 1].
    assert min(c.min().item() for c in crops) < 0
    # Random: two calls give different crops.
    assert not torch.equal(aug(photo)[0], aug(photo)[0])


def test_defaults_are_the_paper_recipe(photo):
    aug = MultiCropAugmentation()
    crops = aug(photo)
    assert len(crops) == 10
    assert crops[0].shape == (3, 224, 224) and crops[-1].shape == (3, 96, 96)
    text = repr(aug.global1) + repr(aug.global2) + repr(aug.local)
    assert "brightness=(0.6, 1.4)" in text and "hue=(-0.1, 0.1)" in text
    assert "scale=(0.4, 1.0)" in repr(aug.global1) and "scale=(0.05, 0.4)" in repr(aug.local)
    assert "RandomSolarize" in repr(aug.global2) and "RandomSolarize" not in repr(aug.global1)
    assert "bicubic" in repr(aug.global1)


def test_grayscale_variant_three_equal_channels():
    torch.manual_seed(0)
    digit = Image.fromarray(data.camera()).resize((28, 28))  # mode "L", like Fashion-MNIST
    aug = MultiCropAugmentation(
        28, 12, n_local_crops=4, mean=(0.286,), std=(0.353,), grayscale=True
    )
    text = repr(aug.global1)
    assert "hue=None" in text and "saturation=None" in text and "RandomGrayscale" not in text
    assert "contrast=(0.6, 1.4)" in text and "sigma=(0.1, 1.0)" in text
    for _ in range(3):
        crops = aug(digit)
        assert [tuple(c.shape) for c in crops] == [(3, 28, 28)] * 2 + [(3, 12, 12)] * 4
        for c in crops:
            torch.testing.assert_close(c[0], c[1])
            torch.testing.assert_close(c[0], c[2])
    # An RGB input to the grayscale variant is converted too.
    assert aug(Image.fromarray(data.chelsea()))[0].shape == (3, 28, 28)


def test_collate_and_pickle(photo):
    aug = MultiCropAugmentation(global_size=32, local_size=16, n_local_crops=2)
    batch = stack_crops([aug(photo), aug(photo), aug(photo)])
    assert [tuple(t.shape) for t in batch] == [(3, 3, 32, 32)] * 2 + [(3, 3, 16, 16)] * 2
    # DataLoader workers (spawn/forkserver) need a picklable transform.
    assert len(pickle.loads(pickle.dumps(aug))(photo)) == 4


def test_blur_kernel_is_odd_and_scaled():
    assert blur_kernel_size(224, 2.0) == 13
    assert blur_kernel_size(96, 2.0) == 13
    assert blur_kernel_size(12, 1.0) == 5
    assert all(blur_kernel_size(s, 2.0) % 2 == 1 for s in range(1, 300))


def test_eval_transform_output(photo):
    tf = eval_transform(resize=72, crop=64)
    wide = photo.crop((0, 0, 512, 256))  # non-square: the short side goes to 72
    x = tf(wide)
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    # Reference: bicubic resize to 144 x 72, centre crop, normalise.
    ref = np.asarray(wide.resize((144, 72), Image.BICUBIC), dtype=np.float32)[4:68, 40:104] / 255
    ref = (ref - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), ref, atol=0.05)
    # Grayscale input gives 3 equal channels.
    g = tf(Image.fromarray(data.camera()))
    assert g.shape == (3, 64, 64)
    torch.testing.assert_close(
        g[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0], g[1] * IMAGENET_STD[1] + IMAGENET_MEAN[1]
    )


def test_bad_arguments():
    with pytest.raises(ValueError, match="crop 300 is larger"):
        eval_transform(256, 300)
    with pytest.raises(ValueError, match="local_scale"):
        MultiCropAugmentation(local_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="mean must have 1 or 3"):
        MultiCropAugmentation(mean=(0.1, 0.2))
    with pytest.raises(TypeError, match="PIL image"):
        MultiCropAugmentation(32, 16)(np.zeros((32, 32, 3), dtype=np.uint8))
