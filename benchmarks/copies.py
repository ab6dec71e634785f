"""Augmented copies of an image (what near-duplicate search must still match) and a synthetic
copy-detection set: copies of some images hidden among unrelated distractors."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

Augment = Callable[[Image.Image, np.random.Generator], Image.Image]


def crop(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Keep 70-90 % of each side at a random place."""
    w, h = img.size
    keep = rng.uniform(0.7, 0.9)
    cw, ch = max(1, round(w * keep)), max(1, round(h * keep))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return img.crop((left, top, left + cw, top + ch))


def resize(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Down to 50-80 % and back up: detail is lost, the frame is kept."""
    w, h = img.size
    scale = rng.uniform(0.5, 0.8)
    small = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    return small.resize((w, h), Image.BICUBIC)


def jpeg(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Re-encoded at JPEG quality 30-70."""
    out = io.BytesIO()
    img.save(out, "JPEG", quality=int(rng.integers(30, 71)))
    return Image.open(io.BytesIO(out.getvalue())).convert("RGB")


def blur(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Gaussian blur of 0.3-1 % of the image side (about 1 pixel on Fashion-MNIST)."""
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0.003, 0.01) * max(img.size) + 0.3))


def colour(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness, contrast and saturation each scaled by 0.7-1.3."""
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        img = enhance(img).enhance(rng.uniform(0.7, 1.3))
    return img


AUGMENTS: dict[str, Augment] = {
    "crop": crop,
    "resize": resize,
    "jpeg": jpeg,
    "blur": blur,
    "colour": colour,
}


def copies(img: Image.Image, rng: np.random.Generator) -> dict[str, Image.Image]:
    """One copy per augmentation, plus one with all of them chained (crop first)."""
    out = {name: fn(img, rng) for name, fn in AUGMENTS.items()}
    chained = img
    for fn in AUGMENTS.values():
        chained = fn(chained, rng)
    out["all"] = chained
    return out


def offline_photos() -> list[Image.Image]:
    """Real photos that ship with scikit-image and scikit-learn (no download)."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    names = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "immunohistochemistry")
    names += ("hubble_deep_field", "clock", "moon", "page", "cat", "horse", "motorcycle_left")
    photos = []
    for name in names:
        loader = getattr(skimage.data, name, None)
        if loader is not None:
            with np.errstate(all="ignore"):
                arr = np.asarray(loader())
            if arr.dtype != np.uint8:
                arr = (arr.astype(np.float64) * (255 / max(arr.max(), 1))).astype(np.uint8)
            photos.append(Image.fromarray(arr).convert("RGB"))
    photos += [Image.fromarray(a).convert("RGB") for a in load_sample_images().images]
    return photos


@dataclass
class CopySet:
    """``images[i]`` belongs to ``source[i]`` (an original's number); distractors have their
    own number each. True pairs: two images with the same source."""

    images: list[Image.Image]
    source: np.ndarray
    kind: list[str]  # "original", "distractor", or the augmentation name

    def true_pairs(self) -> set[tuple[int, int]]:
        by_source: dict[int, list[int]] = {}
        for i, s in enumerate(self.source.tolist()):
            by_source.setdefault(s, []).append(i)
        return {(a, b) for group in by_source.values() for a in group for b in group if a < b}


def copy_set(
    originals: list[Image.Image], distractors: list[Image.Image], seed: int = 0
) -> CopySet:
    """Every original with its 6 copies, mixed with the distractors."""
    rng = np.random.default_rng(seed)
    images, source, kind = [], [], []
    for n, img in enumerate(originals):
        images.append(img)
        source.append(n)
        kind.append("original")
        for name, copy in copies(img, rng).items():
            images.append(copy)
            source.append(n)
            kind.append(name)
    for m, img in enumerate(distractors):
        images.append(img)
        source.append(len(originals) + m)
        kind.append("distractor")
    return CopySet(images, np.asarray(source), kind)
