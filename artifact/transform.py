"""THE eval transform: an image -> float32 ``[3, crop, crop]``, as DINO evaluates.

torchvision's ``Resize(resize, interpolation)`` + ``CenterCrop(crop)`` + ``ToTensor`` +
``Normalize(mean, std)`` on a PIL image, reproduced without torch:

* the short side goes to ``resize`` and the long side to ``int(resize * long / short)``
  (truncated, not rounded), with Pillow's resampling;
* the crop offsets are ``int(round((side - crop) / 2))`` (Python's round: halves to even);
* ``(x / 255 - mean) / std`` in float32.

The exporter's parity check, the int8 gate, the k-NN evaluation and the server all call this
module, so they see the same pixels.

A thin strip would make the full resize huge (1 x 20,000 at resize 256 is 256 x 5,120,000,
3.9 GB) while almost all of it is cropped away. For a strip upscaled beyond
``MAX_FULL_RESIZE_RATIO`` only the crop window is computed, by ``_resampled_window``, which
repeats Pillow's fixed-point resampling (same coefficients, same pass order, same 8-bit
intermediate, same rounding) for the rows and columns that survive the crop: the bytes equal
the full resize's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import PIL
from PIL import Image

RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}

# Up to this aspect ratio Pillow resizes the whole image (the intermediate is at most
# ratio * resize^2 pixels); an upscaled strip beyond it has only its crop window resampled.
MAX_FULL_RESIZE_RATIO = 8

_PRECISION_BITS = 22  # Pillow's fixed-point coefficients for 8-bit images: 32 - 8 - 2
_PILLOW_MAJOR = int(PIL.__version__.split(".")[0])


def resized_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """(width, height) after torchvision's ``Resize(resize)``: the short side to ``resize``, the
    long one to ``int(resize * long / short)``."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(resize * long / short)
    return (resize, new_long) if width <= height else (new_long, resize)


