"""Bad input over HTTP: every case gets the right 4xx with a message, never a 500."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from service_helpers import encode, photo, serve, settings_for

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def declared(width: int, height: int) -> bytes:
    raw = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])) & 0xFFFFFFFF)
    return bytes(raw)


def animated_gif() -> bytes:
    frames = [photo("chelsea", 64), photo("rocket", 64).resize((64, 42))]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)
    return out.getvalue()


def first_gif_frame_as_png() -> bytes:
    with Image.open(io.BytesIO(animated_gif())) as gif:
        return encode(gif.convert("RGB"), "PNG")


def sixteen_bit_png() -> bytes:
    grey = np.asarray(photo("camera", 64).convert("L"), np.uint16) * 257
    return encode(Image.fromarray(grey), "PNG")


def palette_with_alpha() -> bytes:
    img = photo("coffee", 64).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(img, "PNG", transparency=0)


JPEG = encode(photo("astronaut", 96))
CASES = [
    # (case, bytes, client content type, expected status, words in the detail)
    ("zero bytes", b"", "image/jpeg", 400, "empty"),
    ("text", b"just some text", "image/jpeg", 415, "not an accepted image type"),
    ("truncated JPEG", JPEG[: len(JPEG) // 2], "image/jpeg", 400, "truncated"),
    ("huge declared size", declared(60_000, 60_000), "image/png", 413, "pixels"),
    ("svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="9"/>', "image/svg+xml", 415, "type"),
    ("html", b"<!DOCTYPE html><title>x</title>", "text/html", 415, "type"),
    ("jpeg named as text", JPEG, "text/plain", 200, None),
    ("16-bit PNG", sixteen_bit_png(), "image/png", 200, None),
    ("CMYK JPEG", encode(photo("rocket", 64).convert("CMYK")), "image/jpeg", 200, None),
    ("palette + alpha", palette_with_alpha(), "image/png", 200, None),
    ("animated GIF", animated_gif(), "image/gif", 200, None),
    ("WebP", encode(photo("chelsea", 64), "WEBP"), "image/webp", 200, None),
    ("BMP", encode(photo("chelsea", 64), "BMP"), "image/bmp", 200, None),
    ("TIFF", encode(photo("chelsea", 64), "TIFF"), "image/tiff", 200, None),
]


@pytest.fixture
async def client(tiny_vit_dir, tmp_path):
    settings = settings_for(tiny_vit_dir, tmp_path, max_upload_bytes=200_000)
    async with serve(settings) as c:
        yield c


@pytest.mark.parametrize("endpoint", ["/embed", "/attention", "/similar", "/items"])
@pytest.mark.parametrize(
    ("case", "blob", "ctype", "status", "words"), CASES, ids=[c[0] for c in CASES]
)
async def test_bad_input_table(client, endpoint, case, blob, ctype, status, words):
    field = "images" if endpoint in ("/embed", "/items") else "image"
    response = await client.post(endpoint, files={field: ("upload.txt", blob, ctype)})
    expected = 201 if status == 200 and endpoint == "/items" else status
    assert response.status_code == expected, (case, response.text)
    if words:
        detail = response.json()["detail"]
        assert words in detail and "image 0 ('upload.txt')" in detail


async def test_accepted_conversions_embed_like_their_rgb_equivalents(client):
    async def embedding(blob: bytes) -> np.ndarray:
        response = await client.post("/embed", files={"images": ("x", blob)})
        return np.array(response.json()["embeddings"][0])

    # The animated GIF embeds as its first frame, the 16-bit PNG as its 8-bit version.
    assert np.allclose(await embedding(animated_gif()), await embedding(first_gif_frame_as_png()))
    eight = encode(photo("camera", 64).convert("L"), "PNG")
    assert np.allclose(await embedding(sixteen_bit_png()), await embedding(eight), atol=1e-6)


async def test_byte_pixel_and_count_limits_are_413(tiny_vit_dir, tmp_path):
    settings = settings_for(
        tiny_vit_dir,
        tmp_path,
        max_upload_bytes=20_000,
        max_request_bytes=100_000,
        max_image_pixels=50_000,
        max_images_per_request=3,
    )
    big_file = encode(photo("astronaut"), "PNG")  # ~500 kB
    async with serve(settings) as client:
        per_file = await client.post(
            "/embed", files=[("images", ("a.jpg", JPEG)), ("images", ("b.png", big_file[:30_000]))]
        )
        body = await client.post("/embed", files={"images": ("b.png", big_file)})
        flat = encode(Image.new("RGB", (300, 200), "red"), "PNG")  # small file, 60k pixels
        pixels = await client.post("/embed", files={"images": ("c.png", flat)})

        async def stream():  # chunked: no Content-Length to check up front
            yield (
                b'--zzz\r\nContent-Disposition: form-data; name="images"; filename="a"\r\n'
                b"Content-Type: image/png\r\n\r\n"
            )
            for _ in range(20):
                yield b"x" * 10_000

        chunked = await client.post(
            "/embed",
            content=stream(),
            headers={"content-type": "multipart/form-data; boundary=zzz"},
        )
        count = await client.post("/embed", files=[("images", ("x.jpg", JPEG))] * 4)
        still_fine = await client.post("/embed", files=[("images", ("x.jpg", JPEG))] * 3)
    assert per_file.status_code == 413
    assert per_file.json()["detail"] == (
        "image 1 ('b.png'): file is larger than the limit of 20000 bytes"
    )
    assert body.status_code == 413 and "DINO_MAX_REQUEST_BYTES" in body.json()["detail"]
    assert pixels.status_code == 413 and "300x200" in pixels.json()["detail"]
    assert chunked.status_code == 413 and "DINO_MAX_REQUEST_BYTES" in chunked.json()["detail"]
    assert count.status_code == 413 and "DINO_MAX_IMAGES_PER_REQUEST" in count.json()["detail"]
    assert still_fine.status_code == 200


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "words"),
    [
        ("post", "/embed", {}, "images"),
        (
            "post",
            "/embed",
            {"data": {"normalize": "maybe"}, "files": {"images": JPEG}},
            "normalize",
        ),
        ("post", "/attention", {"files": {"image": JPEG}, "data": {"threshold": "-0.1"}}, "thresh"),
        ("get", "/similar", {}, "id"),
        ("get", "/similar", {"params": {"id": "x", "k": "0"}}, "k"),
        ("get", "/similar", {"params": {"id": "x", "k": "ten"}}, "k"),
        ("post", "/similar", {"files": {"image": JPEG}, "data": {"k": "1000"}}, "DINO_MAX_K"),
        ("get", "/items", {"params": {"limit": "0"}}, "limit"),
    ],
)
async def test_bad_parameters_are_422_with_a_string_detail(client, method, path, kwargs, words):
    response = await getattr(client, method)(path, **kwargs)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and words in detail


async def test_unknown_route_and_method(client):
    assert (await client.get("/nope")).json() == {"detail": "Not Found"}
    assert (await client.get("/embed")).status_code == 405
