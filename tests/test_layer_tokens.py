"""The ViT artifact's ``layer_tokens`` output and the multi-layer ``POST /distance``.

``layer_tokens [B, L, h*w, D]`` holds the patch tokens of the blocks the manifest's
``token_layers`` names (FeaturePredictionLoss's default layers), each after the final norm, so
the server's ``patch_distance`` is the loss's feature term. Artifacts exported before it existed
must still load and serve ``/distance`` from the last block (``patch_layers: ["last"]``).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image, ImageFilter
from pydantic import ValidationError
from service_helpers import photo, serve, settings_for

from artifact import (
    INPUT_NAME,
    LEGACY_VIT_OUTPUTS,
    MANIFEST_NAME,
    MODEL_FILE,
    Manifest,
    load_manifest,
    sha256_file,
)
from service.routes_perceptual import square_pixels
from training.backbones import build_backbone
from training.onnx_graph import FeatureGraph, token_layers
from training.perceptual import FeaturePredictionLoss


def _intermediate(vit, x: torch.Tensor, layers: tuple[int, ...]) -> np.ndarray:
    """DINO's get_intermediate_layers for ``layers`` (patch tokens only), ``[B, L, N, D]``."""
    depth = len(vit.blocks)
    with torch.no_grad():
        seqs = vit.get_intermediate_layers(x, n=depth - layers[0])
    return torch.stack([seqs[i - layers[0]][:, 1:] for i in layers], dim=1).numpy()


def test_default_layers_are_the_losses_and_the_graph_computes_them():
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", 8, depth=6, img_size=32).eval()
    assert token_layers(vit) == FeaturePredictionLoss(vit).layers == (2, 3, 4, 5)
    assert token_layers(build_backbone("resnet18")) is None
    x = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        embedding, patches, _, layers = FeatureGraph(vit)(x)
    assert layers.shape == (2, 4, 15, 192)
    assert np.abs(layers.numpy() - _intermediate(vit, x, (2, 3, 4, 5))).max() < 1e-5
    assert torch.equal(layers[:, -1], patches)  # the last block, through the final norm
    # The hooks are gone afterwards: a later forward pass is the plain model.
    assert all(not b._forward_hooks for b in vit.blocks)
    assert torch.allclose(vit(x), embedding, atol=1e-6)


