"""One entry point to every backbone: ``build_backbone(arch, patch_size, **kw)``."""

from __future__ import annotations

from collections.abc import Mapping

import torchvision
from torch import Tensor, nn

from training.convnext import CONVNEXT_CONFIGS, build_convnext
from training.dinov2 import DINOV2_CONFIGS, build_dinov2
from training.dinov3 import DINOV3_CONFIGS, build_dinov3
from training.vision_transformer import VIT_SIZES, VisionTransformer, build_vit

RESNETS = {"resnet18": 512, "resnet50": 2048}
# Official hub names: the name alone builds the published configuration (docs/models.md).
FAMILY_BUILDERS = {
    **{name: build_dinov2 for name in DINOV2_CONFIGS},
    **{name: build_dinov3 for name in DINOV3_CONFIGS},
    **{name: build_convnext for name in CONVNEXT_CONFIGS},
}
ARCHS = sorted([*VIT_SIZES, *RESNETS, *FAMILY_BUILDERS])


def family_patch_size(arch: str) -> int | None:
    """The patch size a DINOv2/DINOv3 ViT hub name fixes (None for other names)."""
    return 14 if arch in DINOV2_CONFIGS else 16 if arch in DINOV3_CONFIGS else None


def is_token_vit(arch: str) -> bool:
    """A ViT of any family: has patch tokens, attention and a patch size."""
    return arch in VIT_SIZES or family_patch_size(arch) is not None


def is_family_arch(arch: str) -> bool:
    """True for a DINOv2/DINOv3 hub name (fixed patch size, built by name alone)."""
    return arch in FAMILY_BUILDERS


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without its classifier: ``forward`` gives pooled features ``[B, D]``.

    The torchvision modules are attributes of this class directly (``conv1``, ``layer1``, ...), so
    the state-dict keys are those of the official DINO ResNet-50 checkpoint.
    """

    family = "resnet"
    patch_size = None
    num_heads = None

    def __init__(self, arch: str) -> None:
        super().__init__()
        net = getattr(torchvision.models, arch)(weights=None)
        net.fc = nn.Identity()
        for name, module in net.named_children():
            self.add_module(name, module)
        self.embed_dim = self.num_features = RESNETS[arch]
        self.depth = None

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def family_kwargs(arch: str, sd: Mapping[str, Tensor]) -> dict:
    """Constructor overrides that make a hub-name model fit a checkpoint of it trained here at a
    smaller depth or position grid (the official files give the official configuration)."""
    kw: dict = {}
    blocks = {k.split(".")[1] for k in sd if k.startswith("blocks.")}
    if blocks:
        kw["depth"] = len(blocks)
    pos = sd.get("pos_embed")
    weight = sd.get("patch_embed.proj.weight")
    if pos is not None and weight is not None:
        kw["img_size"] = round((pos.shape[1] - 1) ** 0.5) * weight.shape[-1]
    return kw


def build_backbone(
    arch: str, patch_size: int | None = None, **kw: object
) -> VisionTransformer | nn.Module:
    """Build ``vit_tiny|vit_small|vit_base`` (any patch size, default 16; ``kw`` such as
    ``img_size``, ``depth``, ``drop_path_rate`` go to the ViT), ``resnet18|resnet50``
    (torchvision, no fc) or a DINOv2/DINOv3 hub name such as ``dinov2_vits14_reg`` (its official
    configuration; ``kw`` overrides, e.g. a smaller ``depth``; ``patch_size`` is ignored because
    the name fixes it)."""
    if arch in VIT_SIZES:
        return build_vit(arch, patch_size=patch_size or 16, **kw)
    if arch in FAMILY_BUILDERS:
        return FAMILY_BUILDERS[arch](arch, **kw)
    if arch in RESNETS:
        if kw:
            raise ValueError(f"{arch} takes no extra options, got {sorted(kw)}")
        return ResNetBackbone(arch)
    raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
