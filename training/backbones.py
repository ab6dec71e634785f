"""One entry point to every backbone: ``build_backbone(arch, patch_size, **kw)``."""

from __future__ import annotations

import torchvision
from torch import Tensor, nn

from training.vision_transformer import VIT_SIZES, VisionTransformer, build_vit

RESNETS = {"resnet18": 512, "resnet50": 2048}
ARCHS = sorted([*VIT_SIZES, *RESNETS])


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


def build_backbone(arch: str, patch_size: int = 16, **kw: object) -> VisionTransformer | nn.Module:
    """Build ``vit_tiny|vit_small|vit_base`` (any patch size; ``kw`` such as ``img_size``,
    ``depth``, ``drop_path_rate`` go to the ViT) or ``resnet18|resnet50`` (torchvision, no fc)."""
    if arch in VIT_SIZES:
        return build_vit(arch, patch_size=patch_size, **kw)
    if arch in RESNETS:
        if kw:
            raise ValueError(f"{arch} takes no extra options, got {sorted(kw)}")
        return ResNetBackbone(arch)
    raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
