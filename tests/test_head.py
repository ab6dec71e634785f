"""DINO head: official key names, weight norm, frozen g, multi-crop batching, optimiser groups."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training.backbones import build_backbone
from training.head import (
    DINOHead,
    MultiCropWrapper,
    cancel_last_layer_gradients,
    get_params_groups,
)


def test_official_key_names_and_shapes():
    head = DINOHead(384, 65536)
    got = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert got == {
        "mlp.0.weight": (2048, 384),
        "mlp.0.bias": (2048,),
        "mlp.2.weight": (2048, 2048),
        "mlp.2.bias": (2048,),
        "mlp.4.weight": (256, 2048),
        "mlp.4.bias": (256,),
        "last_layer.weight_g": (65536, 1),
        "last_layer.weight_v": (65536, 256),
    }
    bn = DINOHead(8, 16, use_bn=True, hidden_dim=12, bottleneck_dim=4)
    assert [type(m).__name__ for m in bn.mlp] == [
        "Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU", "Linear"
    ]  # fmt: skip


def test_weight_norm_frozen_g_and_forward_value():
    torch.manual_seed(0)
    head = DINOHead(16, 10, hidden_dim=32, bottleneck_dim=8)
    assert torch.equal(head.last_layer.weight_g, torch.ones(10, 1))
    assert not head.last_layer.weight_g.requires_grad
    assert head.last_layer.weight_v.requires_grad
    assert "bias" not in dict(head.last_layer.named_parameters())
    assert DINOHead(16, 10, norm_last_layer=False).last_layer.weight_g.requires_grad
    assert head.mlp[0].bias.abs().sum() == 0
    assert 0.01 < head.mlp[0].weight.std() < 0.03  # trunc_normal(std=.02)

    x = torch.randn(5, 16)
    out = head(x)
    assert out.shape == (5, 10)
    # Independent computation: MLP, L2 norm, then rows of V scaled to norm g.
    m = head.mlp
    z = m[4](F.gelu(m[2](F.gelu(m[0](x)))))
    z = z / z.norm(dim=1, keepdim=True)
    v, g = head.last_layer.weight_v, head.last_layer.weight_g
    w = g * v / v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(out, z @ w.T)
    # With unit-norm prototypes, every logit is a cosine: |logit| <= 1.
    assert out.abs().max() <= 1 + 1e-6

    out.sum().backward()
    assert head.last_layer.weight_g.grad is None and head.last_layer.weight_v.grad is not None


def test_multicrop_wrapper_mixed_sizes_equals_per_crop():
    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny", patch_size=8, depth=1, img_size=32)
    model = MultiCropWrapper(backbone, DINOHead(192, 20, hidden_dim=32, bottleneck_dim=8)).eval()
    assert set(model.state_dict()) == {f"backbone.{k}" for k in backbone.state_dict()} | {
        f"head.{k}" for k in model.head.state_dict()
    }
    crops = [torch.randn(3, 3, 32, 32) for _ in range(2)] + [
        torch.randn(3, 3, 16, 16) for _ in range(3)
    ]
    calls = []
    hook = backbone.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    with torch.no_grad():
        out = model(crops)
        hook.remove()
        per_crop = torch.cat([model.head(backbone(c)) for c in crops])
    assert calls == [(6, 3, 32, 32), (9, 3, 16, 16)]  # one backbone call per resolution
    assert out.shape == (15, 20)
    torch.testing.assert_close(out, per_crop, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(crops[0]), per_crop[:3], atol=1e-5, rtol=1e-5)


def test_cancel_last_layer_gradients_only_while_frozen():
    model = MultiCropWrapper(
        build_backbone("vit_tiny", patch_size=8, depth=1, img_size=16),
        DINOHead(192, 6, norm_last_layer=False, hidden_dim=8, bottleneck_dim=4),
    )

    def step(epoch: int) -> None:
        model.zero_grad()
        model([torch.randn(2, 3, 16, 16)]).sum().backward()
        cancel_last_layer_gradients(model, epoch, freeze_last_layer_epochs=1)

    step(0)
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["head.last_layer.weight_v"] is None and grads["head.last_layer.weight_g"] is None
    assert grads["head.mlp.0.weight"] is not None and grads["backbone.cls_token"] is not None
    step(1)
    assert model.head.last_layer.weight_v.grad is not None


def test_params_groups_no_decay_on_biases_and_norms():
    model = MultiCropWrapper(
        build_backbone("vit_tiny", patch_size=8, depth=1, img_size=16),
        DINOHead(192, 6, hidden_dim=8, bottleneck_dim=4),
    )
    groups = get_params_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[1]["weight_decay"] == 0.0 and "weight_decay" not in groups[0]
    assert "backbone.blocks.0.norm1.weight" in no_decay and "head.mlp.0.bias" in no_decay
    assert "backbone.blocks.0.attn.qkv.weight" in decay and "head.last_layer.weight_v" in decay
    assert all(not n.endswith(".bias") for n in decay)
    assert "head.last_layer.weight_g" not in decay | no_decay  # frozen: left out
    torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.04)  # accepted as is


def test_bad_dims_rejected():
    with pytest.raises(ValueError, match="positive"):
        DINOHead(0, 10)
