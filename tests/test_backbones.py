"""Backbones against facts of the official DINO architecture, written out independently here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.backbones import build_backbone


def official_vit_small16_shapes() -> dict[str, tuple[int, ...]]:
    """Key names and shapes of the published dino_deitsmall16_pretrain.pth (ViT-S/16)."""
    d, hidden = 384, 1536
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 197, d),
        "patch_embed.proj.weight": (d, 3, 16, 16),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    for i in range(12):
        b = f"blocks.{i}."
        shapes |= {
            b + "norm1.weight": (d,),
            b + "norm1.bias": (d,),
            b + "attn.qkv.weight": (3 * d, d),
            b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d),
            b + "attn.proj.bias": (d,),
            b + "norm2.weight": (d,),
            b + "norm2.bias": (d,),
            b + "mlp.fc1.weight": (hidden, d),
            b + "mlp.fc1.bias": (hidden,),
            b + "mlp.fc2.weight": (d, hidden),
            b + "mlp.fc2.bias": (d,),
        }
    return shapes


@pytest.fixture(scope="module")
def vit_s16() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("vit_small", patch_size=16).eval()


def test_vit_small16_state_dict_matches_official(vit_s16):
    got = {k: tuple(v.shape) for k, v in vit_s16.state_dict().items()}
    assert got == official_vit_small16_shapes()
    eps = {m.eps for m in vit_s16.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert eps == {1e-6}
    assert vit_s16.embed_dim == 384 and vit_s16.num_heads == 6 and vit_s16.patch_size == 16


def reference_vit(sd: dict[str, torch.Tensor], x: torch.Tensor, heads: int, patch: int):
    """The DINO ViT forward from the state dict with plain tensor ops (CLS token, last attn)."""
    b = x.shape[0]
    tokens = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    tokens = tokens.flatten(2).transpose(1, 2)
    tokens = torch.cat([sd["cls_token"].expand(b, -1, -1), tokens], 1) + sd["pos_embed"]
    d = tokens.shape[-1]
    n_blocks = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    attn = None
    for i in range(n_blocks):
        p = {k[len(f"blocks.{i}.") :]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        h = F.layer_norm(tokens, (d,), p["norm1.weight"], p["norm1.bias"], eps=1e-6)
        qkv = h @ p["attn.qkv.weight"].T + p["attn.qkv.bias"]
        q, k, v = qkv.split(d, dim=-1)
        split = lambda t: t.reshape(b, -1, heads, d // heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        attn = torch.softmax(q @ k.transpose(-1, -2) / (d // heads) ** 0.5, dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(b, -1, d)
        tokens = tokens + y @ p["attn.proj.weight"].T + p["attn.proj.bias"]
        h = F.layer_norm(tokens, (d,), p["norm2.weight"], p["norm2.bias"], eps=1e-6)
        h = F.gelu(h @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"])
        tokens = tokens + h @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"]
    out = F.layer_norm(tokens, (d,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return out[:, 0], attn


def test_forward_equals_reference_at_training_size():
    torch.manual_seed(1)
    model = build_backbone("vit_tiny", patch_size=16, depth=2, img_size=64).eval()
    # Non-trivial norms and biases so a wrong eps or a missing bias would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(2, 3, 64, 64)
    ref_cls, ref_attn = reference_vit(model.state_dict(), x, heads=3, patch=16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref_cls, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.get_last_selfattention(x), ref_attn, atol=1e-5, rtol=0)


def test_pos_embed_interpolation_identity_and_non_square():
    torch.manual_seed(2)
    model = build_backbone("vit_tiny", patch_size=16, depth=1, img_size=64).eval()
    torch.testing.assert_close(model.interpolate_pos_encoding(4, 4), model.pos_embed)
    # Bicubic resampling to the same grid (forced path) is also the identity.
    cls, grid = model.pos_embed[:, :1], model.pos_embed[:, 1:].reshape(1, 4, 4, -1)
    same = F.interpolate(grid.permute(0, 3, 1, 2), size=(4, 4), mode="bicubic")
    torch.testing.assert_close(same.permute(0, 2, 3, 1).reshape(1, 16, -1), model.pos_embed[:, 1:])
    pe = model.interpolate_pos_encoding(10, 15)
    assert pe.shape == (1, 1 + 150, 192)
    torch.testing.assert_close(pe[:, :1], cls)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 160, 240)).shape == (1, 192)
        attn = model.get_last_selfattention(torch.randn(1, 3, 160, 240))
    assert attn.shape == (1, 3, 151, 151)


def test_patch8_non_square_attention_rows_sum_to_one():
    model = build_backbone("vit_tiny", patch_size=8, depth=2, img_size=32).eval()
    x = torch.randn(2, 3, 40, 24)
    with torch.no_grad():
        attn = model.get_last_selfattention(x)
        layers = model.get_intermediate_layers(x, n=2)
        cls, patches, cls_attn = model.forward_features(x)
    assert attn.shape == (2, 3, 1 + 5 * 3, 1 + 5 * 3)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, 16))
    assert [tuple(t.shape) for t in layers] == [(2, 16, 192), (2, 16, 192)]
    assert cls.shape == (2, 192) and patches.shape == (2, 15, 192)
    assert cls_attn.shape == (2, 3, 15)
    torch.testing.assert_close(layers[-1][:, 0], cls)


@pytest.mark.parametrize(("arch", "dim"), [("resnet18", 512), ("resnet50", 2048)])
def test_resnet_has_no_classifier(arch, dim):
    model = build_backbone(arch).eval()
    keys = model.state_dict().keys()
    assert not any(k.startswith("fc.") for k in keys)
    assert "conv1.weight" in keys and "layer4.0.conv1.weight" in keys
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, dim)
    assert model.family == "resnet" and model.embed_dim == dim


def test_bad_sizes_and_names_give_clear_errors():
    model = build_backbone("vit_tiny", patch_size=16, depth=1, img_size=32)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        model(torch.randn(1, 3, 40, 32))
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        build_backbone("vit_tiny", patch_size=16, img_size=30)
    with pytest.raises(ValueError, match="unknown arch"):
        build_backbone("vit_giant")
    with pytest.raises(ValueError, match="takes no extra options"):
        build_backbone("resnet18", depth=3)
