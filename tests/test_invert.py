"""Decoder mechanics, the ``training.invert`` CLI (real training steps, real ONNX export run by
onnxruntime) and POST /reconstruct over real HTTP."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from service_helpers import encode, photo, serve, settings_for

from training.decoder import PatchDecoder
from training.invert import InvertConfig, main, train_decoder


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.parametrize("padding", ["zeros", "reflect", "pad-crop"])
def test_decoder_shapes_and_no_transposed_convs(padding):
    torch.manual_seed(0)
    dec = PatchDecoder(24, 8, padding, width=16, min_width=8)
    out = dec(torch.randn(2, 24, 3, 5))
    assert out.shape == (2, 3, 24, 40) and out.min() >= 0 and out.max() <= 1
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in dec.modules())
    convs = [m for m in dec.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    want = "reflect" if padding == "reflect" else "zeros"
    assert convs and all(c.padding_mode == want for c in convs)
    # A patch that is no power of two is resized to the exact size.
    assert PatchDecoder(24, 14, padding, width=16)(torch.randn(1, 24, 2, 3)).shape[-2:] == (28, 42)
    with pytest.raises(ValueError, match=r"token grid \[B, 24, h, w\]"):
        dec(torch.randn(1, 12, 3, 3))


def test_pad_crop_reflects_the_grid_before_decoding():
    """pad-crop == a zero-padded decoder run on the reflect-padded grid, cropped back."""
    torch.manual_seed(0)
    dec = PatchDecoder(8, 4, "pad-crop", width=8, min_width=8, margin=2)
    grid = torch.randn(1, 8, 4, 5)
    padded = torch.nn.functional.pad(grid, (2, 2, 2, 2), mode="reflect")
    dec.margin = 0
    full = dec(padded)
    dec.margin = 2
    assert torch.allclose(dec(grid), full[..., 8:24, 8:28], atol=1e-6)
    with pytest.raises(ValueError, match="padding must be one of"):
        PatchDecoder(8, 4, "circular")


def test_training_records_history_and_resumes(tiny_vit, tmp_path):
    images = [torch.rand(3, 48, 64), torch.rand(3, 64, 64)]
    stats = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    cfg = InvertConfig(image_size=16, steps=4, batch_size=2, width=16, min_width=8, lr=1e-2)
    cfg.loss, cfg.checkpoint_every = "l1+fp", 2
    dec, tokens, hist = train_decoder(tiny_vit, images, cfg, **stats, run_dir=tmp_path)
    assert [h["step"] for h in hist] == [1, 2, 3, 4] and all("fp" in h for h in hist)
    assert not any(p.requires_grad for p in tokens.backbone.parameters())
    longer = InvertConfig(**{**cfg.__dict__, "steps": 6})
    with pytest.raises(ValueError, match="another configuration"):
        train_decoder(tiny_vit, images, longer, **stats, run_dir=tmp_path, resume=True)
    _, _, again = train_decoder(tiny_vit, images, cfg, **stats, run_dir=tmp_path, resume=True)
    assert len(again) == 4  # already finished: nothing re-done
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        train_decoder(tiny_vit, images, InvertConfig(image_size=20), **stats)


@pytest.fixture(scope="module")
def exported(tiny_vit, tiny_vit_dir, tmp_path_factory):
    """A copy of the tiny model's folder with a decoder exported by the CLI, and its run dir."""
    root = tmp_path_factory.mktemp("invert")
    model_dir = root / "store" / tiny_vit_dir.name
    shutil.copytree(tiny_vit_dir, model_dir)
    ckpt = root / "tiny.pth"
    torch.save(tiny_vit.state_dict(), ckpt)
    argv = ["--checkpoint", str(ckpt), "--model-dir", str(model_dir), "--out", str(root / "run")]
    argv += ["--steps", "3", "--image-size", "32", "--batch-size", "2", "--width", "16"]
    assert main([*argv, "--no-progress", "--padding", "pad-crop"]) == 0
    return model_dir, root / "run"


def test_cli_writes_grid_checkpoint_and_decoder(exported, tiny_vit):
    model_dir, run = exported
    grid = Image.open(run / "grid.png")
    assert grid.size == (8 * 32 + 9 * 2, 2 * 32 + 3 * 2)  # 8 held-out crops over their decodings
    summary = json.loads((run / "summary.json").read_text())
    assert summary["config"]["padding"] == "pad-crop" and summary["final"]["step"] == 3
    meta = json.loads((model_dir / "decoder.json").read_text())
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert meta["backbone_sha256"] == manifest["files"]["model.onnx"]["sha256"]
    assert "decoder.onnx" not in manifest["files"]  # the manifest is left as it was
    state = torch.load(run / "decoder.pth", weights_only=False)
    dec = PatchDecoder(**state["decoder_config"]).eval()
    dec.load_state_dict(state["decoder"])
    session = ort.InferenceSession(str(model_dir / "decoder.onnx"))
    grid_in = np.random.default_rng(0).standard_normal((1, 192, 5, 3)).astype(np.float32)
    (got,) = session.run(["image"], {"patch_grid": grid_in})
    with torch.no_grad():
        want = dec(torch.from_numpy(grid_in)).numpy()
    assert got.shape == (1, 3, 40, 24) and np.abs(got - want).max() < 1e-4


