"""DINOv2 ViTs: official key names, strict loading and the forward against a reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from family_reference import dinov2_reference, layer_norm, official_keys, randomize, trim

from training.backbones import build_backbone
from training.checkpoints import CheckpointError, load_backbone_weights
from training.dinov2 import DINOV2_CONFIGS
from training.pos_interp import bicubic_aa_matrix, bicubic_matrix, resize_grid

DEPTHS = {"s": 12, "b": 12, "l": 24, "g": 40}
SMALL = {"embed_dim": 48, "num_heads": 3, "depth": 3, "img_size": 56}  # a 4 x 4 trained grid


@pytest.mark.parametrize("name", sorted(DINOV2_CONFIGS))
def test_name_alone_builds_the_official_state_dict(name):
    with torch.device("meta"):  # ViT-g has 1.1 B parameters: shapes only
        model = build_backbone(name)
    sd = model.state_dict()
    assert [(k, list(v.shape)) for k, v in sd.items() if k in trim(list(sd))] == official_keys(name)
    assert len(model.blocks) == DEPTHS[name[len("dinov2_vit")]]
    assert model.patch_size == 14 and model.n_register_tokens == (4 if "reg" in name else 0)


def small_pair(name: str, tmp_path, seed: int = 0):
    """A small random model saved under the official names and loaded strictly into a fresh
    one; returns (loaded model, its state dict)."""
    sd = randomize(build_backbone(name, **SMALL), seed)
    path = tmp_path / f"{name}_pretrain.pth"
    torch.save(sd, path)
    model = build_backbone(name, **SMALL).eval()
    load_backbone_weights(model, path)
    return model, sd


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg", "dinov2_vitg14_reg"])
@pytest.mark.parametrize("size", [(56, 56), (42, 70), (98, 84)])
def test_forward_matches_reference(name, size, tmp_path):
    model, sd = small_pair(name, tmp_path)
    cfg = DINOV2_CONFIGS[name]
    registers, offset = cfg.get("n_register_tokens", 0), cfg.get("interpolate_offset", 0.1)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outs, final = dinov2_reference(sd, x, 3, 14, registers, offset)
        prefix = 1 + registers
        torch.testing.assert_close(model(x), final[:, 0], atol=1e-5, rtol=0)
        cls, patches, attn = model.forward_features(x)
        torch.testing.assert_close(patches, final[:, prefix:], atol=1e-5, rtol=0)
        assert patches.shape[1] == (size[0] // 14) * (size[1] // 14)
        layers = model.get_intermediate_layers(x, n=2, return_class_token=True)
        for (got, got_cls), ref in zip(layers, outs[-2:], strict=True):
            normed = layer_norm(ref, sd, "norm", 1e-6)
            torch.testing.assert_close(got, normed[:, prefix:], atol=1e-5, rtol=0)
            torch.testing.assert_close(got_cls, normed[:, 0], atol=1e-5, rtol=0)
        full = model.get_last_selfattention(x)
        assert full.shape[-1] == prefix + patches.shape[1]
        torch.testing.assert_close(attn, full[:, :, 0, prefix:])
        tokens = model.forward_tokens(x)  # CLS + patches, registers left out
        torch.testing.assert_close(tokens[:, 1:], patches)


def test_mask_token_replaces_hidden_patches(tmp_path):
    model, sd = small_pair("dinov2_vits14_reg", tmp_path)
    x = torch.randn(2, 3, 56, 56)
    mask = torch.rand(2, 16, generator=torch.Generator().manual_seed(0)) < 0.4
    with torch.no_grad():
        _, ref = dinov2_reference(sd, x, 3, 14, 4, 0.0, mask=mask)
        got = model.forward_tokens(x, mask)
    torch.testing.assert_close(got[:, 1:], ref[:, 5:], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[:, 0], ref[:, 0], atol=1e-5, rtol=0)


def test_training_checkpoint_with_teacher_student_prefixes_loads(tmp_path):
    sd = randomize(build_backbone("dinov2_vits14_reg", **SMALL), 3)
    ckpt = {
        "teacher": {f"backbone.{k}": v for k, v in sd.items()} | {"dino_head.w": torch.ones(2)},
        "student": {f"module.backbone.{k}": v for k, v in sd.items()},
    }
    ckpt["teacher"]["head.mlp.0.weight"] = torch.ones(2, 2)
    for which in ("teacher", "student"):
        model = build_backbone("dinov2_vits14_reg", **SMALL)
        load_backbone_weights(model, ckpt, which=which)
        assert torch.equal(model.register_tokens, sd["register_tokens"])


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda sd: sd.pop("register_tokens"), "register_tokens"),
        (lambda sd: sd.__setitem__("blocks.0.ls1.beta", torch.ones(48)), "blocks.0.ls1.beta"),
        (lambda sd: sd.__setitem__("pos_embed", torch.zeros(1, 26, 48)), "pos_embed"),
        (lambda sd: sd.pop("blocks.2.mlp.fc2.weight"), "blocks.2.mlp.fc2.weight"),
    ],
)
def test_bad_checkpoint_error_names_the_key(edit, named, tmp_path):
    sd = randomize(build_backbone("dinov2_vits14_reg", **SMALL), 0)
    edit(sd)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
        load_backbone_weights(build_backbone("dinov2_vits14_reg", **SMALL), path)


def test_original_checkpoint_does_not_load_into_register_model():
    sd = randomize(build_backbone("dinov2_vits14", **SMALL), 0)
    with pytest.raises(CheckpointError, match="register_tokens") as err:
        load_backbone_weights(build_backbone("dinov2_vits14_reg", **SMALL), sd)
    assert "holds a DINOv2 ViT" in str(err.value) and "--arch dinov2_vit?14" in str(err.value)


@pytest.mark.parametrize("out", [(16, 16), (37, 28), (50, 20), (5, 7), (37, 37)])
def test_matrix_resize_matches_torch_bicubic(out):
    """The export form of the position resize agrees with F.interpolate at any size."""
    grid = torch.randn(8, 37, 37, generator=torch.Generator().manual_seed(0))
    h, w = out
    ref = F.interpolate(grid[None], scale_factor=((h + 0.1) / 37, (w + 0.1) / 37), mode="bicubic")
    rows = bicubic_matrix(h, 37, torch.tensor(37 / (h + 0.1)))
    cols = bicubic_matrix(w, 37, torch.tensor(37 / (w + 0.1)))
    channels_last = grid.permute(1, 2, 0)  # resize_grid's layout, [M, M, D] -> [h*w, D]
    tokens = ref[0].permute(1, 2, 0).reshape(-1, 8)
    got = resize_grid(channels_last, rows, cols)
    torch.testing.assert_close(got, tokens, atol=3e-5, rtol=1e-5)
    ref = F.interpolate(grid[None], size=out, mode="bicubic", antialias=True)
    got = resize_grid(channels_last, bicubic_aa_matrix(h, 37), bicubic_aa_matrix(w, 37))
    torch.testing.assert_close(got, ref[0].permute(1, 2, 0).reshape(-1, 8), atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["dinov2_vits14_reg", "dinov3_vits16"])
def test_feature_prediction_loss_takes_a_hub_name_and_its_checkpoint(name, tmp_path):
    from training.perceptual import FeaturePredictionLoss

    small = {"depth": 2, **({"img_size": 56} if name.startswith("dinov2") else {})}
    sd = randomize(build_backbone(name, **small), 0, std=0.05)  # the hub width, fewer blocks
    path = tmp_path / "ckpt.pth"
    torch.save(sd, path)
    loss = FeaturePredictionLoss(name, path, cls_weight=0.5, input_range="normalized")
    assert len(loss.backbone.blocks) == 2 and loss.layers == (0, 1)
    x = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(0))  # /14 and /16
    with torch.no_grad():
        layers, cls = loss.features(x)
        emb, patches, _ = loss.backbone.forward_features(x)
    torch.testing.assert_close(layers[-1], patches)  # register/storage tokens left out
    torch.testing.assert_close(cls, emb)
    y = x + 0.1 * torch.randn_like(x)
    assert float(loss(x, x)) == pytest.approx(0.0, abs=1e-6) and float(loss(y, x)) > 0
