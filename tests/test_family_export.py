"""DINOv2 / DINOv3 artifacts: exported at small widths with parity at the served size, a
non-square size and one far from it; served unchanged by a live, torch-free server."""

from __future__ import annotations

import json

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch
from family_reference import randomize
from live_server import Server
from service_helpers import photo_bytes

from training.backbones import build_backbone
from training.export import export_backbone
from training.export import main as export_main
from training.onnx_graph import FeatureGraph

SIZE = 224  # the served (eval crop) size; DINOv2 positions are trained on a 37 x 37 grid
MODELS = {
    "dinov2_vits14": {"embed_dim": 48, "num_heads": 3, "depth": 2},
    "dinov2_vits14_reg": {"embed_dim": 48, "num_heads": 3, "depth": 2},
    "dinov3_vits16": {"embed_dim": 48, "num_heads": 3, "depth": 2},
    "dinov3_convnext_tiny": {"depths": (1, 1, 2, 1), "dims": (8, 16, 24, 32)},
}


def small_model(name: str) -> torch.nn.Module:
    model = build_backbone(name, **MODELS[name])
    model.load_state_dict(randomize(model, seed=0, std=0.1))
    return model.eval()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("family-models")
    return {
        name: export_backbone(
            small_model(name),
            name.replace("_", "-"),
            root,
            arch=name,
            train_image_size=SIZE,
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
            eval_resize=256,
            eval_crop=SIZE,
            provenance={"source": "random"},
        )
        for name in MODELS
    }


@pytest.mark.parametrize("name", sorted(MODELS))
def test_export_parity_includes_a_far_non_square_size(name, artifacts):
    manifest = json.loads((artifacts[name] / "manifest.json").read_text())
    shapes = [tuple(p["shape"]) for p in manifest["parity"]]
    far = {"dinov2": (1, 3, 518, 392), "dinov3": (1, 3, 512, 384)}
    if "convnext" in name:
        assert manifest["family"] == "convnext" and manifest["outputs"] == ["embedding"]
        assert len(shapes) == 3
    else:
        assert far[name[:6]] in shapes and (1, 3, 224, 336) in shapes
        assert manifest["patch_size"] == (14 if name.startswith("dinov2") else 16)
    assert manifest["lineage"] == name[:6]
    assert manifest["n_register_tokens"] == (
        0 if name in ("dinov2_vits14",) or "convnext" in name else 4
    )
    assert min(p["embedding_cosine_min"] for p in manifest["parity"]) >= 0.9999


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg", "dinov3_vits16"])
@pytest.mark.parametrize("size", [(518, 518), (70, 126), (336, 168)])
def test_onnx_matches_pytorch_at_other_sizes(name, size, artifacts):
    """Including the trained 37 x 37 grid, where the original models skip the resize."""
    if name.startswith("dinov3"):
        size = tuple(s // 14 * 16 for s in size)
    session = ort.InferenceSession(str(artifacts[name] / "model.onnx"))
    x = np.random.default_rng(0).standard_normal((1, 3, *size), dtype=np.float32)
    got = session.run(None, {"pixel_values": x})
    with torch.no_grad():
        expected = FeatureGraph(small_model(name))(torch.from_numpy(x))
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e.numpy(), atol=2e-5, rtol=1e-4)


def test_export_cli_builds_the_model_from_the_hub_name_and_the_file(tmp_path):
    model = build_backbone("dinov2_vits14_reg", depth=1)  # full width, one block: small enough
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in model.state_dict().items()}}, path)
    argv = ["--checkpoint", str(path), "--arch", "dinov2_vits14_reg", "--name", "reg"]
    assert export_main([*argv, "--models-dir", str(tmp_path / "models")]) == 0
    manifest = json.loads((tmp_path / "models" / "reg" / "manifest.json").read_text())
    assert manifest["patch_size"] == 14 and manifest["depth"] == 1
    assert manifest["train_image_size"] == 224 and manifest["eval_transform"]["crop"] == 224
    assert (1, 3, 518, 392) in [tuple(p["shape"]) for p in manifest["parity"]]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_live_server_answers_every_endpoint(name, artifacts, tmp_path):
    server = Server(artifacts[name], tmp_path / "data", tmp_path / "server.log")
    try:
        server.wait_ready()
        url = server.url
        info = httpx.get(f"{url}/models").json()
        assert info["lineage"] == name[:6] and info["arch"] == name
        assert (
            info["n_register_tokens"]
            == json.loads((artifacts[name] / "manifest.json").read_text())["n_register_tokens"]
        )
        blobs = [photo_bytes(i, size=120) for i in range(3)]
        embed = httpx.post(f"{url}/embed", files=[("images", ("a.jpg", blobs[0]))], timeout=30)
        assert embed.status_code == 200 and embed.json()["dim"] == info["embed_dim"]
        added = httpx.post(
            f"{url}/items",
            files=[("images", (f"{i}.jpg", b)) for i, b in enumerate(blobs)],
            data={"ids": ["a", "b", "c"]},
            timeout=30,
        )
        assert added.status_code == 201, added.text
        found = httpx.post(f"{url}/similar", files={"image": ("q.jpg", blobs[1])}, data={"k": 1})
        assert found.json()["results"][0]["id"] == "b"
        pair = [("image_a", ("a.jpg", blobs[0])), ("image_b", ("b.jpg", blobs[2]))]
        assert httpx.post(f"{url}/distance", files=pair, timeout=30).status_code == 200
        attention = httpx.post(
            f"{url}/attention", files={"image": ("a.jpg", blobs[0])}, data={"threshold": "0.6"}
        )
        if "convnext" in name:
            assert attention.status_code == 409
            return
        body = attention.json()
        h, w = body["grid"]
        assert body["patch_size"] == info["patch_size"] and body["heads"] == 3
        assert np.asarray(body["maps"]).shape == (3, h, w) and h * info["patch_size"] <= 224
        np.testing.assert_allclose(np.asarray(body["maps"]).sum(axis=(1, 2)), 1.0, atol=1e-6)
        png = httpx.post(
            f"{url}/attention", files={"image": ("a.jpg", blobs[0])}, data={"format": "png"}
        )
        assert png.headers["content-type"] == "image/png"
    finally:
        server.stop()


def test_attention_quality_metrics(artifacts):
    from benchmarks.attention_quality import measure, norm_outliers, top_share

    spike = np.full((2, 200), 1.0)
    spike[:, 7] = 198.0  # one patch holds half of each head's mass
    assert top_share(spike) == pytest.approx((198 + 1) / 397)  # top 2 of 200 patches
    tokens = np.ones((100, 4))
    tokens[3] *= 10
    assert norm_outliers(tokens) == pytest.approx(0.01)
    row = measure(artifacts["dinov2_vits14_reg"])
    assert row["register_tokens"] == 4 and 0 < row["top1pct_attention_share"] <= 1
    assert 0 <= row["norm_outlier_share"] <= 1


@pytest.mark.parametrize("name", sorted(MODELS))
def test_openvino_runs_each_artifact_like_onnxruntime(name, artifacts):
    """The served default engine: every graph compiles and agrees at two sizes."""
    ov = pytest.importorskip("openvino")
    path = str(artifacts[name] / "model.onnx")
    compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    session = ort.InferenceSession(path)
    patch = 14 if name.startswith("dinov2") else 16
    for size in [(224, 224), (37 * patch, 28 * patch)]:
        x = np.random.default_rng(1).standard_normal((1, 3, *size), dtype=np.float32)
        for got, want in zip(
            compiled(x).values(), session.run(None, {"pixel_values": x}), strict=True
        ):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