def test_cli_refuses_a_model_with_other_weights(exported, tmp_path):
    model_dir, _ = exported
    torch.manual_seed(1)
    from training.backbones import build_backbone

    other = build_backbone("vit_tiny", 8, depth=2, img_size=32)
    torch.save(other.state_dict(), tmp_path / "other.pth")
    before = (model_dir / "decoder.json").read_text()
    argv = ["--checkpoint", str(tmp_path / "other.pth"), "--model-dir", str(model_dir)]
    argv += ["--out", str(tmp_path / "run"), "--steps", "1", "--image-size", "32", "--width", "8"]
    assert main([*argv, "--no-progress"]) == 2  # bad input: a message, no traceback
    assert (model_dir / "decoder.json").read_text() == before
    assert main(["--checkpoint", str(tmp_path / "missing.pth"), "--no-progress"]) == 2


# ---------------------------------------------------------------------- POST /reconstruct


def client_for(model_dir, data_dir):
    return serve(settings_for(model_dir, data_dir))


@pytest.mark.anyio
async def test_reconstruct_returns_the_decoded_image(exported, tmp_path):
    model_dir, _ = exported
    size = photo("chelsea", 75).size  # 75 x 49: not a multiple of the patch: padded, cropped
    img = encode(photo("chelsea", 75))
    async with client_for(model_dir, tmp_path) as c:
        plain = await c.post("/reconstruct", files={"image": img})
        both = await c.post("/reconstruct", files={"image": img}, data={"side_by_side": "true"})
        bad = await c.post("/reconstruct", files={"image": b"garbage"})
    assert plain.status_code == 200 and plain.headers["content-type"] == "image/png"
    out = Image.open(io.BytesIO(plain.content))
    assert out.size == size and out.mode == "RGB"
    assert Image.open(io.BytesIO(both.content)).size == (2 * size[0], size[1])
    assert bad.status_code in (400, 415)


@pytest.mark.anyio
async def test_reconstruct_without_or_with_a_foreign_decoder_is_409(exported, tmp_path):
    model_dir, _ = exported
    bare = tmp_path / "store" / "bare"
    shutil.copytree(model_dir, bare)
    (bare / "decoder.json").unlink()
    async with client_for(bare, tmp_path / "d1") as c:
        r = await c.post("/reconstruct", files={"image": encode(photo("camera", 64))})
    assert r.status_code == 409 and "python -m training.invert" in r.json()["detail"]
    meta = json.loads((model_dir / "decoder.json").read_text())
    meta["backbone_sha256"] = "0" * 64
    (bare / "decoder.json").write_text(json.dumps(meta))
    async with client_for(bare, tmp_path / "d2") as c:
        r = await c.post("/reconstruct", files={"image": encode(photo("camera", 64))})
    assert r.status_code == 409 and "trained for other weights" in r.json()["detail"]


@pytest.mark.anyio
async def test_reconstruct_with_a_malformed_decoder_json_is_409_and_the_server_runs(
    exported, tmp_path
):
    model_dir, _ = exported
    meta = json.loads((model_dir / "decoder.json").read_text())
    cases = {
        "truncated": ("{not json", "not readable JSON"),
        "wrong type": (json.dumps({**meta, "bytes": "many"}), "not a valid decoder description"),
        "unknown field": (json.dumps({**meta, "extra": 1}), "not a valid decoder description"),
        "newer format": (json.dumps({**meta, "format_version": 99}), "upgrade this server"),
    }
    for i, (name, (text, expected)) in enumerate(cases.items()):
        broken = tmp_path / f"store{i}" / "broken"
        shutil.copytree(model_dir, broken)
        (broken / "decoder.json").write_text(text)
        async with client_for(broken, tmp_path / f"d{i}") as c:
            r = await c.post("/reconstruct", files={"image": encode(photo("camera", 64))})
            embed = await c.post("/embed", files={"images": encode(photo("camera", 64))})
        assert r.status_code == 409, (name, r.text)
        assert expected in r.json()["detail"] and "decoder.json" in r.json()["detail"], name
        assert embed.status_code == 200, name  # the model is served all the same
