"""Untrusted image bytes -> an RGB Pillow image, or a typed error a client can act on.

The format is sniffed from the content (the client's content type and file name are ignored), the
byte limit is enforced while reading, and the pixel limit is checked from the header before any
pixel is decoded, so a decompression bomb costs a header parse. Truncated files are rejected:
``ImageFile.LOAD_TRUNCATED_IMAGES`` stays off and ``.load()`` is forced inside the try.
"""

from __future__ import annotations

import io
import logging
import threading
import time
import warnings
from typing import BinaryIO, Protocol

import anyio
import numpy as np
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

# Alpha is composited on white: the usual look of transparent product shots and logos.
BACKGROUND = (255, 255, 255)
_CHUNK = 1 << 16


class ImageError(ValueError):
    """A client image we cannot use; ``status_code`` is the HTTP status to answer with."""

    status_code = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def named(self, name: str) -> ImageError:
        """The same error, prefixed with which upload it concerns."""
        return type(self)(f"{name}: {self.message}")


class UndecodableImage(ImageError):
    status_code = 400


class TruncatedImage(ImageError):
    status_code = 400


class UnsupportedImageType(ImageError):
    status_code = 415


class ImageTooLarge(ImageError):
    """Too many bytes or too many pixels."""

    status_code = 413


class _Readable(Protocol):
    async def read(self, size: int = -1) -> bytes: ...


