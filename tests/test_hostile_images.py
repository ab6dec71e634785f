"""Hostile and odd images, generated here, against a live server: every one gets a correct result
or the documented 4xx on /embed, /attention, /similar and /items (never a 5xx), the server's
memory stays bounded over repeated rounds, and EXIF orientation gives the upright embedding."""

from __future__ import annotations

import io
import struct
import time
import zipfile
import zlib

import httpx
import numpy as np
import pytest
from live_server import Server
from PIL import Image
from reliability import record, rss_bytes
from service_helpers import encode, photo, serve, settings_for

from artifact import load_manifest
from artifact.transform import MAX_FULL_RESIZE_RATIO
from service.preprocess import eval_pixels

ENDPOINTS = ("/embed", "/attention", "/similar", "/items")
ROUNDS = 4  # the first warms up (allocator pools, ORT arenas); RSS is compared after it
RSS_SLACK = 40 * 2**20


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def png_declaring(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring ``width x height``, with a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def jpeg_declaring(width: int, height: int) -> bytes:
    """A real JPEG whose SOF0 header is patched to declare ``width x height``."""
    raw = bytearray(encode(Image.new("RGB", (16, 16), "gray")))
    sof = raw.index(b"\xff\xc0")
    raw[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(raw)


def animated(fmt: str) -> bytes:
    frames = [photo(name, 64).resize((64, 48)) for name in ("chelsea", "rocket", "coffee")]
    out = io.BytesIO()
    frames[0].save(out, fmt, save_all=True, append_images=frames[1:], duration=60, loop=0)
    return out.getvalue()


def sixteen_bit_png() -> bytes:
    grey = np.asarray(photo("camera", 64).convert("L"), np.uint16) * 257
    return encode(Image.fromarray(grey), "PNG")


def palette_with_transparency() -> bytes:
    img = photo("coffee", 64).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(img, "PNG", transparency=0)


def zip_file() -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("photo.jpg", encode(photo("astronaut", 64)))
    return out.getvalue()


# EXIF orientation tag value -> the transpose that shows the stored pixels upright (TIFF/EXIF
# spec, written out here rather than taken from Pillow) and its inverse (to make such a file).
UPRIGHT = {
    2: (Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_LEFT_RIGHT),
    3: (Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_180),
    4: (Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.FLIP_TOP_BOTTOM),
    5: (Image.Transpose.TRANSPOSE, Image.Transpose.TRANSPOSE),
    6: (Image.Transpose.ROTATE_270, Image.Transpose.ROTATE_90),
    7: (Image.Transpose.TRANSVERSE, Image.Transpose.TRANSVERSE),
    8: (Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270),
}


def exif_rotated_jpeg(upright: Image.Image, orientation: int) -> bytes:
    """The pixels stored as a camera would (turned), with the tag that turns them back."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = upright.transpose(UPRIGHT[orientation][1])
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


JPEG = encode(photo("astronaut", 96))
PNG = encode(photo("chelsea", 80), "PNG")
OK, BAD, UNSUPPORTED, TOO_BIG = 200, 400, 415, 413
# (case, bytes, file name, content type, status): every status is one docs/serving.md documents.
CASES = [
    ("zero bytes", b"", "empty.jpg", "image/jpeg", BAD),
    ("text", b"hello, this is not a picture\n" * 10, "notes.txt", "text/plain", UNSUPPORTED),
    ("html", b"<!DOCTYPE html><html><body><img src=x></body></html>", "a.html", "text/html", 415),
    (
        "svg",
        b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="9" height="9">'
        b'<rect width="9" height="9"/></svg>',
        "a.svg",
        "image/svg+xml",
        UNSUPPORTED,
    ),
    ("pdf", b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n", "a.pdf", "image/jpeg", 415),
    ("zip", zip_file(), "photos.zip", "application/zip", UNSUPPORTED),
    ("truncated jpeg", JPEG[: len(JPEG) // 2], "cut.jpg", "image/jpeg", BAD),
    ("truncated png", PNG[: len(PNG) // 2], "cut.png", "image/png", BAD),
    ("png declaring 100k x 100k", png_declaring(100_000, 100_000), "bomb.png", "image/png", 413),
    ("jpeg declaring 65k x 65k", jpeg_declaring(65_000, 65_000), "bomb.jpg", "image/jpeg", 413),
    ("1 x 20000 strip", encode(Image.new("RGB", (1, 20_000), "teal"), "PNG"), "s.png", "", OK),
    ("20000 x 1 strip", encode(Image.new("L", (20_000, 1), 90), "PNG"), "w.png", "", OK),
    ("1 x 1", encode(Image.new("RGB", (1, 1), "red"), "PNG"), "dot.png", "image/png", OK),
    ("16-bit png", sixteen_bit_png(), "deep.png", "image/png", OK),
    ("cmyk jpeg", encode(photo("rocket", 64).convert("CMYK")), "cmyk.jpg", "image/jpeg", OK),
    ("palette + transparency", palette_with_transparency(), "pal.png", "image/png", OK),
    ("LA", encode(photo("coins", 64).convert("LA"), "PNG"), "la.png", "image/png", OK),
    ("animated gif", animated("GIF"), "anim.gif", "image/gif", OK),
    ("animated webp", animated("WEBP"), "anim.webp", "image/webp", OK),
    ("exif-rotated jpeg", exif_rotated_jpeg(photo("astronaut", 64), 6), "r.jpg", "image/jpeg", OK),
    ("png named .jpg, sent as gif", PNG, "photo.jpg", "image/gif", OK),
    ("text named .png, sent as png", b"GIF? no. PNG? no." * 4, "x.png", "image/png", 415),
]


def post(client: httpx.Client, endpoint: str, name: str, blob: bytes, ctype: str):
    field = "images" if endpoint in ("/embed", "/items") else "image"
    return client.post(endpoint, files={field: (name, blob, ctype or "application/octet-stream")})


def check_answer(endpoint: str, case: str, status: int, response: httpx.Response) -> None:
    expected = 201 if status == OK and endpoint == "/items" else status
    assert response.status_code == expected, (endpoint, case, response.text[:300])
    body = response.json()
    if status != OK:
        assert isinstance(body["detail"], str) and "image 0" in body["detail"], body
        return
    if endpoint == "/embed":
        row = np.array(body["embeddings"][0])
        assert row.shape == (192,) and np.isfinite(row).all()
        assert abs(np.linalg.norm(row) - 1) < 1e-4
    elif endpoint == "/attention":
        maps = np.array(body["maps"])
        assert maps.shape[0] == 3 and np.isfinite(maps).all()
        assert np.allclose(maps.sum(axis=(1, 2)), 1.0, atol=1e-4)
    elif endpoint == "/similar":
        assert all(np.isfinite(r["score"]) for r in body["results"])
    else:
        assert len(body["ids"]) == 1


@pytest.mark.slow
def test_hostile_images_get_documented_answers_and_memory_stays_bounded(tiny_vit_dir, tmp_path):
    server = Server(tiny_vit_dir, tmp_path / "data", tmp_path / "server.log")
    rss: list[int] = []
    requests = 0
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for _ in range(ROUNDS):
                for endpoint in ENDPOINTS:
                    for case, blob, name, ctype, status in CASES:
                        response = post(client, endpoint, name, blob, ctype)
                        requests += 1
                        check_answer(endpoint, case, status, response)
                rss.append(rss_bytes(server.proc.pid))
            alive = client.get("/healthz").status_code == 200
        log = server.output()
    finally:
        server.stop()
    assert alive
    assert " 500 " not in log and "Traceback" not in log, log[-3000:]
    grown = max(rss[1:]) - rss[0]
    assert grown < RSS_SLACK, f"RSS grew {grown / 2**20:.1f} MiB over {ROUNDS - 1} rounds: {rss}"
    record(
        "hostile_images",
        {
            "cases": len(CASES),
            "endpoints": len(ENDPOINTS),
            "rounds": ROUNDS,
            "requests": requests,
            "server_errors": 0,
            "rss_mib_after_each_round": [round(r / 2**20, 1) for r in rss],
        },
    )


anyio_test = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


@anyio_test
@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
async def test_exif_rotated_jpeg_embeds_as_the_upright_image(tiny_vit_dir, tmp_path, orientation):
    upright = photo("chelsea", 72)  # 72 x 48: every orientation changes the pixels
    blob = exif_rotated_jpeg(upright, orientation)
    with Image.open(io.BytesIO(blob)) as raw:
        stored = raw.convert("RGB")  # the pixels as stored, orientation not applied
    turned = stored.transpose(UPRIGHT[orientation][0])
    # The spec's turn of the stored pixels is the upright photo (up to JPEG loss)...
    assert turned.size == upright.size
    assert np.abs(np.asarray(turned, float) - np.asarray(upright, float)).mean() < 6
    async with serve(settings_for(tiny_vit_dir, tmp_path)) as client:

        async def embedding(data: bytes) -> np.ndarray:
            response = await client.post("/embed", files={"images": ("x.jpg", data)})
            assert response.status_code == 200, response.text
            return np.array(response.json()["embeddings"][0])

        served = await embedding(blob)
        expected = await embedding(encode(turned, "PNG"))  # lossless: the same pixels
        unturned = await embedding(encode(stored, "PNG"))
        grid = await client.post("/attention", files={"image": ("x.jpg", blob)})
    # ...and the server embeds exactly that, not the sideways or mirrored stored pixels.
    assert np.allclose(served, expected, atol=1e-6)
    assert not np.allclose(served, unturned, atol=1e-3)
    height, width = grid.json()["image_size"]
    assert (width > height) == (upright.width > upright.height)


@pytest.mark.parametrize("shape", [(1, 20_000), (20_000, 1), (7, 20_000)])
def test_thin_strips_cost_no_more_than_a_square_image(tiny_vit_dir, shape):
    # Found here: a 1 x 20000 strip was resized to 37 x 740000 before the centre crop (at the
    # usual resize 256: 256 x 5.1M = 3.9 GB), so one small PNG could exhaust the server's memory.
    from artifact.transform import crop_box, normalise, resized_size

    manifest = load_manifest(tiny_vit_dir)
    t = manifest.eval_transform
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (*shape[::-1], 3), np.uint8))
    started = time.perf_counter()
    pixels = eval_pixels(img, manifest)
    elapsed = time.perf_counter() - started
    # The full resize (huge) and then the crop, as torchvision does it:
    full = img.resize(resized_size(*img.size, t.resize), Image.Resampling.BICUBIC)
    reference = normalise(full.crop(crop_box(*full.size, t.crop)), manifest.mean, manifest.std)
    assert full.width * full.height > 1000 * t.crop**2  # what the crop window spares
    assert pixels.shape == (3, t.crop, t.crop)
    diff = np.abs(pixels - reference)  # in units of std: 1/255 is ~0.017
    assert diff.mean() < 0.02 and diff.max() < 0.3, (diff.mean(), diff.max())
    assert elapsed < 0.5, f"{elapsed:.2f} s for one {shape} strip"


def test_moderately_long_images_still_match_the_full_resize(tiny_vit_dir):
    # Up to the ratio the eval transform is torchvision's exactly; above it, nearly.
    from artifact.transform import crop_box, normalise, resized_size

    manifest = load_manifest(tiny_vit_dir)
    t = manifest.eval_transform
    rng = np.random.default_rng(1)
    for ratio, atol in ((MAX_FULL_RESIZE_RATIO, 0.0), (MAX_FULL_RESIZE_RATIO * 3, 0.3)):
        img = Image.fromarray(rng.integers(0, 256, (20, 20 * ratio, 3), np.uint8))
        full = img.resize(resized_size(*img.size, t.resize), Image.Resampling.BICUBIC)
        reference = normalise(full.crop(crop_box(*full.size, t.crop)), manifest.mean, manifest.std)
        assert np.abs(eval_pixels(img, manifest) - reference).max() <= atol + 1e-6
