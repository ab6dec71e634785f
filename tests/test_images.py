"""Image decoding: sniffed formats, limits before decoding, truncation, every mode to RGB."""

from __future__ import annotations

import io
import struct
import time
import zlib

import anyio
import numpy as np
import pytest
from PIL import Image
from service_helpers import encode, photo
from starlette.datastructures import UploadFile

from service.images import (
    ImageError,
    ImageTooLarge,
    TruncatedImage,
    UndecodableImage,
    UnsupportedImageType,
    decode_image,
    read_upload,
    sniff_format,
    thumbnail_jpeg,
)

LIMIT = 10_000_000


def png_with_declared_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR is rewritten to claim ``width`` x ``height`` (CRC fixed)."""
    raw = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])) & 0xFFFFFFFF)
    return bytes(raw)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_accepted_formats_are_sniffed_and_decoded(fmt):
    img = photo("chelsea", 64)
    blob = encode(img, fmt)
    assert sniff_format(blob) == fmt
    out = decode_image(blob, LIMIT)
    assert out.mode == "RGB" and out.size == img.size
    if fmt in ("PNG", "BMP", "TIFF"):  # lossless: exactly the pixels
        assert np.array_equal(np.asarray(out), np.asarray(img))


@pytest.mark.parametrize(
    ("blob", "error", "status", "words"),
    [
        (b"", UndecodableImage, 400, "empty"),
        (b"hello, this is text", UnsupportedImageType, 415, "not an accepted image type"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"/>', UnsupportedImageType, 415, "accepted"),
        (b"<!doctype html><html></html>", UnsupportedImageType, 415, "accepted"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, UndecodableImage, 400, "cannot decode"),
        (b"GIF89a" + b"\x01" * 3, UndecodableImage, 400, "cannot decode"),
    ],
)
def test_bad_bytes_raise_typed_errors(blob, error, status, words):
    with pytest.raises(error) as info:
        decode_image(blob, LIMIT)
    assert info.value.status_code == status
    assert words in str(info.value)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_are_rejected(fmt):
    blob = encode(photo("astronaut", 128), fmt)
    with pytest.raises((TruncatedImage, UndecodableImage)) as info:
        decode_image(blob[: len(blob) * 2 // 3], LIMIT)
    assert info.value.status_code == 400


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    bomb = png_with_declared_size(50_000, 50_000)  # 2.5e9 pixels declared, 70 bytes on disk
    started = time.perf_counter()
    with pytest.raises(ImageTooLarge) as info:
        decode_image(bomb, LIMIT)
    assert time.perf_counter() - started < 1.0
    assert info.value.status_code == 413
    # Below Pillow's own bomb limit our limit still applies (it is checked first).
    with pytest.raises(ImageTooLarge, match="over the limit of 1000"):
        decode_image(encode(photo("coffee", 64), "PNG"), 1000)


def test_sixteen_bit_grey_is_scaled_to_eight_bit():
    values = np.array([[0, 257 * 100, 65535, 257 * 7]], dtype=np.uint16)
    blob = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(blob)).mode.startswith("I")
    out = np.asarray(decode_image(blob, LIMIT))
    assert out.shape == (1, 4, 3)
    assert out[0, :, 0].tolist() == [0, 100, 255, 7]
    assert (out[..., 0] == out[..., 2]).all()


def test_float_tiff_in_unit_range_is_scaled():
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    out = np.asarray(decode_image(encode(Image.fromarray(values), "TIFF"), LIMIT))
    assert out[0, :, 1].tolist() == [0, 128, 255]


def test_cmyk_is_converted():
    rgb = photo("rocket", 64)
    blob = encode(rgb.convert("CMYK"), "JPEG", quality=95)
    out = decode_image(blob, LIMIT)
    assert out.mode == "RGB"
    assert np.abs(np.asarray(out, float) - np.asarray(rgb, float)).mean() < 8


def test_palette_transparency_is_composited_on_white():
    img = Image.new("P", (4, 1))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putdata([0, 1, 0, 1])
    blob = encode(img, "PNG", transparency=1)  # palette entry 1 (blue) is transparent
    out = np.asarray(decode_image(blob, LIMIT))
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]


def test_alpha_is_composited_on_white():
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, :, :3] = [10, 200, 30]
    rgba[0, :, 3] = [255, 0, 128]
    out = np.asarray(decode_image(encode(Image.fromarray(rgba), "PNG"), LIMIT)).astype(int)
    assert out[0, 0].tolist() == [10, 200, 30]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert np.abs(out[0, 2] - np.array([132, 227, 142])).max() <= 1
    la = Image.fromarray(np.array([[[0, 0], [0, 255]]], np.uint8), "LA")
    assert np.asarray(decode_image(encode(la, "PNG"), LIMIT))[0].tolist() == [[255] * 3, [0] * 3]


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    decoded = np.asarray(decode_image(out.getvalue(), LIMIT))
    assert (decoded == [255, 0, 0]).all()


def test_exif_orientation_is_applied():
    img = photo("coffee", 60)  # 60 x 40
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes()), LIMIT)
    assert out.size == (img.height, img.width)


def test_error_names_the_upload():
    err = UnsupportedImageType("not an accepted image type").named("image 2 ('x.svg')")
    assert isinstance(err, ImageError) and err.status_code == 415
    assert str(err) == "image 2 ('x.svg'): not an accepted image type"


def test_read_upload_stops_at_the_byte_limit():
    async def main() -> None:
        small = UploadFile(io.BytesIO(b"x" * 1000))
        assert await read_upload(small, 1000) == b"x" * 1000
        big = UploadFile(io.BytesIO(b"x" * 300_000))
        with pytest.raises(ImageTooLarge, match="larger than the limit of 200000 bytes"):
            await read_upload(big, 200_000)
        assert big.file.tell() <= 200_000 + (1 << 16)  # stopped reading soon after the limit

    anyio.run(main)


def test_thumbnail_is_a_small_jpeg():
    thumb = Image.open(io.BytesIO(thumbnail_jpeg(photo("astronaut"), 128)))
    assert thumb.format == "JPEG" and max(thumb.size) == 128