def sniff_format(data: bytes) -> str | None:
    """The Pillow format name from the leading magic bytes, or None for anything else."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM":
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    return None


async def read_upload(upload: _Readable, max_bytes: int) -> bytes:
    """Read an upload in chunks, stopping as soon as it passes ``max_bytes``."""
    parts: list[bytes] = []
    total = 0
    while chunk := await upload.read(_CHUNK):
        total += len(chunk)
        if total > max_bytes:
            raise ImageTooLarge(f"file is larger than the limit of {max_bytes} bytes")
        parts.append(chunk)
    return b"".join(parts)


def read_limited(file: BinaryIO, max_bytes: int) -> bytes:
    """``file`` to its end, refused as soon as it passes ``max_bytes`` (blocking: a thread)."""
    data = file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageTooLarge(f"file is larger than the limit of {max_bytes} bytes")
    return data


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode one image to RGB, honouring EXIF orientation; raise an ImageError otherwise."""
    return load_rgb(open_image(data, max_pixels))


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Parse the header only (no pixel decoded yet): the format is sniffed and the size checked
    against ``max_pixels``. ``load_rgb`` decodes it."""
    if not data:
        raise UndecodableImage("empty file (0 bytes)")
    fmt = sniff_format(data)
    if fmt is None:
        raise UnsupportedImageType(
            "not an accepted image type (accepted: JPEG, PNG, WebP, GIF, BMP, TIFF; "
            "detected from the content, not the name or content type)"
        )
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below is the one that counts; Pillow's warning is noise here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=[fmt])
        width, height = img.size
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"too many pixels: {exc}") from exc
    except Exception as exc:
        raise _decode_error(fmt, exc) from exc
    if width <= 0 or height <= 0:
        raise UndecodableImage(f"{fmt} header declares an empty image ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"{width}x{height} = {width * height} pixels is over the limit of {max_pixels}"
        )
    return img


def load_rgb(img: Image.Image) -> Image.Image:
    """Decode an ``open_image`` result to 8-bit RGB (first frame, EXIF orientation applied)."""
    fmt = img.format or "image"
    try:
        img.seek(0)  # first frame of an animation or multi-page TIFF
        img.load()
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"too many pixels: {exc}") from exc
    except Exception as exc:  # Pillow raises many types on corrupt data; all are the client's
        raise _decode_error(fmt, exc) from exc
    oriented = _orient(img)
    if oriented is not img:
        img.close()  # each step frees the step before: one or two full-size copies at a time
    mode = oriented.mode
    try:
        return _owned_to_rgb(oriented)
    except ImageError:
        raise
    except Exception as exc:
        raise UnsupportedImageType(f"cannot convert colour mode {mode} to RGB: {exc}") from exc


def _owned_to_rgb(img: Image.Image) -> Image.Image:
    """``to_rgb`` for an image this module owns: it is closed as soon as it is converted."""
    if img.mode.startswith("I") or img.mode == "F":
        values = np.asarray(img)
        img.close()
        grey = Image.fromarray(_scale_to_8bit(values))
        del values
        return grey.convert("RGB")
    rgb = to_rgb(img)
    if rgb is not img:
        img.close()
    return rgb


def _decode_error(fmt: str, exc: Exception) -> ImageError:
    text = str(exc) or type(exc).__name__
    if "truncated" in text.lower() or isinstance(exc, EOFError):
        return TruncatedImage(f"{fmt} file is truncated: {text}")
    return UndecodableImage(f"cannot decode this {fmt} file: {text}")


def _orient(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception as exc:  # a broken EXIF block should not cost the user their image
        log.info("ignoring unreadable EXIF orientation: %s", exc)
        return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: high bit depths scaled, alpha composited on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_scale_to_8bit(np.asarray(img))).convert("RGB")
    has_alpha = mode in ("LA", "La", "PA", "RGBa") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, BACKGROUND)
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...


# Rows of this many values at most are converted at a time: the float64 temporaries stay a few
# MB whatever the image size (a 6000 x 6000 16-bit PNG as one float64 array was 288 MB).
_BLOCK = 1 << 20
# 16-bit value -> 8-bit, exactly rint(v * 255 / 65535) as the float64 formula gave.
_U16_TO_U8 = np.rint(np.arange(65536, dtype=np.float64) * (255.0 / 65535.0)).astype(np.uint8)


def _scale_to_8bit(arr: np.ndarray) -> np.ndarray:
    """16-bit (I;16*, or I within 0..65535) by the full 16-bit range; floats in 0..1 by 255;
    anything else (negative or wider ranges) stretched over its own extent. Converted block by
    block into one uint8 array: memory beyond the input is one byte per pixel."""
    out = np.empty(arr.shape, np.uint8)
    if not arr.size:
        return out
    low, high = float(arr.min()), float(arr.max())
    lookup = arr.dtype.kind in "iu" and low >= 0 and high <= 65535
    if arr.dtype.kind == "f" and low >= 0.0 and high <= 1.0:
        low, span = 0.0, 1.0  # (v - 0) / 1 * 255: the same float64 steps as before
    else:
        span = (high - low) or 1.0
    flat_in, flat_out = arr.reshape(-1), out.reshape(-1)
    for start in range(0, flat_in.size, _BLOCK):
        block = flat_in[start : start + _BLOCK]
        if lookup:
            flat_out[start : start + _BLOCK] = _U16_TO_U8[block]
        else:
            values = (block.astype(np.float64) - low) / span * 255.0
            flat_out[start : start + _BLOCK] = np.clip(np.rint(values), 0, 255)
    return out


def thumbnail_jpeg(img: Image.Image, side: int) -> bytes:
    """A small JPEG (long side ``side``) for the web page's result grid."""
    thumb = img.copy()
    thumb.thumbnail((side, side), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    thumb.save(out, format="JPEG", quality=85)
    return out.getvalue()


class PixelBudget:
    """Pixels of the images being decoded at once, server-wide (thread-safe).

    Decoding runs in worker threads, which take budget with ``try_acquire``; a request that
    finds it spent waits on the event loop (``acquire``), never in a thread, and gives up with
    ``BudgetBusy`` after ``wait_s``."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._lock = threading.Lock()

    def try_acquire(self, pixels: int) -> bool:
        with self._lock:
            if self.used + pixels > self.total:
                return False
            self.used += pixels
            return True

    def release(self, pixels: int) -> None:
        with self._lock:
            self.used -= pixels

    async def acquire(self, pixels: int, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while not self.try_acquire(pixels):
            if time.monotonic() >= deadline:
                raise BudgetBusy(
                    f"server busy: {self.used} of {self.total} pixels are being decoded "
                    "(DINO_MAX_DECODE_PIXELS)"
                )
            await anyio.sleep(_POLL_S)


class BudgetBusy(RuntimeError):
    """The server-wide decoding budget stayed spent for the whole wait."""


_POLL_S = 0.01
