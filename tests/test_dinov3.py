"""DINOv3 ViTs: official key names, strict loading and the forward against a reference."""

from __future__ import annotations

import pytest
import torch
from family_reference import dinov3_reference, layer_norm, official_keys, randomize, trim

from training.backbones import build_backbone
from training.checkpoints import CheckpointError, load_backbone_weights
from training.dinov3 import DINOV3_CONFIGS

DEPTHS = {"dinov3_vits16": 12, "dinov3_vits16plus": 12, "dinov3_vitb16": 12, "dinov3_vitl16": 24}
SMALL = {"embed_dim": 48, "num_heads": 3, "depth": 3}  # head width 16: 4 RoPE periods


@pytest.mark.parametrize("name", sorted(DINOV3_CONFIGS))
def test_name_alone_builds_the_official_state_dict(name):
    with torch.device("meta"):
        model = build_backbone(name)
    sd = model.state_dict()
    assert [(k, list(v.shape)) for k, v in sd.items() if k in trim(list(sd))] == official_keys(name)
    assert len(model.blocks) == DEPTHS[name]
    assert model.patch_size == 16 and model.n_register_tokens == 4


def test_rope_periods_and_key_bias_mask_are_the_official_constants():
    model = build_backbone("dinov3_vits16")
    head = 64
    expected = 100 ** (torch.arange(16) * 4 / head)
    torch.testing.assert_close(model.rope_embed.periods, expected)
    mask = model.blocks[0].attn.qkv.bias_mask
    assert mask[:384].eq(1).all() and mask[384:768].eq(0).all() and mask[768:].eq(1).all()


def small_pair(name: str, tmp_path, seed: int = 0):
    sd = randomize(build_backbone(name, **SMALL), seed)
    path = tmp_path / f"{name}_pretrain_lvd1689m-00000000.pth"
    torch.save(sd, path)
    model = build_backbone(name, **SMALL).eval()
    load_backbone_weights(model, path)
    return model, sd


@pytest.mark.parametrize("name", ["dinov3_vits16", "dinov3_vits16plus"])
@pytest.mark.parametrize("size", [(224, 224), (48, 80), (96, 64)])
def test_forward_matches_reference(name, size, tmp_path):
    model, sd = small_pair(name, tmp_path)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outs, final = dinov3_reference(sd, x, 3, 16)
        torch.testing.assert_close(model(x), final[:, 0], atol=1e-5, rtol=0)
        _, patches, attn = model.forward_features(x)
        torch.testing.assert_close(patches, final[:, 5:], atol=1e-5, rtol=0)
        assert patches.shape[1] == (size[0] // 16) * (size[1] // 16)
        layers = model.get_intermediate_layers(x, n=2, return_class_token=True)
        for (got, got_cls), ref in zip(layers, outs[-2:], strict=True):
            normed = layer_norm(ref, sd, "norm", 1e-5)
            torch.testing.assert_close(got, normed[:, 5:], atol=1e-5, rtol=0)
            torch.testing.assert_close(got_cls, normed[:, 0], atol=1e-5, rtol=0)
        full = model.get_last_selfattention(x)
        torch.testing.assert_close(attn, full[:, :, 0, 5:])


def test_mask_token_replaces_hidden_patches(tmp_path):
    model, sd = small_pair("dinov3_vits16", tmp_path)
    x = torch.randn(2, 3, 64, 64)
    mask = torch.rand(2, 16, generator=torch.Generator().manual_seed(0)) < 0.4
    with torch.no_grad():
        _, ref = dinov3_reference(sd, x, 3, 16, mask=mask)
        got = model.forward_tokens(x, mask)
    torch.testing.assert_close(got[:, 1:], ref[:, 5:], atol=1e-5, rtol=0)


def test_rope_coordinates_are_rescaled_only_in_training():
    model = build_backbone("dinov3_vits16", **SMALL)
    model.rope_embed.train()
    torch.manual_seed(0)
    a = model.rope_embed(4, 4)[0]
    model.rope_embed.eval()
    b, c = model.rope_embed(4, 4)[0], model.rope_embed(4, 4)[0]
    assert torch.equal(b, c) and not torch.allclose(a, b)


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda sd: sd.pop("blocks.1.attn.qkv.bias_mask"), "blocks.1.attn.qkv.bias_mask"),
        (lambda sd: sd.pop("storage_tokens"), "storage_tokens"),
        (lambda sd: sd.__setitem__("rope_embed.periods", torch.ones(8)), "rope_embed.periods"),
        (lambda sd: sd.__setitem__("cls_norm.weight", torch.ones(48)), "cls_norm.weight"),
    ],
)
def test_bad_checkpoint_error_names_the_key(edit, named, tmp_path):
    sd = randomize(build_backbone("dinov3_vits16", **SMALL), 0)
    edit(sd)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
        load_backbone_weights(build_backbone("dinov3_vits16", **SMALL), path)
