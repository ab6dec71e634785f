"""Heat-map overlays of attention maps as PNG (Pillow + numpy only)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# A perceptually ordered ramp (dark blue -> magenta -> orange -> pale yellow), sampled at 5 stops.
_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_COLOURS = np.array(
    [[13, 8, 135], [126, 3, 168], [204, 71, 120], [248, 149, 64], [240, 249, 33]], np.float64
)
ALPHA = 0.55  # heat-map opacity; the photo stays recognisable underneath
OUTSIDE_MASK = 0.35  # brightness kept outside a threshold mask


def colourise(values: np.ndarray) -> np.ndarray:
    """Values in 0..1 -> uint8 RGB via the ramp."""
    v = np.clip(values, 0.0, 1.0)
    channels = [np.interp(v, _STOPS, _COLOURS[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1)


def upsample(
    grid_map: np.ndarray,
    patch: int,
    size: tuple[int, int],
    resample: Image.Resampling = Image.Resampling.BILINEAR,
) -> np.ndarray:
    """Patch-resolution map -> pixels (bilinear), cropped to ``size`` = (H, W) of the image
    (the grid covers the reflect-padded image, which can be a little larger)."""
    h, w = grid_map.shape
    field = Image.fromarray(grid_map.astype(np.float32))
    field = field.resize((w * patch, h * patch), resample)
    return np.asarray(field)[: size[0], : size[1]]


def overlay_png(
    image: Image.Image,
    grid_map: np.ndarray,
    patch: int,
    mask: np.ndarray | None = None,
) -> bytes:
    """Blend a heat map of ``grid_map`` ([h, w], any scale) over ``image``; dim outside ``mask``."""
    size = (image.height, image.width)
    # Stretch min..max: maps of weak or untrained models are nearly flat and would look uniform.
    low, high = float(grid_map.min()), float(grid_map.max())
    values = upsample((grid_map - low) / ((high - low) or 1.0), patch, size)
    photo = np.asarray(image.convert("RGB"), dtype=np.float64)
    blended = (1.0 - ALPHA) * photo + ALPHA * colourise(values)
    if mask is not None:
        nearest = Image.Resampling.NEAREST  # a mask is per patch: keep its hard edges
        inside = upsample(mask.astype(np.float32), patch, size, nearest) >= 0.5
        blended[~inside] *= OUTSIDE_MASK
    out = io.BytesIO()
    Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8)).save(out, "PNG")
    return out.getvalue()