def crop_box(width: int, height: int, crop: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of torchvision's ``CenterCrop(crop)`` on a ``width`` x
    ``height`` image at least ``crop`` on each side."""
    top = int(round((height - crop) / 2.0))
    left = int(round((width - crop) / 2.0))
    return left, top, left + crop, top + crop


def eval_image(
    image: Image.Image, resize: int, crop: int, interpolation: str = "bicubic"
) -> Image.Image:
    """The RGB ``crop`` x ``crop`` image the eval transform normalises (before /255)."""
    if not 0 < crop <= resize:
        raise ValueError(f"crop {crop} must be positive and at most resize {resize}")
    if interpolation not in RESAMPLE:
        raise ValueError(f"interpolation must be one of {sorted(RESAMPLE)}, got {interpolation!r}")
    if image.mode != "RGB":
        image = image.convert("RGB")
    width, height = image.size
    new_w, new_h = resized_size(width, height, resize)
    box = crop_box(new_w, new_h, crop)
    if _window_only(width, height, resize):
        pixels = _resampled_window(np.asarray(image), (new_w, new_h), box, interpolation)
        return Image.fromarray(pixels, "RGB")
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), RESAMPLE[interpolation])
    return image.crop(box)


def _window_only(width: int, height: int, resize: int) -> bool:
    """Whether to resample only the crop window: a strip upscaled to ``resize`` on its short
    side, whose full resize would be ``ratio * resize^2`` pixels. A downscaled image's full
    resize is smaller than the image itself, so Pillow (faster) does it whole."""
    short, long = min(width, height), max(width, height)
    return short < resize and long > MAX_FULL_RESIZE_RATIO * short


def normalise(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """RGB uint8 image -> float32 CHW, ``(x / 255 - mean) / std``.

    One output buffer, written in CHW order by the first step and updated in place: the same
    float32 operations in the same order as ``(asarray(img) / 255 - mean) / std`` (bit-identical),
    at a quarter of the time (no temporaries, no final transpose)."""
    pixels = np.asarray(image)
    out = np.empty((pixels.shape[2], pixels.shape[0], pixels.shape[1]), np.float32)
    np.divide(pixels.transpose(2, 0, 1), np.float32(255.0), out=out, dtype=np.float32)
    out -= np.asarray(mean, np.float32)[:, None, None]
    out /= np.asarray(std, np.float32)[:, None, None]
    return out


def eval_pixels(
    image: Image.Image,
    resize: int,
    crop: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
) -> np.ndarray:
    """One image through the eval transform: float32 ``[3, crop, crop]``."""
    return normalise(eval_image(image, resize, crop, interpolation), mean, std)


# ------------------------------------------------------- Pillow's resampling, for a window only


def _bicubic(x: float) -> float:
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _bilinear(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


_FILTERS: dict[str, tuple[Callable[[float], float], float]] = {
    "bicubic": (_bicubic, 2.0),
    "bilinear": (_bilinear, 1.0),
}


def _coefficients(
    in_size: int, out_size: int, first: int, count: int, interpolation: str
) -> tuple[list[int], list[list[int]]]:
    """Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpp`` for output pixels
    ``first .. first + count - 1`` of an ``in_size`` -> ``out_size`` resize: each one's first
    input pixel and its integer weights (scaled by 2^22). Plain Python floats, summed in
    Pillow's order, so every double matches."""
    kernel, support = _FILTERS[interpolation]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support *= filterscale
    starts, weights = [], []
    for xx in range(first, first + count):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        ws = [kernel((x + xmin - center + 0.5) * (1.0 / filterscale)) for x in range(xmax)]
        total = 0.0
        for w in ws:
            total += w
        if total != 0.0:
            ws = [w / total for w in ws]
        one = 1 << _PRECISION_BITS
        weights.append([int(w * one - 0.5) if w < 0 else int(w * one + 0.5) for w in ws])
        starts.append(xmin)
    return starts, weights


def _weight_matrix(starts: list[int], weights: list[list[int]]) -> tuple[int, np.ndarray]:
    """The integer weights as a dense float64 ``[outputs, inputs]`` matrix over the inputs they
    touch, and the first of those inputs. float64 holds every product and partial sum exactly
    (all below 2^53), so a matrix product gives Pillow's integer sums whatever its order."""
    lo = min(starts)
    hi = max(s + len(w) for s, w in zip(starts, weights, strict=True))
    matrix = np.zeros((len(starts), hi - lo), np.float64)
    for row, (start, ws) in enumerate(zip(starts, weights, strict=True)):
        matrix[row, start - lo : start - lo + len(ws)] = ws
    return lo, matrix


def _to_uint8(sums: np.ndarray) -> np.ndarray:
    """Pillow's rounding (half added, shift right) and clipping to 0..255."""
    half, one = 1 << (_PRECISION_BITS - 1), 1 << _PRECISION_BITS
    return np.clip(np.floor((sums + half) / one), 0, 255).astype(np.uint8)


def _horizontal_first(width: int, height: int, new_w: int, new_h: int) -> bool:
    """The order of Pillow's two passes: from Pillow 13 the vertical pass runs first when the
    height shrinks by more than twice as many pixels as the width; before, always horizontal."""
    if _PILLOW_MAJOR < 13:
        return True
    return not (height - new_h > 0 and height - new_h > (width - new_w) * 2)


def _resampled_window(
    pixels: np.ndarray, size: tuple[int, int], box: tuple[int, int, int, int], interpolation: str
) -> np.ndarray:
    """``Image.fromarray(pixels).resize(size).crop(box)`` as uint8 ``[h, w, 3]``, computing only
    the box. An axis whose size does not change is not resampled (as in Pillow); the other's
    output window reads only its input span, so the input is cut to those spans first."""
    height, width = pixels.shape[:2]
    (new_w, new_h), (left, top, right, bottom) = size, box
    cols = rows = None
    col_span, row_span = slice(left, right), slice(top, bottom)
    if new_w != width:
        lo, cols = _weight_matrix(*_coefficients(width, new_w, left, right - left, interpolation))
        col_span = slice(lo, lo + cols.shape[1])
    if new_h != height:
        lo, rows = _weight_matrix(*_coefficients(height, new_h, top, bottom - top, interpolation))
        row_span = slice(lo, lo + rows.shape[1])
    block = pixels[row_span, col_span]
    # Each pass rounds to 8 bits, as Pillow's does, so the order matters.
    order = ("h", "v") if _horizontal_first(width, height, new_w, new_h) else ("v", "h")
    for axis in order:
        if axis == "h" and cols is not None:
            block = _to_uint8(np.einsum("hxc,ox->hoc", block.astype(np.float64), cols))
        elif axis == "v" and rows is not None:
            block = _to_uint8(np.einsum("oy,ywc->owc", rows, block.astype(np.float64)))
    return np.ascontiguousarray(block)
