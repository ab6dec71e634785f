"""/attention: maps, DINO's threshold masks, PNG overlays, 409 for models without attention."""

from __future__ import annotations

import io

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from service_helpers import encode, photo, serve, settings_for

from artifact import load_manifest
from service.attention import kept_share, patch_maps, threshold_masks
from service.preprocess import attention_pixels

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def test_masks_follow_dino_on_a_hand_case():
    maps = np.array([[[0.1, 0.5], [0.1, 0.3]]])
    assert threshold_masks(maps, 0.6)[0].tolist() == [[False, True], [False, True]]
    assert threshold_masks(maps, 0.5)[0].tolist() == [[False, True], [False, False]]
    assert threshold_masks(maps, 1.0).all()
    assert not threshold_masks(maps, 0.0).any()
    with pytest.raises(ValueError, match="within 0..1"):
        threshold_masks(maps, 1.5)


@pytest.mark.parametrize("threshold", [0.1, 0.33, 0.6, 0.9])
def test_masks_are_the_smallest_set_holding_the_share(threshold):
    rng = np.random.default_rng(1)
    maps = patch_maps(rng.dirichlet(np.ones(35) * 0.3, size=4), (5, 7))
    masks = threshold_masks(maps, threshold)
    share = kept_share(maps, masks)
    assert (share >= threshold - 1e-12).all()
    for head in range(4):
        kept = maps[head][masks[head]]
        assert share[head] - kept.min() < threshold  # dropping any kept patch falls short
        assert kept.min() >= maps[head][~masks[head]].max()  # the kept ones are the largest


async def test_attention_json_maps_and_masks(tiny_vit_dir, tmp_path):
    manifest = load_manifest(tiny_vit_dir)
    img = photo("astronaut").resize((50, 37), Image.Resampling.BICUBIC)  # not a patch multiple
    blob = encode(img, "PNG")
    async with serve(settings_for(tiny_vit_dir, tmp_path)) as client:
        plain = await client.post("/attention", files={"image": ("a.png", blob)})
        masked = await client.post(
            "/attention", files={"image": ("a.png", blob)}, data={"threshold": "0.6"}
        )
    assert plain.status_code == 200, plain.text
    body = plain.json()
    assert body["model"] == "tiny-vit" and body["heads"] == 3 and body["patch_size"] == 8
    assert body["image_size"] == [37, 50] and body["grid"] == [5, 7]
    assert body["masks"] is None and body["threshold"] is None
    maps = np.array(body["maps"])
    assert maps.shape == (3, 5, 7)
    assert np.allclose(maps.sum(axis=(1, 2)), 1.0, atol=1e-6)
    # The same as the model run directly on the reflect-padded image, renormalised per head.
    prepared = attention_pixels(img, manifest, 224)
    session = ort.InferenceSession(str(tiny_vit_dir / "model.onnx"))
    raw = session.run(["attention"], {"pixel_values": prepared.pixels[None]})[0][0]
    assert np.allclose(maps, (raw / raw.sum(axis=1, keepdims=True)).reshape(3, 5, 7), atol=1e-6)

    mbody = masked.json()
    masks = np.array(mbody["masks"], dtype=bool)
    assert mbody["threshold"] == 0.6 and masks.shape == (3, 5, 7)
    assert np.array_equal(masks, threshold_masks(maps, 0.6))
    assert (kept_share(maps, masks) >= 0.6 - 1e-6).all()


async def test_attention_fits_large_images_to_the_max_side(tiny_vit_dir, tmp_path):
    blob = encode(photo("coffee"))  # 600 x 400
    async with serve(settings_for(tiny_vit_dir, tmp_path, attention_max_side=96)) as client:
        body = (await client.post("/attention", files={"image": ("c.jpg", blob)})).json()
    # 96 is for patch 16; patch 8 keeps the same grid with half the side: 48.
    assert body["image_size"] == [32, 48] and body["grid"] == [4, 6]


async def test_attention_png_overlay(tiny_vit_dir, tmp_path):
    blob = encode(photo("chelsea", 120))
    async with serve(settings_for(tiny_vit_dir, tmp_path)) as client:
        mean = await client.post(
            "/attention", files={"image": ("c.jpg", blob)}, data={"format": "png"}
        )
        head = await client.post(
            "/attention",
            files={"image": ("c.jpg", blob)},
            data={"format": "png", "head": "2", "threshold": "0.5"},
        )
        bad_head = await client.post(
            "/attention", files={"image": ("c.jpg", blob)}, data={"format": "png", "head": "3"}
        )
        bad_format = await client.post(
            "/attention", files={"image": ("c.jpg", blob)}, data={"format": "gif"}
        )
    for response in (mean, head):
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        overlay = Image.open(io.BytesIO(response.content))
        assert overlay.format == "PNG" and overlay.size == (120, 79) and overlay.mode == "RGB"
    assert mean.content != head.content
    assert bad_head.status_code == 422 and "0..2" in bad_head.json()["detail"]
    assert bad_format.status_code == 422 and "format" in bad_format.json()["detail"]


async def test_attention_on_a_model_without_attention_is_409(tiny_resnet_dir, tmp_path):
    async with serve(settings_for(tiny_resnet_dir, tmp_path)) as client:
        response = await client.post(
            "/attention", files={"image": ("c.jpg", encode(photo("rocket")))}
        )
        embedded = await client.post("/embed", files={"images": ("c.jpg", encode(photo("rocket")))})
    assert response.status_code == 409
    assert "no attention" in response.json()["detail"]
    assert embedded.status_code == 200 and embedded.json()["dim"] == 512
