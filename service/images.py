"""Untrusted image bytes -> an RGB Pillow image, or a typed error a client can act on.

The format is sniffed from the content (the client's content type and file name are ignored), the
byte limit is enforced while reading, and the pixel limit is checked from the header before any
pixel is decoded, so a decompression bomb costs a header parse. Truncated files are rejected:
``ImageFile.LOAD_TRUNCATED_IMAGES`` stays off and ``.load()`` is forced inside the try.
"""

from __future__ import annotations

import io
import logging
import warnings
from typing import Protocol

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


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode one image to RGB, honouring EXIF orientation; raise an ImageError otherwise."""
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
        if width <= 0 or height <= 0:
            raise UndecodableImage(f"{fmt} header declares an empty image ({width}x{height})")
        if width * height > max_pixels:
            raise ImageTooLarge(
                f"{width}x{height} = {width * height} pixels is over the limit of {max_pixels}"
            )
        img.seek(0)  # first frame of an animation or multi-page TIFF
        img.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"too many pixels: {exc}") from exc
    except Exception as exc:  # Pillow raises many types on corrupt data; all are the client's
        text = str(exc) or type(exc).__name__
        if "truncated" in text.lower() or isinstance(exc, EOFError):
            raise TruncatedImage(f"{fmt} file is truncated: {text}") from exc
        raise UndecodableImage(f"cannot decode this {fmt} file: {text}") from exc
    img = _orient(img)
    try:
        return to_rgb(img)
    except ImageError:
        raise
    except Exception as exc:
        raise UnsupportedImageType(f"cannot convert colour mode {img.mode} to RGB: {exc}") from exc


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


def _scale_to_8bit(arr: np.ndarray) -> np.ndarray:
    """16-bit (I;16*, or I within 0..65535) by the full 16-bit range; floats in 0..1 by 255;
    anything else (negative or wider ranges) stretched over its own extent."""
    values = arr.astype(np.float64)
    if not values.size:
        return values.astype(np.uint8)
    low, high = float(values.min()), float(values.max())
    if arr.dtype.kind == "f" and low >= 0.0 and high <= 1.0:
        scaled = values * 255.0
    elif arr.dtype.kind in "iu" and low >= 0 and high <= 65535:
        scaled = values * (255.0 / 65535.0)
    else:
        scaled = (values - low) / ((high - low) or 1.0) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def thumbnail_jpeg(img: Image.Image, side: int) -> bytes:
    """A small JPEG (long side ``side``) for the web page's result grid."""
    thumb = img.copy()
    thumb.thumbnail((side, side), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    thumb.save(out, format="JPEG", quality=85)
    return out.getvalue()
