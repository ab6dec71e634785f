"""FeaturePredictionLoss mechanics (tiny real backbones, real torch steps) and POST /distance over
real HTTP on an exported model."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from service_helpers import encode, photo, serve, settings_for

from training.backbones import build_backbone
from training.checkpoints import CheckpointError
from training.perceptual import FeaturePredictionLoss, backbone_from_checkpoint, reflect_pad_to


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return build_backbone("vit_tiny", 8, depth=3, img_size=32).eval()


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """Two real photos, 40 x 48, in [0, 1]."""
    out = []
    for name in ("astronaut", "coffee"):
        img = photo(name).resize((48, 40), Image.Resampling.BICUBIC)
        out.append(torch.from_numpy(np.asarray(img, np.float32) / 255).permute(2, 0, 1))
    return torch.stack(out)


def test_zero_for_identical_positive_for_different(vit, photos):
    loss = FeaturePredictionLoss(vit, cls_weight=0.5, pixel_weight=1.0)
    assert loss(photos, photos).item() < 1e-5
    per = loss.per_sample(photos, photos.flip(0))
    assert per.shape == (2,) and (per > 0.01).all()


def test_gradient_reaches_prediction_not_backbone(vit, photos):
    loss = FeaturePredictionLoss(vit, cls_weight=1.0)
    loss.train()  # a user's training loop calls .train() on everything
    assert not loss.backbone.training
    assert not any(p.requires_grad for p in loss.parameters())
    pred = photos.flip(0).clone().requires_grad_(True)
    loss(pred, photos).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.backbone.parameters())


def test_any_size_is_reflect_padded_to_the_patch(vit, photos):
    """37 x 45 input == the same images reflect-padded to 40 x 48 by hand."""
    loss = FeaturePredictionLoss(vit)
    a, b = photos[:, :, :37, :45], photos.flip(0)[:, :, :37, :45]
    by_hand = (F.pad(a, (0, 3, 0, 3), mode="reflect"), F.pad(b, (0, 3, 0, 3), mode="reflect"))
    assert torch.allclose(loss(a, b), loss(*by_hand), atol=1e-6)
    tiny = torch.rand(1, 3, 3, 5)  # smaller than one patch: reflected repeatedly
    assert reflect_pad_to(tiny, 8).shape[-2:] == (8, 8)
    assert torch.isfinite(loss(tiny, tiny.flip(-1)))
    dmap = loss.distance_map(a, b)
    assert dmap.shape == (2, 37, 45) and dmap.min() >= -1e-6


def test_optimising_an_image_lowers_the_loss(vit, photos):
    loss = FeaturePredictionLoss(vit, pixel_weight=0.1)
    target = photos[:1]
    x = torch.full_like(target, 0.5).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.05)
    first = None
    for _ in range(8):
        value = loss(x, target)
        first = value.item() if first is None else first
        opt.zero_grad()
        value.backward()
        opt.step()
    assert loss(x, target).item() < 0.8 * first


def test_layers_and_weights(vit, photos):
    assert FeaturePredictionLoss(vit).layers == (0, 1, 2)  # "last 4" of a depth-3 ViT
    only_last = FeaturePredictionLoss(vit, layers=[-1])
    assert only_last.layers == (2,)
    weighted = FeaturePredictionLoss(vit, layers=[0, 2], layer_weights=[0.0, 1.0])
    a, b = photos, photos.flip(0)
    assert torch.allclose(weighted(a, b), only_last(a, b), atol=1e-6)
    with pytest.raises(ValueError, match="outside the ViT's blocks 0..2"):
        FeaturePredictionLoss(vit, layers=[3])
    with pytest.raises(ValueError, match="2 layer_weights for 1 layers"):
        FeaturePredictionLoss(vit, layers=[1], layer_weights=[1, 1])
    with pytest.raises(ValueError, match="differ in shape"):
        only_last(a, b[:, :, :20])
    with pytest.raises(ValueError, match=r"expected images \[B, 1 or 3, H, W\]"):
        only_last(a[:, :2], b[:, :2])


def test_resnet_stages(photos):
    torch.manual_seed(0)
    loss = FeaturePredictionLoss(build_backbone("resnet18"), layers=(1, 2))
    assert loss(photos, photos).item() < 1e-5
    assert loss(photos, photos.flip(0)).item() > 0.01
    with pytest.raises(ValueError, match="ResNet has no CLS token"):
        FeaturePredictionLoss(build_backbone("resnet18"), cls_weight=1.0)


def test_from_checkpoint_reads_the_shape(vit, photos, tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in vit.state_dict().items()}}, path)
    loaded = FeaturePredictionLoss("vit_tiny", path)
    assert len(loaded.backbone.blocks) == 3 and loaded.backbone.patch_size == 8
    ref = FeaturePredictionLoss(vit)
    a, b = photos, photos.flip(0)
    assert torch.allclose(loaded(a, b), ref(a, b), atol=1e-6)
    with pytest.raises(CheckpointError, match="holds a vit_tiny, not the vit_small"):
        backbone_from_checkpoint(path, arch="vit_small")


# ------------------------------------------------------------------------- POST /distance


@pytest.fixture
def anyio_backend():
    return "asyncio"


def client_for(model_dir, data_dir):
    return serve(settings_for(model_dir, data_dir))


def _png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


@pytest.mark.anyio
async def test_distance_ranks_a_blurred_copy_closer(tiny_vit_dir, tmp_path):
    astronaut, coffee = photo("astronaut", 128), photo("coffee", 128)
    blurred = astronaut.filter(ImageFilter.GaussianBlur(1))
    async with client_for(tiny_vit_dir, tmp_path) as c:
        same = await c.post(
            "/distance", files={"image_a": _png(astronaut), "image_b": _png(astronaut)}
        )
        near = await c.post(
            "/distance", files={"image_a": _png(astronaut), "image_b": _png(blurred)}
        )
        far = await c.post("/distance", files={"image_a": _png(astronaut), "image_b": _png(coffee)})
        back = await c.post(
            "/distance", files={"image_a": _png(coffee), "image_b": _png(astronaut)}
        )
    assert same.status_code == near.status_code == far.status_code == 200, far.text
    s, n, f = same.json(), near.json(), far.json()
    assert s["patch_distance"] < 1e-5 and s["embedding_distance"] < 1e-5
    assert n["patch_distance"] < f["patch_distance"]
    assert n["embedding_distance"] < f["embedding_distance"]
    assert f["patch_layers"] == ["0", "1"] and f["grid"] == [4, 4]  # both blocks; crop 32 / patch 8
    assert back.json()["patch_distance"] == pytest.approx(f["patch_distance"], rel=1e-6)


@pytest.mark.anyio
async def test_distance_errors(tiny_vit_dir, tmp_path):
    good = encode(photo("astronaut", 64))
    async with client_for(tiny_vit_dir, tmp_path) as c:
        missing = await c.post("/distance", files={"image_a": good})
        broken = await c.post("/distance", files={"image_a": good, "image_b": b"not an image"})
    assert missing.status_code == 422 and "image_b" in missing.json()["detail"]
    assert broken.status_code in (400, 415) and "image 1" in broken.json()["detail"]


@pytest.mark.anyio
async def test_distance_on_a_resnet_has_no_patch_term(tiny_resnet_dir, tmp_path):
    img = encode(photo("astronaut", 96))
    async with client_for(tiny_resnet_dir, tmp_path) as c:
        r = await c.post("/distance", files={"image_a": img, "image_b": img})
    assert r.status_code == 200
    assert r.json()["patch_distance"] is None and r.json()["embedding_distance"] < 1e-5
