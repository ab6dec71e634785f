"""DINOv3 ConvNeXt: official key names, strict loading and the forward against a reference."""

from __future__ import annotations

import pytest
import torch
from family_reference import convnext_reference, official_keys, randomize, trim

from training.backbones import build_backbone
from training.checkpoints import CheckpointError, load_backbone_weights
from training.convnext import CONVNEXT_CONFIGS

SMALL = {"depths": (1, 2, 1, 1), "dims": (8, 16, 24, 32)}


@pytest.mark.parametrize("name", sorted(CONVNEXT_CONFIGS))
def test_name_alone_builds_the_official_state_dict(name):
    with torch.device("meta"):
        model = build_backbone(name)
    sd = model.state_dict()
    assert [(k, list(v.shape)) for k, v in sd.items() if k in trim(list(sd))] == official_keys(name)
    depths = [len(stage) for stage in model.stages]
    assert depths == list(CONVNEXT_CONFIGS[name]["depths"])
    assert depths[2] == (9 if name.endswith("tiny") else 27)


@pytest.mark.parametrize("size", [(64, 64), (96, 160), (224, 224)])
def test_forward_matches_reference(size, tmp_path):
    sd = randomize(build_backbone("dinov3_convnext_tiny", **SMALL), 0)
    path = tmp_path / "dinov3_convnext_tiny_pretrain_lvd1689m-00000000.pth"
    torch.save(sd, path)
    model = build_backbone("dinov3_convnext_tiny", **SMALL).eval()
    load_backbone_weights(model, path)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pooled, tokens = convnext_reference(sd, x)
        torch.testing.assert_close(model(x), pooled, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.forward_patch_tokens(x), tokens, atol=1e-5, rtol=0)
    assert tokens.shape[1] == (size[0] // 32) * (size[1] // 32)


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda sd: sd.pop("norms.3.weight"), "norms.3.weight"),
        (lambda sd: sd.__setitem__("stages.1.1.gamma", torch.ones(3)), "stages.1.1.gamma"),
        (lambda sd: sd.__setitem__("head.weight", torch.ones(3)), "head.weight"),
    ],
)
def test_bad_checkpoint_error_names_the_key(edit, named, tmp_path):
    sd = randomize(build_backbone("dinov3_convnext_tiny", **SMALL), 0)
    edit(sd)
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
        load_backbone_weights(build_backbone("dinov3_convnext_tiny", **SMALL), sd)