def test_onnx_layer_tokens_match_pytorch(tiny_vit, tiny_vit_dir):
    manifest = load_manifest(tiny_vit_dir)
    session = ort.InferenceSession(str(tiny_vit_dir / MODEL_FILE))
    rng = np.random.default_rng(2)
    for shape in [(1, 3, 32, 32), (3, 3, 24, 40), (2, 3, 64, 48)]:
        x = rng.standard_normal(shape, dtype=np.float32)
        patches, layers = session.run(["patch_tokens", "layer_tokens"], {INPUT_NAME: x})
        n = (shape[2] // 8) * (shape[3] // 8)
        assert layers.shape == (shape[0], 2, n, 192)
        assert np.abs(layers[:, -1] - patches).max() < 1e-6
        ref = _intermediate(tiny_vit, torch.from_numpy(x), manifest.token_layers)
        assert np.abs(layers - ref).max() < 1e-4, shape


def _manifest_json(model_dir: Path) -> dict:
    return json.loads((model_dir / MANIFEST_NAME).read_text())


def _older(data: dict) -> dict:
    """A manifest as exported before layer_tokens: three outputs, no new fields."""
    old = {k: v for k, v in data.items() if k != "token_layers"}
    old["outputs"] = list(LEGACY_VIT_OUTPUTS)
    old["parity"] = [
        {k: v for k, v in p.items() if k != "layer_tokens_max_abs_diff"} for p in data["parity"]
    ]
    return old


def test_manifest_accepts_older_vit_artifacts(tiny_vit_dir):
    legacy = Manifest.model_validate(_older(_manifest_json(tiny_vit_dir)))
    assert not legacy.has_layer_tokens and legacy.token_layers is None


@pytest.mark.parametrize(
    "change",
    [
        {"token_layers": None},  # layer_tokens without the blocks it holds
        {"token_layers": [1, 2]},  # block 2 of a depth-2 ViT
        {"token_layers": [1, 0]},
        {"token_layers": [1, 1]},
        {"outputs": ["embedding", "patch_tokens", "attention", "layer_tokens", "extra"]},
        {"older": True, "token_layers": [0, 1]},  # blocks named but no layer_tokens output
    ],
)
def test_manifest_refuses_inconsistent_layer_tokens(tiny_vit_dir, change):
    data, change = _manifest_json(tiny_vit_dir), dict(change)
    if change.pop("older", False):
        data = _older(data)
    with pytest.raises(ValidationError):
        Manifest.model_validate({**data, **change})


# ------------------------------------------------------------------------- POST /distance


@pytest.fixture
def anyio_backend():
    return "asyncio"


def _png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def images() -> dict[str, Image.Image]:
    astronaut = photo("astronaut", 128)
    return {
        "astronaut": astronaut,
        "blurred": astronaut.filter(ImageFilter.GaussianBlur(1)),
        "coffee": photo("coffee", 128),
    }


async def _distances(model_dir: Path, data_dir: Path, images: dict) -> dict[str, dict]:
    pairs = {"near": ("astronaut", "blurred"), "far": ("astronaut", "coffee")}
    out = {}
    async with serve(settings_for(model_dir, data_dir)) as c:
        for key, (a, b) in pairs.items():
            r = await c.post(
                "/distance", files={"image_a": _png(images[a]), "image_b": _png(images[b])}
            )
            assert r.status_code == 200, r.text
            out[key] = r.json()
    return out


def _loss_distance(vit, manifest: Manifest, a: Image.Image, b: Image.Image, layers) -> float:
    """FeaturePredictionLoss's feature term on the pixels the server prepares."""
    loss = FeaturePredictionLoss(vit, layers=layers, input_range="normalized")
    x = [torch.from_numpy(square_pixels(img, manifest))[None] for img in (a, b)]
    with torch.no_grad():
        return float(loss(x[0], x[1]))


@pytest.mark.anyio
async def test_distance_is_the_multi_layer_loss(tiny_vit, tiny_vit_dir, tmp_path, images):
    d = await _distances(tiny_vit_dir, tmp_path, images)
    near, far = d["near"], d["far"]
    assert near["patch_layers"] == far["patch_layers"] == ["0", "1"]
    assert near["patch_distance"] < far["patch_distance"]
    manifest = load_manifest(tiny_vit_dir)
    for key, (a, b) in {"near": ("astronaut", "blurred"), "far": ("astronaut", "coffee")}.items():
        expected = _loss_distance(tiny_vit, manifest, images[a], images[b], None)
        assert d[key]["patch_distance"] == pytest.approx(expected, rel=1e-4, abs=1e-6)


def _legacy_artifact(src: Path, store: Path) -> Path:
    """``src`` as an export from before ``layer_tokens``: a graph with the three older outputs
    only and a manifest without the new fields."""
    dst = store / "legacy-vit"
    dst.mkdir(parents=True)
    onnx.utils.extract_model(
        str(src / MODEL_FILE), str(dst / MODEL_FILE), [INPUT_NAME], list(LEGACY_VIT_OUTPUTS)
    )
    data = _older(_manifest_json(src))
    model = {"sha256": sha256_file(dst / MODEL_FILE), "bytes": (dst / MODEL_FILE).stat().st_size}
    data.update(name="legacy-vit", variants={}, files={MODEL_FILE: model})
    (dst / MANIFEST_NAME).write_text(json.dumps(data))
    return dst


@pytest.mark.anyio
async def test_older_artifact_serves_the_last_layer(tiny_vit, tiny_vit_dir, tmp_path, images):
    legacy = _legacy_artifact(tiny_vit_dir, tmp_path / "store")
    session = ort.InferenceSession(str(legacy / MODEL_FILE))
    assert [o.name for o in session.get_outputs()] == list(LEGACY_VIT_OUTPUTS)
    d = await _distances(legacy, tmp_path / "data", images)
    near, far = d["near"], d["far"]
    assert near["patch_layers"] == far["patch_layers"] == ["last"]
    assert near["patch_distance"] < far["patch_distance"]
    manifest = load_manifest(legacy)
    expected = _loss_distance(tiny_vit, manifest, images["astronaut"], images["coffee"], [-1])
    assert far["patch_distance"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
