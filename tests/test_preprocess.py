"""Preprocessing: the eval transform matches torchvision's; attention input keeps every pixel."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from service_helpers import photo

from artifact import load_manifest
from service.preprocess import attention_pixels, attention_size, eval_pixels


@pytest.fixture(scope="module")
def manifest(tiny_vit_dir):
    return load_manifest(tiny_vit_dir)


@pytest.mark.parametrize("size", [(451, 300), (300, 451), (37, 37), (20, 90), (640, 427)])
def test_eval_pixels_match_torchvision(manifest, size):
    from torchvision import transforms

    t = manifest.eval_transform
    reference = transforms.Compose(
        [
            transforms.Resize(t.resize, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(t.crop),
            transforms.ToTensor(),
            transforms.Normalize(manifest.mean, manifest.std),
        ]
    )
    img = photo("chelsea").resize(size, Image.Resampling.BICUBIC)
    ours = eval_pixels(img, manifest)
    assert ours.dtype == np.float32 and ours.shape == (3, t.crop, t.crop)
    assert np.abs(ours - reference(img).numpy()).max() < 1e-5


@pytest.mark.parametrize(
    ("size", "max_side"),
    [((512, 512), 224), ((451, 300), 224), ((50, 37), 224), ((300, 451), 100), ((5, 3), 224)],
)
def test_attention_pixels_reflect_pad_to_the_patch_grid(manifest, size, max_side):
    patch = manifest.patch_size
    img = photo("coffee").resize(size, Image.Resampling.BICUBIC)
    prepared = attention_pixels(img, manifest, max_side)
    h, w = prepared.image_size
    assert max(h, w) <= max(max_side, patch) and min(h, w) >= patch
    assert prepared.image.size == (w, h)
    assert prepared.grid == (math.ceil(h / patch), math.ceil(w / patch))
    assert prepared.pixels.shape == (3, prepared.grid[0] * patch, prepared.grid[1] * patch)
    # The image is intact in the top-left corner, and the padding mirrors it (no zeros, no edge
    # replication): row H+i equals row H-2-i.
    mean = np.asarray(manifest.mean, np.float32)[:, None, None]
    std = np.asarray(manifest.std, np.float32)[:, None, None]
    inner = (np.asarray(prepared.image, np.float32).transpose(2, 0, 1) / 255 - mean) / std
    assert np.allclose(prepared.pixels[:, :h, :w], inner, atol=1e-6)
    pad_h = prepared.pixels.shape[1] - h
    for i in range(pad_h):
        assert np.array_equal(prepared.pixels[:, h + i, :w], inner[:, h - 2 - i, :])


def test_attention_size_keeps_aspect_and_never_upscales_big_images():
    assert attention_size(1000, 500, 448, 16) == (448, 224)
    assert attention_size(200, 100, 448, 16) == (200, 100)  # already small: kept
    assert attention_size(4, 4, 448, 16) == (16, 16)  # below one patch: grown to one


def test_normalise_is_the_plain_formula_bit_for_bit(manifest):
    """The in-place normalisation computes exactly ``(x / 255 - mean) / std`` in float32."""
    from service.preprocess import normalise

    for img in (photo("chelsea"), photo("coffee").resize((224, 224)), photo("camera", 50)):
        arr = np.asarray(img, dtype=np.float32) / np.float32(255.0)
        arr = (arr - np.asarray(manifest.mean, np.float32)) / np.asarray(manifest.std, np.float32)
        ours = normalise(img, manifest.mean, manifest.std)
        assert ours.flags.c_contiguous and ours.dtype == np.float32
        assert np.array_equal(ours, arr.transpose(2, 0, 1))
